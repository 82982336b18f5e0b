"""Shared-prefix scoring for the transformers backend: run a common token prefix once.

Labelling rows repeat long token prefixes: the system prompt and few-shot turns are the same for
every row, and the two orders of one pair share the conversation and the question up to the
options. `score_shared` runs a batch in three stages over one KV cache:

1. the batch's global prefix G (longest common prefix of all rows), batch 1;
2. each group's extension E_k (the rows of group k share G + E_k), one row per group, on top of
   G's cache repeated to the groups;
3. each row's suffix, on top of its group's cache row (gathered with repeats).

Every stage LEFT-pads its new tokens, so the cache holds padding holes between G, E_k and the
suffix; the attention mask (over cache + new tokens) hides them and explicit position ids count
only real tokens, so each row sees exactly the positions and keys of its unpadded prompt.
With left padding the suffixes end in the last column, so the LM head runs only over the last
K+1 positions as in the unshared path. Results equal the unshared path up to float noise.

Only a plain `DynamicCache` of full-attention `DynamicLayer`s is expanded (a sliding window
would see the holes as positions); for other caches `score_shared` returns None and the caller
falls back to running every row's full prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from critique.backends.transformers_backend import common_prefix_len as lcp

MIN_SHARED = 16  # fewer shared tokens than this are not worth an extra forward pass


@dataclass
class Plan:
    """How one batch of rows is run: `g` global prefix tokens, then groups of row indices
    (into the batch) whose members share `ext[k]` more tokens after the global prefix."""
    g: int
    groups: list[list[int]]
    ext: list[int]

    def saved(self) -> int:
        """Tokens not run compared with running every row in full (padding ignored)."""
        n = sum(len(m) for m in self.groups)
        return self.g * (n - 1) + sum(e * (len(m) - 1) for e, m in zip(self.ext, self.groups))


def plan(rows: Sequence[tuple[Sequence[int], int]], min_shared: int = MIN_SHARED) -> Plan:
    """Group `rows` = [(ids, start)] (sorted by ids, so rows sharing a prefix are adjacent).

    A row may share at most `start - 1` tokens: the position before its first scored token
    (and its last position, whose next-token log-probs are read) must run in the last stage.
    Groups are consecutive runs chosen by dynamic programming to maximise the tokens saved,
    sum_k ext_k * (|group_k| - 1) (a group's extension is run once instead of |group_k| times).
    """
    n = len(rows)
    cap = [max(0, start - 1) for _, start in rows]
    adj = [lcp(rows[i][0], rows[i + 1][0]) for i in range(n - 1)]  # sorted: lcp(i..j) = min adj
    g = min([*adj, *cap]) if n > 1 else 0
    if g < min_shared:
        g = 0
    best = [0] * (n + 1)  # best[j]: most tokens saved by grouping rows[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        shared = cap[j - 1]  # extension prefix of rows[i-1:j] (+ g), grown leftwards
        best[j], cut[j] = best[j - 1], j - 1
        for i in range(j - 1, 0, -1):
            shared = min(shared, adj[i - 1], cap[i - 1])
            gain = (shared - g) * (j - i)  # |group| - 1 = j - i
            if shared - g < min_shared:
                break
            if best[i - 1] + gain > best[j]:
                best[j], cut[j] = best[i - 1] + gain, i - 1
    groups, ext, j = [], [], n
    while j > 0:
        i = cut[j]
        members = list(range(i, j))
        shared = min(cap[k] for k in members)
        if len(members) > 1:
            shared = min(shared, *adj[i:j - 1])
        groups.append(members)
        ext.append(shared - g)  # a single row runs all of its shareable tokens in stage 2
        j = i
    return Plan(g, groups[::-1], ext[::-1])


def _shareable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(la) is DynamicLayer for la in cache.layers)


def _left_padded(seqs: list[Sequence[int]], pad_id: int):
    """(B, T) ids and mask of `seqs` left-padded to the longest (T may be 0)."""
    import torch

    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.tensor(list(s))
            mask[b, T - len(s):] = 1
    return ids, mask


def score_shared(model, rows: list[tuple[list[int], int]], p: Plan, pad_id: int, device: str
                 ) -> tuple[list[float], Any] | None:
    """Run `rows` by plan `p`; same return as the backend's `_score_batch` ((B,) summed
    log-probs of the scored tokens, (B, V) next-token log-probs), or None when the model's
    cache cannot be shared."""
    import torch

    B = len(rows)
    group_of = [0] * B
    for k, members in enumerate(p.groups):
        for r in members:
            group_of[r] = k
    first = [rows[m[0]][0] for m in p.groups]
    cache, mask, pos_end = None, torch.zeros((1, 0), dtype=torch.long, device=device), \
        torch.zeros((1,), dtype=torch.long, device=device)

    def run(ids, new_mask, past_mask, past_pos, keep):
        """One stage: (N, T) left-padded ids after a cache whose mask is past_mask (N, P) and
        whose rows hold past_pos (N,) real tokens. Returns logits, the cache, the full mask."""
        full = torch.cat([past_mask, new_mask], dim=1)  # (N, P+T)
        pos = past_pos[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        out = model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=keep)
        return out.logits, out.past_key_values, full

    with torch.inference_mode():
        if p.g:  # stage 1: the global prefix, batch 1
            ids = torch.tensor([first[0][:p.g]], device=device)
            _, cache, mask = run(ids, torch.ones_like(ids), mask, pos_end, 1)
            if not _shareable(cache):
                return None
            pos_end = pos_end + p.g
        if cache is not None:  # G's cache row, once per group
            cache.batch_select_indices(torch.zeros(len(first), dtype=torch.long, device=device))
        if any(p.ext):  # stage 2: one row per group, after the global prefix
            ids, m = _left_padded([f[p.g:p.g + e] for f, e in zip(first, p.ext)], pad_id)
            _, cache, mask = run(ids.to(device), m.to(device), mask.expand(len(first), -1),
                                 pos_end.expand(len(first)), 1)
            if not _shareable(cache):
                return None
            pos_end = pos_end + torch.tensor(p.ext, device=device)
        else:
            mask, pos_end = mask.expand(len(first), -1), pos_end.expand(len(first))
        # stage 3: each row's suffix after its group's cache row
        idx = torch.tensor(group_of, device=device)
        if cache is not None:
            cache.batch_select_indices(idx)
        done = [p.g + p.ext[group_of[b]] for b in range(B)]
        ids, m = _left_padded([rows[b][0][done[b]:] for b in range(B)], pad_id)
        ids = ids.to(device)
        K = max(len(f) - start for f, start in rows)
        T = ids.shape[1]
        logits, _, _ = run(ids, m.to(device), mask[idx], pos_end[idx], K + 1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K+1, V): [:, :K] predict ids[:, T-K:]
        scored = torch.zeros((B, K), dtype=torch.bool, device=device)
        for b, (full, start) in enumerate(rows):
            if len(full) > start:
                scored[b, K - (len(full) - start):] = True
        tok_logp = logp[:, :K].gather(-1, ids[:, T - K:, None]).squeeze(-1)  # (B, K)
        total = torch.where(scored, tok_logp, 0.0).sum(-1)  # (B,)
    return total.tolist(), logp[:, K].cpu()
