"""Critique-and-revise loop: SL-CAI training data from a constitution (Bai et al. 2022, §3).

    charter critique --constitution principles/harmless.yaml \\
        --prompts examples/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 64 \\
        --helpful-prompts examples/data/alpaca-eval-instructions.jsonl --helpful-limit 32 \\
        --rounds 2 --out runs/critique

Writes OUT/records.jsonl (every prompt's critiques and revisions), OUT/sft.jsonl (prompt + final
revision, plus the helpful answers), OUT/pairs.jsonl (chosen = final revision, rejected = initial
response) and OUT/manifest.json. Every flag can also be set in a YAML file given with --config;
flags override it. Re-running the same command resumes where a killed run stopped.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args
    from critique.revise.config import CritiqueConfig

    p.add_argument("--config", metavar="YAML", default=None,
                   help="YAML file with any of the settings below (flags override it)")
    add_config_args(p, CritiqueConfig)


def summary(m: dict) -> str:
    """A few lines for the terminal."""
    c = m["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in c["flagged_by_reason"].items()) or "none"
    lines = [
        f"critique: {c['done']}/{c['prompts']} prompts done ({c['resumed']} from an earlier run),"
        f" {c['flagged']} flagged",
        f"  flagged by reason: {reasons}",
        f"  rounds: {c['revised_rounds']} revised, {c['unchanged_rounds']} unchanged"
        " (nothing to fix)",
        f"  sft.jsonl: {c['sft_examples']} examples ({c['helpful_done']} helpful);"
        f" pairs.jsonl: {c['pairs']} pairs ({c['identical_pairs_skipped']} identical skipped)",
        f"  {m['generated_tokens']} tokens generated in {m['timings']['total_seconds']:.1f} s"
        f" ({m['tokens_per_second'] or 0:.1f} tokens/s)",
        "  principles used: " + ", ".join(f"{k} {v}" for k, v in m["principle_usage"].items()),
        f"  output: {m['config']['out']}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from charter.core.config import build_config
    from critique.revise.run import CritiqueConfig, run_critique

    cfg = build_config(CritiqueConfig, args, args.config)
    manifest = run_critique(cfg)
    print(summary(manifest))
    return 0
