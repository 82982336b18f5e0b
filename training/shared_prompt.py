"""Preference pairs with the prompt run once: chosen and rejected continue one prompt cache.

The concatenated forward (`training.collate.collate_pairs`) runs every pair's prompt twice, once
before the chosen and once before the rejected response. Here the B prompts run once (left
padded, so they all end in the last column), and the 2B responses (chosen rows, then rejected
rows) run on top of the prompts' key/value cache, repeated for the two sides; gradients flow
through the cache into the prompt's pass. The first response token is predicted by the
prompt's last position, the others by the response positions. Same log-probs as the
concatenated forward up to float rounding (tests/test_training_shared_prompt.py); it saves
B·(prompt length) tokens of forward and backward per batch; `decide` turns it on for a run
whose micro-batches hold enough prompt tokens for that to pay.

Used by the DPO stage (policy pass and reference pass) on one process: under DDP a module must
run one forward per backward, so the concatenated pass stays there, and with gradient
checkpointing (which turns the cache off) or a model whose cache is not plain full attention.
"""

from __future__ import annotations

import torch

from training.data import PairExample


def usable(model) -> bool:
    """Whether `model` keeps a plain full-attention DynamicCache (no sliding windows, no
    recurrent state), which is what running responses after a prompt cache needs."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if getattr(model, "is_gradient_checkpointing", False):
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an exotic config: use the concatenated pass
        return False
    return all(type(la) is DynamicLayer for la in cache.layers)


# Tokens a micro-batch's prompts must hold for the shared pass to pay. Measured with SmolLM2,
# bf16 autocast, CPU (2026-11-25): 2 pairs of ~110 tokens (~110 prompt tokens saved) ran 12%
# slower shared, 4 pairs of ~240 tokens (~500 saved) 2-3% faster with 8% less peak memory.
MIN_SAVED = 256


def decide(cfg, num_processes: int, model, examples: list[PairExample]) -> bool:
    """The run's choice, made once so that the reference pass and the policy pass compute
    every pair the same way: shared when allowed (`share_prompt`, one process, a usable cache)
    and a micro-batch's prompts hold at least MIN_SAVED tokens on average (batch_size x mean
    prompt length: the tokens the second run of each prompt would cost)."""
    if not (cfg.share_prompt and num_processes == 1 and examples and usable(model)):
        return False
    mean_prompt = sum(len(e.prompt_ids) for e in examples) / len(examples)
    return cfg.batch_size * mean_prompt >= MIN_SAVED


def collate(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt_ids/prompt_mask (B, P) left-padded; response_ids/response_mask (2B, R)
    right-padded, chosen rows then rejected rows."""
    B = len(examples)
    P = max(len(e.prompt_ids) for e in examples)
    resps = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    R = max(len(r) for r in resps)
    p_ids = torch.full((B, P), pad_id, dtype=torch.long)
    p_mask = torch.zeros((B, P), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.prompt_ids)
        p_ids[b, P - n:] = torch.tensor(e.prompt_ids)
        p_mask[b, P - n:] = 1
    r_ids = torch.full((2 * B, R), pad_id, dtype=torch.long)
    r_mask = torch.zeros((2 * B, R), dtype=torch.long)
    for b, r in enumerate(resps):
        if r:
            r_ids[b, :len(r)] = torch.tensor(r)
            r_mask[b, :len(r)] = 1
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids,
            "response_mask": r_mask}


def pair_logps(model, batch: dict, chunked: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed and mean response log-probs and response token counts, each (2B,): the
    contract of `training.loop.forward_logps` on the concatenated batch (`chunked`: response
    tokens other than the first are scored from hidden states, `training.chunked_logps`)."""
    from transformers.cache_utils import DynamicCache

    from training.chunked_logps import label_logps

    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    r_ids, r_mask = batch["response_ids"], batch["response_mask"]
    R = r_ids.shape[1]
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos,
                past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().repeat(2, 1)  # (2B, V): each response's first token
    both = DynamicCache([(torch.cat([la.keys, la.keys]), torch.cat([la.values, la.values]))
                         for la in out.past_key_values.layers])
    mask = torch.cat([p_mask.repeat(2, 1), r_mask], dim=1)  # (2B, P + R)
    start = p_mask.sum(-1).repeat(2)[:, None]  # (2B, 1): each prompt's real length
    pos = start + torch.arange(R, device=r_ids.device)[None, :]
    valid = r_mask.bool()
    safe = torch.where(valid, r_ids, torch.zeros_like(r_ids))
    kw = dict(input_ids=r_ids, attention_mask=mask, position_ids=pos, past_key_values=both,
              use_cache=True)
    if chunked:
        out, rest = label_logps(model, safe[:, 1:], valid[:, 1:], **kw)
        logits = out.logits[:, :-1].float() if rest is None else None
    else:
        logits = model(**kw, logits_to_keep=R).logits[:, :-1].float()  # (2B, R-1, V)
    if logits is not None:
        picked = torch.gather(logits, -1, safe[:, 1:, None]).squeeze(-1)
        rest = (picked - torch.logsumexp(logits, dim=-1)) * valid[:, 1:]
    head = first.gather(-1, safe[:, :1]).squeeze(-1) - torch.logsumexp(first, dim=-1)
    logps = torch.cat([(head * valid[:, 0])[:, None], rest], dim=1)  # (2B, R)
    total, count = logps.sum(-1), valid.sum(-1)
    return total, total / count.clamp(min=1), count
