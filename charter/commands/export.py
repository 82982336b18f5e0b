"""Export a run's data for other tools (TRL, the alignment handbook, the Hub).

    charter export runs/quick --out exports/quick
    charter export runs/quick --format trl-standard --min-margin 0.1 --soft-labels as-weights \\
        --out exports/quick-std

Writes OUT/sft/train.jsonl and OUT/preference/train.jsonl in TRL's dataset shapes and
OUT/README.md, a dataset card whose front matter names them (`load_dataset(OUT, "preference")`),
with the constitution beside it. See training/export.py for the options.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args
    from training.export import ExportConfig

    p.add_argument("run", help="a pipeline run folder, or a critique or label stage's folder")
    p.add_argument("--config", metavar="YAML", help="settings file; flags override it")
    add_config_args(p, ExportConfig, skip=("run",))


def run(args: argparse.Namespace) -> int:
    from charter.core.config import build_config
    from training.export import ExportConfig, export

    got = export(build_config(ExportConfig, args, args.config))
    counts = ", ".join(f"{k}: {v} rows" for k, v in got["counts"].items())
    print(f"wrote {got['out']} ({counts}; {got['dropped']} pairs below --min-margin)")
    return 0
