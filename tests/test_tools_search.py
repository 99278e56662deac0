"""Local search: FTS5/BM25 index of text, Markdown, HTML and PDF; English and Russian; incremental."""
from __future__ import annotations

import sqlite3
import sys

import pytest

from lmforge.cli.main import main
from lmforge.errors import LmforgeError
from lmforge.tools.search import build_index, chunk_text, extract_pages, search, search_tool

FILLER_EN = "The weather report mentioned clouds over the hills and a quiet afternoon. " * 3
FILLER_RU = "Сводка погоды сообщала об облаках над холмами и тихом вечере. " * 3


def _docs(root):
    (root / "travel").mkdir(parents=True)
    (root / "travel" / "paris.md").write_text(
        "# Travel notes\n\n" + FILLER_EN + "\n\nParis is the capital of France. The Eiffel Tower was completed in 1889.\n"
        + FILLER_EN + "\n", encoding="utf-8")
    (root / "garden.txt").write_text(
        FILLER_EN + "\nThe gardener was running between the apple trees while his dogs barked.\n", encoding="utf-8")
    (root / "library.txt").write_text(
        FILLER_RU + "\nВ старой библиотеке хранятся редкие книги о путешествиях.\n" + FILLER_RU, encoding="utf-8")
    (root / "cats.html").write_text(
        "<html><head><title>Cats</title><style>.hidden{color:red}</style>"
        "<script>var password = 'hunter2';</script></head><body><h1>About cats</h1>"
        "<p>Cats are small carnivorous mammals &amp; loyal companions.</p><p>Кошки любят спать на солнце.</p></body></html>",
        encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00capital of France\x00")
    return root


@pytest.fixture()
def indexed(tmp_path):
    data = _docs(tmp_path / "docs")
    db = tmp_path / "index.sqlite"
    report = build_index(data, db)
    return data, db, report


def test_chunks_cover_the_text_with_overlap():
    text = " ".join(f"word{i}" for i in range(800))
    spans = chunk_text(text, chunk_chars=300, overlap=60)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 - s0 <= 300 and s0 < s1 <= e0, (s0, e0, s1, e1)  # ordered, overlapping or touching
        assert e0 - s1 <= 60
        assert text[s1 - 1] == " " and (e0 == len(text) or text[e0] == " ")  # cut at word boundaries
    covered = "".join(text[s:e] for s, e in spans)
    assert all(f"word{i}" in covered for i in range(800))
    with pytest.raises(LmforgeError):
        chunk_text(text, 100, 100)


def test_english_search_cites_file_line_and_offsets(indexed):
    data, db, report = indexed
    assert (report.added, report.updated, report.removed, report.unchanged) == (4, 0, 0, 0)
    hits = search(db, "What is the capital of France?", k=3)
    top = hits[0]
    assert top.relpath == "travel/paris.md"
    assert "Paris is the capital of France" in top.snippet
    text = (data / "travel" / "paris.md").read_text()
    assert " ".join(text[top.start:top.end].split()) in top.snippet  # offsets point at the snippet
    assert text.splitlines()[top.line - 1].startswith("Paris is the capital")
    out = search_tool("capital of France", index=db, k=2)
    assert out.startswith(f"[1] travel/paris.md, line {top.line} (chars ")
    assert "Paris is the capital of France" in out


def test_english_stemming(indexed):
    _, db, _ = indexed
    hits = search(db, "run dog", k=2)  # the text says "running" and "dogs"
    assert hits and hits[0].relpath == "garden.txt" and "running" in hits[0].snippet


def test_russian_stemming(indexed):
    _, db, _ = indexed
    for query in ("книга", "библиотека", "редкой книгой", "путешествие"):
        hits = search(db, query, k=2)
        assert hits and hits[0].relpath == "library.txt", query
        assert "библиотеке" in hits[0].snippet
    assert search(db, "кошка", k=1)[0].relpath == "cats.html"


def test_html_text_only(indexed):
    data, db, _ = indexed
    assert search(db, "hunter2 password", k=3) == []  # script content is not text
    assert search(db, "hidden color", k=3) == []
    hit = search(db, "carnivorous companions", k=1)[0]
    assert hit.relpath == "cats.html" and "mammals & loyal" in hit.snippet  # entities decoded
    assert search(db, "capital France", k=5)[0].relpath != "ignored.bin"


def test_incremental_reindex(indexed, tmp_path):
    data, db, _ = indexed
    again = build_index(data, db)
    assert (again.added, again.updated, again.removed, again.unchanged, again.chunks) == (0, 0, 0, 4, 0)

    (data / "garden.txt").write_text("Tomatoes ripen in August in the greenhouse.\n")
    (data / "library.txt").unlink()
    (data / "travel" / "rome.txt").write_text("Rome is the capital of Italy.\n")
    r = build_index(data, db)
    assert (r.added, r.updated, r.removed, r.unchanged) == (1, 1, 1, 2)
    assert search(db, "run dog") == []
    assert search(db, "tomatoes greenhouse")[0].relpath == "garden.txt"
    assert search(db, "книга") == []
    assert search(db, "capital of Italy")[0].relpath == "travel/rome.txt"
    con = sqlite3.connect(db)
    n_chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    n_fts = con.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
    n_files = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    con.close()
    assert n_chunks == n_fts and n_files == 4  # no orphans left by updates and deletions


def _pdf(text: str) -> bytes:
    """A one-page PDF with Helvetica text, written by hand (byte offsets in the xref)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_pdf_pages(tmp_path):
    pytest.importorskip("pypdf")
    data = tmp_path / "pdfs"
    data.mkdir()
    (data / "volcano.pdf").write_bytes(_pdf("Volcanoes erupt molten basalt near Iceland"))
    r = build_index(data, tmp_path / "i.sqlite")
    assert r.added == 1 and not r.skipped
    hit = search(tmp_path / "i.sqlite", "volcano eruption iceland")[0]
    assert hit.relpath == "volcano.pdf" and hit.page == 1 and "basalt" in hit.snippet
    assert "page 1" in hit.cite()


def test_pdf_without_pypdf_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf -> ImportError
    data = tmp_path / "pdfs"
    data.mkdir()
    (data / "a.pdf").write_bytes(_pdf("hello"))
    (data / "b.txt").write_text("hello there")
    r = build_index(data, tmp_path / "i.sqlite")
    assert r.added == 1 and len(r.skipped) == 1 and "pip install pypdf" in r.skipped[0][1]
    with pytest.raises(LmforgeError, match="pypdf"):
        extract_pages(data / "a.pdf", b"%PDF")


def test_errors_are_clear(tmp_path):
    with pytest.raises(LmforgeError, match="no search index"):
        search(tmp_path / "missing.sqlite", "x")
    with pytest.raises(LmforgeError, match="not a folder|must be a folder"):
        build_index(tmp_path / "nope", tmp_path / "i.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database at all" * 100)
    with pytest.raises(LmforgeError):
        search(bad, "x")


def test_cli_build_and_search(tmp_path, capsys):
    data = _docs(tmp_path / "docs")
    db = tmp_path / "cli.sqlite"
    assert main(["index", "build", "--data", str(data), "--out", str(db)]) == 0
    assert "4 added" in capsys.readouterr().out
    assert main(["index", "search", "--index", str(db), "--query", "столица путешествия книги", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] library.txt, line") and "библиотеке" in out
    assert main(["index", "build", "--out", str(db)]) == 2  # --data missing: a one-line error
    assert "needs --data" in capsys.readouterr().err
