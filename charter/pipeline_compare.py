"""Constitution A/B: one pipeline file, two principle files, one report.

    charter run examples/quickstart.yaml --compare principles/helpful-only.yaml --out runs/ab

A is the pipeline file's constitution, B the one given with `--compare`. Both runs use the same
data split, seeds, models and stage settings; only the principle file differs. OUT/a/ and OUT/b/
are each a complete run folder (summary.json, report.md, every stage). What does not depend on
the constitution is done once and shared: the data split is the same by construction, and the
starting model's greedy answers to the held-out prompts (each eval's responses-baseline.jsonl)
are made in A and copied into B's eval folders before B runs (the eval's resume check keys them
by model, prompt and token budget, so a stale copy is never used).

OUT/report.md puts the outcomes side by side: refusal rates on held-out harmful and benign
prompts with 95% Wilson intervals (and whether the two harmful intervals are apart), the judge's
win rates with intervals, the label diagnostics, each run's principle attribution, and a unified
diff of the two principle files. OUT/compare.json holds the same numbers; OUT/compare.png plots
the refusal rates. Re-running the same command resumes (each run resumes stage by stage).
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import write_json_atomic, write_text_atomic


def run_compare(path: str | Path, compare: str | Path, out: str | Path | None = None,
                kinds: dict | None = None, more_heldout: int = 0) -> dict:
    """Run the pipeline at `path` with its own constitution (A) and with `compare` (B);
    `kinds` as in `run_pipeline` (tests pass stand-ins); `more_heldout` > 0 adds that many
    held-out harmful prompts to the comparison (charter/pipeline_heldout.py)."""
    from charter.pipeline import default_out, run_pipeline
    from charter.pipeline_file import load_pipeline_file
    from constitution import load_constitution

    pf = load_pipeline_file(path)
    if more_heldout < 0:
        raise CharterError(f"--more-heldout must be 0 or more, got {more_heldout}",
                           field="more_heldout")
    b_file = str(Path(compare).resolve())
    load_constitution(b_file)  # a bad B fails before A runs for half an hour
    a_file = pf.cfg.constitution
    out = Path(out or pf.cfg.out or default_out(path))
    if Path(a_file).read_bytes() == Path(b_file).read_bytes():
        raise CharterError(f"--compare names the same principle file as the pipeline's "
                           f"({a_file}): nothing to compare", field="compare")
    print(f"[charter run] A: {a_file} into {out / 'a'}")
    a = run_pipeline(path, out / "a", kinds)
    shared = share_baseline(out / "a", out / "b")
    print(f"[charter run] B: {b_file} into {out / 'b'} (shared from A: "
          f"{', '.join(shared) or 'nothing'})")
    b = run_pipeline(path, out / "b", kinds, constitution=b_file)
    result = {"pipeline": str(pf.path), "out": str(out), "shared": shared,
              "a": side(out / "a", a, a_file), "b": side(out / "b", b, b_file)}
    result["harmful_refusal_apart"] = intervals_apart(
        *(result[k]["model"]["harmful"]["ci95"] for k in ("a", "b")))
    if more_heldout:
        from charter.pipeline_heldout import evaluate_more

        result["more_heldout"] = evaluate_more(out, result, pf, more_heldout)
    write_json_atomic(out / "compare.json", result)
    png = plot_compare(result, out / "compare.png")
    write_text_atomic(out / "report.md", render(result, diff_files(a_file, b_file),
                                                png.name if png else None))
    return result


def share_baseline(a_out: Path, b_out: Path) -> list[str]:
    """Copy A's starting-model eval answers into B's eval folders (where B has none yet)."""
    shared = []
    for src in sorted(a_out.glob("eval*/responses-baseline.jsonl")):
        target = b_out / src.parent.name / src.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        shared.append(f"{src.parent.name}/{src.name}")
    return shared


def intervals_apart(a: list[float], b: list[float]) -> bool:
    """True when two intervals [lo, hi] do not overlap (one lies wholly above the other)."""
    return a[0] > b[1] or b[0] > a[1]


def side(run: Path, summary: dict, constitution: str) -> dict:
    """One run's outcome: the last eval's refusal rates (with intervals) and win rates, the
    last label stage's diagnostics, and its principle attribution's candidates."""
    from constitution import load_constitution
    from critique.evaluate.attribution import build_attribution

    evals = [st for st in summary["stages"] if st["kind"] == "eval"]
    if not evals or not (Path(evals[-1]["dir"]) / "report.json").exists():
        raise CharterError("the run has no evaluation report", path=run)
    report = json.loads((Path(evals[-1]["dir"]) / "report.json").read_text(encoding="utf-8"))
    refusal = {role: {label: m[label]["refusal"] for label in ("harmful", "benign")}
               for role, m in report["models"].items()}
    labels = [st for st in summary["stages"] if st["kind"] == "label"]
    diagnostics = ((labels[-1].get("result") or {}).get("diagnostics") if labels else None)
    c = load_constitution(constitution)
    try:
        candidates = build_attribution(run)["candidates"]
    except CharterError as e:
        candidates = {"(attribution failed)": [str(e)]}
    return {"constitution": {"name": c.name, "path": constitution, "sha256": c.sha256},
            "dir": str(run), "eval": evals[-1]["name"], **refusal,
            "win_rate": report.get("win_rate") or {}, "diagnostics": diagnostics,
            "rewrite_candidates": candidates, "final_model": summary.get("final_model")}


def diff_files(a: str, b: str) -> str:
    """A unified diff of the two principle files."""
    text = [Path(p).read_text(encoding="utf-8").splitlines(keepends=True) for p in (a, b)]
    return "".join(difflib.unified_diff(*text, fromfile=f"a: {a}", tofile=f"b: {b}"))


def _pct(s: dict | None) -> str:
    if not s or s.get("rate") is None:
        return "n/a"
    lo, hi = s["ci95"]
    return f"{100 * s['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({s['count']}/{s['n']})"


def _win(w: dict | None) -> str:
    if not w:
        return "n/a"
    lo, hi = w["win_ci95"]
    return f"{100 * w['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={w['n']})"


def render(result: dict, diff: str, image: str | None) -> str:
    a, b = result["a"], result["b"]
    name = {k: f"{result[k]['constitution']['name']} (`{result[k]['constitution']['path']}`)"
            for k in ("a", "b")}
    rows = [("starting model: harmful refusal", a["baseline"]["harmful"],
             b["baseline"]["harmful"]),
            ("trained model: harmful refusal (higher is more harmless)", a["model"]["harmful"],
             b["model"]["harmful"]),
            ("starting model: benign refusal", a["baseline"]["benign"], b["baseline"]["benign"]),
            ("trained model: benign refusal (over-refusal)", a["model"]["benign"],
             b["model"]["benign"])]
    lines = ["# Constitution A/B", "",
             f"Pipeline `{result['pipeline']}`, run twice with the same data, seeds and models; "
             "only the principle file differs.", "",
             f"- **A**: {name['a']} → [a/report.md](a/report.md)",
             f"- **B**: {name['b']} → [b/report.md](b/report.md)",
             f"- shared (made once, in A): {', '.join(result['shared']) or 'nothing'}", "",
             "## Held-out evaluation", "",
             "Refusal rates with 95% Wilson intervals (refused / prompts).", "",
             "| | A | B |", "|---|---|---|"]
    lines += [f"| {label} | {_pct(x)} | {_pct(y)} |" for label, x, y in rows]
    for label in sorted(set(a["win_rate"]) | set(b["win_rate"])):
        lines.append(f"| judge prefers the trained model over the starting one, {label} "
                     f"prompts | {_win(a['win_rate'].get(label))} | "
                     f"{_win(b['win_rate'].get(label))} |")
    ra, rb = a["model"]["harmful"]["rate"], b["model"]["harmful"]["rate"]
    if ra is not None and rb is not None:
        apart = result["harmful_refusal_apart"]
        lines += ["", f"Harmful refusal, A − B: {100 * (ra - rb):+.1f} points; the two 95% "
                  f"intervals {'do not overlap: the outcome follows the principle file' if apart else 'overlap: this run cannot tell the two files apart'}."]
        if not apart and "more_heldout" not in result:
            lines.append("More held-out prompts give the comparison more power without "
                         "re-running anything: add `--more-heldout 200` to the same command.")
    if "more_heldout" in result:
        from charter.pipeline_heldout import render_more

        lines += render_more(result["more_heldout"], _pct)
    if image:
        lines += ["", f"![refusal rates, A and B]({image})"]
    from critique.label.report import render_diagnostics

    for k in ("a", "b"):
        if result[k]["diagnostics"]:
            lines += [""] + render_diagnostics(result[k]["diagnostics"],
                                               f"## Label diagnostics ({k.upper()})")
    lines += ["", "## Principles to rewrite", ""]
    for k in ("a", "b"):
        cands = result[k]["rewrite_candidates"]
        lines.append(f"- {k.upper()}: " + ("; ".join(f"`{p}` ({', '.join(w)})"
                                                    for p, w in cands.items()) or "none")
                     + f" (table: {k}/report.md)")
    fence = "~~~~" if "```" in diff else "```"
    lines += ["", "## The two principle files", "", f"{fence}diff", diff.rstrip("\n"), fence]
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> Path | None:
    """Refusal rates of the starting model and the two trained models, with intervals."""
    from critique.evaluate.report import plot_refusal_bars

    bars = [("starting model", result["a"]["baseline"])]
    bars += [(f"{k.upper()}: {result[k]['constitution']['name']}"[:40], result[k]["model"])
             for k in ("a", "b")]
    more = result.get("more_heldout")
    if more:  # the pooled harmful rates (no benign bar: the extra prompts are harmful only)
        bars += [(f"{k.upper()}, pooled with {more['n']} more"[:40],
                  {"harmful": more[k]["pooled"]}) for k in ("a", "b")]
    return plot_refusal_bars(bars, path, "Constitution A/B: refusal rates (95% Wilson "
                                         "intervals)")
