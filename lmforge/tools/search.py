"""Local search over the user's own documents: SQLite FTS5 with BM25, English and Russian.

    from lmforge.tools.search import build_index, search
    report = build_index("~/notes", "~/.cache/lmforge/index.sqlite")    # incremental
    for hit in search("~/.cache/lmforge/index.sqlite", "capital of France", k=3):
        print(hit.relpath, hit.line, hit.snippet)

Files: .txt .text .md .markdown .rst .html .htm .pdf (PDF needs `pypdf`; without it each PDF is
reported as skipped with that reason). Text is cut into chunks of `chunk_chars` characters that
overlap by `overlap` characters, ending at whitespace where possible; each chunk keeps its
character offsets in the file's text (for HTML and PDF: in the extracted text, per page for PDF)
and its line number, so a hit can be cited as file, line and characters.

Words are matched after stemming: every chunk's words are lowercased, `ё` becomes `е`, and
Snowball stems them (English for Latin script, Russian for Cyrillic; `snowballstemmer`, pure
Python). The FTS5 table indexes this stemmed shadow text (`stems`, tokenizer
`unicode61 remove_diacritics 2`); the chunk's own text is kept beside it for snippets. Without
`snowballstemmer` words are indexed unstemmed (the index records which, and queries follow it).

Re-indexing is incremental by file sha256: unchanged files are skipped, changed ones re-chunked,
files gone from the folder removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import html.parser
import os
import re
import sqlite3
from pathlib import Path
from typing import Iterable

from lmforge.errors import LmforgeError
from lmforge.paths import lmforge_home

SCHEMA_VERSION = "1"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
MAX_FILE_BYTES = 50 * 2**20
_WORD = re.compile(r"\w+", re.UNICODE)
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
# Words too common to help ranking (BM25 already discounts them; dropping them from queries keeps
# "what is the ..." from matching every chunk).
STOPWORDS = set("""
a an and are as at be but by for from has have how i in is it its of on or that the this to was
were what when where which who why will with you your do does did can about into than then there
и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только ее мне
было вот от меня еще нет о из ему теперь когда даже ну вдруг ли если уже или ни быть был него до
вас нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя
их чем была сам чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого
какой совсем ним здесь этом один почти мой тем чтобы нее сейчас были куда зачем всех никогда
можно при наконец два об другой хоть после над больше тот через эти нас про всего них какая много
разве три эту моя впрочем хорошо свою этой перед иногда лучше чуть том нельзя такой им более
всегда конечно всю между это
""".split())


def default_index_path() -> Path:
    """$LMFORGE_HOME/index.sqlite (default ~/.cache/lmforge/index.sqlite)."""
    return lmforge_home() / "index.sqlite"


# ---------------------------------------------------------------- stemming


class _Stemmer:
    """Lowercase + Snowball stem per script; identity when snowballstemmer is missing."""

    def __init__(self, enabled: bool = True):
        self.enabled = False
        if enabled:
            try:
                import snowballstemmer

                self._en = snowballstemmer.stemmer("english")
                self._ru = snowballstemmer.stemmer("russian")
                self.enabled = True
            except ImportError:
                pass
        self._cache: dict[str, str] = {}

    def __call__(self, word: str) -> str:
        w = word.lower().replace("ё", "е")
        if not self.enabled:
            return w
        s = self._cache.get(w)
        if s is None:
            s = (self._ru if _CYRILLIC.search(w) else self._en).stemWord(w)
            if len(self._cache) < 200_000:
                self._cache[w] = s
        return s


def _stems(text: str, stem: _Stemmer) -> str:
    return " ".join(stem(m.group()) for m in _WORD.finditer(text))


# ---------------------------------------------------------------- text extraction


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "pre", "blockquote", "title", "dt", "dd", "hr"}
    SKIP = {"script", "style", "noscript", "template", "svg"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        t = "".join(self.parts)
        t = re.sub(r"[ \t\r\f\v]+", " ", t)
        t = re.sub(r" ?\n ?", "\n", t)
        return re.sub(r"\n{3,}", "\n\n", t).strip()


def _decode(data: bytes) -> str:
    for enc in ("utf-8-sig", "cp1251" if _looks_cp1251(data) else "latin-1"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def _looks_cp1251(data: bytes) -> bool:
    high = sum(1 for b in data[:4096] if b >= 0xC0)
    return high > 16


def extract_pages(path: Path, data: bytes) -> list[tuple[int | None, str]]:
    """[(page or None, text)] of a file; PDF gives one entry per page."""
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        try:
            from pypdf import PdfReader
        except ImportError:
            raise LmforgeError("indexing PDF files needs pypdf: pip install pypdf") from None
        import io
        import logging

        logging.getLogger("pypdf").setLevel(logging.ERROR)
        try:
            reader = PdfReader(io.BytesIO(data))
            return [(i + 1, (p.extract_text() or "")) for i, p in enumerate(reader.pages)]
        except Exception as e:  # noqa: BLE001 - pypdf raises many kinds on broken files
            raise LmforgeError(f"cannot read PDF: {type(e).__name__}: {e}") from None
    text = _decode(data)
    if suffix in HTML_SUFFIXES:
        parser = _HTMLText()
        parser.feed(text)
        parser.close()
        return [(None, parser.text())]
    return [(None, text.replace("\r\n", "\n"))]


def chunk_text(text: str, chunk_chars: int = 1000, overlap: int = 200) -> list[tuple[int, int]]:
    """(start, end) character spans covering `text`, ~chunk_chars long, overlapping, cut at spaces."""
    if chunk_chars <= 0 or overlap < 0 or overlap >= chunk_chars:
        raise LmforgeError(f"chunking needs 0 <= overlap < chunk_chars, got {overlap} and {chunk_chars}")
    n = len(text)
    spans = []
    start = 0
    while start < n:
        end = min(n, start + chunk_chars)
        if end < n:  # end at whitespace, looking back at most a fifth of a chunk
            cut = max(text.rfind(c, end - chunk_chars // 5, end) for c in ("\n", " "))
            if cut > start:
                end = cut
        if text[start:end].strip():
            spans.append((start, end))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        # start the next chunk on a word boundary too
        sp = text.find(" ", nxt, end)
        nl = text.find("\n", nxt, end)
        cands = [c + 1 for c in (sp, nl) if c >= 0]
        start = min(cands) if cands else nxt
    return spans


# ---------------------------------------------------------------- the index


def _connect(path: str | Path, create: bool) -> sqlite3.Connection:
    path = Path(path).expanduser()
    if not create and not path.exists():
        raise LmforgeError(f"no search index at {path} (build one: lmforge index build --data DIR --out {path})")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path))
    con.execute("PRAGMA foreign_keys = ON")
    if create:
        try:
            con.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS files(
                    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, root TEXT NOT NULL,
                    relpath TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER, n_chunks INTEGER);
                CREATE TABLE IF NOT EXISTS chunks(
                    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                    page INTEGER, start INTEGER NOT NULL, end INTEGER NOT NULL, line INTEGER NOT NULL,
                    text TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS chunks_file ON chunks(file_id);
                CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
                    stems, tokenize="unicode61 remove_diacritics 2");
                """
            )
        except sqlite3.DatabaseError as e:
            con.close()
            if "fts5" in str(e).lower():
                raise LmforgeError("this Python's sqlite3 has no FTS5; search needs SQLite built with FTS5") from None
            raise LmforgeError(f"{path} is not an lmforge search index: {e}") from None
    return con


def _meta(con: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(con.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError:
        raise LmforgeError("not an lmforge search index (no meta table)") from None


@dataclasses.dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    chunks: int = 0  # chunks written in this run
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        s = f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.unchanged} unchanged, {self.chunks} chunks written"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        return s


def _iter_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.suffix.lower() in SUFFIXES and p.is_file():
                yield p


def _delete_file(con: sqlite3.Connection, file_id: int) -> None:
    ids = [r[0] for r in con.execute("SELECT id FROM chunks WHERE file_id = ?", (file_id,))]
    con.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
    con.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
    con.execute("DELETE FROM files WHERE id = ?", (file_id,))


def build_index(data: str | Path, out: str | Path | None = None, chunk_chars: int = 1000, overlap: int = 200,
                stemming: bool = True, progress: bool = False) -> IndexReport:
    """Index (or re-index) every supported file under `data` into the SQLite file `out`."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise LmforgeError(f"--data must be a folder of documents; {root} is not one")
    out = Path(out).expanduser() if out else default_index_path()
    con = _connect(out, create=True)
    report = IndexReport()
    try:
        meta = _meta(con)
        if meta and meta.get("version") != SCHEMA_VERSION:
            raise LmforgeError(f"{out} was built by another lmforge index version ({meta.get('version')}); remove it and rebuild")
        if meta:
            chunk_chars, overlap = int(meta["chunk_chars"]), int(meta["overlap"])
            stem = _Stemmer(meta["stemming"] == "snowball")
            if meta["stemming"] == "snowball" and not stem.enabled:
                raise LmforgeError(f"{out} was built with stemming, which needs snowballstemmer: pip install snowballstemmer")
        else:
            stem = _Stemmer(stemming)
            con.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("version", SCHEMA_VERSION), ("chunk_chars", str(chunk_chars)), ("overlap", str(overlap)),
                ("stemming", "snowball" if stem.enabled else "none")])
        known = {row[0]: (row[1], row[2]) for row in con.execute(
            "SELECT path, id, sha256 FROM files WHERE root = ?", (str(root),))}
        seen = set()
        files = list(_iter_files(root))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(files), desc="indexing", unit="file")
        for path in files:
            if bar:
                bar.update(1)
            key = str(path)
            seen.add(key)
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    report.skipped.append((key, f"larger than {MAX_FILE_BYTES >> 20} MB"))
                    continue
                data_bytes = path.read_bytes()
            except OSError as e:
                report.skipped.append((key, f"cannot read: {e.strerror}"))
                continue
            digest = hashlib.sha256(data_bytes).hexdigest()
            old = known.get(key)
            if old is not None and old[1] == digest:
                report.unchanged += 1
                continue
            try:
                pages = extract_pages(path, data_bytes)
            except LmforgeError as e:
                report.skipped.append((key, str(e)))
                continue
            if old is not None:
                _delete_file(con, old[0])
            cur = con.execute("INSERT INTO files(path, root, relpath, sha256, size, n_chunks) VALUES (?, ?, ?, ?, ?, 0)",
                              (key, str(root), path.relative_to(root).as_posix(), digest, len(data_bytes)))
            file_id = cur.lastrowid
            n = 0
            for page, text in pages:
                line_starts = _line_starts(text)
                for start, end in chunk_text(text, chunk_chars, overlap):
                    chunk = text[start:end]
                    c = con.execute("INSERT INTO chunks(file_id, page, start, end, line, text) VALUES (?, ?, ?, ?, ?, ?)",
                                    (file_id, page, start, end, _line_of(line_starts, start), chunk))
                    con.execute("INSERT INTO chunks_fts(rowid, stems) VALUES (?, ?)", (c.lastrowid, _stems(chunk, stem)))
                    n += 1
            con.execute("UPDATE files SET n_chunks = ? WHERE id = ?", (n, file_id))
            report.chunks += n
            if old is None:
                report.added += 1
            else:
                report.updated += 1
        for key, (file_id, _) in known.items():
            if key not in seen:
                _delete_file(con, file_id)
                report.removed += 1
        con.commit()
        if bar:
            bar.close()
    finally:
        con.close()
    return report


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


def _line_of(line_starts: list[int], pos: int) -> int:
    import bisect

    return bisect.bisect_right(line_starts, pos)


# ---------------------------------------------------------------- querying


@dataclasses.dataclass
class SearchHit:
    path: str  # absolute path of the file
    relpath: str  # path inside the indexed folder
    page: int | None  # PDF page (1-based), None for other files
    line: int  # line of the snippet's first matching word in the file's (extracted) text, 1-based
    start: int  # character offsets of the snippet in the file's (page's) text
    end: int
    score: float  # BM25 (higher is better)
    snippet: str

    def cite(self) -> str:
        where = f"page {self.page}, " if self.page is not None else ""
        return f"{self.relpath}, {where}line {self.line} (chars {self.start}-{self.end})"


def _query_terms(query: str, stem: _Stemmer) -> list[str]:
    words = [m.group() for m in _WORD.finditer(query)]
    kept = [w for w in words if w.lower().replace("ё", "е") not in STOPWORDS] or words
    terms = []
    for w in kept:
        s = stem(w)
        if s and s not in terms:
            terms.append(s)
    return terms


def _snippet(text: str, terms: set[str], stem: _Stemmer, width: int) -> tuple[int, int, str, int]:
    """The window of ~width characters with the most distinct query terms:
    (start, end, text, position of its first matching word)."""
    hits = [(m.start(), m.end()) for m in _WORD.finditer(text) if stem(m.group()) in terms]
    center = 0
    if not hits:
        s, e = 0, min(len(text), width)
    else:
        best, best_i = -1, 0
        for i, (hs, _) in enumerate(hits):
            found = {stem(text[a:b]) for a, b in hits[i:] if a < hs + width}
            if len(found) > best:
                best, best_i = len(found), i
        center = hits[best_i][0]
        s = max(0, center - width // 4)
        e = min(len(text), s + width)
        s = max(0, min(s, e - width))
    # widen to word boundaries
    while s > 0 and not text[s - 1].isspace() and s > 0 and len(text[s - 1:e]) < width + 20:
        s -= 1
    while e < len(text) and not text[e].isspace() and len(text[s:e + 1]) < width + 20:
        e += 1
    snippet = " ".join(text[s:e].split())
    return s, e, ("…" if s > 0 else "") + snippet + ("…" if e < len(text) else ""), center


def search(index: str | Path | None, query: str, k: int = 5, snippet_chars: int = 300) -> list[SearchHit]:
    """Top-k snippets for `query` by BM25 over the stemmed chunks; near-duplicate chunks merged."""
    index = Path(index).expanduser() if index else default_index_path()
    con = _connect(index, create=False)
    try:
        meta = _meta(con)
        stem = _Stemmer(meta.get("stemming") == "snowball")
        if meta.get("stemming") == "snowball" and not stem.enabled:
            raise LmforgeError("this index was built with stemming, which needs snowballstemmer: pip install snowballstemmer")
        terms = _query_terms(query, stem)
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        rows = con.execute(
            "SELECT c.id, c.page, c.start, c.line, c.text, f.path, f.relpath, -bm25(chunks_fts) AS score "
            "FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid JOIN files f ON f.id = c.file_id "
            "WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
            (match, max(k, 1) * 4),
        ).fetchall()
    except sqlite3.Error as e:
        raise LmforgeError(f"search in {index} failed: {e}") from None
    finally:
        con.close()
    hits: list[SearchHit] = []
    term_set = set(terms)
    for cid, page, cstart, line, text, path, relpath, score in rows:
        s, e, snip, first = _snippet(text, term_set, stem, snippet_chars)
        start, end = cstart + s, cstart + e
        if any(h.path == path and h.page == page and start < h.end and h.start < end for h in hits):
            continue  # overlapping chunks give the same passage twice
        hits.append(SearchHit(path, relpath, page, line + text.count("\n", 0, first), start, end, float(score), snip))
        if len(hits) >= k:
            break
    return hits


def search_tool(query: str, index: str | Path | None = None, k: int = 5) -> str:
    """The `search` tool's text: numbered snippets, each with file, line and characters to cite."""
    hits = search(index, query, k=k)
    if not hits:
        return f"No results for {query!r} in the indexed documents."
    parts = [f"[{i}] {h.cite()}:\n{h.snippet}" for i, h in enumerate(hits, 1)]
    return "\n\n".join(parts)


def index_stats(index: str | Path | None = None) -> dict:
    index = Path(index).expanduser() if index else default_index_path()
    con = _connect(index, create=False)
    try:
        meta = _meta(con)
        files = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        roots = [r[0] for r in con.execute("SELECT DISTINCT root FROM files")]
    finally:
        con.close()
    return {"index": str(index), "files": files, "chunks": chunks, "roots": roots, **meta}
