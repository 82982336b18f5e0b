"""Preference-label math: pure functions of log-probs and probabilities (no model, no I/O).

Conventions used throughout:
- A comparison shows two responses in positions (A) and (B). The labeller's log-probs of the
  option tokens give `p_first`, the probability that the response in position A is better.
- A pair's responses are called `a` and `b` (its given order). It is scored twice: as (a, b) and
  swapped as (b, a). `orders = [p_a from the given order, p_a from the swapped order]`, where the
  swapped order's p_a is `1 - p_first` (response a sat in position B).
- "Winning position": A when p_first > 0.5, B when < 0.5, none on an exact tie.

Multi-token options: `score` returns each option's *summed* log-prob (log of the product of its
tokens' probabilities), and the options are compared through those sums. That is the probability
of the whole option string, so options of different token lengths are compared fairly as
strings; it is not length-normalised. When one option is a string prefix of another ("1" and
"10"), the longer one's mass is inside the shorter one's; `exclusive_probs` separates them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def softmax(logps: Sequence[float]) -> list[float]:
    """Normalised probabilities from log-probs (numerically stable: shift by the max)."""
    if not logps:
        raise ValueError("softmax of an empty list")
    m = max(logps)
    if m == -math.inf:
        return [1.0 / len(logps)] * len(logps)  # no information: uniform
    exps = [math.exp(x - m) for x in logps]
    total = sum(exps)
    return [e / total for e in exps]


def p_first(logp_a: float, logp_b: float) -> float:
    """P(option A) normalised over the two options: exp(la) / (exp(la) + exp(lb)).

    `logp_a`, `logp_b` are the options' summed token log-probs (see the module docstring).
    """
    return softmax([logp_a, logp_b])[0]  # = sigmoid(la - lb)


def swap_average(p_given: float, p_first_swapped: float) -> tuple[float, list[float]]:
    """Both-orders label: (p_a, orders).

    `p_given`: P(position A) when a is in A; `p_first_swapped`: P(position A) when b is in A.
    orders = [p_given, 1 - p_first_swapped]; p_a = their mean. A labeller that only prefers a
    position gives p_given = p_first_swapped = q, so p_a = (q + 1 - q) / 2 = 0.5: the bias cancels.
    """
    orders = [p_given, 1.0 - p_first_swapped]
    return (orders[0] + orders[1]) / 2.0, orders


def winning_position(p_first_value: float) -> str | None:
    """"A" if position A wins, "B" if position B wins, None on an exact tie."""
    if p_first_value > 0.5:
        return "A"
    if p_first_value < 0.5:
        return "B"
    return None


def position_bias(orders: Sequence[Sequence[float]]) -> float | None:
    """Fraction of pairs whose winning POSITION stayed the same when the order was swapped.

    Each item is a pair's `orders` ([p_a given, p_a swapped]). In the given order a sits in A, so
    the winning position is that of p_a; in the swapped order a sits in B, so the winning position
    is that of 1 - p_a. A tie in either order counts as not the same. A labeller that reads the
    content gives 0.0; one that always picks the same slot gives 1.0; a coin flip about 0.5.
    None for no pairs.
    """
    if not orders:
        return None
    same = 0
    for given, swapped in orders:
        first = winning_position(given)
        second = winning_position(1.0 - swapped)  # back to P(position A) in the swapped order
        same += first is not None and first == second
    return same / len(orders)


def ensemble(votes: Mapping[str, float]) -> float:
    """The mean of the principles' p_a votes (each principle weighs the same)."""
    if not votes:
        raise ValueError("no votes to ensemble")
    return sum(votes.values()) / len(votes)


def clamp(p: float, lo: float = 0.2, hi: float = 0.8) -> float:
    """Clamp a chain-of-thought label to [lo, hi] (CoT labels are over-confident, Bai et al. §4.1)."""
    if not 0.0 <= lo <= 0.5 <= hi <= 1.0:
        raise ValueError(f"clamp bounds must satisfy 0 <= lo <= 0.5 <= hi <= 1, got {lo}, {hi}")
    return min(hi, max(lo, p))


def exclusive_probs(options: Sequence[str], logps: Sequence[float]) -> list[float]:
    """Probabilities of the options as disjoint events, normalised over the options.

    The log-prob of "1" is that of the assistant's text *starting* with "1", which includes
    "10". So P(exactly o) = P(o) - Σ P(o') over the other options o' that extend o, when
    no third option sits between them (true for "1".."10"). Negative remainders (numerical noise)
    become 0. Then normalise over the options.
    """
    if len(options) != len(logps) or not options:
        raise ValueError("one log-prob per option, at least one option")
    raw = [math.exp(x) for x in logps]
    excl = []
    for i, o in enumerate(options):
        longer = [j for j, o2 in enumerate(options) if j != i and o2.startswith(o) and o2 != o]
        # only direct extensions: o' with no other option strictly between o and o'
        direct = [j for j in longer
                  if not any(k != j and options[j].startswith(options[k]) for k in longer)]
        excl.append(max(0.0, raw[i] - sum(raw[j] for j in direct)))
    total = sum(excl)
    if total <= 0.0:
        return [1.0 / len(options)] * len(options)
    return [e / total for e in excl]


def rating_expectation(logps: Sequence[float], low: int = 1, nested: bool = True) -> float:
    """Expected rating Σ i·P(i), P normalised over the score tokens low, low+1, ... (direct RLAIF).

    `logps[k]` is the summed log-prob of the rating `low + k` written as text. With `nested`
    (a tokenizer that writes "10" as "1" then "0", as SmolLM2, Qwen and Mistral do), "10"'s mass
    is inside "1"'s and `exclusive_probs` separates them; a tokenizer with a "10" token (Llama 3)
    makes them disjoint already: nested=False, plain normalisation.
    """
    options = [str(low + k) for k in range(len(logps))]
    probs = exclusive_probs(options, logps) if nested else softmax(logps)
    return sum((low + k) * p for k, p in enumerate(probs))


def low_margin(p: float, min_margin: float) -> bool:
    """True when the label is too close to a coin flip: |p - 0.5| < min_margin."""
    return abs(p - 0.5) < min_margin


def confidence(p: float) -> float:
    """How sure a label is: max(p, 1 - p), in [0.5, 1]."""
    return max(p, 1.0 - p)


def accuracy(ps: Sequence[float], preferred: Sequence[str]) -> float | None:
    """Agreement with human labels: p_a > 0.5 and preferred "a", or p_a < 0.5 and "b".

    An exact tie (p_a = 0.5) earns half a point, as a coin flip would on average. None when there
    is nothing to compare.
    """
    if len(ps) != len(preferred):
        raise ValueError("one human label per probability")
    if not ps:
        return None
    score = 0.0
    for p, pref in zip(ps, preferred):
        if pref not in ("a", "b"):
            raise ValueError(f"preferred must be 'a' or 'b', got {pref!r}")
        if p == 0.5:
            score += 0.5
        elif (p > 0.5) == (pref == "a"):
            score += 1.0
    return score / len(ps)


def principle_agreement(votes: Sequence[Mapping[str, float]]) -> float | None:
    """How often two principles voted for the same response, over all principle pairs within
    each labelled pair (a vote at exactly 0.5 agrees with nothing). None when no pair has two
    or more votes."""
    agree = total = 0
    for v in votes:
        sides = [winning_position(p) for p in v.values()]
        for i in range(len(sides)):
            for j in range(i + 1, len(sides)):
                total += 1
                agree += sides[i] is not None and sides[i] == sides[j]
    return agree / total if total else None
