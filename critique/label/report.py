"""report.json for a labelling run: label statistics computed from all records in the output
(those written by earlier, resumed runs included), plus this run's tokens and timings.

Rate-mode records have no probability; where a statistic needs a side (accuracy, agreement), a
rating gap g in [-9, 9] is mapped to 0.5 + g / 18, which only keeps its sign and size.
"""

from __future__ import annotations

from collections import Counter

from critique.preference.labelmath import accuracy, confidence, position_bias, principle_agreement

RATING_SPAN = 9.0  # ratings 1..10


def _gap_to_p(gap: float) -> float:
    return 0.5 + gap / (2 * RATING_SPAN)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _rnd(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def label_views(rec: dict) -> tuple[float, dict[str, float], list[float] | None]:
    """(p of the first/chosen response, votes principle → p, orders or None) of any record."""
    if "rating_gap" in rec:
        votes = {k: _gap_to_p(v[0] - v[1]) for k, v in rec.get("rating_votes", {}).items()}
        return _gap_to_p(rec["rating_gap"]), votes, None
    p = rec["p_a"] if "p_a" in rec else rec["p_chosen"]
    return p, rec.get("votes", {}), rec.get("orders")


def accuracy_report(records: list[dict], cot: bool) -> dict | None:
    """Accuracy against `preferred` (pairs mode): given order only, both orders, per principle."""
    labelled = [r for r in records if r.get("preferred") in ("a", "b")]
    if not labelled:
        return None
    prefs = [r["preferred"] for r in labelled]
    views = [label_views(r) for r in labelled]
    out = {"n": len(labelled), "cot": cot,
           "both_orders": _rnd(accuracy([v[0] for v in views], prefs))}
    if all(v[2] is not None for v in views):
        out["given_order"] = _rnd(accuracy([v[2][0] for v in views], prefs))
    per: dict[str, tuple[list[float], list[str]]] = {}
    for (_, votes, _), pref in zip(views, prefs):
        for pid, p in votes.items():
            per.setdefault(pid, ([], []))
            per[pid][0].append(p)
            per[pid][1].append(pref)
    out["per_principle"] = {pid: {"n": len(ps), "accuracy": _rnd(accuracy(ps, pr))}
                            for pid, (ps, pr) in sorted(per.items())}
    return out


def build_report(records: list[dict], cfg, *, seconds: float, done_now: int, usage: dict,
                 provenance: dict, extra: dict | None = None) -> dict:
    views = [label_views(r) for r in records]
    orders = [v[2] for v in views if v[2] is not None]
    usage_count = Counter(pid for v in views for pid in v[1])
    report = {
        "input": "pairs" if cfg.pairs else "prompts",
        "mode": cfg.mode,
        "n": len(records),
        "labelled_this_run": done_now,
        "position_bias": _rnd(position_bias(orders)) if orders else None,
        "mean_confidence": _rnd(_mean([confidence(v[0]) for v in views])),
        "principle_usage": dict(sorted(usage_count.items())),
        "principle_agreement": _rnd(principle_agreement([v[1] for v in views])),
    }
    if cfg.mode == "rate":
        report["mean_rating_gap"] = _rnd(_mean([abs(r["rating_gap"]) for r in records]))
    if cfg.prompts:
        report["low_margin"] = sum(bool(r.get("low_margin")) for r in records)
    acc = accuracy_report(records, cfg.cot)
    if acc is not None:
        report["accuracy"] = acc
    report.update(extra or {})
    unit = "pairs" if cfg.pairs else "prompts"
    report["timing"] = {"seconds": round(seconds, 3), f"{unit}_this_run": done_now,
                        f"{unit}_per_second": round(done_now / seconds, 4) if seconds > 0
                        and done_now else None}
    report["usage"] = usage
    report["provenance"] = provenance
    return report
