"""FSDP (FSDP2, `fully_shard`, through accelerate) and the sharded checkpoints it writes.

    torchrun --nproc_per_node 2 -m charter train dpo --data pairs.jsonl --out runs/dpo --fsdp
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m charter train sft ...

With `fsdp: true` (or under `accelerate launch --use_fsdp`) and more than one process, every
trainable weight, its gradient and its AdamW moments are split by rows over the processes (a
DTensor with placement Shard(0)): each process holds 1/N of them. accelerate's own FSDP switch
only acts on accelerators; on CPUs (gloo) it would leave the run as plain data parallel, so
`enable` turns the state over to FSDP there too (FSDP2 runs on CPU over gloo).

A checkpoint is then written by every process at once, one shard each, never gathered:
`model-R-of-N.safetensors` (process R's rows of every trainable weight) and
`optimizer-R-of-N.safetensors` (its rows of the optimizer state, `charter.core.safestate`: no
pickle; torch.distributed.checkpoint's own format pickles its metadata, so it is not used). The
shards are listed in the checkpoint's manifest with their sha256 like any other file. Resume
with the same N reads one shard per process; with another N (or without FSDP) each tensor is
put together from all shards, in row order, and split again the way this run shards it; a full
checkpoint (`model.safetensors`, written without FSDP) also resumes under FSDP. The final model
is gathered on process 0 and saved as an ordinary `save_pretrained` folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from charter.core.errors import CharterError
from charter.core.safestate import load_state, state_bytes

SHARD = "__shard0__"  # marks an optimizer-state tensor stored as this process's rows
_SHARD_FILE = re.compile(r"(model|optimizer)-(\d{5})-of-(\d{5})\.safetensors")


def requested(cfg) -> bool:
    """`fsdp: true`, or accelerate's launcher asked for FSDP (`--use_fsdp`)."""
    return cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def plugin_for(cfg, num_processes: int):
    """accelerate's FSDP plugin when FSDP is asked for and there are processes to shard over
    (else None): always FSDP2 (the sharded checkpoints read DTensors), one FSDP unit per
    decoder layer unless the launcher chose a wrap policy."""
    from accelerate import FullyShardedDataParallelPlugin

    if not requested(cfg) or num_processes < 2:
        return None
    if cfg.lora and cfg.merge:
        raise CharterError("merging a LoRA adapter into a sharded model is not supported; "
                           "train without --merge and merge final/ afterwards", field="merge")
    if cfg.precision == "bf16":  # BF16AdamW's Kahan buffers are not checked on DTensors
        raise CharterError("bf16 weights (BF16AdamW) are not supported under FSDP yet; use "
                           "bf16-mixed", field="precision")
    if cfg.bf16_moments:  # the same optimizer's chunked views of each parameter
        raise CharterError("bf16 moments are not supported under FSDP yet; leave bf16_moments "
                           "off", field="bf16_moments")
    kw = {} if "FSDP_AUTO_WRAP_POLICY" in os.environ else {
        "auto_wrap_policy": "transformer_based_wrap"}
    return FullyShardedDataParallelPlugin(fsdp_version=2, **kw)


def enable(acc, fsdp_plugin) -> None:
    """Make a multi-process CPU run an FSDP run (accelerate does this itself on GPUs)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.MULTI_CPU:
        if acc.mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = fsdp_plugin
        # as accelerate does for its own FSDP: the process state says so too (AcceleratorState
        # copies it back whenever it is constructed again)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        _switched.append(True)


_switched: list[bool] = []  # `enable` switched this process's CPU state to FSDP


def undo_enable() -> None:
    """Before the next run in this process (the pipeline trains SFT then DPO): back to the
    plain multi-process CPU state, which that run may or may not switch again."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if _switched:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        _switched.clear()


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local().detach().cpu().contiguous().clone()


def shard_blobs(acc, model, opt) -> dict[str, bytes]:
    """This process's files of a sharded checkpoint (its rows of the weights and optimizer)."""
    from safetensors.torch import save as st_save
    from torch.distributed.tensor import DTensor

    rank, world = acc.process_index, acc.num_processes
    weights = {n: _local(p) for n, p in model.named_parameters() if p.requires_grad}
    sd = opt.state_dict()
    state = {i: {k: {SHARD: _local(v)} if isinstance(v, DTensor) else v for k, v in st.items()}
             for i, st in sd["state"].items()}
    meta = {"rank": str(rank), "world": str(world)}
    return {shard_name("model", rank, world): st_save(weights, metadata=meta),
            shard_name("optimizer", rank, world): state_bytes({**sd, "state": state})}


def shard_world(ckpt: Path) -> int | None:
    """How many processes wrote checkpoint `ckpt` (None: a full checkpoint)."""
    worlds = {int(m.group(3)) for f in ckpt.iterdir() if (m := _SHARD_FILE.fullmatch(f.name))}
    if not worlds:
        return None
    if len(worlds) > 1:
        raise CharterError(f"shards of {sorted(worlds)} process counts in one checkpoint",
                           path=ckpt)
    world = worlds.pop()
    for kind in ("model", "optimizer"):
        for r in range(world):
            if not (ckpt / shard_name(kind, r, world)).is_file():
                raise CharterError(f"{shard_name(kind, r, world)} is missing", path=ckpt)
    return world


def _place(target: torch.Tensor, parts: list[torch.Tensor], same_layout: bool) -> torch.Tensor:
    """`target`'s value from `parts` (the rows each old process held, in rank order): this
    process's part as it is when the layout is unchanged, else the whole tensor split again the
    way `target` is split (or whole, for a tensor that is not sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        if same_layout:
            return parts[0]
        full = torch.cat(parts) if len(parts) > 1 else parts[0]
        return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None).to_local()
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _weights(ckpt: Path, world: int | None, mine: list[int]) -> dict[str, list[torch.Tensor]]:
    from safetensors.torch import load_file

    files = ([ckpt / "model.safetensors"] if world is None
             else [ckpt / shard_name("model", r, world) for r in mine])
    out: dict[str, list[torch.Tensor]] = {}
    for f in files:
        try:
            for n, t in load_file(str(f)).items():
                out.setdefault(n, []).append(t)
        except Exception as e:  # SafetensorError: damaged after the checksum was taken
            raise CharterError(f"damaged weights ({e})", path=f) from None
    return out


def _optimizer(ckpt: Path, world: int | None, mine: list[int]) -> list[dict]:
    files = ([ckpt / "optimizer.safetensors"] if world is None
             else [ckpt / shard_name("optimizer", r, world) for r in mine])
    return [load_state(f) for f in files]


def load_weights_and_optimizer(acc, model, opt, ckpt: Path) -> None:
    """Restore the trainable weights and the optimizer state from a full or sharded
    checkpoint into this run's model, sharded or not, on any number of processes."""
    from torch.distributed.tensor import DTensor

    world = shard_world(ckpt)
    same = world is not None and world == acc.num_processes and is_sharded(model)
    # the shards this process reads: its own, or (another layout) all of them in row order
    mine = [acc.process_index] if same else list(range(world or 1))
    weights = _weights(ckpt, world, mine)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise CharterError("checkpoint weights do not match this model (was --lora changed?)",
                           path=ckpt)
    with torch.no_grad():
        for n, p in params.items():
            w = _place(p, weights[n], same)
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.shape != w.shape:
                raise CharterError(f"checkpoint weight {n} has shape {tuple(w.shape)}, the "
                                   f"model's is {tuple(local.shape)}", path=ckpt)
            local.copy_(w)
    states = _optimizer(ckpt, world, mine)
    order = [p for g in opt.param_groups for p in g["params"]]
    try:
        sd = states[0]
        for i, st in sd["state"].items():
            p = order[i]
            for k, v in st.items():
                parts = [s["state"][i][k] for s in states]
                if isinstance(v, dict) and SHARD in v:
                    parts = [x[SHARD] for x in parts]
                elif not (isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim()):
                    continue  # a step count or another per-parameter value: the same everywhere
                value = _place(p, parts, same)
                st[k] = _as_like(p, value)
        opt.load_state_dict(sd)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CharterError(f"optimizer state does not fit this run ({e})", path=ckpt) from None


def _as_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like parameter `p` (a DTensor when `p` is one) holding `local`."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return local.to(p.device)
    out = torch.zeros_like(p, dtype=local.dtype)
    out.to_local().copy_(local)
    return out


def full_state_dict(acc, model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on process 0 (every process must call it), or None when the
    model is not sharded and can be saved as it is."""
    if not is_sharded(model):
        return None
    full = acc.get_state_dict(model)
    # a tied weight (lm_head = embed_tokens) is gathered under both names as two tensors, which
    # save_pretrained would then write twice; keep the names an unsharded save writes
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in names}
