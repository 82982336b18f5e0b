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
    report["diagnostics"] = diagnostics(views, records, report)
    unit = "pairs" if cfg.pairs else "prompts"
    report["timing"] = {"seconds": round(seconds, 3), f"{unit}_this_run": done_now,
                        f"{unit}_per_second": round(done_now / seconds, 4) if seconds > 0
                        and done_now else None}
    report["usage"] = usage
    report["provenance"] = provenance
    return report


# -- diagnostics: does this label set carry signal? -------------------------------------------

MARGIN_BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # |p - 0.5|
NO_SIGNAL_MARGIN = 0.05
NO_SIGNAL_SHARE = 0.5  # warn when at least this share of the pairs sits within 0.05 of 0.5
POSITION_BIAS_WARN = 0.8


def margin_histogram(ps: list[float]) -> list[int]:
    """Counts of |p - 0.5| per MARGIN_BINS interval [lo, hi) (the last one closed)."""
    counts = [0] * (len(MARGIN_BINS) - 1)
    for p in ps:
        m = abs(p - 0.5)
        k = next((i for i in range(len(counts)) if m < MARGIN_BINS[i + 1]), len(counts) - 1)
        counts[k] += 1
    return counts


def label_warnings(n: int, near_half: int, position_bias_value: float | None,
                   human: float | None, human_n: int, unlabelled: int) -> list[str]:
    """Plain-language warnings when the labels carry little or no signal."""
    out = []
    if n and near_half / n >= NO_SIGNAL_SHARE:
        out.append(f"{100 * near_half / n:.0f}% of pairs within {NO_SIGNAL_MARGIN} of 0.5: DPO "
                   "on these labels will change little (a stronger labeller, or "
                   "relabel_below with a second labeller, gives them signal)")
    if position_bias_value is not None and position_bias_value >= POSITION_BIAS_WARN:
        out.append(f"the labeller picked the same position in {100 * position_bias_value:.0f}%"
                   " of pairs whatever their order: it reads position, not content (both "
                   "orders are averaged, which leaves labels near 0.5)")
    if human is not None and human_n >= 10 and human < 0.6:
        out.append(f"agreement with the human labels is {100 * human:.0f}% on {human_n} pairs: "
                   "near chance")
    if unlabelled:
        out.append(f"{unlabelled} pair(s) got no label: an option token was missing from the "
                   "server's top log-probs in every reading")
    return out


def diagnostics(views: list, records: list[dict], report: dict) -> dict:
    """Margin histogram, position bias, principle agreement, human agreement, relabelling
    and missing-option counts, and the warnings they raise."""
    ps = [v[0] for v in views]
    near = sum(abs(p - 0.5) < NO_SIGNAL_MARGIN for p in ps)
    acc = report.get("accuracy") or {}
    first = [r["first_label"] for r in records if "first_label" in r]
    relabel = None
    if first:
        flipped = sum(f["p_chosen"] is not None and f["p_chosen"] < 0.5 for f in first)
        relabel = {"relabelled": len(first), "flipped": flipped,
                   "still_near_half": sum(abs(r["p_chosen"] - 0.5) < NO_SIGNAL_MARGIN
                                          for r in records if "first_label" in r)}
    unlabelled = report.get("pairs_without_label", 0)
    missing = sum(r.get("missing_option_reads", 0) for r in records)
    return {
        "n": len(ps), "margin_bins": list(MARGIN_BINS), "margin_histogram": margin_histogram(ps),
        "share_within_0.05": _rnd(near / len(ps)) if ps else None,
        "position_bias": report.get("position_bias"),
        "principle_agreement": report.get("principle_agreement"),
        "human_agreement": acc.get("both_orders"), "human_n": acc.get("n", 0),
        "relabel": relabel, "missing_option_reads": missing, "pairs_without_label": unlabelled,
        "warnings": label_warnings(len(ps), near, report.get("position_bias"),
                                   acc.get("both_orders"), acc.get("n", 0), unlabelled),
    }


def render_diagnostics(d: dict, title: str = "## Label diagnostics") -> list[str]:
    """Markdown lines for report.md (the label stage's and the pipeline's)."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    bins = d["margin_bins"]
    lines = [title, "", f"{d['n']} labelled pairs. |p − 0.5| histogram: " + ", ".join(
        f"[{lo:.2f}, {hi:.2f}) {c}" for lo, hi, c in zip(bins, bins[1:], d["margin_histogram"]))
        + ".", "",
        f"- within 0.05 of 0.5: {pct(d['share_within_0.05'])}",
        f"- position bias (same position won in both orders): {pct(d['position_bias'])}",
        f"- agreement between principles: {pct(d['principle_agreement'])}",
        "- agreement with human labels: " + (f"{pct(d['human_agreement'])} of {d['human_n']}"
                                             if d["human_n"] else "no human labels given")]
    if d.get("relabel"):
        r = d["relabel"]
        lines.append(f"- low-margin pairs relabelled: {r['relabelled']} ({r['flipped']} changed "
                     f"side, {r['still_near_half']} still within 0.05 of 0.5)")
    if d.get("missing_option_reads") or d.get("pairs_without_label"):
        lines.append(f"- readings with an option token missing from the top log-probs: "
                     f"{d['missing_option_reads']}; pairs left without a label: "
                     f"{d['pairs_without_label']}")
    lines += [""] + [f"**Warning:** {w}" for w in d["warnings"]]
    return lines


def write_diagnostics(out, report: dict, records: list[dict], min_margin: float) -> None:
    """margins.png (histogram of the labels' p) and report.md into the label directory."""
    from pathlib import Path

    from charter.core.records import write_text_atomic

    out = Path(out)
    d = report["diagnostics"]
    png = plot_margins([label_views(r)[0] for r in records], out / "margins.png", min_margin)
    lines = ["# Labels", "", f"Labeller: `{report['provenance'].get('labeler')}` on "
             f"`{report['provenance'].get('backend')}`; mode {report['mode']}.", ""]
    lines += render_diagnostics(d)
    if png is not None:
        lines += ["", "![label margins](margins.png)"]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


def plot_margins(ps: list[float], path, min_margin: float):
    """Histogram of the labels' p (chosen's or a's), with the low-margin band shaded."""
    if not ps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(ps, bins=40, range=(0, 1), color="tab:blue")
    ax.axvspan(0.5 - min_margin, 0.5 + min_margin, color="grey", alpha=0.25,
               label=f"low margin (|p − 0.5| < {min_margin})")
    ax.set_xlabel("label probability")
    ax.set_ylabel("pairs")
    ax.set_title("AI preference labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
