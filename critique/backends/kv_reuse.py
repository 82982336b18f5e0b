"""Prefix reuse for the transformers backend's `generate`: run no token twice when we can help it.

The critique loop re-sends each conversation with one more turn (initial answer → critique
request → revision request ...), and every prompt may open with the same few-shot turns. So:

- across calls, `KVStore` keeps the key/value cache of each conversation of the last `generate`
  call (prompt + generated tokens). A prompt of the next call that starts with one of them (by
  token ids: the longest common prefix, found by bisection in the sorted store) starts from that
  cache and runs only its new tokens;
- within a batch, the prompts' common token prefix (system prompt, few-shot turns) runs once.

Entries are lists of `Segment`s (per-layer key/value views), so a prefix shared by many rows
(the few-shot turns) is held once, not once per row. Storage is capped at a byte budget; rows
over it are simply not stored (their next turn runs in full).

The reused keys sit left-padded in front of each row's new tokens; the attention mask hides the
padding and explicit position ids count only real tokens, as in `prefix_cache`. Only a plain
`DynamicCache` of full-attention layers is reused (a sliding window would see the holes as
positions): with any other cache the backend turns reuse off.

`GrowingLayer` is the cache layer generation runs on: transformers' `DynamicLayer` appends each
decode step with `torch.cat`, which copies the whole cache every step (45% of a batch-32 decode
step of SmolLM2 on CPU at 300 tokens of context); this one writes into a buffer allocated once
with room for the new tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from charter.core.tokens import common_prefix_len

MIN_REUSE = 16  # fewer reusable tokens than this are not worth the copying


@dataclass(frozen=True)
class Segment:
    """`n` consecutive positions of one conversation's cache: per layer (keys, values), each
    (heads, n, head_dim). Views: slicing a segment copies nothing."""
    kv: tuple[tuple[Any, Any], ...]
    n: int

    def head(self, n: int) -> Segment:
        return self if n >= self.n else Segment(
            tuple((k[:, :n], v[:, :n]) for k, v in self.kv), n)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


def take(segments: Sequence[Segment], n: int) -> list[Segment]:
    """The first `n` positions of a list of segments."""
    out: list[Segment] = []
    for s in segments:
        if n <= 0:
            break
        out.append(s.head(n))
        n -= s.n
    return out


@dataclass
class KVStore:
    """The caches of the last call's conversations, sorted by token ids, within `budget` bytes."""
    budget: int
    keys: list[tuple[int, ...]] = field(default_factory=list)
    values: list[list[Segment]] = field(default_factory=list)
    used: int = 0
    _seen: set[int] = field(default_factory=set)  # ids of segment objects already counted

    def lookup(self, ids: Sequence[int]) -> tuple[int, list[Segment]]:
        """The most tokens of `ids` held (at most len(ids) - 1: the last prompt token always
        runs, its logits pick the first new token), and their segments; (0, []) below
        MIN_REUSE."""
        if not self.keys:
            return 0, []
        key = tuple(ids)
        i = bisect.bisect_left(self.keys, key)
        best, segs = 0, []
        for j in (i - 1, i):  # in sorted order, the longest common prefix is a neighbour
            if 0 <= j < len(self.keys):
                n = common_prefix_len(self.keys[j], key)
                if n > best:
                    best, segs = n, self.values[j]
        best = min(best, len(ids) - 1)
        return (best, take(segs, best)) if best >= MIN_REUSE else (0, [])

    def add(self, ids: Sequence[int], segments: list[Segment]) -> bool:
        """Keep `segments` (covering `ids`) if the budget allows; segments already held by an
        earlier entry (a shared prefix) cost nothing again."""
        new = [s for s in segments if id(s.kv) not in self._seen]
        cost = sum(s.nbytes for s in new)
        if self.used + cost > self.budget:
            return False
        self.used += cost
        self._seen.update(id(s.kv) for s in new)
        key = tuple(ids)
        i = bisect.bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.values.insert(i, segments)
        return True


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer over a preallocated (B, H, capacity, D) buffer: `keys`
        and `values` are views of its first positions; a step writes in place."""

        def __init__(self, reserve: int = 0):
            super().__init__()
            self.reserve = reserve  # positions to allocate beyond what the first update needs
            self.buf_k = self.buf_v = None
            self.n = 0

        def _views(self) -> None:
            self.keys, self.values = self.buf_k[:, :, :self.n], self.buf_v[:, :, :self.n]

        def allocate(self, like, batch: int, length: int) -> None:
            """Zeroed buffers for `length` positions (+ reserve), which the caller fills."""
            if not self.is_initialized:
                self.lazy_initialization(like, like)
            H, D = like.shape[-3], like.shape[-1]
            self.buf_k = like.new_zeros((batch, H, length + self.reserve, D))
            self.buf_v = like.new_zeros((batch, H, length + self.reserve, D))
            self.n = length
            self._views()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            need = self.n + key_states.shape[-2]
            if self.buf_k is None or need > self.buf_k.shape[-2]:
                old_k, old_v, n = self.buf_k, self.buf_v, self.n
                B, H, _, D = key_states.shape
                # the first allocation: what is needed + reserve; later ones grow by half
                cap = need + (self.reserve if old_k is None else max(self.reserve, need // 2))
                self.buf_k = key_states.new_empty((B, H, cap, D))
                self.buf_v = value_states.new_empty((B, H, cap, D))
                if n:
                    self.buf_k[:, :, :n] = old_k[:, :, :n]
                    self.buf_v[:, :, :n] = old_v[:, :, :n]
            self.buf_k[:, :, self.n:need] = key_states
            self.buf_v[:, :, self.n:need] = value_states
            self.n = need
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if self.buf_k is not None:
                self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if self.buf_k is not None and tokens_to_remove < 0:
                self.n = max(0, self.n + tokens_to_remove)
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.buf_k is not None:
                self.buf_k = self.buf_k.repeat_interleave(repeats, dim=0)
                self.buf_v = self.buf_v.repeat_interleave(repeats, dim=0)
                self._views()

    return GrowingLayer


_GROWING = None


def growing_layer_class():
    """GrowingLayer (built on first use, so importing this module does not import transformers)."""
    global _GROWING
    if _GROWING is None:
        _GROWING = _layer_class()
    return _GROWING


def new_cache(reserve: int):
    """An empty DynamicCache whose layers are GrowingLayers with `reserve` spare positions."""
    from functools import partial

    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = partial(growing_layer_class(), reserve)
    return cache


def _shareable(cache: Any) -> bool:
    """A DynamicCache of full-attention layers (plain or growing), whose rows we can copy."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    ok = (DynamicLayer, growing_layer_class())
    return type(cache) is DynamicCache and all(type(la) in ok for la in cache.layers)


def plain_cache_model(config) -> bool:
    """Whether the model's own cache is DynamicLayers only (full attention everywhere): then
    generation may run on GrowingLayers and reuse caches."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=config)
    except Exception:  # an exotic config: leave its cache to the model
        return False
    return all(type(la) is DynamicLayer for la in cache.layers)


def batch_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix of all prompts (0 for fewer than two)."""
    if len(prompts) < 2:
        return 0
    lo, hi = min(prompts), max(prompts)  # lexicographic extremes bound every pair's prefix
    return common_prefix_len(lo, hi)


def reused(model, prompts: list[list[int]], old: KVStore | None, device: str):
    """Per row, how many leading prompt tokens come from a cache (the last call's store `old`,
    or this batch's common prefix run once) and those caches' segments; (None, None) when the
    model's cache cannot be reused."""
    B = len(prompts)
    lengths, segs = [0] * B, [[] for _ in range(B)]
    if old is not None:
        for b, p in enumerate(prompts):
            lengths[b], segs[b] = old.lookup(p)
    g = min(batch_prefix(prompts), min(len(p) for p in prompts) - 1)
    if g >= MIN_REUSE and any(n < g for n in lengths):
        seg = run_prefix(model, prompts[0][:g], device)
        if seg is None:
            return None, None
        for b in range(B):
            if lengths[b] < g:
                lengths[b], segs[b] = g, [seg]
    return lengths, segs


def keep(store: KVStore, cache, row: int, start: int, mask_row, ids: list[int],
         segs: list[Segment]) -> None:
    """Store a finished row's cache: its reused segments, then its columns from `start`."""
    seg = tail(cache, row, start, mask_row)
    if sum(s.n for s in segs) + seg.n == len(ids):  # else something is off: keep nothing
        store.add(ids, [*segs, seg])


def run_prefix(model, ids: Sequence[int], device: str) -> Segment | None:
    """Run `ids` (batch 1) and return their cache as one segment, or None when the model's cache
    cannot be reused."""
    import torch

    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True,
                      past_key_values=new_cache(0), logits_to_keep=1).past_key_values
    if not _shareable(cache):
        return None
    return Segment(tuple((la.keys[0], la.values[0]) for la in cache.layers), len(ids))


def build_past(rows: Sequence[list[Segment]], lengths: Sequence[int], device: str,
               reserve: int = 0):
    """A cache of GrowingLayers holding each row's segments (`lengths[b]` positions),
    left-padded to the longest, with `reserve` spare positions; and its (B, R) attention mask."""
    import torch
    from transformers.cache_utils import DynamicCache

    B, R = len(rows), max(lengths)
    first = next(s for segs in rows for s in segs)
    cache = DynamicCache()
    layer_class = growing_layer_class()
    cache.layer_class_to_replicate = None
    cache.layers = []
    for li, (k0, _) in enumerate(first.kv):
        layer = layer_class(reserve)
        layer.allocate(k0[None], B, R)
        for b, segs in enumerate(rows):
            at = R - lengths[b]
            for s in segs:
                k, v = s.kv[li]
                layer.buf_k[b, :, at:at + s.n] = k
                layer.buf_v[b, :, at:at + s.n] = v
                at += s.n
        cache.layers.append(layer)
    mask = torch.zeros((B, R), dtype=torch.long, device=device)
    for b, n in enumerate(lengths):
        if n:
            mask[b, R - n:] = 1
    return cache, mask


def tail(cache, row: int, start: int, mask_row) -> Segment:
    """The positions of cache row `row` from column `start` on that the mask marks real, as one
    segment (a copy: the batch's cache is freed when the call ends)."""
    import torch

    idx = torch.nonzero(mask_row[start:], as_tuple=True)[0] + start
    kv = tuple((la.keys[row].index_select(1, idx), la.values[row].index_select(1, idx))
               for la in cache.layers)
    return Segment(kv, int(idx.numel()))


# A forward pass of its own costs about this many tokens of prefill (per-layer launch and
# Python overhead, a smaller matmul, the cache copies): a group is split off only where it
# saves more padding than that.
GROUP_COST = 128


def prefill_groups(lengths: Sequence[int], group_cost: int | None = None) -> list[list[int]]:
    """Rows (indices into `lengths`, the tokens each row has to prefill; rows with none are left
    out) grouped so that prefilling each group as its own left-padded batch costs least:
    sum over groups of (rows x longest row) + `group_cost` each, solved exactly over the rows
    sorted by length (a group is then always a run of neighbours). One group means no split."""
    group_cost = GROUP_COST if group_cost is None else group_cost
    rows = sorted((n, b) for b, n in enumerate(lengths) if n > 0)
    best = [0.0] + [float("inf")] * len(rows)  # best[j]: cost of the first j rows
    cut = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        longest = rows[j - 1][0]
        for i in range(j):  # rows i..j-1 as one group
            c = best[i] + (j - i) * longest + group_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(rows)
    while j:
        groups.append([b for _, b in rows[cut[j]:j]])
        j = cut[j]
    return groups[::-1]


def extend(model, prompts: Sequence[Sequence[int]], upto: Sequence[int], rows: Sequence[int],
           lengths: list[int], segs: list[list[Segment]], pad_id: int, device: str) -> bool:
    """Run prompt tokens [lengths[b], upto[b]) of each row b in `rows` as one left-padded batch
    on top of the row's cached segments, and append their cache to `segs[b]` (`lengths[b]`
    becomes `upto[b]`). False when the model's cache cannot be reused (nothing changed)."""
    import torch

    new = [list(prompts[b][lengths[b]:upto[b]]) for b in rows]
    T, R = max(len(x) for x in new), max(lengths[b] for b in rows)
    if R:
        cache, past_mask = build_past([segs[b] for b in rows], [lengths[b] for b in rows],
                                      device, reserve=T)
    else:
        cache = new_cache(T)
        past_mask = torch.zeros((len(rows), 0), dtype=torch.long, device=device)
    ids, mask, pos = left_padded(new, [lengths[b] for b in rows], past_mask, pad_id, device)
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      past_key_values=cache, logits_to_keep=1).past_key_values
    if not _shareable(cache):
        return False
    for i, b in enumerate(rows):
        segs[b] = [*segs[b], tail(cache, i, R, mask[i])]
        lengths[b] = upto[b]
    return True


def left_padded(rows: Sequence[Sequence[int]], starts: Sequence[int], past_mask, pad_id: int,
                device: str):
    """New token rows left-padded to the longest behind a past of `past_mask`'s columns: the
    (B, T) ids, the (B, past + T) attention mask, and the (B, T) real positions, counting on
    from each row's `starts` (padding gets the row's first position; it is masked)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    new_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r))
        new_mask[i, T - len(r):] = 1
    ids, new_mask = ids.to(device), new_mask.to(device)
    mask = torch.cat([past_mask, new_mask], dim=1)
    start = torch.tensor(list(starts), device=device)[:, None]
    return ids, mask, start + (new_mask.cumsum(-1) - 1).clamp(min=0)
