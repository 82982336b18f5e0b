"""AI preference labels from a constitution (RL-CAI feedback): A/B log-probs, both orders.

    charter label --constitution principles/harmless.yaml --pairs pairs.jsonl --out runs/labels
    charter label --constitution principles/harmless.yaml --prompts prompts.jsonl \\
        --policy runs/sft --samples 4 --out runs/prefs [--labeler M] [--cot] [--mode rate]
    charter label --config label.yaml --limit 20     # flags override the YAML file

Pairs mode writes DIR/labels.jsonl (id, p_a, orders, votes); prompts mode samples K responses
per prompt from the policy and writes DIR/pairs.jsonl (TRL prompt/chosen/rejected with p_chosen).
The labeller defaults to the policy model, and to the embedded SmolLM2 when there is none.
DIR/report.json has position bias, confidence, principle agreement and, when the pairs carry a
human `preferred` (a/b), the labeller's accuracy. Re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args
    from critique.label.config import LabelConfig

    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file of settings (flags given here override it)")
    add_config_args(p, LabelConfig)


def run(args: argparse.Namespace) -> int:
    from charter.core.config import build_config
    from critique.label.run import LabelConfig, run_label

    cfg = build_config(LabelConfig, args, args.config)
    report = run_label(cfg)
    summary = {k: report.get(k) for k in ("n", "position_bias", "mean_confidence",
                                          "principle_agreement", "low_margin", "accuracy")
               if report.get(k) is not None}
    print(json.dumps(summary, indent=2))
    out = "labels.jsonl" if cfg.pairs else "pairs.jsonl"
    print(f"wrote {cfg.out}/{out} and {cfg.out}/report.json")
    return 0
