"""charter.core.procmem: the per-stage resident-memory numbers the pipeline records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from charter.core import procmem

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self: runs on Linux (CI)")


def test_peak_restarts_and_sees_an_allocation():
    big = bytearray(300 * 2**20)  # touched: resident
    for i in range(0, len(big), 4096):
        big[i] = 1
    del big
    start = procmem.reset_peak()
    assert start is not None and procmem.peak_mb() < start + 100  # the 300 MB is forgotten
    block = bytearray(200 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert procmem.peak_mb() >= start + 180
    assert procmem.rss_mb() >= start + 180
    del block


_FRAGMENT = r"""
import sys
from charter.core import procmem
if sys.argv[1] == "set":
    assert procmem.return_large_frees()
elif sys.argv[1] == "cli":  # the command line's --lean-memory sets it for the process
    from charter.cli import main
    assert main(["--lean-memory", "principles", "lint", "principles/harmless.yaml"]) == 0
big = bytearray(30 * 2**20)  # mapped, then freed: glibc's own threshold rises to 30 MB
del big
blocks = [bytearray(512 * 1024) for _ in range(600)]  # 300 MB of 512 KB blocks, touched
for b in blocks:
    for i in range(0, len(b), 4096):
        b[i] = 1
before = procmem.rss_mb()
keep = blocks[-1]  # the newest block pins the heap's top: freed blocks below it stay resident
del blocks
print(before - procmem.rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc (Linux, CI), without a user's MALLOC_MMAP_THRESHOLD_")
def test_large_frees_go_back_to_the_system():
    """With the threshold set (directly, or by `charter --lean-memory`), freeing 300 MB of
    512 KB blocks returns it at once; glibc's default (the control) keeps it resident. Each in a process of its own: the setting is
    process-wide."""
    def returned(mode: str) -> int:
        res = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        return int(res.stdout.strip().splitlines()[-1])

    assert returned("set") >= 250
    assert returned("cli") >= 250
    assert returned("default") < 50
