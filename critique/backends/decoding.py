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


def pick_next(logits, gens, sampling: Sampling):
    """Next token per row, (B,): argmax at temperature 0, else temperature + top-p sampling,
    each row drawn with its own `torch.Generator` from `gens`. `logits`: (B, V)."""
    import torch

    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()  # (B, V)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the first always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)]
    return torch.cat(picks).to(logits.device)
