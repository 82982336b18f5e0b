"""The one error type that reaches users: a message that names the file, line and field.

Stages raise `CharterError` (or a subclass) for bad input; the CLI prints its message and exits
with status 1, with no traceback unless `--debug` is given. Anything else is a bug.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


class CharterError(Exception):
    """A user-facing error. `str(err)` is `FILE:LINE: field: what is wrong` where known."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None,
                 field: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        message = _one_line(" ".join(str(message).split()))  # whatever a library wrote
        self.detail = message
        super().__init__(format_location(self.path, line, field, message))


def format_location(path: str | None, line: int | None, field: str | None, message: str) -> str:
    """`FILE:LINE: field: message`, leaving out the parts that are unknown."""
    where = ""
    if path is not None:
        where = _one_line(path) if line is None else f"{_one_line(path)}:{line}"
    parts = [p for p in (where, field and _one_line(field)) if p]
    return ": ".join([*parts, message])


def _one_line(text: str) -> str:
    """`text` with control characters (newlines from a file name or key) shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
