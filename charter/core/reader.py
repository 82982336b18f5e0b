"""The one reader for every input file: bytes in, rows out, every problem a `CharterError`.

Formats: JSON Lines (`.jsonl`, and any other name), a JSON document (`.json`: a list of
objects, or one key holding such a list), CSV (`.csv`, a header row), parquet (`.parquet`), each
optionally gzipped (`.gz`). Whatever goes wrong while turning bytes into rows (a missing or
unreadable path, a directory, a device or FIFO that never ends, a file over the size cap, bytes
that are not UTF-8, a NUL byte, torn JSON, a CSV quote that is never closed or a field larger
than the csv module allows, truncated or corrupt gzip data, a damaged parquet file, a lone
UTF-16 surrogate or NUL character inside a JSON string) is a `CharterError` naming the file, the
line (or row / byte offset) and what was expected. Nothing is silently dropped.

Size cap: no input is read past `max_input_bytes()` bytes (after decompression), 1 GiB by
default; raise it with `charter --max-input-mb N` or `CHARTER_MAX_INPUT_MB=N`. Special files
(`/dev/zero`, a FIFO, `<(zcat ...)`) are read through the same cap, so they end. A leaf module.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError

DEFAULT_MAX_INPUT_MB = 1024
_BAD_CHARS = re.compile("[\ud800-\udfff\x00]")


def max_input_bytes() -> int:
    """The cap on any one input's size (decompressed), from CHARTER_MAX_INPUT_MB."""
    raw = os.environ.get("CHARTER_MAX_INPUT_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_INPUT_MB
    except ValueError:
        raise CharterError(f"CHARTER_MAX_INPUT_MB must be a number of MB, got {raw!r}") from None
    return int(mb * (1 << 20))


def _cap_message(n: int) -> str:
    if n != max_input_bytes():  # a fixed limit for this kind of file (YAML: 1 MB)
        return f"file too large (at most {n} bytes for this kind of file)"
    return (f"input larger than the cap of {n / (1 << 20):g} MB; raise it with --max-input-mb "
            "(e.g. charter --max-input-mb 4096 ...) if this file is meant to be this big")


def check_readable(path: str | os.PathLike, what: str = "file", cap: int | None = None
                   ) -> Path:
    """An input path that exists, is not a directory, is readable and (a regular file) is
    within the size cap. Devices and FIFOs pass here and are capped while read."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CharterError(f"{what} not found", path=path) from None
    except OSError as e:
        raise CharterError(f"cannot open {what}: {e.strerror or e}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise CharterError(f"expected a {what}, found a directory", path=path)
    if stat.S_ISSOCK(st.st_mode):
        raise CharterError(f"expected a {what}, found a socket", path=path)
    if not os.access(path, os.R_OK):
        raise CharterError(f"{what} is not readable (permissions)", path=path)
    if stat.S_ISREG(st.st_mode) and st.st_size > (cap := max_input_bytes() if cap is None
                                                  else cap):
        raise CharterError(f"{st.st_size} bytes: {_cap_message(cap)}", path=path)
    return path


class _Capped(io.RawIOBase):
    """Reads at most the cap from `f`, then raises (so /dev/zero or a gzip bomb ends)."""

    def __init__(self, f: Any, path: Path, cap: int):
        self.f, self.path, self.cap, self.seen = f, path, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        self.seen += len(data)
        if self.seen > self.cap:
            raise CharterError(_cap_message(self.cap), path=self.path)
        b[: len(data)] = data
        return len(data)


def _gz_error(e: BaseException, path: Path, where: str) -> CharterError:
    if isinstance(e, gzip.BadGzipFile):
        return CharterError(f"not a readable gzip file ({e}); expected gzip-compressed data",
                            path=path)
    return CharterError(f"truncated or corrupt gzip data{where} ({e}); expected a complete "
                        ".gz file", path=path)


def open_input(path: str | os.PathLike, what: str = "file", cap: int | None = None
               ) -> io.BufferedReader:
    """A capped binary stream of the file's content (gunzipped for `.gz`)."""
    path = check_readable(path, what, cap)
    cap = max_input_bytes() if cap is None else cap
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise CharterError(f"cannot read: {e.strerror or e}", path=path) from None
    f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    return io.BufferedReader(_Capped(f, path, cap), 1 << 16)


def read_bytes(path: str | os.PathLike, what: str = "file", cap: int | None = None) -> bytes:
    """The whole (capped, gunzipped) content of an input file."""
    path = Path(path)
    with open_input(path, what, cap) as f:
        try:
            return f.read()
        except (OSError, EOFError, zlib.error) as e:
            if path.suffix == ".gz":
                raise _gz_error(e, path, "") from None
            raise CharterError(f"cannot read: {getattr(e, 'strerror', None) or e}",
                               path=path) from None


def check_text(value: Any, path: object, line: int | None, field: str = "") -> None:
    """Refuse lone UTF-16 surrogates and NUL characters anywhere in `value`'s strings (they
    come from JSON escapes like "\\ud800" and cannot be written back as UTF-8 or tokenised)."""
    stack: list[tuple[Any, str]] = [(value, field)]
    seen: set[int] = set()  # YAML aliases share containers: each is checked once
    while stack:
        v, f = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if id(v) in seen:
                continue
            seen.add(id(v))
        if isinstance(v, str):
            m = _BAD_CHARS.search(v)
            if m:
                what = "a NUL character" if m.group() == "\x00" else (
                    f"a lone UTF-16 surrogate (\\u{ord(m.group()):04x})")
                raise CharterError(f"{what} at character {m.start()}; expected text",
                                   path=path, line=line, field=f or None)
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, f))
                stack.append((x, f"{f}.{k}" if f else str(k)))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{f}[{i}]") for i, x in enumerate(v))


def read_text_lines(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, line) for a UTF-8 text file (optionally .gz), with clear errors.

    Lines are split as bytes and decoded one by one, so a decoding error names its own line
    (a text-mode reader decodes ahead in chunks and would blame an earlier line).
    """
    path = Path(path)
    lineno, offset = 0, 0
    max_line = max(max_input_bytes() // 32, 1 << 16)
    with open_input(path, what) as f:
        try:
            while raw := f.readline(max_line + 1):
                lineno += 1
                if b"\x00" in raw:
                    raise CharterError("binary content (NUL byte); expected UTF-8 text",
                                       path=path, line=lineno)
                if len(raw) > max_line and not raw.endswith(b"\n"):
                    raise CharterError(f"line longer than {max_line >> 20} MB (1/32 of the "
                                       "input cap, raised with --max-input-mb); expected "
                                       "one record a line", path=path, line=lineno)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CharterError(f"not valid UTF-8 text ({e.reason} at byte {e.start} "
                                       "of the line)", path=path, line=lineno) from None
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a BOM is not content
                offset += len(raw)
                yield lineno, line
        except (OSError, EOFError, zlib.error) as e:
            if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)) or path.suffix == ".gz":
                raise _gz_error(e, path, f" after line {lineno} (byte {offset} of the "
                                "uncompressed text)") from None
            raise CharterError(f"cannot read: {e.strerror or e}", path=path) from None


def read_jsonl(path: str | os.PathLike, errors: list[str] | None = None
               ) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line.

    With an `errors` list, a line that is not a JSON object is reported there and skipped
    (the lines after it are still read) instead of raising.
    """
    seen = False
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        seen = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            err = CharterError(f"invalid JSON ({e.msg} at column {e.colno})",
                               path=path, line=lineno)
        except RecursionError:
            err = CharterError("invalid JSON (nested too deeply)", path=path, line=lineno)
        else:
            if isinstance(obj, dict):
                try:
                    check_text(obj, path, lineno)
                except CharterError as e:
                    err = e
                else:
                    yield lineno, obj
                    continue
            else:
                err = CharterError(f"expected a JSON object, got {type(obj).__name__}",
                                   path=path, line=lineno)
        if errors is None:
            raise err
        errors.append(str(err))
    if not seen:
        raise CharterError("file is empty: expected at least one JSON line", path=path)


def read_csv(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) for a CSV file with a header row. A quote that is never closed, a
    row with more cells than the header and a field over the size cap are errors with the line
    (a lenient reader would swallow the rest of the file into one field)."""
    path = Path(path)
    lines = [line for _, line in read_text_lines(path)]
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, max_input_bytes()))
    try:
        reader = csv.DictReader(lines, strict=True)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise CharterError(f"invalid CSV header ({e})", path=path, line=1) from None
        if not header:
            raise CharterError("empty CSV file: expected a header row", path=path)
        start = reader.line_num + 1  # the first data row's line
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                why = ("a quoted field is never closed" if "unexpected end" in str(e)
                       else str(e))
                raise CharterError(f"invalid CSV ({why}); expected a row of "
                                   f"{len(header)} comma-separated cells", path=path,
                                   line=start) from None
            if None in row:
                raise CharterError(f"{len(header) + len(row[None])} cells, the header has "
                                   f"{len(header)}", path=path, line=start)
            yield start, row
            start = reader.line_num + 1  # a quoted field may span lines
    finally:
        csv.field_size_limit(old)


def read_json_document(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """One JSON document; errors name the line and column where it breaks."""
    path = Path(path)
    data = read_bytes(path, what)
    if not data.strip():
        raise CharterError(f"{what} is empty", path=path)
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CharterError(f"not valid UTF-8 text ({e.reason} at byte {e.start})", path=path,
                           line=data[: e.start].count(b"\n") + 1) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CharterError(f"invalid JSON ({e.msg} at column {e.colno})", path=path,
                           line=e.lineno) from None
    except RecursionError:
        raise CharterError("invalid JSON (nested too deeply)", path=path) from None
    check_text(obj, path, None)
    return obj


Located = tuple[str, "int | None", dict]  # (file, or file[row N]; line or None; the record)


def _json_rows(path: Path) -> list[Located] | None:
    """A `.json` file's list of objects (or `{"key": [...]}`); None when it is JSON Lines."""
    data = read_bytes(path)
    try:
        obj = json.loads(data.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # JSON Lines, or broken: the line reader names the line
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))
    if not isinstance(obj, list):
        return None
    rows = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise CharterError(f"expected a list of objects, item {i} is {type(r).__name__}",
                               path=path)
        check_text(r, f"{path}[row {i}]", None)
        rows.append((f"{path}[row {i}]", None, r))
    return rows


def _parquet_rows(path: Path) -> list[Located]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(read_bytes(path)))
        rows = table.to_pylist()
    except CharterError:
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow's errors: not parquet, truncated...)
        raise CharterError(f"cannot read as parquet ({type(e).__name__}: {str(e)[:200]}); "
                           "expected a complete parquet file", path=path) from None
    for i, r in enumerate(rows):
        check_text(r, f"{path}[row {i}]", None)
    return [(f"{path}[row {i}]", None, r) for i, r in enumerate(rows)]


def format_of(path: str | os.PathLike) -> str:
    """"jsonl", "json", "csv" or "parquet", from the name (a `.gz` suffix is looked through)."""
    suffix = Path(path).name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    return suffix if suffix in ("json", "csv", "parquet") else "jsonl"


def read_records(path: str | os.PathLike, errors: list[str] | None = None,
                 what: str = "file") -> list[Located]:
    """(where, line, object) for every record of an input file, in any format above: `where`
    is the file (`FILE[row N]` for JSON and parquet rows, counted from 0) and `line` its line
    (None for rows). With `errors`, bad JSON lines are reported there and skipped (JSONL)."""
    path = check_readable(path, what)
    fmt = format_of(path)
    if fmt == "parquet":
        rows = _parquet_rows(path)
    elif fmt == "json" and (got := _json_rows(path)) is not None:
        rows = got
    else:
        lines = read_csv(path) if fmt == "csv" else read_jsonl(path, errors)
        rows = [(str(path), n, r) for n, r in lines]
    if not rows and not errors:
        raise CharterError("no records in this file", path=path)
    return rows
