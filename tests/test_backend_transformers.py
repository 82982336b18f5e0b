"""The transformers backend on a tiny random-init llama (real SmolLM2 tokenizer and template).

Every behaviour is checked against a manual, unbatched computation on the same model: greedy
decoding without a KV cache, and log-probs summed by hand over literal token ids.
"""

from __future__ import annotations

import pytest

from charter.errors import CharterError
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
