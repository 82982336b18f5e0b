"""The one-token decode attention (critique/backends/decode_attention.py) against transformers'
SDPA function on the same tensors and masks, and its use by the transformers backend."""

from __future__ import annotations

import pytest


class Module:  # what the attention functions read from the layer
    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def tensors(B=3, H=6, Hk=2, T=11, D=8, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hk, T, D, generator=g)
    v = torch.randn(B, Hk, T, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_decode_attention_equals_sdpa(mask_kind, heads):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from critique.backends.decode_attention import attention

    H, Hk = heads
    q, k, v = tensors(H=H, Hk=Hk)
    B, T = q.shape[0], k.shape[2]
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[0, ..., :4] = False  # left padding
    keep[1, ..., 5:7] = False  # a hole, as reused caches have
    mask = {"bool": keep, "none": None,
            "float": torch.where(keep, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    mod = Module(H // Hk)
    ours, _ = attention(mod, q, k, v, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (B, 1, H, q.shape[-1])
    assert float((ours - theirs).abs().max()) <= 1e-5
    # masked positions do not matter: changing their values changes nothing
    if mask is not None:
        k2, v2 = k.clone(), v.clone()
        k2[0, :, :4], v2[1, :, 5:7] = 100.0, -100.0
        again, _ = attention(mod, q, k2, v2, mask, scaling=0.3)
        assert float((again - ours).abs().max()) <= 1e-6


def test_prefill_goes_to_sdpa(monkeypatch):
    import torch
    import transformers.integrations.sdpa_attention as sdpa

    from critique.backends.decode_attention import attention

    calls = []
    real = sdpa.sdpa_attention_forward

    def spy(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    q = torch.randn(2, 4, 5, 8)  # 5 query tokens
    k = v = torch.randn(2, 2, 5, 8)
    out, _ = attention(Module(2), q, k, v, None)
    assert calls == [q.shape] and out.shape == (2, 5, 4, 8)


def test_backend_switches_to_it(tiny_model_dir):
    from critique.backends.decode_attention import NAME
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), progress=False, device="cpu")
    assert b.model.config._attn_implementation == NAME
