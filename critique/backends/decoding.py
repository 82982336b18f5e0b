"""The decode rules of the transformers backend, as functions of tensors and token ids: each
completion's seed, the next-token pick (greedy, or temperature + top-p sampling from a row's own
generator), and where a stop string cuts the text. A library module beside
`transformers_backend.py`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from critique.backends.base import Sampling


def row_seed(seed: int, ids: Sequence[int], sample: int) -> int:
    """A 63-bit seed from the call's seed, the prompt's token ids and the sample index."""
    h = hashlib.sha256(f"{seed}|{sample}|{','.join(map(str, ids))}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


# The nucleus is looked for among each row's top NUCLEUS_K tokens first (a partial sort); a row
# whose top tokens hold less than top_p of the mass widens the search, up to the whole
# vocabulary. Measured on SmolLM2's 49,152-token vocabulary, 16 rows, 2 cores: a full sort per
# step took 30 ms and 16 `torch.multinomial` draws 18 ms (it draws one exponential per
# vocabulary entry), next to a ~110 ms forward; this pick takes ~3 ms.
NUCLEUS_K = 256


def nucleus(probs, top_p: float):
    """Each row's smallest set of most likely tokens whose mass reaches `top_p` (the first always
    stays): (values, token ids), both (B, k), values sorted descending and 0 past the set.
    `probs`: (B, V). The same set a full descending sort gives (up to the order of ties)."""
    V = probs.shape[-1]
    k = min(V, NUCLEUS_K)
    while True:
        vals, idx = probs.topk(k, dim=-1)  # sorted, descending
        mass = vals.cumsum(-1)
        if k == V or bool((mass[:, -1] >= top_p).all()):
            break
        k = min(V, k * 8)
    # a token is dropped once the tokens before it already reach top_p
    return vals.masked_fill(mass - vals >= top_p, 0.0), idx


def draw(weights, gens):
    """One index per row of `weights` (B, n), non-negative and not all 0 in a row, drawn with
    probability proportional to its weight by inverting the row's cumulative sum at one uniform
    number from that row's own generator (so a row's draw does not depend on the other rows)."""
    import torch

    cdf = weights.double().cumsum(-1)  # (B, n)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])  # (B,)
    target = (u * cdf[:, -1])[:, None]
    j = torch.searchsorted(cdf, target, right=True).clamp(max=weights.shape[-1] - 1)
    # u * total can round up to the total: fall back to the last entry with weight
    zero = weights.gather(-1, j) <= 0
    if bool(zero.any()):
        n = weights.shape[-1]
        last = torch.where(weights > 0, torch.arange(n), -1).amax(-1, keepdim=True)
        j = torch.where(zero, last, j)
    return j[:, 0]


def pick_next(logits, gens, sampling: Sampling):
    """Next token per row, (B,): argmax at temperature 0, else temperature + top-p sampling,
    each row drawn with its own `torch.Generator` from `gens`. `logits`: (B, V)."""
    import torch

    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()  # (B, V)
    if sampling.top_p < 1.0:
        vals, idx = nucleus(probs, sampling.top_p)
        picks = idx.gather(-1, draw(vals, gens)[:, None])[:, 0]
    else:
        picks = draw(probs, gens)
    return picks.to(logits.device)
