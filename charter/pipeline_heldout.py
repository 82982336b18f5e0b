"""More held-out prompts for a constitution A/B: statistical power where the comparison needs it.

    charter run examples/quickstart.yaml --compare principles/helpful-only.yaml --out runs/ab \
        --more-heldout 200

A run's own eval holds out the first `eval` prompts of each set after the seeded shuffle, and
trains on the next `train`. At 40 held-out prompts a refusal rate's 95% interval is about
±14 points wide, so two principle files whose models differ by 15 points cannot be told apart.
`--more-heldout N` takes the N harmful prompts that follow the training ones in the same
shuffle (no stage of either run has seen them), has each side's final model answer them with
the run's own eval settings (greedy), and pools them with that run's held-out harmful prompts.
The starting model answers them too (once, shared by both sides). Refusal only: the judge's
win rates cost more than the answers and stay on the run's own eval. The training data does not change, so this adds to a finished A/B without re-running
anything (re-running the same command resumes every stage, then this).

Outputs: OUT/heldout-more/harmful.jsonl (the prompts), OUT/heldout-more/a/ and b/ (each a
`charter eval` folder: report.json, report.md, results.jsonl), and a `more_heldout` entry in
OUT/compare.json and OUT/report.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import write_jsonl_atomic

# the eval settings that say where prompts, models and outputs are: replaced, not copied
_WIRING = {"model", "baseline", "sft_model", "prompts", "harmful", "benign", "prompt_field",
           "out", "metrics", "judge", "judge_backend", "constitution", "limit"}


def more_heldout_prompts(pf, n: int, run: Path) -> list[dict]:
    """The `n` harmful prompts after the held-out and training ones of `pf`'s seeded shuffle;
    checked against the run's own data split (`run`/data) so none was trained on or held out."""
    from charter.pipeline_file import _row, read_prompts, split_prompts

    ps = pf.harmful
    if ps is None:
        raise CharterError("--more-heldout needs a `harmful` prompt set", path=pf.path)
    if ps.train is None:
        raise CharterError("--more-heldout: the harmful set's `train` takes all the prompts left "
                           "after the held-out ones; set `train: N` to leave some",
                           path=pf.path, field="harmful")
    items = read_prompts(ps.path, ps.prompt_field)
    everything, _ = split_prompts(items, dataclasses.replace(ps, eval=0, train=None),
                                  pf.cfg.seed, "harmful")
    extra = everything[ps.eval + ps.train:][:n]
    if len(extra) < n:
        raise CharterError(f"--more-heldout {n}: the harmful set has {len(everything)} distinct "
                           f"prompts, {ps.eval} held out and {ps.train} trained on, so only "
                           f"{len(extra)} are left", path=ps.path)
    used = set()
    for name in ("eval.jsonl", "train.jsonl"):
        with open(run / "data" / name, encoding="utf-8") as f:
            used |= {json.loads(line)["id"] for line in f if line.strip()}
    if any(it.id in used for it in extra):  # the run's split is not this file's: refuse
        raise CharterError("--more-heldout: the run's data split is not the pipeline file's "
                           "(the prompt file or seed changed since it ran)", path=run / "data")
    return [_row(it) for it in extra]


def evaluate_more(out: Path, result: dict, pf, n: int) -> dict:
    """Each side's final model on the `n` extra prompts; their refusal rates alone and pooled
    with the side's own held-out harmful prompts, and whether the pooled intervals are apart."""
    from charter.pipeline import free_memory
    from critique.evaluate.config import EvalConfig
    from critique.evaluate.run import run_eval
    from critique.evaluate.stats import intervals_apart
    folder = out / "heldout-more"
    rows = more_heldout_prompts(pf, n, out / "a")
    prompts = folder / "harmful.jsonl"
    write_jsonl_atomic(prompts, rows)  # the same rows each time (the eval keys answers by prompt)
    fields = {f.name for f in dataclasses.fields(EvalConfig)} - _WIRING
    entry: dict = {"n": n, "prompts": str(prompts)}
    for k in ("a", "b"):
        side = result[k]
        base = json.loads((Path(side["dir"]) / side["eval"] / "report.json")
                          .read_text(encoding="utf-8"))["config"]
        settings = {f: base[f] for f in fields if f in base}
        if settings.get("refusal_detector", "rule") != "rule":  # the judge's verdict counts too
            settings.update(judge=base.get("judge"), judge_backend=base.get("judge_backend"),
                            constitution=base.get("constitution"))
        cfg = EvalConfig(**settings, model=side["final_model"], baseline=base.get("baseline"),
                         prompts=str(prompts), out=str(folder / k))
        if k == "b":  # the starting model's answers: made once, in A (as the A/B's own eval)
            share_baseline(folder, "a", "b")
        print(f"[charter run] {k.upper()}: {n} more held-out harmful prompts into {folder / k}")
        models = run_eval(cfg)["models"]
        free_memory()
        entry[k] = _pooled(models["model"]["harmful"]["refusal"], side["model"]["harmful"])
        if k == "a" and "baseline" in models:
            entry["start"] = _pooled(models["baseline"]["harmful"]["refusal"],
                                     side["baseline"]["harmful"])
    entry["pooled_apart"] = intervals_apart(entry["a"]["pooled"]["ci95"],
                                            entry["b"]["pooled"]["ci95"])
    return entry


def _pooled(more: dict, own: dict) -> dict:
    """The extra prompts' refusal summary, and pooled with the run's own (a Wilson interval)."""
    from critique.evaluate.stats import wilson_interval

    count, total = own["count"] + more["count"], own["n"] + more["n"]
    return {"more": more, "pooled": {"count": count, "n": total,
                                     "rate": count / total if total else None,
                                     "ci95": list(wilson_interval(count, total))}}


def share_baseline(folder: Path, src: str, dst: str) -> None:
    import shutil

    made = folder / src / "responses-baseline.jsonl"
    target = folder / dst / "responses-baseline.jsonl"
    if made.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, target)


def render_more(entry: dict, pct) -> list[str]:
    """The report's section on the extra held-out prompts (`pct` formats one rate)."""
    a, b = entry["a"], entry["b"]
    ra, rb = a["pooled"]["rate"], b["pooled"]["rate"]
    verdict = ("do not overlap: the outcome follows the principle file"
               if entry["pooled_apart"] else "still overlap: these prompts cannot tell the "
               "two files apart either")
    rows = ["", "## More held-out harmful prompts", "",
            f"{entry['n']} more harmful prompts from the same set (the ones after the training "
            "prompts in the same seeded shuffle: no stage of either run saw them), answered by "
            "the starting model and each trained model with the eval's settings; refusal by the "
            "same rule. Pooled with "
            f"the held-out ones above. Prompts: `{entry['prompts']}`.", "",
            "| harmful refusal | A | B |", "|---|---|---|"]
    start = entry.get("start")
    if start:  # the same starting model on both sides
        rows += [f"| starting model, the {entry['n']} more prompts | {pct(start['more'])} | "
                 f"{pct(start['more'])} |",
                 f"| starting model, pooled with the run's own | {pct(start['pooled'])} | "
                 f"{pct(start['pooled'])} |"]
    rows += [f"| trained model, the {entry['n']} more prompts | {pct(a['more'])} | "
             f"{pct(b['more'])} |",
             f"| trained model, pooled with the run's own held-out prompts | "
             f"{pct(a['pooled'])} | {pct(b['pooled'])} |", "",
            f"Pooled harmful refusal, A − B: {100 * (ra - rb):+.1f} points; the two 95% "
            f"intervals {verdict}."]
    return rows
