"""Evaluate a model: refusal rates on harmful and benign prompts, and an AI judge's win rate.

    charter eval --model runs/quick/dpo --baseline smollm2 --prompts eval.jsonl --out runs/eval
    charter eval --model runs/quick/dpo --baseline smollm2 --harmful red.jsonl \\
        --benign helpful.jsonl --judge smollm2 --constitution principles/harmless.yaml \\
        --out runs/eval

Prompts carry `label: harmful|unsafe|benign|safe`, or come as two files (--harmful, --benign).
Refusals are detected by the phrase rule documented in critique/evaluate/refusal.py (plus the judge's
yes/no verdict with --judge). The judged win rate needs --judge, --baseline and --constitution.
Writes DIR/report.json, DIR/report.md, DIR/results.jsonl and PNG plots; re-running with the
same settings resumes (other settings in the same DIR are refused: delete it, or use a new --out).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args
    from critique.evaluate.config import EvalConfig

    p.add_argument("--config", help="YAML file with these settings (flags override it)")
    add_config_args(p, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from charter.core.config import build_config
    from critique.evaluate.run import EvalConfig, run_eval

    cfg = build_config(EvalConfig, args, getattr(args, "config", None))
    report = run_eval(cfg)
    for role, m in report["models"].items():
        h, b = m["harmful"]["refusal"], m["benign"]["refusal"]
        print(f"{role:8s} {m['name']}: refuses {_pct(h['rate'])} of {h['n']} harmful, "
              f"{_pct(b['rate'])} of {b['n']} benign prompts")
    for label, w in (report.get("win_rate") or {}).items():
        print(f"judge prefers the model on {label} prompts: {_pct(w['win_rate'])} "
              f"[{_pct(w['win_ci95'][0])}, {_pct(w['win_ci95'][1])}] (n={w['n']})")
    print(f"report: {cfg.out}/report.md")
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
