"""`lmforge <command> [subcommand] [--config recipe.yaml] [--key value ...]`."""
from __future__ import annotations

import ast
import difflib
import importlib
import os
import sys
import traceback
from pathlib import Path

from lmforge.config import format_help, parse_args
from lmforge.errors import LmforgeError

COMMANDS_DIR = Path(__file__).parent / "commands"


def available_commands() -> dict[str, str]:
    """Command name -> first docstring line, read without importing anything heavy."""
    out = {}
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.stem.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _usage() -> str:
    lines = ["usage: lmforge <command> [--config recipe.yaml] [--key value ...] [--debug]", "", "commands:"]
    for name, doc in available_commands().items():
        lines.append(f"  {name:<14} {doc}")
    lines.append("")
    lines.append("`lmforge <command> --help` lists a command's flags.")
    return "\n".join(lines)


def _config_help(prog: str, cls, doc: str) -> str:
    """Every flag of `lmforge PROG` by its dotted name, with type, default and description."""
    return format_help(cls, prog, doc)


def _subcommands_help(name: str, module, subs: dict) -> str:
    lines = [f"usage: lmforge {name} <{'|'.join(subs)}> [--key value ...]", ""]
    doc = (module.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    lines.append("subcommands:")
    width = max(len(s) for s in subs) + 2
    for sub, (_, fn) in subs.items():
        first = (fn.__doc__ or "").strip().splitlines()
        lines.append(f"  {sub:<{width}} {first[0] if first else ''}".rstrip())
    lines += ["", f"`lmforge {name} <subcommand> --help` lists its flags."]
    return "\n".join(lines)


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "version"):
        from lmforge import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in available_commands():
        near = difflib.get_close_matches(name, list(available_commands()), n=1)
        hint = f"did you mean `lmforge {near[0]}`? " if near else ""
        raise LmforgeError(f"unknown command '{name}' ({hint}run `lmforge --help` for the list)")
    module = importlib.import_module(f"lmforge.cli.commands.{name.replace('-', '_')}")
    subs = getattr(module, "SUBCOMMANDS", None)
    if subs:
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in subs:
            if rest and rest[0] not in ("-h", "--help"):
                raise LmforgeError(f"unknown subcommand '{name} {rest[0]}' (choose from: {', '.join(subs)})")
            print(_subcommands_help(name, module, subs))
            return 0
        cls, fn = subs[rest[0]]
        prog, rest = f"{name} {rest[0]}", rest[1:]
        doc = fn.__doc__ or ""
    else:
        cls, fn, prog, doc = module.Config, module.run, name, module.__doc__ or ""
    if any(a in ("-h", "--help") for a in rest):
        print(_config_help(prog, cls, doc))
        return 0
    cfg = parse_args(cls, rest, prog=prog)
    result = fn(cfg)
    return int(result) if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMFORGE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        code = run_command(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    except LmforgeError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # a one-line error for users; --debug shows where
        if debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
