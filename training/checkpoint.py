"""Run directories, checkpoints and the final model.

A checkpoint `out/checkpoint-STEP/` holds the trainable weights (all of them, or only the LoRA
adapter), the optimizer and scheduler state, each process's RNG state, the step (which is the
data position: the data order is a function of seed and step) and the resolved config. It is
written under a temporary name and renamed when complete, so a run killed while saving leaves no
checkpoint that looks complete; leftovers are ignored and cleaned up.

Checkpoints assume the optimizer state is replicated (one process, or DDP). Sharded runs (FSDP,
DeepSpeed ZeRO) train with the same loop but should use a large `save_every` until sharded
checkpoints are supported.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from charter.errors import CharterError
from charter.records import write_json_atomic, write_text_atomic
from training.cards import model_card  # noqa: F401  (re-exported for the loops)

CONFIG_NAME = "train_config.json"  # not config.json: that name marks a model directory
# Settings that may change between a run and its resumption.
# share_prompt only changes how the same log-probs are computed.
RESUMABLE = {"save_every", "log_every", "tensorboard", "epochs", "max_steps", "trust_remote_code",
             "share_prompt", "keep_checkpoints", "merge"}


def prepare_run_dir(acc, out: Path, cfg_dict: dict, stage: str) -> None:
    """Create `out`, refuse to resume a run made with different settings, write the config."""
    out.mkdir(parents=True, exist_ok=True)
    f = out / CONFIG_NAME
    if f.exists():
        old = json.loads(f.read_text(encoding="utf-8"))
        if old.get("stage") != stage:
            raise CharterError(f"this directory holds a {old.get('stage')} run, not {stage}; "
                               "use another --out", path=out, field="out")
        diff = [k for k in cfg_dict if k not in RESUMABLE and old.get(k) != cfg_dict[k]]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} then, {cfg_dict[k]!r} now" for k in diff)
            raise CharterError(f"this directory holds a run with other settings ({what}); use "
                               "another --out or delete it to start over", path=out, field="out")
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(f, {"stage": stage, **cfg_dict})


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary leftovers are not candidates)."""
    best, best_step = None, -1
    for d in out.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / "state.json").exists() and int(step) > best_step:
            best, best_step = d, int(step)
    return best


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(acc, model, opt, sched, step: int, out: Path, cfg_dict: dict) -> Path:
    """Write out/checkpoint-STEP atomically (every process writes its RNG state)."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng-{acc.process_index}.pt")
    if acc.is_main_process:
        torch.save(_trainable_state(acc.unwrap_model(model)), tmp / "trainable.pt")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / CONFIG_NAME, cfg_dict)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(tmp / "state.json", {"step": step})  # written last: marks complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(out, cfg_dict.get("keep_checkpoints"))
    acc.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (None: keep all). Called after a
    new one is complete, so a resume always has the latest."""
    if not keep:
        return
    done = sorted((int(d.name.removeprefix("checkpoint-")), d) for d in out.glob("checkpoint-*")
                  if d.name.removeprefix("checkpoint-").isdigit() and (d / "state.json").exists())
    for _, d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(acc, model, opt, sched, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler and RNG; return the step to continue from."""
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    weights = torch.load(ckpt / "trainable.pt", map_location="cpu")
    unwrapped = acc.unwrap_model(model)
    expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise CharterError("checkpoint weights do not match this model (was --lora changed?)",
                           path=ckpt)
    with torch.no_grad():
        params = dict(unwrapped.named_parameters())
        for n, w in weights.items():
            params[n].copy_(w)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
    sched.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu"))
    rng_file = ckpt / f"rng-{acc.process_index}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def clean_partial(out: Path) -> None:
    for d in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(d, ignore_errors=True)
    for d in out.glob(".final.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def finished(out: Path, total: int) -> bool:
    """Whether out/final holds the result of a run of `total` steps (re-running is a no-op)."""
    f = out / "final" / "charter_state.json"
    return f.exists() and json.loads(f.read_text(encoding="utf-8")).get("step") == total


def save_final(acc, model, tok, out: Path, card: str, step: int, merge: bool = False) -> Path:
    """out/final: safetensors + tokenizer + README.md (the model card).

    With LoRA, final/ is the peft adapter (adapter_config.json + adapter_model.safetensors,
    loadable with PeftModel.from_pretrained(base, final)); with `merge` it is the merged model
    and the adapter is kept in final/adapter/."""
    final, tmp = out / "final", out / ".final.tmp"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = acc.unwrap_model(model)
        if hasattr(unwrapped, "merge_and_unload"):  # peft
            unwrapped.save_pretrained(tmp / "adapter" if merge else tmp, safe_serialization=True)
            if merge:  # fold the adapter into the weights
                unwrapped = unwrapped.merge_and_unload()
        if not hasattr(unwrapped, "merge_and_unload"):
            unwrapped.config.use_cache = True
            unwrapped.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_text_atomic(tmp / "README.md", card)
        write_json_atomic(tmp / "charter_state.json", {"step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    acc.wait_for_everyone()
    return final
