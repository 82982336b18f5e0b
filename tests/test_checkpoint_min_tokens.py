"""`checkpoint_min_tokens`: gradient checkpointing only for micro-batches of at least that many
token positions; the others keep their activations. Same gradients and same training either
way; only the recompute (counted here as a layer's forward calls) changes."""

from __future__ import annotations

import json

import pytest
import torch


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    return model.train()


def _batch(lengths=(7, 3, 12, 5)):
    """Four right-padded rows: 4 x 12 = 48 positions, 27 real tokens."""
    from training.collate import collate_sft
    from training.data import IGNORE, SFTExample

    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        rows.append(SFTExample(input_ids=ids, labels=[IGNORE] * 2 + ids[2:], source="t"))
    return collate_sft(rows, pad_id=0)


def _run(model, batch, min_tokens):
    """One forward + backward; (whether checkpointed, layer-0 forward calls (pre-hooks: a recompute stops early, before any forward hook), gradients)."""
    from training.loop import checkpoint_by_size, forward_logps

    with torch.no_grad():  # chunked_logps probes a model once: not counted below
        forward_logps(model, batch, chunked=True)
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.zero_grad(set_to_none=True)
    on = checkpoint_by_size(model, batch, min_tokens)
    total, _, _ = forward_logps(model, batch, chunked=True)
    total.sum().backward()
    hook.remove()
    return on, len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("min_tokens, checkpointed", [(0, True), (48, True), (49, False)])
def test_padded_batches_are_measured_by_positions(tiny_model_dir, min_tokens, checkpointed):
    model = _model(tiny_model_dir)
    on, calls, grads = _run(model, _batch(), min_tokens)
    assert on is checkpointed
    assert calls == (2 if checkpointed else 1)  # a checkpointed layer reruns in the backward
    # whichever way, the gradients are those of the plain (never checkpointed) model
    plain = _model(tiny_model_dir)
    plain.gradient_checkpointing_disable()
    _, plain_calls, want = _run(plain, _batch(), 0)
    assert plain_calls == 1
    for name in want:
        assert torch.allclose(grads[name], want[name], atol=1e-6), name


def test_switches_back_and_forth_per_micro_batch(tiny_model_dir):
    model = _model(tiny_model_dir)
    short, long = _batch((3, 4)), _batch((12, 12, 12, 12))  # 8 and 48 positions
    seen = [_run(model, b, 20)[:2] for b in (short, long, short, long)]
    assert seen == [(False, 1), (True, 2), (False, 1), (True, 2)]


def test_packed_batches_are_measured_by_real_tokens(tiny_model_dir):
    from training import packing

    model = _model(tiny_model_dir)
    assert packing.enable(model)
    assert _run(model, _batch(), 28)[:2] == (False, 1)  # 27 real tokens (48 padded positions)
    assert _run(model, _batch(), 27)[:2] == (True, 2)


@pytest.mark.parametrize("kw, msg", [({"checkpoint_min_tokens": -1}, "must be >= 0"),
                                     ({"checkpoint_min_tokens": 64}, "only with gradient_ch")])
def test_bad_settings_name_the_field(kw, msg):
    from charter.core.errors import CharterError
    from training.options import DPOConfig, SFTConfig

    for cls in (SFTConfig, DPOConfig):
        with pytest.raises(CharterError, match=msg) as e:
            cls(data="d", out="o", **kw).validate()
        assert e.value.field == "checkpoint_min_tokens"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_runs_the_same_with_and_without(tmp_path, tiny_model_dir, stage, monkeypatch):
    """End to end: the same losses and final weights as checkpointing every micro-batch, and the
    stage really skips it for the short micro-batches (layer-0 calls counted)."""
    from safetensors.torch import load_file

    from tests.conftest import write_sft_or_pairs
    from training import loop
    from training.options import DPOConfig, SFTConfig

    data = write_sft_or_pairs(tmp_path / "data.jsonl", stage, please=20)
    decided = []
    real = loop.checkpoint_by_size

    def spy(model, batch, min_tokens):
        decided.append(real(model, batch, min_tokens))
        return decided[-1]

    module = __import__(f"training.{stage}", fromlist=["x"])
    monkeypatch.setattr(module, "checkpoint_by_size", spy)
    runs = {}
    cut = 150 if stage == "sft" else 300  # micro-batches of 122-198 positions (DPO: 244-396)
    for min_tokens in (0, cut):
        out = tmp_path / f"{stage}-{min_tokens}"
        kw = dict(data=str(data), out=str(out), model=str(tiny_model_dir), max_steps=3,
                  batch_size=2, save_every=None, lr=1e-3, gradient_checkpointing=True,
                  checkpoint_min_tokens=min_tokens)
        decided.clear()
        if stage == "sft":
            from training.sft import train_sft

            final = train_sft(SFTConfig(**kw))
        else:
            from training.dpo import train_dpo

            final = train_dpo(DPOConfig(**kw))
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[min_tokens] = (losses, load_file(final / "model.safetensors"), list(decided))
    (l0, w0, d0), (l1, w1, d1) = runs[0], runs[cut]
    assert len(d0) == len(d1) == 3 and all(d0)
    assert True in d1 and False in d1  # some micro-batches long enough, some not
    assert l1 == pytest.approx(l0, abs=1e-6)
    assert all(torch.allclose(w1[k], w0[k], atol=1e-6) for k in w0)
