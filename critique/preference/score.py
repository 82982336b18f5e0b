"""The labelling calls: one `score` call per chunk with both orders of every pair (and every
drawn principle) in it, and the rating call of rating mode. Shared by `charter label` and the
judge of `charter eval`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from critique.backends.base import Sampling
from critique.preference import prompt as lp
from critique.preference.labelmath import clamp, ensemble, p_first, rating_expectation, swap_average


@dataclass(kw_only=True)
class CompareSettings:
    """How a comparison is asked and read: the labeller's settings (`LabelConfig` inherits
    them) and the judge's."""

    few_shot: int = 3
    """At most this many labelling examples from the principle file before each question."""
    cot: bool = False
    """Chain of thought: the labeller reasons first, then the options are read after it."""
    cot_max_new_tokens: int = 128
    """Length limit of the chain-of-thought reasoning."""
    clamp_low: float = 0.2
    """Chain-of-thought: each order's P(A) is clamped to at least this."""
    clamp_high: float = 0.8
    """Chain-of-thought: each order's P(A) is clamped to at most this."""
    seed: int = 0
    """Seed of the chain-of-thought generation."""


def compare_pairs(backend, constitution, jobs: list[tuple], cfg: CompareSettings) -> list[dict]:
    """Label `jobs` = [(messages, response_a, response_b, [principles])] in both orders.

    Returns per job: p_a, orders, votes (principle id → p_a), vote_orders, and with CoT the
    reasoning (principle id → [given order, swapped order]).
    """
    convs, keys = [], []
    for j, (messages, ra, rb, principles) in enumerate(jobs):
        for pr in principles:
            for order, (first, second) in enumerate(((ra, rb), (rb, ra))):
                convs.append(lp.comparison(constitution, pr, messages, first, second,
                                           0 if cfg.cot else cfg.few_shot))
                keys.append((j, pr.id, order))
    if cfg.cot:
        # Few-shot answers carry no reasoning, so under CoT they would teach skipping it.
        greedy = Sampling(temperature=0.0, max_new_tokens=cfg.cot_max_new_tokens,
                          seed=cfg.seed, stop=list(lp.COT_STOP))
        texts = backend.generate(convs, greedy, prefixes=[lp.COT_PREFIX] * len(convs))
        reasoning = [t[0] for t in texts]
        prefixes = [lp.cot_answer_prefix(r) for r in reasoning]
    else:
        reasoning, prefixes = [], [lp.ANSWER_PREFIX] * len(convs)
    scores = backend.score(convs, [list(lp.OPTIONS)] * len(convs), prefixes)
    firsts: dict[tuple, float | None] = {}
    for key, (la, lb) in zip(keys, scores):
        if math.isnan(la) or math.isnan(lb):
            firsts[key] = None  # an option token outside the server's top-k: no reading
            continue
        p = p_first(la, lb)  # normalised P("(A)") over the two options (Bai et al. 2022 §4.1)
        # CoT labels are clamped per read (Bai et al. 2022 §4.1: 40-60% there; a flag here)
        firsts[key] = clamp(p, cfg.clamp_low, cfg.clamp_high) if cfg.cot else p
    results = []
    for j, (_, _, _, principles) in enumerate(jobs):
        votes, vote_orders, missing = {}, {}, 0
        for pr in principles:
            given, swapped = firsts[(j, pr.id, 0)], firsts[(j, pr.id, 1)]
            missing += (given is None) + (swapped is None)
            if given is None or swapped is None:
                continue  # one order alone would let position bias back in
            # both orders averaged: cancels position bias (Lee et al. 2023, "Addressing Position Bias")
            votes[pr.id], vote_orders[pr.id] = swap_average(given, swapped)
        n = len(vote_orders)
        res = {"p_a": ensemble(votes) if votes else None,  # principle ensemble (Bai et al. §4.1)
               "orders": [sum(o[k] for o in vote_orders.values()) / n for k in (0, 1)]
               if n else None, "votes": votes, "vote_orders": vote_orders}
        if missing:
            res["missing_option_reads"] = missing
        if cfg.cot:
            res["reasoning"] = {pr.id: [reasoning[i] for i, k in enumerate(keys)
                                        if k[0] == j and k[1] == pr.id] for pr in principles}
        results.append(res)
    return results


def rate_responses(backend, constitution, jobs: list[tuple]) -> list[dict]:
    """Rate `jobs` = [(messages, response, [principles])]: per job the mean expected rating
    and each principle's rating."""
    convs, keys = [], []
    for j, (messages, response, principles) in enumerate(jobs):
        for pr in principles:
            convs.append(lp.rating(constitution, pr, messages, response))
            keys.append((j, pr.id))
    scores = backend.score(convs, [list(lp.RATING_OPTIONS)] * len(convs), None)
    nested = lp.ratings_nested(getattr(backend, "tokenizer", None))
    per: dict[int, dict[str, float]] = {}
    missing: dict[int, int] = {}
    for (j, pid), logps in zip(keys, scores):
        # a score token outside the server's top-k had less mass than every listed one: it
        # counts as 0 and the rating says how many were missing
        gone = sum(math.isnan(x) for x in logps)
        missing[j] = missing.get(j, 0) + gone
        logps = [-math.inf if math.isnan(x) else x for x in logps]
        per.setdefault(j, {})[pid] = rating_expectation(logps, lp.RATING_LOW, nested)
    return [{"rating": sum(per[j].values()) / len(per[j]), "votes": per[j],
             **({"missing_options": missing[j]} if missing.get(j) else {})}
            for j in range(len(jobs))]
