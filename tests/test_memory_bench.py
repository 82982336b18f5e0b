"""benchmarks/memory_1b.py keeps running: its smoke shape, one mode, end to end (~20 s)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_benchmark_reports_peaks_by_phase():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_1b.py"), "--shape",
                           "tiny", "--modes", "bf16-inbw", "--steps", "2", "--max-length", "128"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    r = last["modes"]["bf16-inbw"]
    assert len(r["loss"]) == 2 and all(x == x for x in r["loss"])  # two steps, no NaN
    phases = r["phase_peaks_mb"]
    assert {"load", "reference log-probs", "steps", "final save"} <= set(phases)
    assert r["peak_mb"] >= max(phases.values())  # VmHWM, or a sample where VmHWM lagged it
    assert phases["steps"] > r["runtime_mb"] > 0
    assert r["computed_mb"] > r["runtime_mb"]
