"""Parts shared by the SFT and DPO loops (functions, not a base class).

- `setup`: the `accelerate.Accelerator`, model (optionally wrapped in LoRA) and tokenizer.
- `step_indices`: which examples each process uses at each optimizer step. The order is a
  function of (seed, epoch) only, so the data position in a checkpoint is just the step number,
  and N processes with micro-batch b see the same global batches as one process with N·b.
- `forward_logps`: one forward pass, logits only where a label follows, masked log-probs.
- optimizer, warm-up + cosine/linear schedule, metrics JSONL, PNG plot.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import torch

from charter.core.errors import CharterError
from training import fsdp
from training.logps import sequence_logps
from training.options import TrainConfig


def log(acc, msg: str) -> None:
    """A message on stderr, from the main process only."""
    if acc.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def _on_cpu(cfg: TrainConfig) -> bool:
    return cfg.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def resolve_precision(cfg: TrainConfig) -> str | None:
    """`precision: auto` made concrete for this machine (bf16-mixed where bf16 matmuls are
    native, else fp32), in place; returns the choice to log, or None when it was not auto."""
    from charter.core.hardware import cpu_bf16_native

    on_cpu = _on_cpu(cfg)
    if cfg.precision == "auto":
        if on_cpu:
            fast, where = cpu_bf16_native(), "this CPU"
        elif torch.cuda.is_available():
            fast, where = torch.cuda.is_bf16_supported(), "this GPU"
        else:  # Apple's MPS: bf16 autocast support varies with the OS; fp32 is safe
            fast, where = False, "MPS"
        cfg.precision = "bf16-mixed" if fast else "fp32"
        return (f"precision auto: {cfg.precision} ({where} "
                f"{'multiplies bf16 natively' if fast else 'has no native bf16 matmul'})")
    return None


def precision_warning(cfg: TrainConfig) -> str | None:
    """A warning for a bf16 setting on a CPU that emulates bf16, or None."""
    from charter.core.hardware import cpu_bf16_native, slow_bf16_note

    if _on_cpu(cfg) and cfg.precision in ("bf16-mixed", "bf16") and not cpu_bf16_native():
        return "warning: " + slow_bf16_note(f"precision {cfg.precision}",
                                            "use precision fp32 or auto (fp32 here)")
    return None


def setup(cfg: TrainConfig):
    """(accelerator, model, tokenizer, resolved model path)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from charter.core.models import require_safetensors, resolve_model
    from training.trackers import log_with

    trackers = log_with(cfg.report_to, cfg.out)  # a missing package fails before any work
    notes = [resolve_precision(cfg), precision_warning(cfg)]  # (open_run may have resolved it)
    if cfg.precision == "fp16-mixed" and (cfg.cpu or not torch.cuda.is_available()):
        raise CharterError("fp16 autocast needs a GPU; use bf16 on CPUs", field="precision")
    # Accelerator state is a process-wide singleton; the pipeline runs SFT then DPO in one
    # process, possibly with other precision settings, so start each run from a clean state
    # (the process-group part, PartialState, is kept: under `accelerate launch` it is shared).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    fsdp.undo_enable()
    # accelerate only sets up multi-process CPU training (DDP over gloo) when told `cpu=True`,
    # so a machine with no accelerator is a CPU run, launched alone or under torchrun.
    no_accel = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    autocast = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(cfg.precision, "no")
    cpu = cfg.cpu or no_accel
    sharding = fsdp.plugin_for(cfg, PartialState(cpu=cpu).num_processes)  # None: no FSDP
    acc = Accelerator(mixed_precision=autocast, cpu=cpu, log_with=trackers or None,
                      project_dir=cfg.out, fsdp_plugin=sharding)
    for note in filter(None, notes):
        log(acc, note)
    if sharding is not None:
        fsdp.enable(acc, sharding)
    set_seed(cfg.seed)
    path = resolve_model(cfg.model)
    require_safetensors(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:  # padding is masked everywhere; any id will do
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if Path(path, "adapter_config.json").exists() and not Path(path, "config.json").exists():
        # a LoRA run's final/ (a peft adapter): train on from its base with the adapter merged
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base; all of it trains from here
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    if getattr(cfg, "padding_free", False):
        from training import packing

        if not packing.enable(model):
            log(acc, f"padding_free: this model's attention is "
                     f"{getattr(model.config, '_attn_implementation', None)!r}, not SDPA; "
                     "its batches stay padded")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.lora:
            model.enable_input_require_grads()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets[0] if targets == ["all-linear"] else targets,
                          task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as e:
            raise CharterError(f"peft could not place LoRA: {e}", field="lora_targets") from None
    return acc, model, tok, path


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (a last partial batch is dropped so every step has the
    same size, which keeps losses comparable across steps and process counts)."""
    return n_examples // global_batch


def total_steps(cfg: TrainConfig, n_examples: int, world: int) -> int:
    g = cfg.batch_size * cfg.grad_accum * world
    per_epoch = steps_per_epoch(n_examples, g)
    if per_epoch == 0:
        raise CharterError(f"{n_examples} examples do not fill one global batch of {g} "
                           "(batch_size x grad_accum x processes); lower --batch-size",
                           field="batch_size")
    return cfg.max_steps if cfg.max_steps is not None else per_epoch * cfg.epochs


GROUP_WINDOW = 8  # global batches per window that group_by_length sorts by length


def step_indices(step: int, n_examples: int, micro: int, accum: int, world: int, rank: int,
                 seed: int, lengths: list[int] | None = None) -> list[list[int]]:
    """This process's micro-batches (lists of example indices) for optimizer step `step`.

    Global batch g = micro·accum·world; epoch e = step // (steps per epoch) is a permutation
    seeded by (seed, e). Micro-batch a of process r is slice [(a·world + r)·micro, +micro).
    With `lengths` (group_by_length), the epoch's used examples are taken in windows of
    GROUP_WINDOW global batches, each window sorted by length (longest first) and cut into
    global batches, and the epoch's batches shuffled again (seeded): a step then pads its
    examples to a similar length, and every epoch still holds the same examples.
    """
    g = micro * accum * world
    per_epoch = steps_per_epoch(n_examples, g)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    if lengths is not None:
        used, w = order[:per_epoch * g], GROUP_WINDOW * g
        windows = [sorted(used[i:i + w], key=lambda j: -lengths[j])
                   for i in range(0, len(used), w)]
        batches = [win[i:i + g] for win in windows for i in range(0, len(win), g)]
        random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
        order = [j for b in batches for j in b]
    chunk = order[k * g:(k + 1) * g]
    return [chunk[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            for a in range(accum)]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine/linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg: TrainConfig, total: int, num_processes: int = 1):
    """AdamW for the trainable parameters and the warm-up + decay schedule. fp32 weights:
    torch's fused AdamW (one kernel per parameter, no foreach temporaries: those are a copy of
    every parameter at the step, which sets small-model training's peak memory). bf16 weights:
    `training.optim.BF16AdamW`, also for fp32 weights with `bf16_moments`.
    `optimizer_in_backward`: steps from gradient hooks."""
    from training.optim import BF16AdamW, attach_in_backward

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.precision == "bf16" or cfg.optimizer_in_backward or cfg.bf16_moments:
        opt = BF16AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
                        bf16_moments=cfg.bf16_moments)
    else:
        try:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=True)
        except (RuntimeError, TypeError):  # a device or torch without a fused kernel
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer_in_backward:
        if num_processes > 1:
            raise CharterError("runs on one process only (under DDP/FSDP the gradients are "
                               "reduced after the hooks would have used them)",
                               field="optimizer_in_backward")
        attach_in_backward(opt)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    return opt, sched


def clip_and_step(acc, model, opt, max_norm: float):
    """Clip the global gradient norm to `max_norm` (0: no clipping) and take the optimizer step;
    returns the norm before clipping (None without clipping).

    With a fused AdamW under plain or DDP training, the clipping factor goes into the fused
    kernel as its `grad_scale` (each gradient is divided by 1/coef as it is read) instead of a
    separate pass that multiplies every gradient in place, as `clip_grad_norm_` does even when
    the norm is below `max_norm`; that pass was ~8% of a DPO step of SmolLM2 on CPU. Same math:
    torch's coef = max_norm / (norm + 1e-6), clamped at 1. Elsewhere (FSDP, DeepSpeed, an fp16
    grad scaler, other optimizers) accelerate's `clip_grad_norm_` runs as before."""
    from accelerate.utils import DistributedType

    from training.optim import BF16AdamW

    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    fusable = (max_norm and getattr(acc, "scaler", None) is None
               and (inner.defaults.get("fused") or isinstance(inner, BF16AdamW))
               and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_GPU))
    if not fusable:
        norm = acc.clip_grad_norm_(model.parameters(), max_norm) if max_norm else None
        opt.step()
        return norm
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0).float()
    # 1 / clamp(coef, max=1); dividing by exactly 1.0 changes nothing, and there is no
    # host sync on a GPU
    inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).to(torch.float32).reshape(())
    try:
        opt.step()
    finally:
        inner.grad_scale = None
    return norm


def checkpoint_by_size(model, batch: dict, min_tokens: int) -> bool:
    """`checkpoint_min_tokens`: gradient checkpointing on for this micro-batch only when it holds
    at least `min_tokens` token positions (rows x padded length; packed: its real tokens), so
    short micro-batches keep their activations and skip the recompute while long ones, which
    set the peak, are still checkpointed. The layers' own switch (transformers'
    `GradientCheckpointingLayer.gradient_checkpointing`, on after `gradient_checkpointing_enable`)
    is set per micro-batch; the math is the same either way. Returns whether it is on."""
    if not min_tokens:
        return True
    from training import packing

    n = (int(batch["attention_mask"].sum()) if packing.active(model)
         else batch["input_ids"].numel())
    on = n >= min_tokens
    for m in model.modules():
        if hasattr(m, "_gradient_checkpointing_func"):  # a layer that checkpointing wraps
            m.gradient_checkpointing = on
    return on


def forward_logps(model, batch: dict, chunked: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed and mean label log-probs and label counts per row, each (N,).

    chunked: the log-probs come from the final hidden states at label positions only
    (`training.chunked_logps`), never a [tokens x vocab] logits tensor. Otherwise, or for a
    model whose logits are not its head applied to the last hidden state, the model computes
    logits from the position before the first label token on (`logits_to_keep`).
    """
    from training import packing

    if packing.active(model):  # padding_free: one packed row, the same per-row results
        return packing.packed_logps(model, batch, chunked)
    ids, labels = batch["input_ids"], batch["labels"]  # (N, T)
    T = ids.shape[1]
    has = labels != -100
    if chunked:
        from training.chunked_logps import label_logps

        targets, mask = labels[:, 1:].clamp(min=0), has[:, 1:]
        out, logps = label_logps(model, targets, mask, input_ids=ids, use_cache=False,
                                 attention_mask=batch["attention_mask"])
        if logps is None:  # logits are not the head's output: the full path's logits
            return sequence_logps(out.logits, labels)
        total, count = logps.sum(-1), mask.sum(-1)
        return total, total / count.clamp(min=1), count
    first = int(has.int().argmax(1)[has.any(1)].min()) if bool(has.any()) else 1
    first = max(first, 1)  # a label at position 0 has nothing before it to predict it
    k = T - first + 1  # logits at positions [first-1, T)
    try:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"],
                       logits_to_keep=k, use_cache=False).logits  # (N, k, V)
    except TypeError:  # a model class without logits_to_keep
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, T - k:]
    return sequence_logps(logits, labels[:, T - k:])


class MetricsLog:
    """metrics.jsonl in the run directory (main process only); on resume, rows past the
    resumed step are dropped so no step appears twice."""

    def __init__(self, acc, out: Path, resume_step: int):
        from charter.core.records import JsonlAppender, load_jsonl_for_resume, write_jsonl_atomic

        self.acc, self.path = acc, out / "metrics.jsonl"
        self.rows: list[dict] = []
        if acc.is_main_process:
            if self.path.exists():
                kept = [r for r in load_jsonl_for_resume(self.path)
                        if r.get("step", 0) <= resume_step]
                write_jsonl_atomic(self.path, kept)
                self.rows = kept
            self.writer = JsonlAppender(self.path)

    def write(self, row: dict) -> None:
        if self.acc.is_main_process:
            self.writer.append(row)
            self.rows.append(row)
        if self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.acc.is_main_process:
            self.writer.close()


def plot_metrics(rows: list[dict], keys: list[str], png: Path, title: str) -> None:
    """One panel per metric against the step (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [r["step"] for r in rows if k in r]
        ax.plot(xs, [r[k] for r in rows if k in r], lw=1.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def raise_if_nonfinite(acc, bad: bool, value: float, step: int, last_ckpt: Path | None) -> None:
    """All processes agree (one reduce) and stop together, before the optimizer update."""
    flag = acc.reduce(torch.tensor([1.0 if bad else 0.0], device=acc.device), "sum")
    if float(flag.item()) > 0:
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint yet"
        raise CharterError(f"the loss became {value} at step {step}; stopped before updating "
                           f"the weights ({where}). Lower --lr, or train in fp32 "
                           "(--precision fp32)", field="lr")


def update(acc, model, opt, sched, max_grad_norm: float, bad: float | None, step: int,
           last_ckpt: Path | None) -> tuple[float, Any]:
    """After step `step`'s micro-batches (0-based): stop every process on a non-finite loss
    (`bad`: its value, None when all were finite), then clip, step the optimizer and the
    schedule and clear the gradients. Returns (the step's learning rate, the gradient norm
    before clipping or None). The SFT and DPO loops end each step with it."""
    raise_if_nonfinite(acc, bad is not None, bad, step + 1, last_ckpt)
    lr = sched.get_last_lr()[0]
    grad_norm = clip_and_step(acc, model, opt, max_grad_norm)
    sched.step()
    opt.zero_grad(set_to_none=True)
    # Hand the step's freed heap back (glibc's malloc_trim): what glibc keeps after a step's
    # frees is reused in fragments, and the next step's peak builds on it. Six quickstart SFT
    # steps of 8 x ~300 tokens: peak 3,813-3,820 -> 3,387-3,470 MiB, step times unchanged
    # (benchmarks/README.md, third session).
    from charter.core import procmem

    procmem.trim()
    return lr, grad_norm
