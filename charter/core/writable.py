"""Is the output writable? Checked before any work starts, so a long run never fails at its end.

Every command that writes calls `check_output(out)` first: it creates the directory, writes,
fsyncs and removes a probe file, and requires some free space, so an output under a regular file
(`--out notes.txt/run`), on a read-only or full file system, or without permission fails at
once with the path and the reason. It also takes the output's lock (`charter.core.runlock`): a
second writer to the same output is refused with the first one's PID and host. (Writes
themselves are atomic or append-only, see `charter.core.records`, so a disk that fills up later
corrupts nothing either.) A leaf module.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.runlock import lock_output

# Less free space than this on the output's device is an error before any work starts.
MIN_FREE_BYTES = 1 << 20


def check_output(path: str | os.PathLike, *, is_dir: bool = True) -> Path:
    """Prove before any work starts that the output `path` (a run directory, or with
    `is_dir=False` a file) can be written: create the directory, write, fsync and remove a probe
    file, and require some free space. Errors name the path and say why."""
    path = Path(path)
    folder = path if is_dir else path.parent
    if is_dir and path.exists() and not path.is_dir():
        raise CharterError("output must be a directory, found a file", path=path, field="out")
    if not is_dir and path.is_dir():
        raise CharterError("output must be a file, found a directory", path=path, field="out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".charter-write-probe-", dir=folder)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        if not is_dir and path.exists():
            with open(path, "ab"):
                pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise CharterError(f"cannot write the output here: {e.strerror or e}", path=path,
                           field="out") from None
    if free < MIN_FREE_BYTES:
        raise CharterError(f"only {free} bytes free on this device; free some space first",
                           path=path, field="out")
    lock_output(path, is_dir, say=lambda m: print(f"charter: {m}", file=sys.stderr))
    return path


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO,
               errno.EFBIG}
DISK_MESSAGES = ("No space left on device", "Read-only file system", "Disk quota exceeded",
                 "File too large", "Input/output error")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_error(e: BaseException, path: str | os.PathLike, need: int | None = None,
               after: str = "") -> CharterError | None:
    """The one-line error for a write that failed (disk full, read-only, quota, permissions):
    names `path`, the reason, the space needed and free, and what is still safe (`after`).
    None when `e` is not a write failure (a bug, to be raised as it is)."""
    if isinstance(e, CharterError):
        return e
    reason = None
    if isinstance(e, OSError) and (e.errno in DISK_ERRNOS or e.errno is None):
        reason = e.strerror or str(e)
    else:  # torch / safetensors wrap the OS error in a RuntimeError: find its message
        text = str(e)
        reason = next((m for m in DISK_MESSAGES if m in text), None)
    if reason is None:
        return None
    path = Path(path)
    space = ""
    if need:
        free = _free_bytes(path)
        space = f"; needs about {_mb(need)}" + (f", {_mb(free)} free" if free is not None
                                                 else "")
    return CharterError(f"cannot write: {reason}{space}" + (f"; {after}" if after else ""),
                        path=path)


def write_bytes_durable(path: str | os.PathLike, data) -> None:
    """Write `data` (bytes, or a list of bytes-like pieces written in turn) to a new file and
    fsync it (callers rename the folder or file after)."""
    with open(path, "wb") as f:
        for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def nbytes(data) -> int:
    """Size of what `write_bytes_durable` writes for `data`."""
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    return sum(memoryview(p).nbytes for p in pieces)
