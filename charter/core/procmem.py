"""This process's resident memory, for the pipeline's per-stage numbers (Linux /proc; None
elsewhere). `reset_peak()` at a stage's start, `peak_mb()` at its end: the stage's own
high-water mark, not the run's so far."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")


def _kb(path: Path, name: str) -> int | None:
    """The `name:` line's value in kB from a /proc file (None where there is none)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _field(name: str) -> int | None:
    kb = _kb(_STATUS, name)
    return None if kb is None else kb // 1024  # kB -> MB


def available_bytes() -> int | None:
    """The machine's memory available to a new allocation (MemAvailable), in bytes."""
    kb = _kb(_MEMINFO, "MemAvailable")
    return None if kb is None else kb * 1024


def rss_mb() -> int | None:
    """Resident memory now, in MB."""
    return _field("VmRSS")


def peak_mb() -> int | None:
    """The high-water mark of resident memory since the last `reset_peak`, in MB."""
    return _field("VmHWM")


def reset_peak() -> int | None:
    """Restart the high-water mark at the current resident size (writing 5 to clear_refs,
    Linux 4.0+); returns the resident size now. Where it cannot, the mark keeps counting from
    the process's start (a peak is then the run's so far, never too low)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mb()


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024
"""Blocks of this many bytes or more get a mapping of their own (see `return_large_frees`)."""


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"))


def return_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every block of `threshold` bytes or more from a mapping of its own, so
    that freeing it hands the memory straight back to the system. By default glibc raises that
    threshold to the largest block freed so far (up to 32 MB): after the first training step
    the activations, gradients and KV caches come from the heap, where what is freed stays
    resident and fragments (a step's peak adds to the last step's leftovers, and the next stage
    starts on top of them). Measured on the quickstart's DPO (3 steps, fp32): peak 4,231 ->
    3,757 MB (benchmarks/README.md). A setting of the user's (`MALLOC_MMAP_THRESHOLD_`) is left
    alone. Returns whether the threshold was set (False off glibc)."""
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: its allocator returns memory its own way


def trim() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def collect() -> None:
    """Collect unreachable objects now (models and Accelerators sit in reference cycles) and
    hand the freed heap back (`trim`): after a stage, or after a model is released."""
    import gc

    gc.collect()
    trim()
