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

from charter.core.tokens import common_prefix_len as lcp
from critique.backends.kv_reuse import _shareable  # noqa: F401 - used (and patched) here

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


def chunks(p: Plan, rows: Sequence[tuple[Sequence[int], int]], slack: float = 0.2
           ) -> list[list[int]]:
    """Groups (indices into p.groups) to run together in stages 2 and 3. Each stage pads to its
    longest row, so groups of similar lengths go together: sorted by extension + longest
    suffix, a chunk grows while its padded tokens stay within (1 + slack) of its real ones."""
    def lens(k):
        done = p.g + p.ext[k]
        return p.ext[k], [len(rows[r][0]) - done for r in p.groups[k]]

    order = sorted(range(len(p.groups)), key=lambda k: (lens(k)[0] + max(lens(k)[1])))
    out: list[list[int]] = []
    cur: list[int] = []
    for k in order:
        trial = cur + [k]
        es = [lens(j)[0] for j in trial]
        ss = [x for j in trial for x in lens(j)[1]]
        padded, real = len(es) * max(es) + len(ss) * max(ss), sum(es) + sum(ss)
        if cur and padded > (1 + slack) * real:
            out.append(cur)
            trial = [k]
        cur = trial
    return out + [cur] if cur else out


def score_shared(model, rows: list[tuple[list[int], int]], p: Plan, pad_id: int, device: str
                 ) -> tuple[list[float], Any] | None:
    """Run `rows` by plan `p`; same return as the backend's `_score_batch` ((B,) summed
    log-probs of the scored tokens, (B, V) next-token log-probs), or None when the model's
    cache cannot be shared."""
    import torch
    from transformers.cache_utils import DynamicCache

    sums: list[float] = [0.0] * len(rows)
    last: list[Any] = [None] * len(rows)
    prefix_kv: list[tuple[Any, Any]] = []  # per layer: G's (1, H, g, D) keys and values
    with torch.inference_mode():
        if p.g:  # stage 1: the global prefix, batch 1
            ids = torch.tensor([rows[p.groups[0][0]][0][:p.g]], device=device)
            cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            if not _shareable(cache):
                return None
            prefix_kv = [(la.keys, la.values) for la in cache.layers]
        for chunk in chunks(p, rows):
            m = len(chunk)
            # G's cache row once per group of the chunk (an empty cache when there is no G)
            cache = DynamicCache([(k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1))
                                  for k, v in prefix_kv] or None)
            mask = torch.ones((m, p.g), dtype=torch.long, device=device)
            pos_end = torch.full((m,), p.g, dtype=torch.long, device=device)
            ext = [p.ext[k] for k in chunk]
            if any(ext):  # stage 2: one row per group, after the global prefix
                firsts = [rows[p.groups[k][0]][0] for k in chunk]
                ids, new = _left_padded([f[p.g:p.g + e] for f, e in zip(firsts, ext)], pad_id)
                _, cache, mask = _run(model, cache, ids.to(device), new.to(device), mask,
                                      pos_end, 1)
                if not _shareable(cache):
                    return None
                pos_end = pos_end + torch.tensor(ext, device=device)
            # stage 3: each row's suffix after its group's cache row (gathered per layer inside
            # the forward, and nothing kept: see `gathered`)
            members = [(j, r) for j, k in enumerate(chunk) for r in p.groups[k]]
            idx = torch.tensor([j for j, _ in members], device=device)
            cache = gathered(cache, idx)
            sub = [rows[r] for _, r in members]
            suffixes = [rows[r][0][p.g + ext[j]:] for j, r in members]
            ids, new = _left_padded(suffixes, pad_id)
            K = max(len(f) - start for f, start in sub)
            logits, _, _ = _run(model, cache, ids.to(device), new.to(device), mask[idx],
                                pos_end[idx], K + 1)
            total, nxt = _read(logits, ids.to(device), sub, K)
            for b, (_, r) in enumerate(members):
                sums[r], last[r] = total[b], nxt[b]
    return sums, torch.stack(last)


def _gather_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GatherLayer(DynamicLayer):
        """A read-only cache layer for a batch's last forward: the past keys and values of m
        cache rows, and for each of the batch's N rows the cache row it continues (`index`).
        `update` returns that past (gathered) followed by the new keys and keeps neither: no
        later forward reads them. So the N rows' copies of the past and their new keys exist for
        one layer at a time, where `batch_select_indices` + a storing update would hold all of
        them for every layer at once (N x (past + new) positions x layers)."""

        def __init__(self, keys, values, index):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values, self.index = keys, values, index
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            return (torch.cat([self.keys.index_select(0, self.index), key_states], dim=-2),
                    torch.cat([self.values.index_select(0, self.index), value_states], dim=-2))

    return GatherLayer


_GATHER = None


def gathered(cache, index):
    """A cache for one last forward over len(index) rows, row n continuing `cache`'s row
    index[n]; its layers keep nothing (GatherLayer). `cache` itself is left as it was."""
    global _GATHER
    from transformers.cache_utils import DynamicCache

    if _GATHER is None:
        _GATHER = _gather_layer_class()
    out = DynamicCache()
    out.layers = [_GATHER(la.keys, la.values, index) for la in cache.layers]
    out.layer_class_to_replicate = None  # every layer is given: none to add lazily
    return out


def _run(model, cache, ids, new_mask, past_mask, past_pos, keep):
    """One forward over (N, T) left-padded ids after a cache whose rows hold past_pos (N,) real
    tokens under past_mask (N, P). Returns the (N, keep, V) logits, the cache, the full mask."""
    import torch

    full = torch.cat([past_mask, new_mask], dim=1)  # (N, P+T): holes are the padding
    pos = past_pos[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T) real positions
    out = model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=keep)
    return out.logits, out.past_key_values, full


def _read(logits, ids, rows, K: int) -> tuple[list[float], Any]:
    """Summed log-prob of each row's scored tokens (its last len - start ids) and the (N, V)
    next-token log-probs, from the (N, K+1, V) logits of the last K+1 positions."""
    import torch

    N, T = ids.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, K+1, V): [:, :K] predict ids[:, T-K:]
    scored = torch.zeros((N, K), dtype=torch.bool, device=ids.device)
    for b, (full, start) in enumerate(rows):
        if len(full) > start:
            scored[b, K - (len(full) - start):] = True
    tok_logp = logp[:, :K].gather(-1, ids[:, T - K:, None]).squeeze(-1)  # (N, K)
    total = torch.where(scored, tok_logp, 0.0).sum(-1)  # (N,)
    return total.tolist(), logp[:, K].cpu()
