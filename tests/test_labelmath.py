"""Label math against values worked out by hand (each docstring shows the computation)."""

from __future__ import annotations

import math

import pytest

from critique.preference.labelmath import (
    accuracy,
    clamp,
    confidence,
    ensemble,
    exclusive_probs,
    low_margin,
    p_first,
    position_bias,
    principle_agreement,
    rating_expectation,
    softmax,
    swap_average,
)


def test_p_first_single_token():
    """la = ln 0.3, lb = ln 0.1 → 0.3 / (0.3 + 0.1) = 0.75."""
    assert p_first(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)


def test_p_first_multi_token_options_compare_summed_logps():
    """Option A = two tokens with log-probs -0.5, -0.2 → sum -0.7; option B = one token -1.0.
    P(A) = e^-0.7 / (e^-0.7 + e^-1.0) = 1 / (1 + e^-0.3) = 1 / 1.740818 = 0.574443."""
    assert p_first(-0.5 + -0.2, -1.0) == pytest.approx(0.574443, abs=1e-6)


def test_p_first_equal_and_extreme():
    """Equal log-probs → 0.5. Very negative values must not underflow to 0/0:
    -1000 vs -1001 → sigmoid(1) = 0.731059."""
    assert p_first(-2.0, -2.0) == 0.5
    assert p_first(-1000.0, -1001.0) == pytest.approx(0.731059, abs=1e-6)
    assert softmax([-math.inf, -math.inf]) == [0.5, 0.5]


def test_swap_average_cancels_a_pure_position_preference():
    """A labeller that gives position A 0.9 whatever it shows: given order p = 0.9, swapped
    P(A) = 0.9 → orders = [0.9, 1 - 0.9] = [0.9, 0.1], p_a = (0.9 + 0.1) / 2 = 0.5."""
    p, orders = swap_average(0.9, 0.9)
    assert p == pytest.approx(0.5)
    assert orders == pytest.approx([0.9, 0.1])


def test_swap_average_keeps_content_preference():
    """Given 0.8 (a in A wins), swapped P(A) = 0.3 (b in A loses, so a wins with 0.7):
    orders = [0.8, 0.7], p_a = 0.75."""
    p, orders = swap_average(0.8, 0.3)
    assert p == pytest.approx(0.75)
    assert orders == pytest.approx([0.8, 0.7])


def test_position_bias_counts_same_winning_position():
    """Pair 1 orders [0.9, 0.1]: given → A wins; swapped P(A) = 1 - 0.1 = 0.9 → A wins: same.
    Pair 2 [0.8, 0.7]: A; swapped P(A) = 0.3 → B: different.
    Pair 3 [0.2, 0.9]: B; swapped P(A) = 0.1 → B: same.
    Pair 4 [0.5, 0.4]: tie → not same. Bias = 2 / 4 = 0.5."""
    assert position_bias([[0.9, 0.1], [0.8, 0.7], [0.2, 0.9], [0.5, 0.4]]) == 0.5
    assert position_bias([]) is None


def test_ensemble_is_the_mean_of_votes():
    """votes 0.9, 0.6, 0.3 → (0.9 + 0.6 + 0.3) / 3 = 0.6."""
    assert ensemble({"harm": 0.9, "honest": 0.6, "kind": 0.3}) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        ensemble({})


def test_clamp():
    """0.95 → 0.8, 0.05 → 0.2, 0.6 stays; bounds [0.4, 0.6]: 0.95 → 0.6."""
    assert clamp(0.95) == 0.8
    assert clamp(0.05) == 0.2
    assert clamp(0.6) == 0.6
    assert clamp(0.95, 0.4, 0.6) == 0.6
    with pytest.raises(ValueError):
        clamp(0.5, 0.7, 0.8)


def test_exclusive_probs_separates_prefix_options():
    """P("1") = 0.5 includes P("10") = 0.2, so P(exactly 1) = 0.3; P("2") = 0.3.
    Disjoint masses 0.3, 0.3, 0.2 (options 1, 2, 10) → normalised 0.375, 0.375, 0.25."""
    probs = exclusive_probs(["1", "2", "10"], [math.log(0.5), math.log(0.3), math.log(0.2)])
    assert probs == pytest.approx([0.375, 0.375, 0.25])


def test_exclusive_probs_nested_chain():
    """Options 1, 10, 100 with P 0.6, 0.3, 0.1: exactly-1 = 0.6 - 0.3 = 0.3 (only the direct
    extension 10 is subtracted; 100 is inside 10), exactly-10 = 0.3 - 0.1 = 0.2, exactly-100 = 0.1.
    Sum 0.6 → 0.5, 0.333333, 0.166667."""
    probs = exclusive_probs(["1", "10", "100"], [math.log(0.6), math.log(0.3), math.log(0.1)])
    assert probs == pytest.approx([0.5, 1 / 3, 1 / 6])


def test_rating_expectation():
    """Ratings 1..10; P("7") = 0.4, P("8") = 0.4, P("1") = 0.15 of which P("10") = 0.05, and
    tiny mass 1e-9 elsewhere (ignored at 1e-6 tolerance). Exclusive masses: 1 → 0.10,
    7 → 0.4, 8 → 0.4, 10 → 0.05; total 0.95.
    E = (1·0.10 + 7·0.4 + 8·0.4 + 10·0.05) / 0.95 = (0.1 + 2.8 + 3.2 + 0.5) / 0.95 = 6.947368."""
    p = {1: 0.15, 7: 0.4, 8: 0.4, 10: 0.05}
    logps = [math.log(p.get(i, 1e-9)) for i in range(1, 11)]
    assert rating_expectation(logps) == pytest.approx(6.947368, abs=1e-5)


def test_rating_expectation_two_levels():
    """low = 1, two options "1", "2" with log-probs equal → E = 1·0.5 + 2·0.5 = 1.5."""
    assert rating_expectation([-1.0, -1.0]) == pytest.approx(1.5)


def test_low_margin_and_confidence():
    """|0.55 - 0.5| = 0.05 < 0.1 → low; |0.7 - 0.5| = 0.2 → not; confidence(0.3) = 0.7."""
    assert low_margin(0.55, 0.1)
    assert not low_margin(0.7, 0.1)
    assert confidence(0.3) == pytest.approx(0.7)


def test_accuracy():
    """p 0.8/a right, 0.3/a wrong, 0.2/b right, 0.5/b tie = half → (1 + 0 + 1 + 0.5) / 4 = 0.625."""
    assert accuracy([0.8, 0.3, 0.2, 0.5], ["a", "a", "b", "b"]) == pytest.approx(0.625)
    assert accuracy([], []) is None
    with pytest.raises(ValueError):
        accuracy([0.5], ["x"])


def test_principle_agreement():
    """Pair 1 votes (0.9, 0.7, 0.2): sides A, A, B → pairs (1,2) agree, (1,3) no, (2,3) no: 1/3.
    Pair 2 votes (0.6, 0.8): A, A → 1/1. Pair 3 has one vote: no principle pairs.
    Total agreeing 2 of 4 principle pairs = 0.5."""
    votes = [{"x": 0.9, "y": 0.7, "z": 0.2}, {"x": 0.6, "y": 0.8}, {"x": 0.1}]
    assert principle_agreement(votes) == 0.5
    assert principle_agreement([{"x": 0.1}]) is None


def test_rating_expectation_disjoint_tokens():
    """A tokenizer with a "10" token: P("1") = 0.5 and P("10") = 0.5 are disjoint, so
    E = 1·0.5 + 10·0.5 = 5.5 (with nested=True it would be 10: "1" minus "10" leaves 0)."""
    logps = [math.log(0.5)] + [-1e9] * 8 + [math.log(0.5)]
    assert rating_expectation(logps, nested=False) == pytest.approx(5.5)
    assert rating_expectation(logps, nested=True) == pytest.approx(10.0)
