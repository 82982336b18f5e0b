"""Principle attribution: what each principle of a constitution did in a run.

    charter principles report runs/quick            # a pipeline run (critique/, label*/ inside)
    charter principles report runs/critique         # or one critique or label stage's folder

Reads the critique stage's `records.jsonl` (which principle each round drew, whether the
revision changed the response) and the label stage's `pairs.jsonl` / `labels.jsonl` (each
principle's vote on each pair, and `preferred` where human labels were given), and reports per
principle: rounds drawn, rounds that changed the response, agreement of its votes with the rest
of the ensemble and with the humans, and its share of low-margin votes; principles that never
change anything or disagree with all others are named as candidates to rewrite (statistics:
`critique.evaluate.attribution_stats`). Nothing here runs a model; the run's files are only read.

Outputs (`write_attribution`): attribution.json, attribution.md and attribution.png. The
pipeline's report.md adds the same section with `attribution_section(run_dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import read_jsonl, write_json_atomic, write_text_atomic
from critique.evaluate.attribution_stats import (
    CritiqueCounts,
    VoteCounts,
    critique_counts,
    rewrite_candidates,
    vote_counts,
)

CRITIQUE_FILE = "records.jsonl"
LABEL_FILES = ("labels.jsonl", "pairs.jsonl")  # pairs mode, prompts mode
CONSTITUTION_COPY = "constitution.yaml"
FALLBACK_MARGIN = {"compare": 0.1, "rate": 1.0}  # only when a label folder has no config.json


def _is_critique(d: Path) -> bool:
    return (d / CRITIQUE_FILE).is_file()


def _label_file(d: Path) -> Path | None:
    """The label stage's records in `d`: labels.jsonl, or pairs.jsonl next to the stage's
    config.json (a critique folder's pairs.jsonl, or an input file, is not one)."""
    if _is_critique(d):
        return None
    if (d / LABEL_FILES[0]).is_file():
        return d / LABEL_FILES[0]
    if (d / LABEL_FILES[1]).is_file() and (d / "config.json").is_file():
        return d / LABEL_FILES[1]
    return None


def stage_dirs(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(critique folders, label folders) in `run_dir`: the folder itself, or its stage folders."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CharterError("not a directory: expected a run folder (charter run --out, or a "
                           "critique or label stage's --out)", path=root)
    dirs = [root] if _is_critique(root) or _label_file(root) else sorted(
        (d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    return [d for d in dirs if _is_critique(d)], [d for d in dirs if _label_file(d)]


# -- reading -----------------------------------------------------------------------------------


def _check(ok: bool, what: str, path: Path, line: int, field: str) -> None:
    if not ok:
        raise CharterError(what, path=path, line=line, field=field)


def read_critique(path: Path, skipped: list[str]) -> list[tuple[str, list[tuple[str, str]], bool]]:
    """(initial response, [(principle id, revision)], flagged) per record of records.jsonl."""
    out = []
    for line, rec in read_jsonl(path, errors=skipped):
        initial, rounds = rec.get("initial_response"), rec.get("rounds")
        _check(isinstance(initial, str), "expected a string", path, line, "initial_response")
        _check(isinstance(rounds, list), "expected a list of rounds", path, line, "rounds")
        pairs = []
        for k, r in enumerate(rounds):
            ok = (isinstance(r, dict) and isinstance(r.get("principle_id"), str)
                  and isinstance(r.get("revision"), str))
            _check(ok, "expected {principle_id, critique, revision} with string values", path,
                   line, f"rounds[{k}]")
            pairs.append((r["principle_id"], r["revision"]))
        out.append((initial, pairs, bool(rec.get("flagged"))))
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def record_leans(rec: dict, path: Path, line: int) -> dict[str, float]:
    """Principle id → lean towards the record's first response (see attribution_stats)."""
    if "rating_votes" in rec:
        votes = rec["rating_votes"]
        _check(isinstance(votes, dict), "expected an object", path, line, "rating_votes")
        for pid, v in votes.items():
            _check(isinstance(v, list) and len(v) == 2 and all(map(_number, v)),
                   "expected two ratings", path, line, f"rating_votes.{pid}")
        return {pid: float(v[0] - v[1]) for pid, v in votes.items()}
    votes = rec.get("votes", {})
    _check(isinstance(votes, dict), "expected an object", path, line, "votes")
    for pid, p in votes.items():
        _check(_number(p) and 0.0 <= p <= 1.0, f"expected a probability in [0, 1], got {p!r}",
               path, line, f"votes.{pid}")
    return {pid: float(p) - 0.5 for pid, p in votes.items()}


def read_label(d: Path, skipped: list[str]) -> tuple[list[tuple[dict, str | None]], float, str]:
    """([(leans, preferred)], margin, mode) of a label folder."""
    path = _label_file(d)
    assert path is not None
    cfg = {}
    if (d / "config.json").is_file():
        try:
            cfg = json.loads((d / "config.json").read_text(encoding="utf-8")).get("config", {})
        except (ValueError, AttributeError):
            raise CharterError("unreadable run settings", path=d / "config.json") from None
    mode = cfg.get("mode", "compare")
    margin = cfg.get("min_rating_gap" if mode == "rate" else "min_margin",
                     FALLBACK_MARGIN.get(mode, 0.1))
    out = []
    for line, rec in read_jsonl(path, errors=skipped):
        pref = rec.get("preferred")
        _check(pref in (None, "a", "b"), f"expected a or b, got {pref!r}", path, line,
               "preferred")
        leans = record_leans(rec, path, line)
        if leans:
            out.append((leans, pref))
    return out, float(margin), mode


def _principles(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """([{id, stages}] in file order, [{name, sha256, path}]) from the folders' principle-file
    copies (deduplicated by content)."""
    from constitution import load_constitution

    seen, files, principles = set(), [], {}
    for d in dirs:
        copy = d / CONSTITUTION_COPY
        if not copy.is_file():
            continue
        c = load_constitution(copy)
        if c.sha256 in seen:
            continue
        seen.add(c.sha256)
        files.append({"name": c.name, "sha256": c.sha256, "path": str(copy)})
        for p in c.principles:
            stages = [s for s in ("critique", "preference") if getattr(p, s)]
            principles.setdefault(p.id, {"id": p.id, "stages": stages})
    return list(principles.values()), files


# -- the report --------------------------------------------------------------------------------


def build_attribution(run_dir: str | Path, min_count: int = 3) -> dict:
    """Per-principle statistics of a run folder (see the module docstring)."""
    crit_dirs, label_dirs = stage_dirs(run_dir)
    if not crit_dirs and not label_dirs:
        raise CharterError(f"no critique or label output here: expected {CRITIQUE_FILE} (a "
                           f"critique folder), {' or '.join(LABEL_FILES)} (a label folder) or "
                           "stage folders holding them", path=run_dir)
    skipped: list[str] = []
    crit: dict[str, CritiqueCounts] = {}
    for d in crit_dirs:
        for pid, c in critique_counts(read_critique(d / CRITIQUE_FILE, skipped)).items():
            t = crit.setdefault(pid, CritiqueCounts())
            t.drawn, t.changed = t.drawn + c.drawn, t.changed + c.changed
            t.unchanged, t.failed = t.unchanged + c.unchanged, t.failed + c.failed
    votes: dict[str, VoteCounts] = {}
    modes = []
    for d in label_dirs:
        pairs, margin, mode = read_label(d, skipped)
        modes.append({"dir": d.name, "mode": mode, "margin": margin, "pairs": len(pairs)})
        for pid, v in vote_counts(pairs, margin).items():
            t = votes.setdefault(pid, VoteCounts())
            for f in ("votes", "low_margin", "ensemble_n", "ensemble_agree", "human_n",
                      "human_agree"):
                setattr(t, f, getattr(t, f) + getattr(v, f))
            for s, n in v.sides.items():
                t.sides[s] += n
    principles, files = _principles(crit_dirs + label_dirs)
    known = {p["id"] for p in principles}
    for pid in sorted(set(crit) | set(votes)):
        if pid not in known:  # e.g. a distilled answer's round ("constitution")
            principles.append({"id": pid, "stages": [], "not_in_file": True})
    rows = []
    for p in principles:
        c, v = crit.get(p["id"], CritiqueCounts()), votes.get(p["id"], VoteCounts())
        rows.append({**p, "drawn": c.drawn, "changed": c.changed, "unchanged": c.unchanged,
                     "failed": c.failed, "change_rate": _r(c.change_rate), "votes": v.votes,
                     "low_margin_share": _r(v.low_margin_share),
                     "ensemble_agreement": _r(v.ensemble_agreement), "ensemble_n": v.ensemble_n,
                     "human_agreement": _r(v.human_agreement), "human_n": v.human_n})
    return {"run_dir": str(run_dir), "critique_dirs": [d.name for d in crit_dirs],
            "label_dirs": modes, "constitutions": files, "min_count": min_count,
            "principles": rows, "candidates": rewrite_candidates(crit, votes, min_count),
            "never_used": [r["id"] for r in rows if not r["drawn"] and not r["votes"]],
            "unreadable_lines": len(skipped), "first_unreadable": skipped[:5]}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pct(x: float | None, n: int | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.0f}%" + (f" ({n})" if n is not None else "")


def render_section(report: dict, image: str | None = None, title: str = "## Principles"
                   ) -> list[str]:
    """Markdown lines: the per-principle table, the candidates to rewrite, the plot link."""
    crit, lab = bool(report["critique_dirs"]), bool(report["label_dirs"])
    lines = [title, "", "What each principle did in this run (critique: "
             f"{', '.join(report['critique_dirs']) or 'none'}; labels: "
             f"{', '.join(m['dir'] for m in report['label_dirs']) or 'none'}). *Changed*: rounds "
             "whose revision differs from the response before it. *Ensemble*: its votes' "
             "agreement with the other principles drawn for the same pair; *humans*: with "
             "`preferred`; counts in brackets.", "",
             "| principle | drawn | changed | votes | ensemble | humans | low-margin |",
             "|---|---|---|---|---|---|---|"]
    for r in report["principles"]:
        name = f"`{r['id']}`" + (" (not in the file)" if r.get("not_in_file") else "")
        changed = (f"{r['changed']} ({_pct(r['change_rate'])})" if r["drawn"] else "–")
        lines.append(f"| {name} | {r['drawn'] if crit else '–'} | {changed} | "
                     f"{r['votes'] if lab else '–'} | "
                     f"{_pct(r['ensemble_agreement'], r['ensemble_n'] or None)} | "
                     f"{_pct(r['human_agreement'], r['human_n'] or None)} | "
                     f"{_pct(r['low_margin_share'])} |")
    lines.append("")
    if report["candidates"]:
        lines += [f"Candidates to rewrite (at least {report['min_count']} rounds or votes "
                  "behind each reason):", ""]
        lines += [f"- `{pid}`: {'; '.join(why)}" for pid, why in report["candidates"].items()]
    else:
        lines.append("No principle is a candidate to rewrite (none never changed a response or "
                     "disagreed with all others on enough data).")
    if report["never_used"]:
        lines += ["", "Never drawn and never voted: "
                  + ", ".join(f"`{p}`" for p in report["never_used"]) + "."]
    if report["unreadable_lines"]:
        lines += ["", f"{report['unreadable_lines']} unreadable line(s) skipped (first: "
                  f"{report['first_unreadable'][0]})."]
    if image:
        lines += ["", f"![principle attribution]({image})"]
    return lines


def plot_attribution(report: dict, path: Path) -> Path | None:
    """Left: rounds drawn (changed part dark); right: agreement and low-margin shares."""
    rows = [r for r in report["principles"] if r["drawn"] or r["votes"]]
    if not rows:
        return None
    from critique.evaluate.report import _pyplot, _save

    plt = _pyplot()
    ys = list(range(len(rows)))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1.8 + 0.32 * len(rows)), sharey=True)
    left.barh(ys, [r["drawn"] for r in rows], color="lightsteelblue", label="drawn")
    left.barh(ys, [r["changed"] for r in rows], color="tab:blue", label="changed the response")
    left.set_yticks(ys, [r["id"] for r in rows], fontsize=8)
    left.set_xlabel("critique rounds")
    below = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.5 / (1 + 0.3
                                                                                  * len(rows))),
             "ncol": 3, "frameon": False}
    left.legend(**below)
    metrics = [("ensemble_agreement", "agrees with the ensemble", "tab:green"),
               ("human_agreement", "agrees with humans", "tab:orange"),
               ("low_margin_share", "low-margin votes", "tab:grey")]
    h = 0.8 / len(metrics)
    for k, (key, label, colour) in enumerate(metrics):
        vals = [100 * (r[key] or 0.0) for r in rows]
        if any(r[key] is not None for r in rows):
            right.barh([y + (1 - k) * h for y in ys], vals, h, color=colour, label=label)
    right.axvline(50, color="black", linestyle=":", linewidth=0.8)
    right.set_xlim(0, 100)
    right.set_xlabel("share of the principle's votes (%)")
    right.legend(**below)
    fig.suptitle("What each principle did")
    return _save(fig, plt, path)


def write_attribution(run_dir: str | Path, out: str | Path | None = None,
                      min_count: int = 3) -> dict:
    """attribution.json, attribution.md and attribution.png into `out` (default: the run
    folder); returns the report."""
    report = build_attribution(run_dir, min_count)
    out = Path(out) if out is not None else Path(run_dir)
    png = plot_attribution(report, out / "attribution.png")
    write_json_atomic(out / "attribution.json", report)
    lines = render_section(report, png.name if png else None, title="# Principle attribution")
    write_text_atomic(out / "attribution.md", "\n".join(lines) + "\n")
    return report


def attribution_section(run_dir: str | Path, min_count: int = 3) -> list[str]:
    """The pipeline report's section (its plot written as run_dir/attribution.png), or [] when
    the run has no critique or label output yet."""
    crit, lab = stage_dirs(run_dir)
    if not crit and not lab:
        return []
    report = build_attribution(run_dir, min_count)
    png = plot_attribution(report, Path(run_dir) / "attribution.png")
    return render_section(report, png.name if png else None)
