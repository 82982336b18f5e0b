"""JSONL on disk: content ids, atomic writes, crash-safe appends, and line-numbered reading (re-exported from `charter.core.reader`).

A leaf module (imports no stage). Crash safety: records are appended one line at a time, flushed
and fsynced (`JsonlAppender`). A run killed mid-write leaves at most one partial last line;
`load_jsonl_for_resume` drops it (and truncates the file back to the last complete record) so
the re-run appends after it. Ids are content hashes (`content_id`), so a resumed run skips what
is done and never writes it twice. Reading errors name the file and line (`CharterError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError

# ---------------------------------------------------------------------------------------------
# ids, atomic writes, appends


def content_id(*parts: Any) -> str:
    """A stable 16-hex-digit id: sha256 of the canonical JSON of `parts`."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temp name in the same folder, fsync, then rename: readers never see half a file.

    If writing fails (disk full), the old file is left as it was and the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CharterError(f"cannot write ({e.strerror or e}); the previous version, if any, "
                           "is unchanged", path=path) from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write a whole JSONL file at once (exports derived from records)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class JsonlAppender:
    """Append-only JSONL writer: each `append` is one whole line, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        end = self._f.tell()
        try:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # disk full mid-line: cut the partial line off, keep the rest
            self._drop_partial(end)
            raise CharterError(f"cannot append a record ({e.strerror or e}); the records "
                               "before it are safe, re-run the same command to resume",
                               path=self.path) from None

    def _drop_partial(self, end: int) -> None:
        try:
            self._f.close()  # may fail again flushing the partial buffer; the file is reopened
        except OSError:
            pass
        try:
            with open(self.path, "r+b") as f:
                f.truncate(end)
        except OSError:
            pass  # a torn last line is repaired by load_jsonl_for_resume on the next run
        self._f = open(self.path, "ab")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_jsonl_for_resume(path: str | os.PathLike) -> list[dict]:
    """Records already finished in an append-only file, repairing a torn last line.

    A last line that has no newline or is not valid JSON is what a kill mid-write leaves: it is
    cut off (the file is truncated to the end of the last good line). A bad line *before* the
    last one is not a torn write but corruption, and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        lineno += 1
        is_last = end >= len(data)
        if nl >= 0 and not raw.strip():  # a blank line (hand-edited file): nothing to keep
            good_end = pos = end
            continue
        try:
            if nl < 0:
                raise ValueError("no newline")
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if is_last:
                break  # torn write: drop it below
            raise CharterError(f"corrupt record ({e}); move the file away to start over",
                               path=path, line=lineno) from None
        records.append(obj)
        good_end = end
        pos = end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


# ---------------------------------------------------------------------------------------------
# reading lives in charter.core.reader (every input format); these names stay importable from here
from charter.core.reader import check_readable, read_jsonl, read_text_lines  # noqa: E402,F401
