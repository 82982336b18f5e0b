"""Kill a `charter` command with SIGKILL at a random moment, then re-run it to completion.

    ref = timed_run(argv, trigger=out / "records.jsonl")         # an uninterrupted run
    trial = kill_run(argv, trigger=..., rng=random.Random(seed), window=ref.after_trigger)
    finished = complete_lines(out / "records.jsonl")            # what the kill left behind
    done = timed_run(argv)                                      # the same command again

The kill moment: once the `trigger` path exists (the command has started real work: its output
file is open, its run config written), sleep a seeded uniform time in [0, window) and SIGKILL the
process group; window is how long the reference run took after its trigger, so kills spread over
the whole working part of a run (a run that finishes first is recorded as not killed). The
command runs as `python -m charter` in its own session, so nothing of it survives the kill.

Used by tests/test_kill_resume.py; `pytest --trials N` runs N kills per command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def charter_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1", **extra)
    return env


@dataclass
class RunResult:
    returncode: int | None  # None: killed
    output: str  # stdout + stderr
    seconds: float  # wall time until exit or kill
    after_trigger: float  # seconds from the trigger appearing to the end (0: never appeared)
    killed: bool = False
    kill_after: float = 0.0  # the drawn delay after the trigger


def _start(argv: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, object]:
    f = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "charter", *argv], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f


def _wait_trigger(proc: subprocess.Popen, trigger: Path | None, deadline: float) -> float | None:
    """Time at which `trigger` appeared (None: the process ended first)."""
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger is None or trigger.exists():
            return time.monotonic()
        time.sleep(0.005)
    return None


def timed_run(argv: list[str], *, env: dict[str, str], log: Path, trigger: Path | None = None,
              timeout: float = 300) -> RunResult:
    """Run to completion; also time how long it ran after `trigger` appeared."""
    t0 = time.monotonic()
    proc, f = _start(argv, env, log)
    t_trig = _wait_trigger(proc, trigger, t0 + timeout)
    try:
        proc.wait(timeout=max(1.0, t0 + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        f.close()
    end = time.monotonic()
    return RunResult(proc.returncode, log.read_text(encoding="utf-8", errors="replace"),
                     end - t0, end - t_trig if t_trig else 0.0)


def kill_run(argv: list[str], *, env: dict[str, str], log: Path, trigger: Path | None,
             rng: random.Random, window: float, timeout: float = 300) -> RunResult:
    """Start the command, SIGKILL it at trigger + uniform(0, window) seconds."""
    t0 = time.monotonic()
    proc, f = _start(argv, env, log)
    delay = rng.uniform(0.0, max(window, 0.01))
    try:
        t_trig = _wait_trigger(proc, trigger, t0 + timeout)
        killed = False
        if t_trig is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, nothing else
                killed = True
        proc.wait()
    finally:
        f.close()
    end = time.monotonic()
    return RunResult(None if killed else proc.returncode,
                     log.read_text(encoding="utf-8", errors="replace"), end - t0,
                     end - t_trig if t_trig else 0.0, killed, delay)


def complete_lines(path: Path) -> list[bytes]:
    """The whole, valid JSON lines at the start of an append-only file (what counts as
    finished; a torn last line is not)."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            json.loads(raw)
        except ValueError:
            break
        out.append(raw)
    return out


def tear(path: Path, rng: random.Random) -> bool:
    """Append half a record without a newline, as a kill in the middle of `write` leaves it.
    Returns whether it did (only where the file exists)."""
    if not path.exists():
        return False
    lines = complete_lines(path)
    sample = lines[-1] if lines else b'{"id": "torn", "text": "half a record"}\n'
    cut = rng.randint(1, max(1, len(sample) - 2))
    with open(path, "ab") as f:
        f.write(sample[:cut])
    return True
