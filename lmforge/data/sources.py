"""Documents from what people have: text files and folders, JSONL, parquet, Hugging Face datasets.

    for doc in iter_documents(["corpus/", "extra.jsonl", "hf:roneneldan/TinyStories:train"]):
        doc.id, doc.text

- A folder is walked in sorted order; `.txt .md .text .rst` files are one document each,
  `.jsonl` / `.jsonl.gz` files one document per line (the `text` field), `.parquet` one per row.
  Hidden files and folders are skipped, and so is any folder holding a `.heldout` marker file
  (held-out evaluation text, see lmforge.data.fetch); pass such a folder directly to read it.
- A file named directly is read by its suffix; an unknown suffix is read as plain text.
- `hf:NAME[:SPLIT]` loads a dataset with `datasets.load_dataset` (default split "train"); a
  folder written by `Dataset.save_to_disk` is loaded with `load_from_disk`. Both need `datasets`.

A document's id is its path relative to the folder that was passed (or the file's own name), with
`:LINE` or `:ROW` for JSONL lines and table rows: ids stay the same wherever the data lives, so
the train/val split that hashes them is the same on every machine.

Malformed input (bad JSON, a missing or non-string text field, bytes that are not UTF-8) raises
LmforgeError naming `file:line` with on_error="fail"; with on_error="skip" it is counted in
`ReadStats.errors` (the first messages kept) and reading goes on.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
HELDOUT_MARKER = ".heldout"  # written by lmforge.data.fetch beside held-out text


@dataclass
class Document:
    id: str
    text: str


@dataclass
class ReadStats:
    files: int = 0
    docs: int = 0
    bytes_read: int = 0  # file bytes consumed so far (for progress bars)
    errors: int = 0
    messages: list[str] = field(default_factory=list)  # the first few error messages
    heldout_skipped: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    empty: int = 0  # records with no text but whitespace: skipped, counted, reported
    empty_where: list[str] = field(default_factory=list)  # the first few of them

    def skip_empty(self, where: str) -> None:
        self.empty += 1
        if len(self.empty_where) < 20:
            self.empty_where.append(where)

    def error(self, msg: str, on_error: str) -> None:
        if on_error == "fail":
            raise LmforgeError(msg)
        self.errors += 1
        if len(self.messages) < 20:
            self.messages.append(msg)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()) and (
        (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    )


def walk(root: Path, stats: ReadStats | None = None) -> list[Path]:
    """Readable files under root in sorted order; skips hidden entries and `.heldout` folders."""
    out = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if (p / HELDOUT_MARKER).exists():
                if stats is not None:
                    stats.heldout_skipped.append(str(p))
                continue
            out += walk(p, stats)
        elif p.is_file():
            if _kind(p):
                out.append(p)
            elif stats is not None:
                stats.unsupported.append(str(p))
    return out


def plan(paths: list[str | Path], stats: ReadStats | None = None) -> list[tuple[str, Path | str, str]]:
    """(kind, path or dataset spec, id prefix) for every input, expanding folders; checks existence."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    items: list[tuple[str, Path | str, str]] = []
    for spec in paths:
        s = str(spec)
        if s.startswith("hf:"):
            items.append(("hf", s[3:], s))
            continue
        p = Path(s).expanduser()
        if _is_hf_saved(p):
            items.append(("hf-disk", p, p.name))
        elif p.is_dir():
            files = walk(p, stats)
            if not files and (stats is None or not stats.heldout_skipped):
                raise LmforgeError(f"no readable files ({', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet) in {p}")
            items += [(_kind(f), f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            items.append((_kind(p) or "text", p, p.name))
        else:
            raise LmforgeError(f"data path not found: {p} (for a Hugging Face dataset write hf:NAME[:SPLIT])")
    return items


def total_bytes(items) -> int | None:
    """Sum of the input files' sizes, or None when a dataset's size is unknown."""
    n = 0
    for kind, p, _ in items:
        if kind in ("hf", "hf-disk"):
            return None
        n += p.stat().st_size
    return n


def _read_text(path: Path, prefix: str, stats: ReadStats, on_error: str) -> Iterator[Document]:
    data = path.read_bytes()
    stats.bytes_read += len(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.error(f"{path}: not UTF-8 text (byte {e.start})", on_error)
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    if text.strip():
        yield Document(prefix, text)
    else:
        stats.skip_empty(str(path))


def _read_jsonl(path: Path, prefix: str, stats: ReadStats, on_error: str, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                stats.error(f"{path}:{lineno}: malformed JSON line ({e})", on_error)
                continue
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                what = "missing" if not isinstance(rec, dict) or text_field not in rec else f"not a string ({type(text).__name__})"
                stats.error(f"{path}:{lineno}: field '{text_field}' {what}", on_error)
                continue
            if text.strip():
                yield Document(f"{prefix}:{lineno}", text)
            else:
                stats.skip_empty(f"{path}:{lineno}")


def _read_parquet(path: Path, prefix: str, stats: ReadStats, on_error: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmforgeError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        stats.error(f"{path}: not a readable parquet file ({e})", on_error)
        return
    if text_field not in pf.schema_arrow.names:
        stats.error(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})", on_error)
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                stats.error(f"{path}:row {row}: '{text_field}' is {type(text).__name__}, not a string", on_error)
                continue
            if text.strip():
                yield Document(f"{prefix}:{row}", text)
            else:
                stats.skip_empty(f"{path}:row {row}")
    stats.bytes_read += path.stat().st_size


def _read_hf(kind: str, spec, prefix: str, stats: ReadStats, on_error: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise LmforgeError(f"reading {spec} needs the Hugging Face datasets package (pip install datasets)") from None
    if kind == "hf-disk":
        ds = datasets.load_from_disk(str(spec))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        name, _, split = str(spec).partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:
            raise LmforgeError(f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if text_field not in ds.column_names:
        raise LmforgeError(f"dataset {spec} has no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    row = 0
    for batch in ds.iter(batch_size=1000):
        for text in batch[text_field]:
            row += 1
            if not isinstance(text, str):
                stats.error(f"{spec}:row {row}: '{text_field}' is {type(text).__name__}, not a string", on_error)
                continue
            if text.strip():
                yield Document(f"{prefix}:{row}", text)
            else:
                stats.skip_empty(f"{spec}:row {row}")


def iter_documents(
    paths, on_error: str = "fail", text_field: str = "text", stats: ReadStats | None = None, items=None
) -> Iterator[Document]:
    """Documents of every input in order (see the module docstring). `stats` collects counts."""
    if on_error not in ("fail", "skip"):
        raise LmforgeError(f"on_error must be fail or skip, got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    for kind, p, prefix in items if items is not None else plan(paths, stats):
        stats.files += 1
        if kind == "text":
            docs = _read_text(p, prefix, stats, on_error)
        elif kind == "jsonl":
            docs = _read_jsonl(p, prefix, stats, on_error, text_field)
        elif kind == "parquet":
            docs = _read_parquet(p, prefix, stats, on_error, text_field)
        else:
            docs = _read_hf(kind, p, prefix, stats, on_error, text_field)
        for d in docs:
            stats.docs += 1
            yield d


def read_text(paths) -> str:
    """All documents of `paths` joined by blank lines (for small held-out sets)."""
    return "\n\n".join(d.text.strip("\n") for d in iter_documents(paths))
