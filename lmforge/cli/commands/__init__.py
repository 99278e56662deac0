"""One module per `lmforge <command>`; the CLI finds them by file name (`foo_bar.py` is `foo-bar`).

A module defines either `Config` (a dataclass: its fields are the flags) and `run(cfg)`, or
`SUBCOMMANDS = {"name": (ConfigClass, function), ...}` for `lmforge <command> <name>`.
Its docstring's first line is the help text. Modules are imported only when their command runs.
"""
