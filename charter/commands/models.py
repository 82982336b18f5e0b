"""Where models live.

    charter models path            # the embedded SmolLM2, converted to safetensors on first use
    charter models path runs/sft   # a run directory resolves to its final/ model
    vllm serve "$(charter models path)"
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_cmd", metavar="ACTION", required=True)
    path = sub.add_parser("path", help="print a model's local directory")
    path.add_argument("name", nargs="?", default=None,
                      help="a model directory, run directory or `smollm2` (default)")


def run(args: argparse.Namespace) -> int:
    from charter.core.models import resolve_model

    print(resolve_model(args.name))
    return 0
