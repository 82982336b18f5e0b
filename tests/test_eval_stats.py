"""Win rates and confidence intervals (critique/evaluate/stats.py), against hand-computed values."""

from __future__ import annotations

import pytest

from critique.evaluate.stats import (
    bootstrap_mean_interval,
    outcome,
    rate_summary,
    wilson_interval,
    win_summary,
)


def test_wilson_interval_hand_computed():
    """z = 1.959964, z² = 3.841459.
    5 of 10: p = 0.5, denom = 1 + 0.3841459 = 1.3841459, centre = (0.5 + 0.1920729) / denom
    = 0.5, half = 1.959964 / 1.3841459 · sqrt(0.025 + 3.841459/400) = 1.416005 · 0.186022
    = 0.263406 → (0.236594, 0.763406).
    0 of 10: centre = 0.1920729 / 1.3841459 = 0.138767, half = 1.416005 · sqrt(0.00960365)
    = 1.416005 · 0.0979982 = 0.138766 → (0, 0.277533).
    10 of 10 mirrors it: (0.722467, 1)."""
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.236594, abs=1e-5), pytest.approx(0.763406, abs=1e-5))
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-6) and hi == pytest.approx(0.277533, abs=1e-5)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.722467, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_interval():
    """Constant values: every resample's mean is the constant. Values {0, 1}: every mean is
    in [0, 1] and the interval contains the sample mean 0.5; the same seed repeats exactly."""
    assert bootstrap_mean_interval([0.7] * 5, resamples=200) == (0.7, 0.7)
    a = bootstrap_mean_interval([0.0, 1.0] * 10, resamples=500, seed=3)
    assert 0.0 <= a[0] < 0.5 < a[1] <= 1.0
    assert a == bootstrap_mean_interval([0.0, 1.0] * 10, resamples=500, seed=3)
    assert bootstrap_mean_interval([], resamples=10) == (0.0, 1.0)


def test_win_summary_counts_ties_as_half():
    """probs = [0.9, 0.6, 0.5, 0.2]: wins 2, ties 1, losses 1 → win rate (2 + 0.5) / 4 = 0.625;
    mean_p = 2.2 / 4 = 0.55; the Wilson interval is the one for 2.5 of 4."""
    s = win_summary([0.9, 0.6, 0.5, 0.2], resamples=100)
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (4, 2, 1, 1)
    assert s["win_rate"] == pytest.approx(0.625)
    assert s["mean_p"] == pytest.approx(0.55)
    assert s["win_ci95"] == list(wilson_interval(2.5, 4))
    assert s["mean_p_ci95"][0] <= 0.55 <= s["mean_p_ci95"][1]
    assert [outcome(p) for p in (0.51, 0.5, 0.49)] == [1.0, 0.5, 0.0]


def test_tie_margin():
    """margin 0.1: 0.9 wins, 0.55 and 0.5 tie (|p - 0.5| <= 0.1), 0.2 loses → (1 + 1) / 4."""
    s = win_summary([0.9, 0.55, 0.5, 0.2], resamples=10, tie_margin=0.1)
    assert (s["wins"], s["ties"], s["losses"], s["win_rate"]) == (1, 2, 1, 0.5)
    assert [outcome(p, 0.1) for p in (0.61, 0.6, 0.4, 0.39)] == [1.0, 0.5, 0.5, 0.0]


def test_rate_summary():
    """3 of 4 refusals → rate 0.75 with the Wilson interval for 3 of 4."""
    s = rate_summary([True, True, False, True])
    assert s == {"n": 4, "count": 3, "rate": 0.75, "ci95": list(wilson_interval(3, 4))}
    assert rate_summary([])["rate"] is None


def test_wilson_interval_contains_the_rate_at_0_and_1():
    """k = 0: centre - half is 0 exactly in arithmetic (1.4e-17 in floats, seen on 0/24, which
    made the refusal plot's error bar negative); the bound must be 0, and 1 for k = n."""
    from critique.evaluate.stats import wilson_interval

    assert wilson_interval(0, 24)[0] == 0.0
    assert wilson_interval(24, 24)[1] == 1.0
    lo, hi = wilson_interval(0, 24)
    assert 0.13 < hi < 0.14  # z²/(n+z²) = 3.8415/27.8415 = 0.1380
