"""Strict dataclass configs from YAML recipes plus `--key value` overrides.

Every command's flags are its config's fields (snake_case, dotted for nesting), the same keys as
its YAML recipe. lmforge's own configs are strict: an unknown key is an error that names it.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import shutil
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lmforge.errors import LmforgeError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _is_optional(tp) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or say which key is wrong."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise LmforgeError(f"config key '{key}' may not be empty")
    tp = inner
    origin = get_origin(tp)
    try:
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise LmforgeError(f"config key '{key}' must be a mapping, got {value!r}")
            return from_dict(tp, value, prefix=key + ".")
        if origin is Literal:
            choices = get_args(tp)
            for c in choices:
                if str(c) == str(value):
                    return c
            raise LmforgeError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise LmforgeError(f"config key '{key}' must be true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, tuple):
            (elem,) = get_args(tp)[:1] or (Any,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise LmforgeError(f"config key '{key}' must be a mapping, got {value!r}")
            return dict(value)
    except (TypeError, ValueError):
        raise LmforgeError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors."""
    if data is None:
        data = {}
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), sorted(names), n=1)
        hint = f"did you mean '{prefix}{near[0]}'? " if near else ""
        raise LmforgeError(
            f"unknown config key '{prefix}{unknown[0]}' ({hint}known: {', '.join(sorted(names))})"
        )
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LmforgeError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"config file {path} must hold a mapping at the top")
    return data


def save_yaml(obj, path: str | Path) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _field_type(cls, dotted: str):
    """Declared type of a dotted key, or None if the key does not exist."""
    tp = cls
    for part in dotted.split("."):
        _, tp = _is_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = _hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def parse_args(cls, argv: list[str], prog: str | None = None):
    """`[--config FILE.yaml] [--key value | --flag] ... [positional ...]` into a `cls` instance.

    A field with `metadata={"positional": True}` collects bare arguments. `prog` (e.g. "sft")
    names the command in the error for an unknown flag.
    """
    data: dict = {}
    overrides: list[tuple[str, Any]] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            key, eq, val = tok[2:].partition("=")
            key = key.replace("-", "_")
            if key == "config":
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise LmforgeError("--config needs a YAML file")
                    val = argv[i]
                data = load_yaml(val)
                i += 1
                continue
            tp = _field_type(cls, key)
            if tp is None:
                raise LmforgeError(unknown_flag_message(cls, tok[2:].partition("=")[0], prog))
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                is_bool = _is_optional(tp)[1] is bool
                if is_bool and (nxt is None or nxt.startswith("--") or nxt.lower() not in _TRUE | _FALSE):
                    val = "true"
                else:
                    if nxt is None:
                        raise LmforgeError(f"option '--{key}' needs a value")
                    val = nxt
                    i += 1
            overrides.append((key, val))
        else:
            positional.append(tok)
        i += 1
    for key, val in overrides:
        set_dotted(data, key, val)
    if positional:
        pos_fields = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
        if not pos_fields:
            raise LmforgeError(f"unexpected argument '{positional[0]}' (options start with --)")
        f = pos_fields[0]
        tp = _hints(cls)[f.name]
        data[f.name] = positional if get_origin(_is_optional(tp)[1]) in (list, tuple) else positional[0]
        if len(positional) > 1 and not isinstance(data[f.name], list):
            raise LmforgeError(f"unexpected argument '{positional[1]}'")
    return from_dict(cls, data)


# ---------------------------------------------------------------------------------------------
# --help: every leaf flag by its dotted name, with type, default and the field's own description


_PRAGMAS = ("noqa", "type:", "pragma", "fmt:", "pylint:", "mypy:")


def _comment_text(tok: str) -> str:
    text = tok.lstrip("#").strip()
    return "" if text.lower().startswith(_PRAGMAS) else text


@functools.lru_cache(maxsize=None)
def _source_notes(cls) -> tuple[dict[str, str], str]:
    """(field name -> its source comment, class docstring) from `cls`'s own class body.

    A field's comment is the `# ...` trailing its line (or lines); without one, the block of
    comment lines directly above it. Empty when the source cannot be read (e.g. built at runtime).
    """
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, ValueError):
        return {}, ""
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}, ""
    comments: dict[int, tuple[str, bool]] = {}  # row -> (text, on a line of its own)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                comments[row] = (_comment_text(tok.string), not tok.line[:col].strip())
    except (tokenize.TokenError, SyntaxError):
        pass
    notes: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        end = stmt.end_lineno or stmt.lineno
        parts = [comments[r][0] for r in range(stmt.lineno, end + 1) if r in comments and not comments[r][1]]
        if not any(parts):
            above, r = [], stmt.lineno - 1
            while r in comments and comments[r][1]:
                above.insert(0, comments[r][0])
                r -= 1
            parts = above
        text = " ".join(p for p in parts if p)
        if text:
            notes[stmt.target.id] = text
    doc = ast.get_docstring(node) or ""  # not cls.__doc__: dataclass fills that with the signature
    return notes, " ".join(doc.strip().split("\n\n")[0].split())


def field_help(cls, f: dataclasses.Field) -> str:
    """A field's description: its source comment (in `cls` or the base class that declares it),
    else `metadata["help"]`, else ""."""
    for c in getattr(cls, "__mro__", (cls,)):
        if f.name in c.__dict__.get("__annotations__", {}):
            note = _source_notes(c)[0].get(f.name)
            if note:
                return note
    return " ".join(str(f.metadata.get("help", "")).split())


def _class_doc(cls) -> str:
    return _source_notes(cls)[1] if dataclasses.is_dataclass(cls) else ""


@dataclasses.dataclass
class Flag:
    dotted: str  # e.g. "train.max_steps" (what --train.max_steps / --train.max-steps set)
    type: Any
    default: Any  # dataclasses.MISSING when required
    help: str
    positional: bool = False


@dataclasses.dataclass
class Section:
    name: str  # "" for the top level, else the dotted section ("train", "model.moe")
    help: str
    flags: list[Flag]


def _default_of(f: dataclasses.Field, owner: Any) -> Any:
    if owner is not None and hasattr(owner, f.name):
        return getattr(owner, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return f.default_factory()  # type: ignore[misc]
        except Exception:
            return dataclasses.MISSING
    return dataclasses.MISSING


def flag_sections(cls) -> list[Section]:
    """The flags of config class `cls`, one Section per (nested) dataclass, top level first.

    Defaults are the values a run would get: a section built by `default_factory` (e.g.
    `TrainConfig(lr=3e-3)`) shows that instance's values, not the class's.
    """
    sections: list[Section] = []

    def walk(c, name: str, owner: Any, help: str) -> None:
        sec = Section(name, help, [])
        sections.append(sec)
        hints = _hints(c)
        nested = []
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            tp = hints[f.name]
            dotted = f"{name}.{f.name}" if name else f.name
            default = _default_of(f, owner)
            inner = _is_optional(tp)[1]
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                sub = default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None
                doc = _class_doc(inner) or field_help(c, f) or next(
                    (d for d in map(_class_doc, inner.__mro__[1:]) if d), "")
                nested.append((inner, dotted, sub, doc))
                continue
            sec.flags.append(Flag(dotted, tp, default, field_help(c, f), bool(f.metadata.get("positional"))))
        for args in nested:
            walk(*args)

    walk(cls, "", None, "")
    return sections


def flag_names(cls) -> list[str]:
    """Every leaf flag of `cls`, dotted, in underscore spelling (positional fields excluded)."""
    return [f.dotted for s in flag_sections(cls) for f in s.flags if not f.positional]


def type_name(tp: Any) -> str:
    """A short, readable type: int, float, str, bool, list[str], {full,lora,qlora}, str|none."""
    optional, inner = _is_optional(tp)
    origin = get_origin(inner)
    if origin is Literal:
        name = "{" + ",".join(str(c) if c != "" else '""' for c in get_args(inner)) + "}"
    elif origin in (list, tuple):
        args = get_args(inner)
        name = f"list[{type_name(args[0])}]" if args else "list"
    elif origin is dict or inner is dict:
        name = "mapping"
    elif inner is Any:
        name = "any"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner).replace("typing.", "").replace("NoneType", "none")
    return name + "|none" if optional else name


def format_value(v: Any) -> str:
    """A default as it would be typed on the command line."""
    if v is dataclasses.MISSING:
        return "(required)"
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v and v.strip() == v and "," not in v else repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v) if v else "[]"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    if isinstance(v, (int, float)):
        return repr(v)
    return type(v).__name__  # never a dataclass repr


def describe(cls) -> list[tuple[str, str, str]]:
    """(--dotted-flag, type, default + description) rows of every leaf flag."""
    return [("--" + f.dotted.replace("_", "-"), type_name(f.type),
             f"(default: {format_value(f.default)})" + ("  " + f.help if f.help else ""))
            for s in flag_sections(cls) for f in s.flags]


def _flag_syntax(sections: list[Section]) -> str:
    """How flags are written, with an example from this command's own flags."""
    flags = [f for s in sections for f in s.flags if not f.positional]
    ex = next((f for f in flags if "." in f.dotted and "_" in f.dotted), None) or next(
        (f for f in flags if "_" in f.dotted), None)
    text = "Flags are the recipe's keys"
    if any(s.name for s in sections):
        sec = next(s.name for s in sections if s.name)
        text += f", dotted by section (`--{sec}.KEY VALUE` or `--{sec}.KEY=VALUE`)"
    else:
        text += " (`--KEY VALUE` or `--KEY=VALUE`)"
    if ex is not None:
        text += f". `-` and `_` are the same (--{ex.dotted.replace('_', '-')} = --{ex.dotted})"
    return text + "; a bool flag alone means true; lists are comma-separated; flags override the --config recipe."


def _rows(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Two columns: the flag (with its type), then the wrapped description."""
    if not rows:
        return []
    col = min(max(len(left) for left, _ in rows) + 2, 44)
    room = max(width - col, 30)
    out = []
    for left, desc in rows:
        wrapped = textwrap.wrap(desc, room, break_on_hyphens=False, break_long_words=False) or [""]
        if len(left) + 2 > col:
            out.append(left)
            out += [" " * col + w for w in wrapped]
        else:
            out.append(left.ljust(col) + wrapped[0])
            out += [" " * col + w for w in wrapped[1:]]
    return [line.rstrip() for line in out]


def format_help(cls, prog: str, doc: str = "", width: int | None = None) -> str:
    """`lmforge PROG --help`: usage, the command's docstring, then every leaf flag by its dotted
    name with type, default and description, grouped by section (one group per nested config)."""
    if width is None:
        width = max(72, min(shutil.get_terminal_size((100, 24)).columns, 120))
    sections = flag_sections(cls)
    positional = [f for s in sections for f in s.flags if f.positional]
    usage = f"usage: lmforge {prog} [--config recipe.yaml] [--key value ...]"
    for f in positional:
        many = get_origin(_is_optional(f.type)[1]) in (list, tuple)
        usage += f" [{f.dotted.upper()}{' ...' if many else ''}]"
    lines = [usage, ""]
    if doc and doc.strip():
        lines += [inspect.cleandoc(doc), ""]
    lines += textwrap.wrap(_flag_syntax(sections), width, break_on_hyphens=False, break_long_words=False) + [""]

    def row(f: Flag) -> tuple[str, str]:
        left = f"  --{f.dotted.replace('_', '-')} {type_name(f.type)}"
        return left, (f.help + " " if f.help else "") + f"(default: {format_value(f.default)})"

    top = [("  --config FILE", "a YAML recipe whose keys are these flags"),
           ("  --help", "this text"),
           ("  --debug", "show the traceback of an error")]
    for s in sections:
        if not s.name:
            lines.append("options:")
            lines += _rows(top + [row(f) for f in s.flags if not f.positional], width)
            if positional:
                lines += ["", "arguments:"]
                lines += _rows([(f"  {f.dotted.upper()} {type_name(f.type)}", f.help) for f in positional], width)
        else:
            lines.append("")
            header = f"{s.name}: {s.help}" if s.help else f"{s.name}:"
            lines += textwrap.wrap(header, width, break_on_hyphens=False, break_long_words=False)
            lines += _rows([row(f) for f in s.flags], width)
    return "\n".join(lines)


def suggest_flags(cls, typed: str, n: int = 3) -> list[str]:
    """Known flags nearest to `typed` (without the leading --), dotted, underscore spelling.

    A name scores its `difflib` similarity to what was typed, or nearly 1 when its last key is
    the typed last key in another section (`--max-steps` -> `--train.max_steps`); only those
    within a hair of the best score are named, best first.
    """
    key = typed.replace("-", "_")
    leaf = key.rsplit(".", 1)[-1]
    scored = []
    for name in flag_names(cls) + ["config"]:
        full = difflib.SequenceMatcher(None, key, name).ratio()
        part = difflib.SequenceMatcher(None, leaf, name.rsplit(".", 1)[-1]).ratio()
        scored.append((max(full, 0.9 * part + 0.1 * full), full, name))
    scored.sort(key=lambda t: (-t[0], -t[1]))
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [name for score, _, name in scored if score >= max(0.6, best - 0.03)][:n]


def unknown_flag_message(cls, typed: str, prog: str | None = None) -> str:
    """"unknown option '--train.max_stpes' (did you mean --train.max_steps?)", in the user's
    spelling (dashes when they typed dashes)."""
    near = suggest_flags(cls, typed)
    if near:
        dashes = "_" not in typed
        shown = ["--" + (s.replace("_", "-") if dashes else s) for s in near]
        said = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
        return f"unknown option '--{typed}' (did you mean {said}?)"
    where = f"`lmforge {prog} --help`" if prog else "--help"
    return f"unknown option '--{typed}' ({where} lists the flags)"
