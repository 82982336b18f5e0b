"""Run the whole pipeline from one YAML file: critique → SFT → label → DPO → eval.

    charter run examples/quickstart.yaml --out runs/quick
    charter run examples/quickstart.yaml --check     # validate and show the plan only
    charter run examples/quickstart.yaml --compare principles/helpful-only.yaml --out runs/ab
    charter run examples/quickstart.yaml --compare principles/helpful-only.yaml --more-heldout 200

The file names the constitution, the starting model, the prompt sets (with held-out parts for
evaluation) and each stage's settings (the keys of that stage's command); see
charter/pipeline_file.py for the format. Each stage writes into DIR/<stage>/; re-running the
same command skips finished stages and resumes the one that was interrupted. DIR/summary.json
names the final model; DIR/report.md shows the evaluation with plots.

`--compare B.yaml` runs the pipeline twice, with its own constitution (A, into DIR/a/) and with
B (into DIR/b/), sharing what does not depend on the principle file, and writes DIR/report.md
with the two outcomes side by side and a diff of the two files (charter/pipeline_compare.py).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline file (YAML)")
    p.add_argument("--out", default=None,
                   help="output directory (default: the file's `out`, else runs/<file name>)")
    p.add_argument("--check", action="store_true",
                   help="validate the file and print the stages and their settings; run nothing")
    p.add_argument("--compare", default=None, metavar="B.yaml",
                   help="a second principle file: run the pipeline with each (A = the file's "
                   "constitution, into OUT/a and OUT/b) and compare them in OUT/report.md")
    p.add_argument("--more-heldout", type=int, default=0, metavar="N",
                   help="with --compare: also have both trained models answer N more held-out "
                   "harmful prompts (after the training ones in the same shuffle; refusal only) "
                   "and pool them with the run's own, for a comparison with more power")


def run(args: argparse.Namespace) -> int:
    from charter.pipeline import run_pipeline

    if args.check:
        import json

        plan = run_pipeline(args.pipeline, args.out, check=True)
        print(json.dumps(plan, indent=2))
        print(f"ok: {len(plan['stages'])} stages, prompts {plan['data']}")
        return 0
    if args.more_heldout and not args.compare:
        from charter.core.errors import CharterError

        raise CharterError("--more-heldout adds prompts to a constitution A/B: it needs "
                           "--compare B.yaml", field="more_heldout")
    if args.compare:
        from charter.pipeline_compare import run_compare

        result = run_compare(args.pipeline, args.compare, args.out,
                             more_heldout=args.more_heldout)
        for k in ("a", "b"):
            h = result[k]["model"]["harmful"]
            print(f"{k.upper()}: {result[k]['constitution']['name']:20s} harmful refusal "
                  f"{h['rate']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]")
            more = result.get("more_heldout")
            if more:
                h = more[k]["pooled"]
                print(f"   pooled with {more['n']} more held-out prompts: {h['rate']:.3f} "
                      f"[{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] ({h['count']}/{h['n']})")
        print(f"report: {result['out']}/report.md")
        return 0
    summary = run_pipeline(args.pipeline, args.out)
    for st in summary["stages"]:
        print(f"{st['name']:10s} {st['status']}")
    print(f"final model: {summary['final_model']}")
    print(f"report: {summary['out']}/report.md")
    return 0
