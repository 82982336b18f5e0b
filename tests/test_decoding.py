"""The sampler of the transformers backend (critique/backends/decoding.py): the nucleus found by a
partial sort against the full sort it replaces, and the inverse-CDF draw against the weights it
draws from."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from critique.backends import decoding  # noqa: E402
from critique.backends.base import Sampling  # noqa: E402


def sorted_nucleus(probs, top_p):
    """The reference: a full descending sort, dropping each token once the ones before it reach
    top_p; returns the kept token ids of each row as a set."""
    vals, idx = probs.sort(dim=-1, descending=True)
    drop = vals.cumsum(-1) - vals >= top_p
    return [set(i[~d].tolist()) for i, d in zip(idx, drop)]


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (whole vocabulary) to peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_is_the_sorted_nucleus(monkeypatch, scale, top_p):
    monkeypatch.setattr(decoding, "NUCLEUS_K", 4)  # small, so flat rows widen the search
    g = torch.Generator().manual_seed(int(scale * 10 + top_p * 100))
    probs = torch.softmax(torch.randn(6, 1000, generator=g) * scale, dim=-1)
    vals, idx = decoding.nucleus(probs, top_p)
    got = [set(i[v > 0].tolist()) for i, v in zip(idx, vals)]
    assert got == sorted_nucleus(probs, top_p)
    kept = torch.zeros_like(probs).scatter_(-1, idx, vals)
    assert torch.equal(kept[kept > 0], probs[kept > 0])  # the kept probabilities, unchanged
    assert bool((vals[:, 0] > 0).all())  # the most likely token always stays


def test_draw_follows_the_weights_and_never_draws_a_zero_weight():
    w = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0, 0.0]]).repeat(20000, 1)
    gens = [torch.Generator().manual_seed(7)] * len(w)  # one stream for all draws
    j = decoding.draw(w, gens)
    freq = torch.bincount(j, minlength=6).double() / len(w)
    assert freq[1] == 0 and freq[4] == 0 and freq[5] == 0
    # binomial standard error at 20000 draws is <= 0.0035: 0.015 is ~4 of them
    assert torch.allclose(freq, w[0].double(), atol=0.015), freq.tolist()


def test_draw_takes_a_single_weight():
    w = torch.tensor([[0.0, 0.0, 2.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    assert decoding.draw(w, gens).tolist() == [2, 0]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_pick_is_seeded_per_row(top_p):
    """A row's pick depends only on its logits and its own generator: the same with other rows
    beside it or alone, and the same again from the same seeds."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 4
    s = Sampling(max_new_tokens=1, temperature=0.7, top_p=top_p)

    def gens():
        return [torch.Generator().manual_seed(100 + b) for b in range(5)]

    together = [decoding.pick_next(logits, gens(), s).tolist() for _ in range(2)]
    alone = [decoding.pick_next(logits[b:b + 1], [gens()[b]], s).item() for b in range(5)]
    assert together[0] == together[1] == alone
    # different seeds draw differently somewhere (a sampler that ignored them would not)
    other = [torch.Generator().manual_seed(900 + b) for b in range(5)]
    picks = [decoding.pick_next(logits, other, s).tolist() for _ in range(3)]
    assert any(p != together[0] for p in picks)


def test_pick_at_temperature_zero_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    s = Sampling(max_new_tokens=1, temperature=0.0)
    assert torch.equal(decoding.pick_next(logits, [None] * 4, s), logits.argmax(-1))
