"""TRL / `TrainingArguments` / alignment-handbook key names in sft and dpo configs.

A recipe written for TRL (`learning_rate: 5.0e-7`, `per_device_train_batch_size: 8`,
`num_train_epochs: 1`, `loss_type: sigmoid`, `bf16: true`, ...) works as it is: each key is
translated to ours (`lr`, `batch_size`, `epochs`, `loss`, `mixed_precision`, ...). Keys that only
steer evaluation, the Hub or logging verbosity are ignored with a note; a key that would change
training but has no counterpart here fails, naming the nearest setting of ours.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from typing import Any

from charter.core.errors import CharterError


def _same(v):
    return v


def _epochs(v):
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"whole epochs only, got {v}; set max_steps for a partial epoch")
    return int(v)


def _max_steps(v):
    return None if v is None or int(v) < 0 else int(v)  # TRL's -1 means "use epochs"


def _schedule(v):
    table = {"cosine": "cosine", "linear": "linear", "constant": "constant",
             "constant_with_warmup": "constant"}
    if v not in table:
        raise ValueError(f"{v!r} is not supported; expected one of {', '.join(table)}")
    return table[v]


def _loss(v):
    if isinstance(v, list):
        if len(v) != 1:
            raise ValueError("one loss at a time (a list of losses mixes them; not supported)")
        v = v[0]
    from training.losses import LOSSES  # the loss registry

    if v not in LOSSES:
        raise ValueError(f"{v!r} is not one of ours: {', '.join(LOSSES)}")
    return v


def _targets(v):
    return [v] if isinstance(v, str) else list(v)


def _dataset_mixer(v):
    if not isinstance(v, dict) or len(v) != 1:
        raise ValueError("one dataset (name: 1.0); mix several into one file first")
    (name, frac), = v.items()
    if float(frac) != 1.0:
        raise ValueError(f"a fraction of a dataset ({frac}) is not supported; use all of it")
    return name


def _first(v):
    return v[0] if isinstance(v, list) else v


def _optim(v):
    if v not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        raise ValueError(f"{v!r}: Charter trains with AdamW (adamw_torch) only")
    return None  # nothing to set


def _fsdp(v):
    # TrainingArguments' fsdp is a string of options ("full_shard auto_wrap"); any sharding
    # option means shard here (FSDP2, full sharding)
    if isinstance(v, str):
        words = v.split()
        return bool(words) and words != ["no_shard"]
    return v


# TRL/TrainingArguments key -> (our key, value conversion)
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "learning_rate": ("lr", _same),
    "per_device_train_batch_size": ("batch_size", _same),
    "num_train_epochs": ("epochs", _epochs),
    "gradient_accumulation_steps": ("grad_accum", _same),
    "lr_scheduler_type": ("schedule", _schedule),
    "max_seq_length": ("max_length", _same),  # older TRL SFTConfig
    "max_steps": ("max_steps", _max_steps),
    "logging_steps": ("log_every", _same),
    "save_steps": ("save_every", _same),
    "save_total_limit": ("keep_checkpoints", _same),
    "output_dir": ("out", _same),
    "model_name_or_path": ("model", _same),
    "dataset_name": ("data", _same),
    "dataset_mixer": ("data", _dataset_mixer),
    "dataset_train_split": ("split", _same),
    "dataset_splits": ("split", _first),
    "loss_type": ("loss", _loss),
    "use_peft": ("lora", _same),
    "lora_target_modules": ("lora_targets", _targets),
    "use_cpu": ("cpu", _same),
    "fsdp": ("fsdp", _fsdp),
    "optim": ("", _optim),
    "tensorboard": ("report_to", lambda v: ["tensorboard"] if v else None),  # our old flag
    "bf16": ("mixed_precision", lambda v: "bf16" if v else None),
    "fp16": ("mixed_precision", lambda v: "fp16" if v else None),
}

# keys that do not change what is trained: ignored, with a note
IGNORED = {
    "do_eval", "do_train", "eval_strategy", "evaluation_strategy", "eval_steps",
    "per_device_eval_batch_size", "hub_model_id", "hub_strategy", "hub_private_repo",
    "push_to_hub", "overwrite_output_dir", "log_level", "logging_strategy", "logging_first_step",
    "save_strategy", "save_only_model", "remove_unused_columns", "preprocessing_num_workers",
    "dataset_num_proc", "dataloader_num_workers", "gradient_checkpointing_kwargs",
    "torch_dtype", "dtype", "attn_implementation", "run_name", "report_to_hub",
    "dataset_test_split", "use_flash_attention_2", "ddp_timeout", "tf32",
}
NOTES = {"torch_dtype": "weights train in fp32 (set mixed_precision: bf16 for bf16 compute)",
         "dtype": "weights train in fp32 (set mixed_precision: bf16 for bf16 compute)"}
# keys with no counterpart that change training: the setting of ours to use instead
NEAREST = {"warmup_steps": "warmup_ratio", "lr_scheduler_kwargs": "schedule",
           "max_completion_length": "max_length", "packing": "max_length",
           "truncation_mode": "max_length", "precompute_ref_log_probs": "ref_batch_size",
           "ref_model_init_kwargs": "ref_model", "model_init_kwargs": "model",
           "completion_only_loss": "data", "assistant_only_loss": "data",
           "dataset_text_field": "data", "simpo_gamma": "gamma", "cpo_alpha": "rpo_alpha",
           "loss_weights": "loss", "sync_ref_model": "ref_model", "use_logits_to_keep": "max_length"}


def translate(values: dict, names: set[str], *, source: str | None = None,
              lines: dict[str, int] | None = None) -> tuple[dict, dict[str, int]]:
    """`values` with TRL keys renamed to ours (`names`); ignored keys dropped with a note on
    stderr; an unsupported TRL key raises CharterError naming our nearest key."""
    lines = dict(lines or {})
    out: dict = {}
    origin: dict[str, str] = {}
    notes = []
    for key, value in values.items():
        line = lines.get(key)
        if key in names and key not in ALIASES:
            target, conv = key, _same
        elif key in ALIASES and ALIASES[key][0] in names | {""}:
            target, conv = ALIASES[key]
        elif key in IGNORED:
            notes.append(f"{key} ({NOTES.get(key, 'no effect on training here')})")
            continue
        elif key in NEAREST:
            raise CharterError(f"TRL's {key!r} is not supported here; the nearest setting is "
                               f"{NEAREST[key]!r}", path=source, line=line, field=key)
        else:
            continue  # not a TRL key either: the config's own unknown-key error reports it
        try:
            got = conv(value)
        except (ValueError, TypeError) as e:
            raise CharterError(str(e), path=source, line=line, field=key) from None
        if not target or got is None:
            continue
        if target in out and origin[target] != key:
            raise CharterError(f"{key!r} and {origin[target]!r} both set {target!r}; keep one",
                               path=source, line=line, field=key)
        out[target], origin[target] = got, key
        if line is not None:
            lines[target] = line
    unknown = [k for k in values if k not in names and k not in ALIASES and k not in IGNORED]
    for key in unknown:  # leave them for the unknown-key error, with a better hint
        out.setdefault(key, values[key])
    if notes:
        where = f"{source}: " if source else ""
        print(f"note: {where}ignored (they do not change training here): {', '.join(notes)}",
              file=sys.stderr)
    return out, lines


def nearest(key: str, names: set[str]) -> str | None:
    """Our closest key to an unknown one (for the unknown-key error)."""
    if key in NEAREST:
        return NEAREST[key]
    got = difflib.get_close_matches(key, sorted(names | set(ALIASES)), n=1, cutoff=0.6)
    if not got:
        return None
    return ALIASES[got[0]][0] if got[0] in ALIASES else got[0]
