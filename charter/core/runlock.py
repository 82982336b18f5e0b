"""One writer per run folder or output file: a lock that names its holder and dies with it.

Two `charter critique` runs on one `--out` folder would each resume from the same records and
write every remaining record twice. So each command that writes takes `lock_output(out)` (called
from `charter.core.writable.check_output`, which every writing command runs before it starts). The
lock is an `fcntl.flock` on `OUT/.charter.lock` (for a folder) or `.NAME.lock` beside an output
file; the file holds the holder's PID, host, command and start time, so a second writer is
refused with:

    charter: error: runs/crit: out: in use by another charter process (pid 4242 on host gpu1,
    `charter critique ...`, since 10:31:02 UTC); wait for it to finish or use another --out

The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a lock
left by a dead process is free: the next run takes it over and says whose it was. Locks are
re-entrant within a process (the pipeline runner and the stage it runs share them), only the
main process of a distributed launch takes them (`RANK` 0), and `release_all()` frees them when
a command ends. Not for network file systems without flock support. A leaf module.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from charter.core.errors import CharterError

_held: dict[str, int] = {}  # resolved lock-file path -> open file descriptor


def lock_path(out: str | os.PathLike, is_dir: bool = True) -> Path:
    out = Path(out)
    return out / ".charter.lock" if is_dir else out.parent / f".{out.name}.lock"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    since = time.strftime("%H:%M:%S UTC", time.gmtime(h["started"])) if isinstance(
        h.get("started"), (int, float)) else "?"
    return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
            f"`{h.get('command', '?')}`, since {since}")


def lock_output(out: str | os.PathLike, is_dir: bool = True, say=None) -> Path | None:
    """Hold the lock on output `out` (a folder, or with `is_dir=False` a file) until
    `release_all()` or the process ends; refuse when another live process holds it."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None  # ranks > 0 of a distributed run write under rank 0's lock
    path = lock_path(out, is_dir)
    key = str(path.resolve())
    if key in _held:
        return path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CharterError(f"cannot create the lock file {path.name}: {e.strerror or e}",
                           path=out, field="out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise CharterError(f"in use by another charter process ({_describe(holder)}); wait "
                           "for it to finish or use another --out", path=out,
                           field="out") from None
    previous = _holder(fd)
    if previous.get("pid") and previous.get("pid") != os.getpid() and say is not None:
        say(f"{out}: taking over the lock of a charter process that is gone "
            f"({_describe(previous)})")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "command": " ".join(["charter", *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode("utf-8"))
    _held[key] = fd
    return path


def release_all() -> None:
    """Free every lock this process holds (the lock files stay; they are free once unlocked)."""
    for key, fd in list(_held.items()):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        except OSError:
            pass
        del _held[key]
