"""Supervised fine-tuning on chat conversations, loss on assistant tokens only.

    charter train sft --data runs/critique --out runs/sft --epochs 2 --lr 2e-5
    accelerate launch --num_processes 2 -m charter train sft --data sft.jsonl --out runs/sft
    torchrun --nproc_per_node 2 -m charter train sft --data sft.jsonl --out runs/sft  # CPU DDP

Data: `messages` JSONL (our sft.jsonl, or any conversational dataset) or a dataset saved with
`save_to_disk`. Every assistant turn is trained on; system/user turns and the template's
generation prompts are masked. The loss is the mean NLL per assistant token over the whole
global batch (not per micro-batch), so gradient accumulation and the number of processes do not
change it. Writes out/metrics.jsonl, out/metrics.png, out/checkpoint-STEP/, out/final/.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.collate import collate_sft
from training.data import load_sft_rows, tokenise_sft
from training.loop import (
    checkpoint_by_size,
    forward_logps,
    log,
    step_indices,
    total_steps,
    update,
)
from training.options import SFTConfig
from training.stage import finish, open_run, resume


def _label_tokens(examples, idx: list[int]) -> int:
    return sum(sum(1 for t in examples[i].labels[1:] if t != -100) for i in idx)


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune on the assistant turns; return out/final."""
    cfg.validate()
    loaded = load_sft_rows(cfg.data, cfg.split, cfg.hh_transcripts)  # bad data fails first
    run = open_run(cfg, "sft", loaded)
    acc, tok, out = run.acc, run.tok, run.out
    examples = tokenise_sft(tok, loaded, cfg.max_length, progress=acc.is_main_process)
    total = total_steps(cfg, len(examples), acc.num_processes)
    if ckpt.finished(out, total):
        log(acc, f"{out / 'final'} is already trained ({total} steps); nothing to do")
        return out / "final"
    opt, sched, start, last, metrics = resume(run, total)
    run_steps(acc, cfg, run.model, opt, sched, examples, tok.pad_token_id, start, total,
              metrics, out, run.cfg_dict, last)
    metrics.close()
    rows = metrics.rows
    summary = {"steps": total, "final loss": rows[-1]["loss"] if rows else None}
    return finish(run, rows, summary, total, ["loss", "lr", "tokens_per_s"], "SFT")


def run_steps(acc, cfg: SFTConfig, model, opt, sched, examples, pad_id, start, total, metrics,
              out, cfg_dict, last_ckpt) -> None:
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=total, initial=start, desc="sft", disable=not acc.is_main_process)
    t0, tokens = time.perf_counter(), 0
    world = acc.num_processes
    lengths = [len(e.input_ids) for e in examples] if cfg.group_by_length else None
    for step in range(start, total):
        # Every process knows the whole global batch, so each can divide by its token count.
        everyone = [step_indices(step, len(examples), cfg.batch_size, cfg.grad_accum, world, r,
                                 cfg.seed, lengths) for r in range(world)]
        n_tokens = sum(_label_tokens(examples, idx) for mb in everyone for idx in mb)
        micro = everyone[acc.process_index]
        nll_sum, bad = 0.0, None
        for a, idx in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in
                     collate_sft([examples[i] for i in idx], pad_id).items()}
            checkpoint_by_size(model, batch, cfg.checkpoint_min_tokens)
            sync = a == len(micro) - 1
            with (contextlib.nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                total_lp, _, _ = forward_logps(model, batch, cfg.chunked_logps)  # (B,)
                # DDP averages gradients over processes, hence × world.
                loss = -total_lp.sum() / n_tokens * world
            if not torch.isfinite(loss):  # still backward: DDP processes must stay in step
                bad = float(loss.detach())
            if bad is None or not cfg.optimizer_in_backward:  # (whose backward steps)
                acc.backward(loss)
            nll_sum += float(-total_lp.detach().sum())
            tokens += int(batch["attention_mask"].sum())
        lr, grad_norm = update(acc, model, opt, sched, cfg.max_grad_norm, bad, step, last_ckpt)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            g = acc.reduce(torch.tensor([nll_sum, float(tokens)], dtype=torch.float64,
                                        device=acc.device), "sum").cpu()
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": float(g[0]) / n_tokens, "lr": lr,
                   "tokens_per_s": float(g[1]) / dt if dt > 0 else 0.0, "elapsed_s": dt}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            t0, tokens = time.perf_counter(), 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            last_ckpt = ckpt.save_checkpoint(acc, model, opt, sched, step + 1, out, cfg_dict)
    bar.close()
