"""This process's resident memory, for the pipeline's per-stage numbers (Linux /proc; None
elsewhere). `reset_peak()` at a stage's start, `peak_mb()` at its end: the stage's own
high-water mark, not the run's so far."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _field(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) // 1024  # kB -> MB
    except (OSError, ValueError, IndexError):
        pass
    return None


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
