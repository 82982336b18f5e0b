"""training.packing: padding-free batches give the padded batch's log-probs and gradients."""

from __future__ import annotations

import pytest
import torch


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch(lengths=(7, 3, 12, 5), prompt=2, vocab=200, seed=1):
    """A right-padded batch like collate_sft's: labels -100 on each row's first `prompt` tokens
    and on the padding."""
    from training.collate import collate_sft
    from training.data import IGNORE, SFTExample

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        rows.append(SFTExample(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:],
                                source=f"row {len(rows)}"))
    return collate_sft(rows, pad_id=0)


def test_pack_by_hand():
    from training.packing import pack

    batch = {"input_ids": torch.tensor([[11, 12, 13], [21, 22, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[-100, 12, 13], [-100, 22, -100]])}
    p = pack(batch)
    assert p["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # position t predicts the same sequence's t+1; a sequence's last token predicts nothing
    assert p["target_mask"].tolist() == [[True, True, False, True, False]]
    assert p["targets"][p["target_mask"]].tolist() == [12, 13, 22]
    assert p["row"].tolist() == [0, 0, 0, 1, 1]
    assert p["cu_seq_lens_q"].tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="right-padded"):
        pack({**batch, "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])})


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_logps_and_grads_equal_padded(tiny_model_dir, chunked, checkpointing):
    from training import packing
    from training.loop import forward_logps

    batch = _batch()
    results = []
    for packed in (False, True):
        model = _model(tiny_model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        if packed:
            assert packing.enable(model)
            total, mean, count = packing.packed_logps(model, batch, chunked)
        else:
            total, mean, count = forward_logps(model, batch, chunked)
        total.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((total.detach(), mean.detach(), count, grads))
        packing.disable(model)
        assert model.config._attn_implementation == "sdpa"
    (t0, m0, c0, g0), (t1, m1, c1, g1) = results
    assert c1.tolist() == c0.tolist() == [5, 1, 10, 3]
    assert torch.allclose(t1, t0, atol=1e-4) and torch.allclose(m1, m0, atol=1e-5)
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-4, rtol=1e-3), name


def test_attention_stays_within_each_sequence(tiny_model_dir):
    """A packed sequence's log-probs do not depend on its neighbours (a second batch with the
    first row's neighbours changed gives the first row the same numbers)."""
    from training import packing

    model = _model(tiny_model_dir).eval()
    assert packing.enable(model)
    a, b = _batch(seed=1), _batch(seed=2)
    b["input_ids"][0], b["labels"][0] = a["input_ids"][0], a["labels"][0]  # same first row
    with torch.no_grad():
        ta = packing.packed_logps(model, a)[0]
        tb = packing.packed_logps(model, b)[0]
    assert torch.allclose(ta[0], tb[0], atol=1e-5) and not torch.allclose(ta[1:], tb[1:])


def test_unsupported_attention_keeps_padding(tiny_model_dir):
    from training import packing

    model = _model(tiny_model_dir)
    model.config._attn_implementation = "eager"
    assert not packing.enable(model)
    assert model.config._attn_implementation == "eager"


def test_packed_forward_runs_attention_per_sequence(tiny_model_dir, monkeypatch):
    """The fast path is taken: SDPA sees each sequence's own length, not the packed row."""
    from training import packing

    model = _model(tiny_model_dir).eval()
    assert packing.enable(model)
    with torch.no_grad():  # the one-time check that the logits are the head's (a plain forward)
        packing.packed_logps(model, _batch(lengths=(2, 2)))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watch(q, k, v, *a, **kw):
        seen.append((q.shape[-2], kw.get("is_causal")))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watch)
    with torch.no_grad():
        packing.packed_logps(model, _batch(lengths=(7, 3, 12, 5)))
    assert seen == [(n, True) for _ in range(model.config.num_hidden_layers)
                    for n in (7, 3, 12, 5)]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_padding_free_matches_padded(tmp_path, tiny_model_dir, stage):
    """`padding_free: true` end to end: the same losses and final weights as padded batches."""
    import json

    from safetensors.torch import load_file

    from tests.conftest import write_sft_or_pairs
    from training.options import DPOConfig, SFTConfig

    data = write_sft_or_pairs(tmp_path / "data.jsonl", stage, please=1)
    runs = {}
    for packed in (False, True):
        out = tmp_path / f"{stage}-{packed}"
        kw = dict(data=str(data), out=str(out), model=str(tiny_model_dir), max_steps=3,
                  batch_size=4, save_every=None, padding_free=packed, lr=1e-3)
        if stage == "sft":
            from training.sft import train_sft

            final = train_sft(SFTConfig(**kw))
        else:
            from training.dpo import train_dpo

            final = train_dpo(DPOConfig(**kw))
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((final / "config.json").read_text())
        assert "charter" not in json.dumps(cfg)  # the packed attention is not saved
        runs[packed] = (losses, load_file(final / "model.safetensors"))
    (l0, w0), (l1, w1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, abs=1e-4)
    assert all(torch.allclose(w1[k], w0[k], atol=1e-5) for k in w0)


def test_a_model_that_would_let_sequences_mix_stays_padded(tiny_model_dir, monkeypatch):
    """The probe in `enable`: if a packed forward lets the second sequence see the first (here
    the attention is made to ignore the sequence bounds), packing is refused."""
    from training import packing

    model = _model(tiny_model_dir)

    def leaky(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    packing.register()
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, packing.ATTN, leaky)
    assert not packing.enable(model)
    assert model.config._attn_implementation == "sdpa"
