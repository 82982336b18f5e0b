"""The transformers backend on a tiny random-init llama (real SmolLM2 tokenizer and template).

Every behaviour is checked against a manual, unbatched computation on the same model: greedy
decoding without a KV cache, and log-probs summed by hand over literal token ids.
"""

from __future__ import annotations

import pytest

from charter.core.errors import CharterError
from critique.backends.base import Sampling

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon and a small village."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "Say something else."}],
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(tiny_model_dir), batch_size=3, progress=False, device="cpu")


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(tiny_model_dir), batch_size=1, progress=False, device="cpu")


def manual_greedy(backend, conv, prefix: str, steps: int) -> str:
    """Greedy decoding by re-running the whole sequence each step (no cache, no padding)."""
    import torch

    ids = backend._encode(backend.prompt_text(conv, prefix))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = backend.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in backend.eos_ids:
                break
            out.append(nxt)
    return backend.tokenizer.decode(out, skip_special_tokens=True)


def manual_logprob(backend, ids: list[int], start: int) -> float:
    """sum_{t >= start} log p(ids[t] | ids[:t]), one sequence, no padding."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_greedy_matches_manual_decoding_and_is_deterministic(backend):
    s = Sampling(max_new_tokens=8)
    first = backend.generate(CONVS, s)
    assert first == backend.generate(CONVS, s)
    assert [t[0] for t in first] == [manual_greedy(backend, c, "", 8) for c in CONVS]
    assert all(t[0] for t in first)  # a random model does not hit EOS in 8 tokens here


def test_left_padded_batches_equal_one_at_a_time(backend, single):
    greedy = Sampling(max_new_tokens=8)
    assert backend.generate(CONVS, greedy) == single.generate(CONVS, greedy)
    # sampled rows draw from their own generator: batch size and order do not change them
    sampled = Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    batched = backend.generate(CONVS, sampled)
    assert batched == single.generate(CONVS, sampled)
    assert backend.generate(CONVS[::-1], sampled) == batched[::-1]


def test_seeded_sampling_reproduces_and_differs_across_seeds(backend):
    def run(seed):
        return backend.generate(CONVS[:2], Sampling(max_new_tokens=8, temperature=1.0, seed=seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_tiny_top_p_is_greedy(backend):
    """top_p keeps the smallest set of tokens whose mass reaches it; the first token always
    stays, so top_p=1e-9 keeps only the argmax and sampling becomes greedy decoding."""
    greedy = backend.generate(CONVS, Sampling(max_new_tokens=6))
    assert backend.generate(CONVS, Sampling(max_new_tokens=6, temperature=1.0, top_p=1e-9,
                                            seed=5)) == greedy


def test_n_samples(backend):
    out = backend.generate(CONVS[:2], Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=0))
    assert [len(o) for o in out] == [3, 3]
    assert len(set(out[0])) > 1  # three draws from a near-uniform model differ
    greedy = backend.generate(CONVS[:1], Sampling(max_new_tokens=6, n=2))
    assert greedy[0][0] == greedy[0][1]


def test_stop_strings_cut_the_text(backend):
    full = backend.generate(CONVS[:1], Sampling(max_new_tokens=12))[0][0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = backend.generate(CONVS[:1], Sampling(max_new_tokens=12, stop=[stop]))[0][0]
    assert cut == full[:full.index(stop)]
    assert stop not in cut


def test_prefix_continues_the_assistant_text(backend):
    out = backend.generate(CONVS[:2], Sampling(max_new_tokens=6), prefixes=["Sure, ", ""])
    assert out[0][0] == manual_greedy(backend, CONVS[0], "Sure, ", 6)
    assert out[1][0] == manual_greedy(backend, CONVS[1], "", 6)
    assert backend.prompt_text(CONVS[0], "Sure, ").endswith("<|im_start|>assistant\nSure, ")


def test_score_equals_manual_computation(backend):
    options = [["Yes", "No, never."], ["(A)", "(B)", "a much longer option with more tokens"],
               [""], ["x"]]
    prefixes = ["", "The answer is ", "", "Well"]
    got = backend.score(CONVS, options, prefixes)
    assert [len(g) for g in got] == [2, 3, 1, 1]
    for conv, opts, prefix, g in zip(CONVS, options, prefixes, got):
        for opt, value in zip(opts, g):
            ids, start = backend.option_tokens(conv, opt, prefix)
            assert value == pytest.approx(manual_logprob(backend, ids, start), abs=1e-4)
    assert got[2][0] == 0.0  # an empty option has no tokens
    assert all(v < 0 for g in got for v in g if v != 0.0)


def test_score_token_boundary(backend):
    """BPE merges the prefix's trailing space into the option's "(": the prompt alone ends in
    token 216 (" "), prompt+option in 365 (" (") 49 ("A") 25 (")"). The option's tokens are
    those after the longest common prefix of ids, so the merged " (" counts as the option's."""
    conv = CONVS[0]
    ids, start = backend.option_tokens(conv, "(A)", "The answer is ")
    assert ids[start - 1:] == [314, 365, 49, 25]  # "Ġis" is the last shared token
    assert ids[start:] == [365, 49, 25]
    ids2, start2 = backend.option_tokens(conv, "A)", "The answer is (")
    assert ids2 == ids and ids2[start2:] == [49, 25]  # no merge: a clean split after " ("
    a, b = backend.score([conv, conv], [["(A)"], ["A)"]], ["The answer is ", "The answer is ("])
    assert a[0] == pytest.approx(manual_logprob(backend, ids, start), abs=1e-4)
    assert b[0] == pytest.approx(manual_logprob(backend, ids, start2), abs=1e-4)
    assert a[0] < b[0]  # the merged version also pays for " ("


def test_score_batch_size_sets_the_rows_per_scoring_forward(tiny_model_dir, monkeypatch):
    """Generation batches by batch_size, scoring by score_batch_size (None: batch_size); the
    scores do not depend on how the rows were batched."""
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), batch_size=4, score_batch_size=1,
                            progress=False, device="cpu", share_prefix=False)
    rows_seen: list[int] = []
    real = b._score_batch
    monkeypatch.setattr(b, "_score_batch", lambda rows: rows_seen.append(len(rows)) or real(rows))
    options = [["Yes", "No, never."], ["(A)", "a longer option"], ["x", "y z"]]
    one = b.score(CONVS[:3], options)
    assert rows_seen == [1] * 6
    rows_seen.clear()
    b.score_batch_size = None  # as the pool sets it for a stage that leaves it unset
    four = b.score(CONVS[:3], options)
    assert rows_seen == [4, 2]
    assert max(abs(x - y) for g, h in zip(one, four) for x, y in zip(g, h)) < 1e-4
    steps: list[int] = []
    real_model = b.model.forward
    monkeypatch.setattr(b.model, "forward", lambda *a, **k: steps.append(
        k["input_ids"].shape[0]) or real_model(*a, **k))
    b.score_batch_size = 1
    b.generate(CONVS, Sampling(max_new_tokens=2))
    assert steps[0] == 4  # the prefill of all four prompts: generation keeps batch_size
    with pytest.raises(CharterError, match="score_batch_size"):
        TransformersBackend(str(tiny_model_dir), score_batch_size=0, progress=False)


def test_each_call_hands_the_freed_heap_back(backend, monkeypatch):
    """One malloc_trim at the end of every generate and score call (not per step)."""
    from charter.core import procmem

    calls = []
    monkeypatch.setattr(procmem, "trim", lambda: calls.append(1))
    backend.generate(CONVS, Sampling(max_new_tokens=3))
    assert len(calls) == 1
    backend.score(CONVS, [["A", "B"]] * len(CONVS))
    assert len(calls) == 2


def test_usage_counts(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), progress=False, device="cpu")
    b.generate(CONVS[:2], Sampling(max_new_tokens=5))
    b.score(CONVS[:1], [["A", "B"]])
    u = b.usage
    assert u.generate_calls == 1 and u.score_calls == 1
    assert 0 < u.generated_tokens <= 10
    assert u.prompt_tokens == sum(len(b._encode(b.prompt_text(c))) for c in CONVS[:2])
    assert u.generate_seconds > 0 and u.score_seconds > 0


def test_missing_and_broken_models_are_clear_errors(tmp_path, tiny_model_dir):
    import shutil

    from critique.backends.transformers_backend import TransformersBackend

    with pytest.raises(CharterError, match="model directory not found"):
        TransformersBackend(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()  # config but no safetensors weights
    with pytest.raises(CharterError, match="cannot load model") as e:
        TransformersBackend(str(broken), progress=False)
    assert str(broken) in str(e.value)
    with pytest.raises(CharterError, match="dtype"):
        TransformersBackend(str(tiny_model_dir), dtype="float8")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(CharterError, match="cannot use device 'cuda'"):
            TransformersBackend(str(tiny_model_dir), device="cuda", progress=False)


@pytest.mark.integration
def test_embedded_smollm2_answers():
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(None, progress=False)
    assert b.model_name == "smollm2"
    (text,), = b.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                          Sampling(max_new_tokens=24))
    assert "Paris" in text
    words = text.split()
    assert len(words) >= 3 and sum(w.isascii() for w in words) == len(words)


# ---------------------------------------------------------------------------------------------
# shared-prefix scoring (critique/backends/prefix_cache.py)

JUDGE = {"role": "system", "content": "You judge which of two assistant answers is better. " * 3}


def label_rows():
    """Labelling-shaped conversations: a shared system prompt, both orders of three pairs (the
    orders share everything up to the options), single- and multi-token options, suffixes of
    different lengths, and one conversation that shares nothing with the others."""
    convs, options, prefixes = [], [], []
    questions = ["How do I bake bread at home with a small oven?", "Tell me about dragons.",
                 "x"]
    answers = [("Use flour, water, salt and yeast; knead, rest, bake.", "Buy it."),
               ("They are myths.", "Dragons breathe fire in many old stories from Europe."),
               ("a", "b")]
    for k, (q, (r1, r2)) in enumerate(zip(questions, answers)):
        for first, second in ((r1, r2), (r2, r1)):
            convs.append([JUDGE, {"role": "user", "content": f"{q}\nOptions:\n(A) {first}\n"
                                  f"(B) {second}\nAnswer with the letter."}])
            options.append(["A", "B"] if k != 1 else ["A) they are", "B"])
            prefixes.append("(")
    convs.append([{"role": "user", "content": "Nothing in common here."}])
    options.append(["Yes", "No, not at all."])
    prefixes.append("")
    return convs, options, prefixes


@pytest.fixture(scope="module")
def unshared(tiny_model_dir):
    from critique.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(tiny_model_dir), batch_size=4, progress=False, device="cpu",
                               share_prefix=False)


def max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))


def test_prefix_plan_groups_by_hand():
    """Rows (ids, start), sorted: r0, r1 share 20 tokens then differ; r2 shares 18 with r1 and
    nothing more; r3 shares only the first 2 tokens with all. min_shared=4.
    Global prefix g = min(adjacent lcps 20, 18, 2; caps) = 2 < 4, so g = 0.
    Grouping {r0, r1} saves 20 * 1; {r0, r1, r2} saves 18 * 2 = 36 > 20; so one group of three
    with extension 18, and r3 alone with its shareable tokens start - 1 = 29."""
    from critique.backends.prefix_cache import plan

    base = list(range(100, 140))
    r0 = base[:20] + [1] * 10
    r1 = base[:20] + [2] * 10
    r2 = base[:18] + [3] * 12
    r3 = base[:2] + [4] * 28
    p = plan([(r0, 25), (r1, 25), (r2, 25), (r3, 30)], min_shared=4)
    assert p.g == 0 and p.groups == [[0, 1, 2], [3]] and p.ext == [18, 29]
    assert p.saved() == 36
    # the scored tokens cap what may be shared: r1's first scored token is its 11th, so
    # g = min(20, 18, caps 24, 10, 24) = 10 and no group can extend it (r1 shares 0 more);
    # single rows run their shareable tokens in stage 2: 24 - 10, 10 - 10, 24 - 10
    p = plan([(r0, 25), (r1, 11), (r2, 25)], min_shared=4)
    assert p.g == 10 and p.groups == [[0], [1], [2]] and p.ext == [14, 0, 14]
    assert p.saved() == 20
    # r0, r1 share 20 > r2's 18: with r2 far apart they group alone
    r2b = base[:5] + [3] * 25
    p = plan([(r0, 30), (r1, 30), (r2b, 30)], min_shared=4)
    assert p.g == 5 and p.groups == [[0, 1], [2]] and p.ext == [15, 24]


def test_prefix_chunks_by_hand():
    """Groups run together while padding stays within 20% of real tokens. Group 0: extension
    10, two suffixes of 30 - 10 = 20; group 1: extension 5, one suffix 10 - 5 = 5; group 2:
    extension 10, two suffixes 21. Sorted by extension + longest suffix: 1 (10), 0 (30), 2 (31).
    {1, 0}: padded 2 * 10 + 3 * 20 = 80 > 1.2 * (15 + 45) = 72, so 0 starts a new chunk;
    {0, 2}: padded 2 * 10 + 4 * 21 = 104 <= 1.2 * (20 + 82) = 122.4, so 2 joins it."""
    from critique.backends.prefix_cache import Plan, chunks

    rows = [([0] * n, n) for n in (30, 30, 10, 31, 31)]
    p = Plan(g=0, groups=[[0, 1], [2], [3, 4]], ext=[10, 5, 10])
    assert chunks(p, rows) == [[1], [0, 2]]
    # slack 0.5: {1, 0}: 80 <= 90; {1, 0, 2}: 3 * 10 + 5 * 21 = 135 <= 1.5 * 112 = 168
    assert chunks(p, rows, slack=0.5) == [[1, 0, 2]]


def test_shared_prefix_scores_equal_unshared(backend, unshared, monkeypatch):
    from critique.backends import prefix_cache

    calls = []
    real = prefix_cache.score_shared
    monkeypatch.setattr(prefix_cache, "score_shared",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    convs, options, prefixes = label_rows()
    shared = backend.score(convs, options, prefixes)
    assert calls and any(p.saved() > 0 for p in calls)  # sharing ran, with a saving
    assert any(p.g for p in calls) and any(len(m) > 1 for p in calls for m in p.groups)
    assert max_diff(shared, unshared.score(convs, options, prefixes)) <= 1e-4
    for conv, opts, prefix, got in zip(convs, options, prefixes, shared):
        for opt, value in zip(opts, got):
            ids, start = backend.option_tokens(conv, opt, prefix)
            assert value == pytest.approx(manual_logprob(backend, ids, start), abs=1e-4)


def test_shared_prefix_single_batch_and_no_common_prefix(tiny_model_dir, unshared):
    from critique.backends.transformers_backend import TransformersBackend

    big = TransformersBackend(str(tiny_model_dir), batch_size=32, progress=False, device="cpu")
    convs, options, prefixes = label_rows()
    assert max_diff(big.score(convs, options, prefixes),
                    unshared.score(convs, options, prefixes)) <= 1e-4
    # CONVS share only the template's first tokens: the plan shares nothing, the old path runs
    opts = [["A", "B c d"]] * len(CONVS)
    assert max_diff(big.score(CONVS, opts), unshared.score(CONVS, opts)) <= 1e-4
    assert big.share_prefix


def test_unshareable_cache_falls_back(tiny_model_dir, unshared, monkeypatch):
    from critique.backends import prefix_cache
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), batch_size=4, progress=False, device="cpu")
    monkeypatch.setattr(prefix_cache, "_shareable", lambda cache: False)
    convs, options, prefixes = label_rows()
    assert max_diff(b.score(convs, options, prefixes),
                    unshared.score(convs, options, prefixes)) <= 1e-4
    assert b.share_prefix is False  # remembered: later calls skip the attempt


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_model_dir):
    """With max_length, longer prompts get fewer new tokens, so rows finish at different steps
    and are dropped from the batch (and its KV cache) as they do; every row must still equal
    its one-at-a-time decoding, greedy and sampled."""
    from critique.backends.transformers_backend import TransformersBackend

    kw = dict(progress=False, device="cpu")
    probe = TransformersBackend(str(tiny_model_dir), batch_size=4, **kw)
    plen = [len(probe._encode(probe.prompt_text(c, ""))) for c in CONVS]
    max_length = max(plen) + 2  # the longest prompt gets 2 new tokens, shorter ones more
    assert len({min(8, max_length - n) for n in plen}) > 1, plen
    batched = TransformersBackend(str(tiny_model_dir), batch_size=4, max_length=max_length, **kw)
    single = TransformersBackend(str(tiny_model_dir), batch_size=1, max_length=max_length, **kw)
    for sampling in (Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=1.0,
                                                          seed=4)):
        assert batched.generate(CONVS, sampling) == single.generate(CONVS, sampling)


def test_gathered_cache_equals_copied_rows_and_keeps_nothing(backend):
    """The last forward of shared scoring reads each row's past through `gathered` (per layer,
    inside the forward) instead of copying the past to every row and storing the new keys:
    same logits as the copying path, and the cache it read is left as it was."""
    import copy

    import torch

    from critique.backends.prefix_cache import gathered

    m = backend.model
    past = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # two cache rows, 4 positions
    new = torch.tensor([[20, 21], [22, 23], [24, 25]])  # three rows: continue rows 1, 0, 1
    idx = torch.tensor([1, 0, 1])
    with torch.inference_mode():
        cache = m(input_ids=past, use_cache=True).past_key_values
        shapes = [tuple(la.keys.shape) for la in cache.layers]
        copied = copy.deepcopy(cache)
        copied.batch_select_indices(idx)
        pos = torch.tensor([[4, 5]] * 3)
        want = m(input_ids=new, past_key_values=copied, position_ids=pos, use_cache=True).logits
        g = gathered(cache, idx)
        got = m(input_ids=new, past_key_values=g, position_ids=pos, use_cache=True).logits
        alone = m(input_ids=torch.cat([past[idx], new], 1)).logits[:, -2:]
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, alone, atol=1e-4)
    assert [tuple(la.keys.shape) for la in g.layers] == shapes  # nothing appended
    assert [tuple(la.keys.shape) for la in cache.layers] == shapes


def test_unshared_scoring_builds_no_kv_cache(unshared, monkeypatch):
    """A scoring forward reads only logits: the model must not keep every layer's keys."""
    kept = []
    forward = unshared.model.forward

    def watch(*a, **k):
        out = forward(*a, **k)
        kept.append(out.past_key_values)
        return out

    monkeypatch.setattr(unshared.model, "forward", watch)
    convs, options, prefixes = label_rows()
    unshared.score(convs, options, prefixes)
    assert kept and all(c is None for c in kept)
