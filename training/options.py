"""Typed settings of the training stages (torch-free, so the CLI can build flags quickly).

`TrainConfig` holds what SFT and DPO share; `SFTConfig` and `DPOConfig` add their own. Defaults
live here only. `validate()` rejects bad or conflicting values with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from charter.core.errors import CharterError


@dataclass(kw_only=True)
class TrainConfig:
    data: str
    """training data in any TRL shape: a JSONL/JSON/CSV/parquet file, a run directory, a folder
    saved with save_to_disk, or a datasets hub name org/name"""
    split: str = "train"
    """split of a hub dataset or of a saved DatasetDict"""
    hh_transcripts: Literal["chat", "text"] = "chat"
    """HH-RLHF transcript strings (\\n\\nHuman: ... \\n\\nAssistant: ...): chat = parsed into
    conversations (chat template), text = plain text as TRL reads them"""
    out: str
    """run directory: checkpoints, metrics, final/ model; re-running resumes from it"""
    model: str | None = None
    """model to train: a directory, a run directory (its final/), a hub id; None = embedded"""
    epochs: int = 1
    """passes over the data (ignored when max_steps is set)"""
    max_steps: int | None = None
    """optimizer steps to run (sets the schedule's length); None = epochs over the data"""
    batch_size: int = 4
    """examples per process per micro-batch (DPO: pairs)"""
    grad_accum: int = 1
    """micro-batches per optimizer step; global batch = batch_size x grad_accum x processes"""
    lr: float = 1e-5
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay after warm-up"""
    warmup_ratio: float = 0.1
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    max_length: int = 1024
    """tokens per sequence; longer ones keep the prompt's end and the response's start"""
    lora: bool = False
    """train a LoRA adapter (peft) instead of all weights; final/ is the peft adapter"""
    merge: bool = False
    """with lora: save final/ as the merged model (the adapter kept in final/adapter/)"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input"""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module names LoRA adapts (peft target_modules), e.g. q_proj v_proj; all-linear = every
    linear layer but the output head"""
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16", "auto"] = "fp32"
    """fp32; bf16-mixed / fp16-mixed = fp32 weights, autocast (fp16: GPUs only); bf16 = bf16
    weights and gradients (no casts) with BF16AdamW (Kahan-compensated weights, bf16 moments):
    10 instead of 16 bytes per parameter; auto = bf16-mixed where the hardware multiplies bf16
    natively (a GPU with bf16; a CPU with AVX512-BF16/AMX or Arm BF16), else fp32 (on other
    CPUs bf16 is emulated, ~100x slower: charter/core/hardware.py). The choice is logged and
    written to the run's train_config.json"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """older name: bf16 / fp16 here means precision bf16-mixed / fp16-mixed"""
    group_by_length: bool = False
    """cut each step's batch from examples of similar length (within a shuffled window of 8
    global batches; the steps' order shuffled again): less padding, the same examples per
    epoch (HF Trainer's group_by_length)"""
    padding_free: bool = False
    """run each micro-batch as one packed row of its real tokens (position ids restarting per
    sequence, attention within each sequence: training/packing.py) instead of padding every row
    to the longest: same losses up to float rounding, less work where lengths differ (TRL's
    padding_free). Models on transformers' SDPA attention; others stay padded (logged)"""
    bf16_moments: bool = False
    """keep AdamW's two moments in bf16 for fp32 weights (exp_avg rounded to nearest, exp_avg_sq
    stochastically): 12 instead of 16 bytes per parameter, the weight and its update still fp32
    (bf16 weights always keep bf16 moments)"""
    optimizer_in_backward: bool = False
    """update each parameter as soon as its gradient is complete and free that gradient (no
    gradient kept for the whole model); needs max_grad_norm 0 (no global-norm clipping),
    grad_accum 1 and one process"""
    chunked_logps: bool = True
    """compute label log-probs from the final hidden states in chunks of tokens, only where a
    label is, instead of materialising [tokens x vocab] logits (same values; less memory)"""
    cpu: bool = False
    """train on the CPU even when a GPU is present"""
    fsdp: bool = False
    """with several processes: shard weights, gradients and optimizer state over them (FSDP2
    through accelerate, also on CPUs over gloo; on by itself under `accelerate launch
    --use_fsdp`); checkpoints are then one shard per process"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, ~30% slower)"""
    checkpoint_min_tokens: int = 0
    """with gradient_checkpointing: a micro-batch of fewer token positions than this (rows x
    padded length; padding_free: its real tokens) runs without it, since its activations fit
    and the recompute is saved; only longer ones are checkpointed, which bounds the peak.
    0 = every micro-batch checkpointed"""
    seed: int = 0
    """seed for data order and initialisation of LoRA weights"""
    log_every: int = 1
    """write metrics every this many optimizer steps"""
    save_every: int | None = 100
    """write a checkpoint every this many optimizer steps (None = only the final model)"""
    keep_checkpoints: int | None = 2
    """keep only the newest this many checkpoints (each holds the weights and the optimizer
    state, ~3x the model's size); None = keep all"""
    report_to: list[str] = field(default_factory=list)
    """trackers for the metrics besides out/metrics.jsonl: tensorboard, wandb, csv (TRL's
    metric names; none by default)"""
    trust_remote_code: bool = False
    """let transformers run Python code shipped in the model folder (only for models you trust)"""

    @classmethod
    def translate_keys(cls, values: dict, names: set[str], source: str | None,
                       lines: dict[str, int]) -> tuple[dict, dict[str, int]]:
        """TRL/TrainingArguments key names → ours (training/recipe_keys.py)."""
        from training.recipe_keys import translate

        return translate(values, names, source=source, lines=lines)

    @classmethod
    def nearest_key(cls, key: str, names: set[str]) -> str | None:
        from training.recipe_keys import nearest

        return nearest(key, names)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                raise CharterError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("max_steps", "save_every", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CharterError(f"must be >= 1 (or unset), got {v}", field=name)
        if not self.lr > 0:
            raise CharterError(f"must be > 0, got {self.lr}", field="lr")
        if not 0 <= self.warmup_ratio < 1:
            raise CharterError(f"must be in [0, 1), got {self.warmup_ratio}",
                               field="warmup_ratio")
        if self.max_length < 8:
            raise CharterError(f"must be >= 8, got {self.max_length}", field="max_length")
        if self.max_grad_norm < 0:
            raise CharterError(f"must be >= 0, got {self.max_grad_norm}", field="max_grad_norm")
        if self.checkpoint_min_tokens < 0:
            raise CharterError(f"must be >= 0, got {self.checkpoint_min_tokens}",
                               field="checkpoint_min_tokens")
        if self.checkpoint_min_tokens and not self.gradient_checkpointing:
            raise CharterError("applies only with gradient_checkpointing: true (it says which "
                               "micro-batches skip the checkpointing)",
                               field="checkpoint_min_tokens")
        if self.mixed_precision != "no":
            legacy = f"{self.mixed_precision}-mixed"
            if self.precision not in ("fp32", legacy):
                raise CharterError(f"mixed_precision {self.mixed_precision!r} conflicts with "
                                   f"precision {self.precision!r}; set only precision",
                                   field="mixed_precision")
            self.precision = legacy
        if self.optimizer_in_backward:
            if self.max_grad_norm:
                raise CharterError("the optimizer step in the backward pass updates each "
                                   "parameter before the global gradient norm is known; set "
                                   "max_grad_norm 0 (no clipping)", field="optimizer_in_backward")
            if self.grad_accum != 1:
                raise CharterError("needs grad_accum 1: each backward pass updates the weights",
                                   field="optimizer_in_backward")


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    lr: float = 2e-5
    """peak learning rate"""


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    lr: float = 1e-6
    """peak learning rate"""
    loss: str = "sigmoid"
    """a loss of the registry `training.losses.LOSSES`: sigmoid (DPO), ipo, hinge, robust, soft
    (per-pair AI label p_chosen), simpo"""
    beta: float = 0.1
    """strength of the KL constraint to the reference (SimPO: reward scale)"""
    label_smoothing: float = 0.0
    """ε: conservative DPO (sigmoid) or the assumed label flip rate (robust)"""
    gamma: float = 0.0
    """SimPO's target reward margin γ"""
    rpo_alpha: float = 0.0
    """weight of an extra per-token NLL term on the chosen response (RPO); 0 = off"""
    ref_model: str | None = None
    """reference model (default: the starting policy; with --lora, the base without adapter)"""
    ref_batch_size: int = 8
    """pairs per forward pass when computing reference log-probs (no gradients)"""
    max_prompt_length: int | None = None
    """keep only the prompt's last N tokens (TRL's max_prompt_length; None = max_length rules)"""
    share_prompt: bool = True
    """run each pair's prompt once and both responses on its cache (one process, no gradient
    checkpointing; else the concatenated pass)"""

    def validate(self) -> None:
        super().validate()
        from training.losses import check_loss_settings  # the registry (imports torch)

        kind = check_loss_settings(self.loss, beta=self.beta, label_smoothing=self.label_smoothing,
                            gamma=self.gamma, rpo_alpha=self.rpo_alpha)
        if not kind.reference and self.ref_model:
            raise CharterError(f"{self.loss} is reference-free; drop --ref-model",
                               field="ref_model")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise CharterError(f"must be >= 1 (or unset), got {self.max_prompt_length}",
                               field="max_prompt_length")
        if self.ref_batch_size < 1:
            raise CharterError(f"must be >= 1, got {self.ref_batch_size}",
                               field="ref_batch_size")

