"""DPO and its variants (IPO, hinge, robust, conservative, soft AI labels, SimPO, RPO).

    charter train dpo --data runs/label --out runs/dpo --model runs/sft --loss soft --beta 0.1
    accelerate launch --num_processes 2 -m charter train dpo --data pairs.jsonl --out runs/dpo
    torchrun --nproc_per_node 2 -m charter train dpo --data pairs.jsonl --out runs/dpo  # CPU DDP

Reference log-probs are computed once, before training, in one pass over the data and cached
in `out/ref_logps.pt` (keyed by a hash of the token ids and the reference model's files), so no
reference model is in memory while training: the reference is the starting policy, or with
`--lora` the base with the adapter disabled, or `--ref-model`. Chosen and rejected go through the
model in one concatenated forward pass, or, on one process, the prompt runs once and both
responses run on its cache (training/shared_prompt.py). Writes out/metrics.jsonl, out/metrics.png,
out/checkpoint-STEP/ and out/final/ (safetensors, loadable with AutoModelForCausalLM).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import time
from pathlib import Path

import torch

from charter.core.errors import CharterError
from charter.core.safestate import load_state, state_bytes
from charter.core.writable import disk_error, write_bytes_durable
from training import checkpoint as ckpt
from training import shared_prompt
from training.collate import collate_pairs
from training.data import (
    drop_degenerate_pairs,
    load_pair_rows,
    pairs_fingerprint,
    tokenise_pairs,
)
from training.loop import (
    checkpoint_by_size,
    forward_logps,
    log,
    step_indices,
    total_steps,
    update,
)
from training.losses import LOSSES, preference_loss
from training.options import DPOConfig
from training.stage import finish, open_run, resume

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def _model_identity(path: str) -> str:
    """Cheap identity of a model's files: config bytes + weight file names, sizes, mtimes."""
    p = Path(path)
    h = hashlib.sha256(str(path).encode())
    if p.is_dir():
        if (p / "config.json").exists():
            h.update((p / "config.json").read_bytes())
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def pair_length(e) -> int:
    """Tokens of a pair's longer row (prompt + response): what a padded batch runs it at."""
    return len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))


def pair_batch(examples, pad_id: int, share: bool, device) -> dict:
    """The concatenated batch, plus the shared-prompt tensors when `share` (the run's decision,
    `shared_prompt.decide`: the reference and the policy pass take the same path)."""
    batch = collate_pairs(examples, pad_id)
    if share and any(e.chosen_ids or e.rejected_ids for e in examples):
        batch.update(shared_prompt.collate(examples, pad_id))
    return {k: v.to(device) for k, v in batch.items()}


def pair_forward(model, batch: dict, chunked: bool = True):
    """(summed, mean, count) log-probs of chosen rows then rejected rows."""
    if "prompt_ids" in batch:
        return shared_prompt.pair_logps(model, batch, chunked)
    return forward_logps(model, batch, chunked)


@torch.no_grad()
def compute_ref_logps(acc, model, examples, pad_id: int, batch_size: int,
                      adapter_off: bool, share: bool = False) -> torch.Tensor:
    """(N, 2) summed log-probs of chosen and rejected under the reference; each process
    scores every world-th pair, then all are gathered on every process."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    mine = list(range(acc.process_index, len(examples), acc.num_processes))
    # batches of similar length (less padding); the rows are put back by index below
    mine.sort(key=lambda i: pair_length(examples[i]))
    share = share and shared_prompt.usable(model)  # a --ref-model may have another cache
    was_training = model.training
    model.eval()
    rows: list[tuple[int, float, float]] = []
    off = model.disable_adapter() if adapter_off else contextlib.nullcontext()
    with off:
        for s in tqdm(range(0, len(mine), batch_size), desc="reference log-probs",
                      disable=not acc.is_main_process):
            idx = mine[s:s + batch_size]
            batch = pair_batch([examples[i] for i in idx], pad_id, share, acc.device)
            with acc.autocast():
                total, _, _ = pair_forward(model, batch)
            n = len(idx)
            rows += [(i, float(total[j]), float(total[n + j])) for j, i in enumerate(idx)]
    model.train(was_training)
    out = torch.empty(len(examples), 2, dtype=torch.float32)
    for i, c, r in gather_object(rows):
        out[i, 0], out[i, 1] = c, r
    return out


def reference_logps(acc, cfg: DPOConfig, model, examples, pad_id: int, model_path: str,
                    share: bool = False) -> torch.Tensor | None:
    """Cached (N, 2) reference log-probs, or None for a reference-free loss (SimPO)."""
    if not LOSSES[cfg.loss].reference:
        return None
    from charter.core.models import resolve_model

    ref_path = resolve_model(cfg.ref_model) if cfg.ref_model else model_path
    key = hashlib.sha256(json.dumps([pairs_fingerprint(examples), _model_identity(ref_path),
                                     cfg.precision]).encode()).hexdigest()
    cache = Path(cfg.out) / "ref_logps.safetensors"
    if cache.exists():
        try:
            saved = load_state(cache)
        except CharterError as e:  # a damaged cache is recomputed, not trusted
            log(acc, f"{e}; computing the reference log-probs again")
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
            log(acc, f"reference log-probs: reusing {cache}")
            return saved["logps"]
    if cfg.ref_model:
        from transformers import AutoModelForCausalLM

        from charter.core.models import require_safetensors

        require_safetensors(ref_path)
        ref = AutoModelForCausalLM.from_pretrained(
            ref_path, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code).to(acc.device)
        logps = compute_ref_logps(acc, ref, examples, pad_id, cfg.ref_batch_size, False,
                                  share)
        del ref
        gc.collect()
    else:
        model.to(acc.device)
        logps = compute_ref_logps(acc, model, examples, pad_id, cfg.ref_batch_size, cfg.lora,
                                  share)
    if acc.is_main_process:
        blob = state_bytes({"key": key, "logps": logps})
        try:
            write_bytes_durable(cache.with_suffix(".tmp"), blob)
            cache.with_suffix(".tmp").replace(cache)
        except OSError as e:
            cache.with_suffix(".tmp").unlink(missing_ok=True)
            raise disk_error(e, cache, len(blob)) from None
    acc.wait_for_everyone()
    return logps


def likelihood_displacement(history: list[tuple[float, float]], window: int = 3) -> bool:
    """True when, in each of the last `window` logs, both the chosen and the rejected reward
    (β·log-ratio to the reference) are negative: both log-probs fell, only at different rates.
    A window, so that one noisy batch does not trigger it."""
    recent = history[-window:]
    return len(recent) == window and all(c < 0 and r < 0 for c, r in recent)


def train_dpo(cfg: DPOConfig) -> Path:
    """Train with a preference loss; return out/final."""
    cfg.validate()
    loaded = load_pair_rows(cfg.data, cfg.split, cfg.hh_transcripts)  # bad data fails first
    degenerate = drop_degenerate_pairs(loaded)
    run = open_run(cfg, "dpo", loaded)
    acc, model, tok, out = run.acc, run.model, run.tok, run.out
    if degenerate:
        log(acc, f"dropped {len(degenerate)} pairs whose chosen equals rejected (first: "
                 f"{degenerate[0]}); training on {len(loaded.rows)}")
    examples = tokenise_pairs(tok, loaded, cfg.max_length, progress=acc.is_main_process,
                              max_prompt_length=cfg.max_prompt_length)
    if LOSSES[cfg.loss].soft_labels:
        missing = next((e for e in examples if e.p_chosen is None), None)
        if missing:
            raise CharterError("the soft loss needs p_chosen on every pair (the AI label's "
                               "probability)", path=missing.source, field="p_chosen")
    total = total_steps(cfg, len(examples), acc.num_processes)
    if ckpt.finished(out, total):
        log(acc, f"{out / 'final'} is already trained ({total} steps); nothing to do")
        return out / "final"
    share = shared_prompt.decide(cfg, acc.num_processes, model, examples)
    ref = reference_logps(acc, cfg, model, examples, tok.pad_token_id, run.model_path, share)
    opt, sched, start, last, metrics = resume(run, total)
    run_steps(acc, cfg, run.model, opt, sched, examples, ref, tok.pad_token_id, start, total,
              metrics, out, run.cfg_dict, last)
    metrics.close()
    rows = metrics.rows
    summary = {k: rows[-1][k] for k in METRICS if rows and k in rows[-1]}
    return finish(run, rows, {"steps": total, **summary}, total,
                  ["loss", "rewards/margins", "rewards/accuracies"],
                  f"DPO ({cfg.loss}, β={cfg.beta})")


def run_steps(acc, cfg: DPOConfig, model, opt, sched, examples, ref, pad_id, start, total,
              metrics, out, cfg_dict, last_ckpt) -> None:
    from tqdm.auto import tqdm

    model.train()
    # one process only: under DDP a module runs one forward per backward
    share = shared_prompt.decide(cfg, acc.num_processes, acc.unwrap_model(model), examples)
    bar = tqdm(total=total, initial=start, desc="dpo", disable=not acc.is_main_process)
    t0, tokens = time.perf_counter(), 0
    history: list[tuple[float, float]] = []  # logged (rewards/chosen, rewards/rejected)
    warned = False
    lengths = [pair_length(e) for e in examples] if cfg.group_by_length else None
    for step in range(start, total):
        micro = step_indices(step, len(examples), cfg.batch_size, cfg.grad_accum,
                             acc.num_processes, acc.process_index, cfg.seed, lengths)
        sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)  # metric sums, pair count
        bad = None
        for a, idx in enumerate(micro):
            batch = pair_batch([examples[i] for i in idx], pad_id, share, acc.device)
            checkpoint_by_size(model, batch, cfg.checkpoint_min_tokens)
            sync = a == len(micro) - 1
            with (contextlib.nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                total_lp, _, count = pair_forward(model, batch, cfg.chunked_logps)  # (2B,)
                n = len(idx)
                pc, pr = total_lp[:n], total_lp[n:]
                rc = rr = None
                if ref is not None:
                    rc, rr = ref[idx, 0].to(acc.device), ref[idx, 1].to(acc.device)
                res = preference_loss(cfg.loss, pc, pr, rc, rr, beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                                      rpo_alpha=cfg.rpo_alpha, p=batch["p_chosen"],
                                      chosen_tokens=count[:n], rejected_tokens=count[n:])
                loss = res.losses.mean() / len(micro)  # equal micro-batches: global mean
            if not torch.isfinite(loss):  # still backward: DDP processes must stay in step
                bad = float(loss.detach())
            if bad is None or not cfg.optimizer_in_backward:  # (whose backward steps)
                acc.backward(loss)
            tokens += int(batch["attention_mask"].sum())
            cr, rj = res.chosen_rewards, res.rejected_rewards
            sums += torch.tensor([res.losses.detach().sum(), cr.sum(), rj.sum(),
                                  (cr > rj).float().sum(), (cr - rj).sum(),
                                  pc.detach().sum(), pr.detach().sum(), n], dtype=torch.float64)
        lr, grad_norm = update(acc, model, opt, sched, cfg.max_grad_norm, bad, step, last_ckpt)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            g = acc.reduce(sums.to(acc.device), "sum").cpu()
            tok_all = float(acc.reduce(torch.tensor([float(tokens)], device=acc.device),
                                       "sum").item())
            dt = time.perf_counter() - t0
            row = {"step": step + 1, **{k: float(g[i] / g[-1]) for i, k in enumerate(METRICS)},
                   "lr": lr, "tokens_per_s": tok_all / dt if dt > 0 else 0.0, "elapsed_s": dt}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            history.append((row["rewards/chosen"], row["rewards/rejected"]))
            if ref is not None and not warned and likelihood_displacement(history):
                warned = True
                log(acc, f"warning: at step {step + 1} the log-probs of both chosen and rejected "
                         "responses have fallen below the reference (likelihood displacement); "
                         "consider a lower --lr, a larger --beta or --rpo-alpha")
            t0, tokens = time.perf_counter(), 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            last_ckpt = ckpt.save_checkpoint(acc, model, opt, sched, step + 1, out, cfg_dict)
    bar.close()
