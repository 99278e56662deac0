"""Strict dataclass configs from YAML recipes plus `--key value` overrides.

Every command's flags are its config's fields (snake_case, dotted for nesting), the same keys as
its YAML recipe. lmforge's own configs are strict: an unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
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
        raise LmforgeError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
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


def parse_args(cls, argv: list[str]):
    """`[--config FILE.yaml] [--key value | --flag] ... [positional ...]` into a `cls` instance.

    A field with `metadata={"positional": True}` collects bare arguments.
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
                known = ", ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(cls))
                raise LmforgeError(f"unknown option '--{key}' (known: {known})")
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


def describe(cls) -> list[tuple[str, str, str]]:
    """(flag, type, default) rows for --help."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append(("--" + f.name, name, default + ("  " + f.metadata["help"] if "help" in f.metadata else "")))
    return rows
