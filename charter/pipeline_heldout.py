"""More held-out prompts for a constitution A/B: statistical power where the comparison needs it.

    charter run examples/quickstart.yaml --compare principles/helpful-only.yaml --out runs/ab \
        --more-heldout 200

A run's own eval holds out the first `eval` prompts of each set after the seeded shuffle, and
trains on the next `train`. At 40 held-out prompts a refusal rate's 95% interval is about
±14 points wide, so two principle files whose models differ by 15 points cannot be told apart.
`--more-heldout N` takes the N harmful prompts that follow the training ones in the same
shuffle (no stage of either run has seen them), has each side's final model answer them with
the run's own eval settings (greedy), and pools them with that run's held-out harmful prompts.
Refusal only: the judge's win rates cost more than the answers and stay on the run's own
eval. The training data does not change, so this adds to a finished A/B without re-running
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
    from charter.pipeline_compare import intervals_apart
    from critique.evaluate.config import EvalConfig
    from critique.evaluate.run import run_eval
    from critique.evaluate.stats import wilson_interval

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
        cfg = EvalConfig(**settings, model=side["final_model"], prompts=str(prompts),
                         out=str(folder / k))
        print(f"[charter run] {k.upper()}: {n} more held-out harmful prompts into {folder / k}")
        more = run_eval(cfg)["models"]["model"]["harmful"]["refusal"]
        free_memory()
        own = side["model"]["harmful"]
        count, total = own["count"] + more["count"], own["n"] + more["n"]
        pooled = {"count": count, "n": total, "rate": count / total if total else None,
                  "ci95": list(wilson_interval(count, total))}
        entry[k] = {"more": more, "pooled": pooled}
    entry["pooled_apart"] = intervals_apart(entry["a"]["pooled"]["ci95"],
                                            entry["b"]["pooled"]["ci95"])
    return entry


def render_more(entry: dict, pct) -> list[str]:
    """The report's section on the extra held-out prompts (`pct` formats one rate)."""
    a, b = entry["a"], entry["b"]
    ra, rb = a["pooled"]["rate"], b["pooled"]["rate"]
    verdict = ("do not overlap: the outcome follows the principle file"
               if entry["pooled_apart"] else "still overlap: these prompts cannot tell the "
               "two files apart either")
    return ["", "## More held-out harmful prompts", "",
            f"{entry['n']} more harmful prompts from the same set (the ones after the training "
            "prompts in the same seeded shuffle: no stage of either run saw them), answered by "
            "each trained model with the eval's settings; refusal by the same rule. Pooled with "
            f"the held-out ones above. Prompts: `{entry['prompts']}`.", "",
            "| trained model: harmful refusal | A | B |", "|---|---|---|",
            f"| the {entry['n']} more prompts | {pct(a['more'])} | {pct(b['more'])} |",
            f"| pooled with the run's own held-out prompts | {pct(a['pooled'])} | "
            f"{pct(b['pooled'])} |", "",
            f"Pooled harmful refusal, A − B: {100 * (ra - rb):+.1f} points; the two 95% "
            f"intervals {verdict}."]
