"""The one exception type the CLI prints as a one-line error (no stack trace unless --debug)."""


class LmforgeError(Exception):
    """A problem the user can fix: bad input, missing file, unsupported model, wrong config key."""
