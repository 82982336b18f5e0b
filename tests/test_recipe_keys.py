"""TRL / TrainingArguments / alignment-handbook keys in sft and dpo configs."""

from __future__ import annotations

import pytest

from charter.core.config import build_config
from charter.core.errors import CharterError
from training.options import DPOConfig, SFTConfig

# An alignment-handbook-style DPO recipe (model, data and trainer arguments in one flat file).
RECIPE = """\
# Model arguments
model_name_or_path: org/some-sft-model
torch_dtype: null
# Data training arguments
dataset_mixer:
  org/some-preferences: 1.0
dataset_splits:
- train_prefs
- test_prefs
preprocessing_num_workers: 12
# Trainer arguments
bf16: true
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: some-dpo-model
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
loss_type: sigmoid
lr_scheduler_type: cosine
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: adamw_torch
output_dir: data/some-dpo-model
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
push_to_hub: true
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
max_steps: -1
"""


def test_a_handbook_recipe_sets_our_keys(tmp_path, capsys):
    f = tmp_path / "recipe.yaml"
    f.write_text(RECIPE)
    cfg = build_config(DPOConfig, {}, f)
    assert (cfg.model, cfg.data, cfg.split, cfg.out) == (
        "org/some-sft-model", "org/some-preferences", "train_prefs", "data/some-dpo-model")
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps) == (
        5e-7, 8, 2, 1, None)
    assert (cfg.beta, cfg.loss, cfg.schedule, cfg.warmup_ratio, cfg.seed) == (
        0.01, "sigmoid", "cosine", 0.1, 42)
    assert (cfg.max_length, cfg.max_prompt_length, cfg.mixed_precision) == (1024, 512, "bf16")
    assert (cfg.log_every, cfg.save_every, cfg.keep_checkpoints) == (10, 100, 1)
    assert cfg.gradient_checkpointing is True
    err = capsys.readouterr().err
    assert "ignored" in err and "do_eval" in err and "push_to_hub" in err
    # a flag still overrides the recipe's key
    assert build_config(DPOConfig, {"lr": 1e-6}, f).lr == 1e-6


@pytest.mark.parametrize("text, match", [
    ("data: d\nout: o\nwarmup_steps: 10\n", r"recipe.yaml:3: warmup_steps: .*nearest setting is "
                                           r"'warmup_ratio'"),
    ("data: d\nout: o\nloss_type: exo_pair\n", r":3: loss_type: 'exo_pair' is not one of ours"),
    ("data: d\nout: o\nnum_train_epochs: 1.5\n", r":3: num_train_epochs: whole epochs only"),
    ("data: d\nout: o\nlr: 1e-5\nlearning_rate: 2e-5\n",
     r":4: learning_rate: 'learning_rate' and 'lr' both set 'lr'"),
    ("data: d\nout: o\nlearnin_rate: 2e-5\n", r":3: learnin_rate: unknown config key "
                                             r"'learnin_rate' \(did you mean 'lr'\?\)"),
    ("data: d\nout: o\nlr_scheduler_type: polynomial\n", r":3: lr_scheduler_type: 'polynomial'"),
    ("data: d\nout: o\noptim: adafactor\n", r":3: optim: 'adafactor': Charter trains with AdamW"),
])
def test_unsupported_keys_name_our_nearest(tmp_path, text, match):
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    with pytest.raises(CharterError, match=match):
        build_config(DPOConfig, {}, f)


def test_sft_recipe_keys(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("dataset_name: org/chat\ndataset_train_split: train_sft\noutput_dir: o\n"
                 "learning_rate: 2.0e-5\nnum_train_epochs: 3\nuse_peft: true\nlora_r: 8\n"
                 "lora_target_modules: [q_proj, v_proj]\nbf16: false\n")
    cfg = build_config(SFTConfig, {}, f)
    assert (cfg.data, cfg.split, cfg.epochs, cfg.lr) == ("org/chat", "train_sft", 3, 2e-5)
    assert cfg.lora and cfg.lora_r == 8 and cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.mixed_precision == "no"
    with pytest.raises(CharterError, match="unknown config key 'max_prompt_length'"):
        f.write_text("data: d\nout: o\nmax_prompt_length: 5\n")  # DPO's key, not SFT's
        build_config(SFTConfig, {}, f)
