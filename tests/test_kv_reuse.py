"""Prefix reuse in the transformers backend's generate (critique/backends/kv_reuse.py).

The store's bookkeeping is checked by hand on small tensors; the backend's multi-turn
generation with reuse is checked against the same backend without it and against decoding
without any cache (tests/test_backend_transformers.manual_greedy) on a tiny random llama.
"""

from __future__ import annotations

import pytest

from critique.backends.base import Sampling

SYSTEM = ("You are a careful assistant. Answer briefly, do not repeat the question, and say "
          "when you do not know something.")


def seg(n: int, value: float = 0.0):
    """A one-layer segment of n positions (1 head, head_dim 2) filled with `value`."""
    import torch

    from critique.backends.kv_reuse import Segment

    k = torch.full((1, n, 2), value)
    return Segment(((k, k.clone()),), n)


def test_lookup_takes_the_longest_prefix_and_leaves_the_last_token():
    from critique.backends.kv_reuse import MIN_REUSE, KVStore

    store = KVStore(budget=10**6)
    a = list(range(40))
    b = list(range(20)) + [99] * 20  # shares 20 tokens with a
    assert store.add(a, [seg(40, 1.0)]) and store.add(b, [seg(40, 2.0)])
    n, segs = store.lookup(a + [7, 8])  # a whole, then new tokens
    assert n == 40 and float(segs[0].kv[0][0][0, 0, 0]) == 1.0
    n, segs = store.lookup(b[:30] + [5])  # b's first 30
    assert n == 30 and [s.n for s in segs] == [30] and float(segs[0].kv[0][0][0, 0, 0]) == 2.0
    n, _ = store.lookup(a)  # the same ids: the last one must still run
    assert n == 39
    n, segs = store.lookup(list(range(MIN_REUSE - 1)) + [500, 501])  # too short to bother
    assert (n, segs) == (0, [])
    assert KVStore(budget=0).lookup(a) == (0, [])


def test_take_slices_across_segments_without_copying():
    from critique.backends.kv_reuse import take

    s1, s2 = seg(5, 1.0), seg(7, 2.0)
    got = take([s1, s2], 8)
    assert [s.n for s in got] == [5, 3]
    assert got[0] is s1  # whole segments are passed as they are
    assert got[1].kv[0][0].data_ptr() == s2.kv[0][0].data_ptr()  # a view of s2
    assert take([s1, s2], 0) == []


def test_budget_counts_a_shared_segment_once():
    from critique.backends.kv_reuse import KVStore

    shared = seg(100)  # 100 positions x 2 dims x 4 bytes x (keys + values) = 1600 bytes
    assert shared.nbytes == 1600
    store = KVStore(budget=1600 + 2 * 160)
    assert store.add(list(range(110)), [shared, seg(10)])  # 1600 + 160
    assert store.add(list(range(100)) + [7] * 10, [shared, seg(10)])  # + 160 only
    assert store.used == 1920
    assert not store.add(list(range(100)) + [8] * 10, [shared, seg(10)])  # over the budget
    assert len(store.keys) == 2 and store.keys == sorted(store.keys)


def test_batch_prefix():
    from critique.backends.kv_reuse import batch_prefix

    assert batch_prefix([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9, 9]]) == 2
    assert batch_prefix([[5, 6], [5, 6]]) == 2
    assert batch_prefix([[1, 2, 3]]) == 0
    assert batch_prefix([[1], [2]]) == 0


def turns(backend, sampling, n_turns=3, after=None):
    """A critique-loop-shaped run: each turn appends the answer and a new request (`after`
    runs on the backend after each generate call)."""
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in ("Why is the sky blue?", "Hi", "Tell me about dragons and villages.",
                       "How do I bake bread?", "What is two plus two?")]
    outs = []
    for t in range(n_turns):
        got = backend.generate(convs, sampling)
        if after is not None:
            after(backend)
        outs.append(got)
        convs = [c + [{"role": "assistant", "content": g[0]},
                      {"role": "user", "content": f"Critique that answer (turn {t})."}]
                 for c, g in zip(convs, got)]
    return outs, convs


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(tiny_model_dir), batch_size=2, progress=False, device="cpu",
                               share_prefix=False)


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=6),
                                      Sampling(max_new_tokens=6, temperature=1.0, seed=3, n=2)])
def test_multi_turn_generation_with_reuse_equals_without(tiny_model_dir, plain, sampling):
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), batch_size=2, progress=False, device="cpu")
    got, convs = turns(b, sampling)
    before = plain.usage.prompt_tokens
    want, _ = turns(plain, sampling)
    assert got == want
    assert b.usage.prompt_tokens == plain.usage.prompt_tokens - before
    # the system prompt ran once per batch, and later turns read earlier turns' caches: more
    # than the first turn's prompts alone could give
    first = sum(len(b._encode(b.prompt_text(c[:2]))) for c in convs) * (sampling.n if
                                                                          sampling.temperature
                                                                          else 1)
    assert b.usage.reused_prompt_tokens > first // 2
    assert b.usage.reused_prompt_tokens < b.usage.prompt_tokens
    assert b._store is not None and b._store.keys


def test_not_continued_keeps_no_caches_and_changes_no_text(tiny_model_dir):
    """Generating inside `not_continued` keeps no store for a later call and drops the last
    call's: the same texts, fewer prompt tokens read from caches; keeping resumes after it."""
    from critique.backends.base import not_continued
    from critique.backends.transformers_backend import TransformersBackend

    def make():
        return TransformersBackend(str(tiny_model_dir), batch_size=2, progress=False,
                                   device="cpu")

    s = Sampling(max_new_tokens=6)
    keeps, drops = make(), make()
    kept, convs = turns(keeps, s, n_turns=2)
    stores = []

    def one_call(b, convs, sampling):
        with not_continued(b):
            out = TransformersBackend.generate(b, convs, sampling)
        stores.append(b._store)
        return out

    drops.generate = lambda convs, sampling: one_call(drops, convs, sampling)
    dropped, _ = turns(drops, s, n_turns=2)
    assert dropped == kept and stores == [None, None] and drops.keep_caches is True
    assert drops.usage.reused_prompt_tokens < keeps.usage.reused_prompt_tokens
    assert keeps._store is not None and keeps._store.keys
    TransformersBackend.generate(drops, convs, s)  # outside the block it keeps them again
    assert drops._store is not None and drops._store.keys
    with not_continued(object()) as plain:  # a backend that keeps no caches: nothing to do
        assert plain is not None


def test_reused_caches_give_the_same_logits(tiny_model_dir, plain, monkeypatch):
    """Greedy tokens of a random tiny model barely depend on positions; its logits do."""
    from critique.backends.transformers_backend import TransformersBackend

    seen: list = []
    pick = TransformersBackend._pick

    def record(logits, gens, sampling):
        seen.append(logits.clone())
        return pick(logits, gens, sampling)

    monkeypatch.setattr(TransformersBackend, "_pick", staticmethod(record))
    b = TransformersBackend(str(tiny_model_dir), batch_size=2, progress=False, device="cpu")
    turns(b, Sampling(max_new_tokens=4))
    got, seen[:] = list(seen), []
    turns(plain, Sampling(max_new_tokens=4))
    assert b.usage.reused_prompt_tokens > 0
    assert len(got) == len(seen)
    for x, y in zip(got, seen):
        assert x.shape == y.shape
        assert float((x - y).abs().max()) <= 1e-4


def test_reuse_matches_decoding_without_any_cache(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend
    from tests.test_backend_transformers import manual_greedy

    b = TransformersBackend(str(tiny_model_dir), batch_size=3, progress=False, device="cpu")
    _, convs = turns(b, Sampling(max_new_tokens=5), n_turns=2)
    reused = b.usage.reused_prompt_tokens
    got = b.generate(convs, Sampling(max_new_tokens=5))
    assert b.usage.reused_prompt_tokens > reused
    assert [g[0] for g in got] == [manual_greedy(b, c, "", 5) for c in convs]


def test_no_budget_stores_nothing_and_unshareable_caches_turn_reuse_off(tiny_model_dir, plain,
                                                                        monkeypatch):
    from critique.backends import kv_reuse
    from critique.backends.transformers_backend import TransformersBackend

    kw = dict(batch_size=2, progress=False, device="cpu")
    zero = TransformersBackend(str(tiny_model_dir), kv_store_mb=0, **kw)
    sampling = Sampling(max_new_tokens=6)
    assert turns(zero, sampling)[0] == turns(plain, sampling)[0]
    assert zero._store is not None and not zero._store.keys
    assert zero.usage.reused_prompt_tokens > 0  # the batch's common prefix still ran once

    monkeypatch.setattr(kv_reuse, "_shareable", lambda cache: False)
    off = TransformersBackend(str(tiny_model_dir), **kw)
    assert turns(off, sampling)[0] == turns(plain, sampling)[0]
    assert off.share_prefix is False and off._store is None


def test_negative_budget_is_an_error(tiny_model_dir):
    from charter.core.errors import CharterError
    from critique.backends.transformers_backend import TransformersBackend

    with pytest.raises(CharterError, match="kv_store_mb"):
        TransformersBackend(str(tiny_model_dir), kv_store_mb=-1, progress=False, device="cpu")


def test_prefill_groups_by_hand():
    from critique.backends import kv_reuse

    # one group: splitting [10, 12, 14] saves (3 x 14) - (10 + 12 + 14) = 6 tokens of padding,
    # less than one group's cost
    assert kv_reuse.prefill_groups([10, 12, 14], group_cost=8) == [[0, 1, 2]]
    # four rows of 10 and one of 400 (given out of order): as one batch 5 x 400 + 8 = 2008;
    # apart 4 x 10 + 8 + 400 + 8 = 456
    assert kv_reuse.prefill_groups([10, 400, 10, 10, 10], group_cost=8) == [[0, 2, 3, 4], [1]]
    # rows with nothing to prefill are left out; no rows, no groups
    assert kv_reuse.prefill_groups([0, 5, 0], group_cost=8) == [[1]]
    assert kv_reuse.prefill_groups([0, 0]) == []
    # the exact optimum, not a greedy cut: lengths 1, 2, 50, 60, 61 at cost 20:
    # {1,2} {50,60,61} = 2*2+20 + 3*61+20 = 227 (one group 325; {1,2} {50} {60,61} 236)
    assert kv_reuse.prefill_groups([1, 2, 50, 60, 61], group_cost=20) == [[0, 1], [2, 3, 4]]


def test_split_prefill_matches_decoding_without_any_cache(tiny_model_dir, monkeypatch):
    """Prompts of very different lengths in one batch: the groups are prefilled apart (on top of
    the batch's shared prefix), and greedy answers still equal decoding each prompt alone
    without a cache; sampled answers equal the unsplit backend's."""
    from critique.backends import kv_reuse
    from critique.backends.transformers_backend import TransformersBackend
    from tests.test_backend_transformers import manual_greedy

    monkeypatch.setattr(kv_reuse, "GROUP_COST", 4)
    b = TransformersBackend(str(tiny_model_dir), batch_size=4, progress=False, device="cpu")
    convs = [[{"role": "user", "content": t}] for t in
             ("hi", "word " * 60, "ok", "a longer question about " * 3)]
    got = b.generate(convs, Sampling(max_new_tokens=6))
    assert b.usage.split_prefills >= 2
    assert [g[0] for g in got] == [manual_greedy(b, c, "", 6) for c in convs]
    sampled = Sampling(max_new_tokens=6, temperature=1.0, seed=5)
    split = b.generate(convs, sampled)
    monkeypatch.setattr(kv_reuse, "GROUP_COST", 10**9)  # never split
    before = b.usage.split_prefills
    assert b.generate(convs, sampled) == split
    assert b.usage.split_prefills == before
