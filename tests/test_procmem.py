"""charter.core.procmem: the per-stage resident-memory numbers the pipeline records."""

from __future__ import annotations

import sys

import pytest

from charter.core import procmem

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
