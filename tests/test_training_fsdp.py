"""FSDP over two CPU processes (gloo, launched with torchrun): sharded checkpoints that save,
survive a SIGKILL and resume to the same weights as an uninterrupted run; the sharded run
follows the same loss curve as one process; a sharded checkpoint resumes on one process.

Launched with `torchrun -m charter train ... --fsdp` (`accelerate launch --cpu` was seen to
start a single process on this kind of machine); each run checks that two processes wrote
shards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training_dpo import cfg, rows, write_pairs
from tests.test_training_sft import write_sft

ROOT = Path(__file__).resolve().parents[1]
SHARDS = {"model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
          "optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "charter", "train", *args, "--fsdp"]


def _run(args: list[str]) -> str:
    proc = subprocess.run(_torchrun(args), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers are not all in its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _run_until(args: list[str], appears: Path, log: Path) -> None:
    """Start the launch; SIGKILL the launcher and every worker as soon as `appears` exists."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun(args), cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 1200
        while not appears.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in [*reversed(_descendants(proc.pid)), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert appears.exists(), log.read_text()[-4000:]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model.safetensors"))


def _close(a: Path, b: Path, tol: float) -> float:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= tol, worst
    return worst


def _dpo_args(pairs: Path, out: Path, model: Path) -> list[str]:
    return ["dpo", "--data", str(pairs), "--out", str(out), "--model", str(model),
            "--lr", "5e-3", "--beta", "0.5", "--batch-size", "2", "--max-steps", "6",
            "--save-every", "1", "--keep-checkpoints", "3", "--warmup-ratio", "0"]


def test_dpo_fsdp_killed_after_a_sharded_checkpoint_resumes_to_the_same_weights(
        tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.dpo import train_dpo

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(_dpo_args(pairs, whole, tiny_model_dir))
    # the same run, SIGKILLed (every process) once its second sharded checkpoint is complete
    _run_until(_dpo_args(pairs, killed, tiny_model_dir), killed / "checkpoint-2",
               tmp_path / "killed.log")
    assert not (killed / "final").exists()
    ckpt = max((d for d in killed.glob("checkpoint-*")), key=lambda d: int(d.name[11:]))
    on_disk = {f.name for f in ckpt.iterdir()}
    assert SHARDS <= on_disk and "model.safetensors" not in on_disk  # one shard per process
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert SHARDS <= set(listed)  # each shard's size and sha256 are in the manifest
    log = _run(_dpo_args(pairs, killed, tiny_model_dir))
    step = int(ckpt.name[11:])
    assert f"resuming from {ckpt} (step {step} of 6)" in log
    assert [r["step"] for r in rows(killed)] == [1, 2, 3, 4, 5, 6]
    # same processes, same order of every sum: the resumed run ends bit-identical
    assert _close(whole / "final", killed / "final", 0.0) == 0.0
    # the final model is a plain (gathered) save_pretrained folder
    AutoModelForCausalLM.from_pretrained(killed / "final")
    # and two sharded processes of micro-batch 2 train like one process with batch 4
    one = tmp_path / "one"
    train_dpo(cfg(pairs, one, tiny_model_dir, batch_size=4, max_steps=6, lr=5e-3))
    a, b = rows(one), rows(whole)
    worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-3) for x, y in zip(a, b)
                for k in ("loss", "rewards/margins", "logps/chosen"))
    print(f"largest relative difference, 1 process vs 2 FSDP processes: {worst:.2e}")
    assert worst < 1e-4
    # weights: measured 3.5e-5 max |diff| (summation order differs, and AdamW divides tiny
    # gradient differences by tiny second moments); 1e-4 leaves room, lr is 5e-3 per step
    _close(one / "final", whole / "final", 1e-4)


def test_sft_fsdp_sharded_checkpoint_resumes_on_one_process(tmp_path, tiny_model_dir):
    from training.options import SFTConfig
    from training.sft import train_sft

    data = write_sft(tmp_path / "sft.jsonl")
    common = dict(data=str(data), model=str(tiny_model_dir), lr=0.03, warmup_ratio=0.0,
                  max_steps=4, keep_checkpoints=None)
    sharded = tmp_path / "sharded"
    _run(["sft", "--data", str(data), "--out", str(sharded), "--model", str(tiny_model_dir),
          "--lr", "0.03", "--warmup-ratio", "0", "--max-steps", "4", "--batch-size", "2",
          "--save-every", "2"])
    assert SHARDS <= {f.name for f in (sharded / "checkpoint-2").iterdir()}
    # one process, batch 4 (the same global batch), from scratch ...
    one = tmp_path / "one"
    train_sft(SFTConfig(**common, out=str(one), batch_size=4, save_every=None))
    # ... and from the two processes' sharded checkpoint-2 (put together again on one process)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(sharded / "checkpoint-2", moved / "checkpoint-2")
    train_sft(SFTConfig(**common, out=str(moved), batch_size=2, grad_accum=2, save_every=2,
                        fsdp=True))
    a, b = rows(one), rows(sharded)
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
    print(f"SFT loss, largest relative difference, 1 process vs 2 FSDP processes: {worst:.2e}")
    assert worst < 1e-4
    assert [r["step"] for r in rows(moved)] == [3, 4]
    _close(sharded / "final", moved / "final", 1e-5)
    # one process vs two: another summation order, which AdamW (lr 0.03) amplifies where second
    # moments are tiny; measured 1.8e-5 max |diff| on an AVX2-only CPU, less with AVX-512
    _close(one / "final", sharded / "final", 1e-4)


def test_a_sharded_checkpoint_missing_a_shard_is_passed_over(tmp_path):
    """A manifest that lists only one process's shards (a listing that missed the other's)
    does not make a checkpoint complete: resume takes the older intact one and says why."""
    from charter.core.safestate import state_bytes
    from training import checkpoint

    for step, shards in ((2, (0, 1)), (4, (0,))):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for r in shards:
            for kind in ("model", "optimizer"):
                (d / f"{kind}-0000{r}-of-00002.safetensors").write_bytes(
                    state_bytes({"w": torch.ones(2)}))
        checkpoint.write_manifest(d, step)
    said = []
    assert checkpoint.resume_point(tmp_path, said.append) == tmp_path / "checkpoint-2"
    assert "model-00001-of-00002.safetensors is missing" in said[0]


def test_fsdp_settings_that_cannot_shard_are_refused(tmp_path, monkeypatch):
    from charter.core.errors import CharterError
    from training import fsdp
    from training.options import DPOConfig

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    base = dict(data="p.jsonl", out=str(tmp_path), fsdp=True)
    assert fsdp.plugin_for(DPOConfig(**base), 1) is None  # one process: nothing to shard
    assert fsdp.plugin_for(DPOConfig(**{**base, "fsdp": False}), 2) is None
    with pytest.raises(CharterError, match="precision: bf16 weights"):
        fsdp.plugin_for(DPOConfig(**base, precision="bf16"), 2)
    with pytest.raises(CharterError, match="bf16_moments: bf16 moments are not supported"):
        fsdp.plugin_for(DPOConfig(**base, bf16_moments=True), 2)
    with pytest.raises(CharterError, match="merge: merging a LoRA adapter"):
        fsdp.plugin_for(DPOConfig(**base, lora=True, merge=True), 2)


def test_trl_fsdp_option_strings_mean_shard():
    from training.recipe_keys import translate

    names = {"fsdp", "lr"}
    assert translate({"fsdp": "full_shard auto_wrap"}, names)[0] == {"fsdp": True}
    assert translate({"fsdp": ""}, names)[0] == {"fsdp": False}
    assert translate({"fsdp": "no_shard"}, names)[0] == {"fsdp": False}
    assert translate({"fsdp": True}, names)[0] == {"fsdp": True}
