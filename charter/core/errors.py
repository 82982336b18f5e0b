"""The one error type that reaches users: a message that names the file, line and field.

Stages raise `CharterError` (or a subclass) for bad input; the CLI prints its message and exits
with status 1, with no traceback unless `--debug` is given. Anything else is a bug.
"""

from __future__ import annotations


class CharterError(Exception):
    """A user-facing error. `str(err)` is `FILE:LINE: field: what is wrong` where known."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None,
                 field: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.detail = message
        super().__init__(format_location(self.path, line, field, message))


def format_location(path: str | None, line: int | None, field: str | None, message: str) -> str:
    """`FILE:LINE: field: message`, leaving out the parts that are unknown."""
    where = ""
    if path is not None:
        where = path if line is None else f"{path}:{line}"
    parts = [p for p in (where, field) if p]
    return ": ".join([*parts, message])
