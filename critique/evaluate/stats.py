"""Evaluation statistics: rates and win rates with 95% confidence intervals (pure functions).

- A rate (refusal rate) is k of n with a Wilson score interval (Wilson 1927): it stays inside
  [0, 1] and is sensible for small n and for rates near 0 or 1, where the normal interval is not.
- A pairwise comparison gives, per prompt, p = P(judge prefers M over the baseline), the mean of
  both presentation orders and of the sampled principles. Each prompt is a win (p > 0.5 + m), a
  loss (p < 0.5 - m) or a tie (|p - 0.5| <= m, e.g. identical responses; the tie margin m is 0
  unless set); the win rate counts ties as half a win: (wins + ties / 2) / n, with a Wilson interval on that fraction (a tie adds 0.5 to the
  successes). The mean preference probability mean(p) gets a seeded percentile bootstrap
  interval over prompts (Efron & Tibshirani 1993, §13.3).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial fraction successes / n.

    centre = (p + z²/2n) / (1 + z²/n); half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²).
    Returns (0, 1) when n = 0 (nothing is known).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at p = 0 (or 1) the bound is exactly p; rounding would leave 1e-17 and put p outside
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_mean_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample `values` with replacement
    `resamples` times (seeded), take the (1-level)/2 and (1+level)/2 quantiles of the means
    (nearest rank on the sorted means)."""
    n = len(values)
    if n == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n
                   for _ in range(resamples))
    lo_i = int(math.floor((1 - level) / 2 * (resamples - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (resamples - 1)))
    return means[lo_i], means[hi_i]


def rate_summary(flags: Sequence[bool]) -> dict:
    """`{n, count, rate, ci95}` for a list of yes/no outcomes."""
    n, k = len(flags), sum(bool(f) for f in flags)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "count": k, "rate": k / n if n else None, "ci95": [lo, hi]}


def outcome(p: float, tie_margin: float = 0.0) -> float:
    """1 for a win (p > 0.5 + tie_margin), 0 for a loss (p < 0.5 - tie_margin), else 0.5."""
    return 1.0 if p > 0.5 + tie_margin else 0.0 if p < 0.5 - tie_margin else 0.5


def win_summary(probs: Sequence[float], resamples: int = 1000, seed: int = 0,
                tie_margin: float = 0.0) -> dict:
    """Win rate of M over the baseline from per-prompt preference probabilities.

    Returns n, wins, losses, ties (|p - 0.5| <= tie_margin), `win_rate` = (wins + ties/2) / n
    with its Wilson `win_ci95`, and `mean_p` with its bootstrap `mean_p_ci95`.
    """
    n = len(probs)
    wins = sum(1 for p in probs if outcome(p, tie_margin) == 1.0)
    losses = sum(1 for p in probs if outcome(p, tie_margin) == 0.0)
    ties = n - wins - losses
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    mean_p = sum(probs) / n if n else None
    blo, bhi = bootstrap_mean_interval(list(probs), resamples, seed)
    return {"n": n, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": score / n if n else None, "win_ci95": [lo, hi],
            "mean_p": mean_p, "mean_p_ci95": [blo, bhi]}


def intervals_apart(a, b) -> bool:
    """True when two intervals [lo, hi] do not overlap (one lies wholly above the other)."""
    return a[0] > b[1] or b[0] > a[1]
