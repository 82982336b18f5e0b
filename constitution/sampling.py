"""Seeded principle sampling.

Draws depend only on (seed, key...), never on how many draws came before, so a resumed run or a
run over a different subset of prompts draws the same principles for the same record and round.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rng_for(seed: int, *key: object) -> random.Random:
    """A `random.Random` seeded from `seed` and a key (e.g. record id, round)."""
    blob = "\x1f".join([str(seed), *map(str, key)]).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def draw(pool: Sequence[T], k: int, seed: int, *key: object) -> list[T]:
    """`k` distinct items of `pool` (all of them, shuffled, when k >= len(pool))."""
    if not pool:
        raise ValueError("cannot draw from an empty pool")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return rng_for(seed, *key).sample(list(pool), min(k, len(pool)))
