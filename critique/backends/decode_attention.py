"""Attention for one-token decode steps with grouped key/value heads, without copying the cache.

With an attention mask (batched generation with left padding always has one), transformers'
SDPA path on CPU repeats the key/value heads to the query heads (`repeat_kv`) and runs a flash
kernel made for long queries.
For a decode step (one query token) this computes the same attention with two small matmuls per
group of query heads that share a key/value head: scores (B, Hkv, groups, T), masked, softmax in
fp32, times the values. Measured on SmolLM2-135M (9 query heads, 3 key/value heads), batch 32,
300 tokens of context, 2-core AMX CPU: 110 ms per decode step instead of 160-195 ms; logits
agree with SDPA within float noise (max |diff| 1e-4 to 1e-3 over 10 steps, fp32).

Prefill (more than one query token) goes to transformers' SDPA function unchanged.
"""

from __future__ import annotations

NAME = "charter_decode"
_registered = False


def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: (B, H, q, D) query, (B, Hkv, T, D) key and
    value, a boolean (B, 1, q, T) mask (True: attend) or an additive float mask or None.
    Returns the (B, q, H, D) output and no weights."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, q, D = query.shape
    Hk = key.shape[1]
    if q != 1 or dropout or H % Hk or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scores = torch.matmul(query.reshape(B, Hk, H // Hk, D), key.transpose(-1, -2))
    scores = scores * (D ** -0.5 if scaling is None else scaling)  # (B, Hk, groups, T)
    if attention_mask is not None:
        m = attention_mask[:, :, -1:, : key.shape[-2]]  # (B, 1, 1, T)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hk, groups, D)
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def use(model) -> bool:
    """Switch `model` from SDPA to this function (same masks); False when it runs another
    attention implementation or refuses the switch."""
    global _registered
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
