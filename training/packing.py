"""Padding-free batches: a batch's sequences packed into one row, attention kept within each.

A right-padded (B, T) batch runs every row at its longest row's length: the quickstart's SFT
batches of 51-383-token examples ran 82,896 token positions for 52,035 real ones. Packed, the
batch is one row of exactly its real tokens: position ids restart at 0 for each sequence (so
rotary positions are those of the padded layout), and attention runs per sequence.

How attention stays within a sequence. `enable(model)` switches the model to the attention
implementation registered here (`ATTN`), which
- for a packed forward (the `cu_seq_lens_q` keyword: cumulative sequence lengths, the name
  transformers' own packed flash-attention path uses) runs causal SDPA on each sequence's slice
  of the queries, keys and values: the work of the unpadded sequences, no (N x N) mask;
- for every other forward delegates to transformers' SDPA attention with its usual mask.
Its mask function is SDPA's, so a model whose attention does not pass keywords through still
gets a correct (block-diagonal) mask from the reset position ids (transformers detects packed
position ids when no attention mask is given); only the speed is lost then.
The switch lives on the model's config for the whole run (a gradient-checkpointed layer reruns
its attention during backward, so it cannot be scoped to the forward call); `_attn_implementation`
is not written to a saved config.json, and `disable` switches back to SDPA.

The losses are the padded ones up to float rounding: each position sees the same tokens at the
same positions. `packed_logps` returns what `training.loop.forward_logps` returns, per
sequence.
"""

from __future__ import annotations

import torch

ATTN = "charter_packed"
_REGISTERED = False


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # query (1, H, N, D); key, value (1, H_kv, N, D): grouped-query heads repeated as SDPA needs
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    bounds = cu.tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling,
        is_causal=True) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


def register() -> None:
    """Register `ATTN` with transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, _attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)
    _REGISTERED = True


def supported(model) -> bool:
    """Whether the model runs SDPA attention through transformers' attention interface (what
    `ATTN` stands in for). Others (eager, flash, a custom kernel) keep padded batches; `enable`
    also probes that packing keeps sequences apart."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) in ("sdpa", ATTN)


def enable(model) -> bool:
    """Switch `model` (its config, shared by every layer) to packed attention; returns whether
    it could: the model is on SDPA (`supported`) and a probe passes: two 3-token sequences
    packed give the second the logits it gets alone (a model whose code builds its own mask
    from nothing but the padding would let it see the first; it stays padded)."""
    if not supported(model):
        return False
    register()
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = ATTN
    if not _probe(model):
        cfg._attn_implementation = before
        return False
    return True


def _probe(model) -> bool:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 8:
        return False
    dev = next(model.parameters()).device
    ids = torch.tensor([[vocab - 1, 3, 5, 7, 2, 4]], device=dev)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]],
                                                                     device=dev),
                           cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32, device=dev),
                           use_cache=False).logits[0, 3:].float()
            alone = model(input_ids=ids[:, 3:], use_cache=False).logits[0].float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return bool(torch.allclose(packed, alone, atol=tol, rtol=tol))


def disable(model) -> None:
    """Back to SDPA (the only implementation `enable` switches from)."""
    if active(model):
        getattr(model, "module", model).config._attn_implementation = "sdpa"


def active(model) -> bool:
    """Whether `model` (or the module a DDP/FSDP wrapper holds) runs packed attention."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == ATTN


def pack(batch: dict) -> dict:
    """A right-padded batch (input_ids, attention_mask, labels: (B, T)) as one row.

    Returns input_ids and position_ids (1, N), N = the batch's real tokens; `targets` and
    `target_mask` (1, N): the label each packed position predicts (the next token of the same
    sequence; none at a sequence's last token); `row` (N,): each position's row in the batch;
    `cu_seq_lens_q` (B + 1,): where each sequence starts and ends."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    B, T = ids.shape
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(T, device=ids.device) < lengths[:, None])).all()):
        raise ValueError("pack needs right-padded rows (real tokens first)")
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    nxt = nxt.masked_fill(~mask, -100)
    # a sequence's last real token predicts nothing (what follows it is padding or, packed,
    # the next sequence)
    last = (lengths - 1).clamp(min=0)
    nxt[torch.arange(B, device=ids.device), last] = -100
    pos = torch.arange(T, device=ids.device).expand(B, T)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=ids.device)
    cu[1:] = lengths.cumsum(0)
    tgt = nxt[mask]
    return {"input_ids": ids[mask][None], "position_ids": pos[mask][None],
            "targets": tgt.clamp(min=0)[None], "target_mask": (tgt != -100)[None],
            "row": torch.arange(B, device=ids.device)[:, None].expand(B, T)[mask],
            "cu_seq_lens_q": cu, "rows": B}


def packed_logps(model, batch: dict, chunked: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`training.loop.forward_logps` of a right-padded batch, run packed: (summed, mean, count)
    label log-probs per row, each (B,). The model must have been `enable`d (otherwise the
    attention crosses sequences through nothing but the reset position ids' mask)."""
    p = pack(batch)
    kwargs = {"input_ids": p["input_ids"], "position_ids": p["position_ids"],
              "cu_seq_lens_q": p["cu_seq_lens_q"], "use_cache": False}
    targets, mask = p["targets"], p["target_mask"]
    logps = None
    if chunked:
        from training.chunked_logps import label_logps

        out, logps = label_logps(model, targets, mask, **kwargs)
    if logps is None:
        logits = (out.logits if chunked else model(**kwargs, logits_to_keep=0).logits)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        logps = torch.where(mask, lp, 0.0)
    B = p["rows"]
    total = torch.zeros(B, dtype=logps.dtype, device=logps.device).index_add(
        0, p["row"], logps[0])
    count = torch.zeros(B, dtype=torch.long, device=logps.device).index_add(
        0, p["row"], mask[0].long())
    return total, total / count.clamp(min=1), count
