"""SFT and DPO training (loops on accelerate; DDP/FSDP/DeepSpeed through `accelerate launch`).

    charter train sft --data runs/critique --out runs/sft --epochs 2
    charter train dpo --data runs/label --out runs/dpo --model runs/sft --loss soft --beta 0.1
    charter train dpo --data pairs.jsonl --out runs/dpo --lora --lora-r 16 --mixed-precision bf16
    accelerate launch --num_processes 2 -m charter train dpo --data pairs.jsonl --out runs/dpo
    torchrun --nproc_per_node 2 -m charter train dpo --data pairs.jsonl --out runs/dpo  # CPU DDP
    torchrun --nproc_per_node 8 -m charter train dpo ... --fsdp     # sharded (docs/scaling.md)

Re-running the same command resumes from the latest complete checkpoint in --out. The model is
saved to OUT/final (safetensors, loads with AutoModelForCausalLM.from_pretrained), and
`--model OUT` in a later command uses it.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args
    from training.options import DPOConfig, SFTConfig

    sub = p.add_subparsers(dest="train_cmd", metavar="STAGE", required=True)
    for name, cls, help_text in (("sft", SFTConfig, "supervised fine-tuning on conversations"),
                                 ("dpo", DPOConfig, "preference optimisation on pairs")):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--config", metavar="YAML", help="settings file; flags override it")
        add_config_args(sp, cls)


def run(args: argparse.Namespace) -> int:
    from charter.core.config import build_config

    if args.train_cmd == "sft":
        from training.options import SFTConfig
        from training.sft import train_sft

        final = train_sft(build_config(SFTConfig, args, args.config))
    else:
        from training.dpo import train_dpo
        from training.options import DPOConfig

        final = train_dpo(build_config(DPOConfig, args, args.config))
    print(final)
    return 0
