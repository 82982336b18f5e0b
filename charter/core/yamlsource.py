"""Reading a principle file's YAML safely, keeping the line of every key and value.

The safe loader builds only plain data (no Python tags); before building, the node tree is
walked once to record lines, refuse duplicate keys and non-scalar keys, and name any Python tag
with its line. Aliases are walked once each, so an alias bomb costs no more than its text.
"""

from __future__ import annotations

from typing import Any

import yaml

from charter.core.errors import CharterError
from charter.core.reader import check_text

MAX_FILE_BYTES = 1_000_000  # a principle file or YAML config larger than this is refused


class ConstitutionError(CharterError):
    """A principle file that cannot be used, with file, line and field."""


def dotted(at: tuple) -> str:
    """("principles", 3, "critique") -> "principles[3].critique"."""
    out = ""
    for p in at:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class Lines:
    """Maps a path of keys/indices in the YAML document to its line number (1-based)."""

    def __init__(self, path: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self._seen: set[int] = set()

    def walk(self, node: yaml.Node, at: tuple = ()) -> None:
        self.lines.setdefault(at, node.start_mark.line + 1)
        if id(node) in self._seen:  # an alias: already checked where it was anchored
            return
        self._seen.add(id(node))
        if node.tag.startswith("tag:yaml.org,2002:python/"):
            raise ConstitutionError(
                f"Python tag {'!!' + node.tag.split(':', 2)[2]!r} is not allowed (principle files "
                "are plain YAML)", path=self.path, line=node.start_mark.line + 1,
                field=dotted(at) or None)
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    raise ConstitutionError("keys must be plain strings", path=self.path,
                                            line=k.start_mark.line + 1, field=dotted(at) or None)
                key = k.value
                if key in seen:
                    raise ConstitutionError(f"duplicate key {key!r}", path=self.path,
                                            line=k.start_mark.line + 1, field=dotted((*at, key)))
                seen.add(key)
                self.lines.setdefault((*at, key, "<key>"), k.start_mark.line + 1)
                self.walk(v, (*at, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self.walk(v, (*at, i))

    def line(self, at: tuple) -> int | None:
        while at and at not in self.lines:
            at = at[:-1]
        return self.lines.get(at)


def read_yaml(text: str, path: str) -> tuple[Any, Lines]:
    """Parse one YAML document with the safe loader; every problem is a ConstitutionError."""
    if not text.strip():
        raise ConstitutionError("empty file; expected a mapping with name, description and "
                                "principles", path=path, line=1)
    if "\x00" in text:
        raise ConstitutionError("binary content (NUL byte); expected YAML text", path=path)
    lines = Lines(path)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                lines.walk(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise ConstitutionError(f"invalid YAML: {e.problem or e.context}", path=path,
                                line=line) from None
    except yaml.YAMLError as e:
        raise ConstitutionError(f"invalid YAML: {e}", path=path) from None
    except RecursionError:
        raise ConstitutionError("invalid YAML: nested too deeply", path=path) from None
    except (TypeError, ValueError) as e:  # e.g. unhashable merge keys inside the safe loader
        raise ConstitutionError(f"invalid YAML: {e}", path=path) from None
    try:
        check_text(data, path, None)  # "\ud800" or "\0" escapes: not text
    except CharterError as e:
        raise ConstitutionError(e.detail, path=path, line=lines.line(_at(e.field)),
                                field=e.field) from None
    return data, lines


def _at(field: str | None) -> tuple:
    """"principles[0].critique" -> ("principles", 0, "critique") (for its line)."""
    import re

    return tuple(int(p) if p.isdigit() else p
                 for p in re.findall(r"[^.\[\]]+", field or ""))
