"""DPO on the tiny model: overfitting 8 pairs, resume, LoRA merge, NaN stop, soft-label data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from charter.core.errors import CharterError
from charter.core.safestate import load_state
from training import checkpoint
from training.dpo import DPOConfig, train_dpo


def write_pairs(path, n=8, p_chosen=0.9):
    rows = []
    for i in range(n):
        row = {"prompt": [{"role": "user", "content": f"Question {i}: how do I do thing {i}?"}],
               "chosen": [{"role": "assistant", "content": f"I can't help with thing {i}."}],
               "rejected": [{"role": "assistant",
                             "content": f"Sure, here is thing {i} step by step."}]}
        if p_chosen is not None:
            row["p_chosen"] = p_chosen
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


def cfg(pairs, out, model, **kw):
    base = dict(data=str(pairs), out=str(out), model=str(model), lr=5e-3, beta=0.5,
                batch_size=4, max_steps=4, save_every=None, warmup_ratio=0.0)
    return DPOConfig(**{**base, **kw})


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_overfits_eight_pairs(pairs, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    final = train_dpo(cfg(pairs, out, tiny_model_dir, batch_size=8, max_steps=8))
    m = rows(out)
    assert [r["step"] for r in m] == list(range(1, 9))
    assert m[0]["loss"] == pytest.approx(0.693147, abs=1e-3)  # policy == reference at step 0
    assert m[-1]["rewards/accuracies"] == 1.0 and m[-1]["loss"] < 0.1
    assert m[-1]["rewards/margins"] > m[1]["rewards/margins"] > 0
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "lr",
              "tokens_per_s"):
        assert k in m[-1]
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "ref_logps.safetensors").exists()
    card = (final / "README.md").read_text()
    assert "data_sha256" in card and '"loss": "sigmoid"' in card
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no peft
    assert type(model).__name__ == "LlamaForCausalLM"
    assert json.loads((out / "train_config.json").read_text())["beta"] == 0.5


def test_soft_loss_trains_and_needs_p(tmp_path, tiny_model_dir):
    out = tmp_path / "soft"
    train_dpo(cfg(write_pairs(tmp_path / "p.jsonl", p_chosen=0.75), out, tiny_model_dir,
                  loss="soft", max_steps=2, mixed_precision="bf16"))  # bf16 autocast (AMX)
    assert rows(out)[-1]["rewards/margins"] > 0
    bad = write_pairs(tmp_path / "hard.jsonl", p_chosen=None)
    with pytest.raises(CharterError) as e:
        train_dpo(cfg(bad, tmp_path / "soft2", tiny_model_dir, loss="soft", max_steps=1))
    assert e.value.field == "p_chosen" and str(e.value).startswith(f"{bad}:1:")


def test_only_the_newest_checkpoints_are_kept(pairs, tmp_path, tiny_model_dir):
    """save_every 1 over 4 steps writes checkpoints 1-3 (the last step writes final/); with
    keep_checkpoints 2 only 2 and 3 remain, with None all three."""
    kept = tmp_path / "kept"
    train_dpo(cfg(pairs, kept, tiny_model_dir, save_every=1, keep_checkpoints=2))
    assert sorted(d.name for d in kept.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    every = tmp_path / "all"
    train_dpo(cfg(pairs, every, tiny_model_dir, save_every=1, keep_checkpoints=None))
    assert sorted(d.name for d in every.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    with pytest.raises(CharterError, match="must be >= 1"):
        train_dpo(cfg(pairs, tmp_path / "bad", tiny_model_dir, keep_checkpoints=0))


def test_resume_gives_the_same_result(pairs, tmp_path, tiny_model_dir, monkeypatch):
    """Kill after the step-2 checkpoint (plus a half-written one), re-run: same weights and
    metrics as an uninterrupted run, each step logged once."""
    from safetensors.torch import load_file

    full = train_dpo(cfg(pairs, tmp_path / "a", tiny_model_dir, save_every=2))
    real_save = checkpoint.save_checkpoint

    def save_then_die(acc, model, opt, sched, step, out, cfg_dict):
        real_save(acc, model, opt, sched, step, out, cfg_dict)
        (out / ".checkpoint-3.tmp").mkdir()  # a checkpoint killed while being written
        (out / "checkpoint-3").mkdir()  # and one without its completion marker
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(pairs, out, tiny_model_dir, save_every=2))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-2"
    resumed = train_dpo(cfg(pairs, out, tiny_model_dir, save_every=2))
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in rows(tmp_path / "a")],
                                                          rel=1e-5)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (out / ".checkpoint-3.tmp").exists()
    stamp = (resumed / "model.safetensors").stat().st_mtime_ns
    assert train_dpo(cfg(pairs, out, tiny_model_dir, save_every=2)) == resumed  # done: no-op
    assert (resumed / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(CharterError, match="other settings.*beta"):
        train_dpo(cfg(pairs, out, tiny_model_dir, beta=0.2))


def test_lora_reference_is_the_base_and_merge_merges(pairs, tmp_path, tiny_model_dir):
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import load_pair_rows, tokenise_pairs
    from training.dpo import compute_ref_logps

    final = train_dpo(cfg(pairs, tmp_path / "lora", tiny_model_dir, lora=True, lora_r=4,
                          lora_targets=["q_proj", "v_proj"], max_steps=2, merge=True))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = tokenise_pairs(tok, load_pair_rows(pairs), 1024, progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref_base = compute_ref_logps(Accelerator(cpu=True), base, ex, tok.pad_token_id, 8, False)
    ref_lora = load_state(tmp_path / "lora" / "ref_logps.safetensors")["logps"]
    assert torch.allclose(ref_base, ref_lora, atol=1e-4)  # adapter disabled = the base model
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in k for k in weights)
    base_w = load_file(tiny_model_dir / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], base_w[q])  # the adapter was merged in
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(weights[k], base_w[k])  # not a LoRA target: untouched
    merged = AutoModelForCausalLM.from_pretrained(final)
    # the adapter is kept beside the merged weights, and equals them on the base
    from peft import PeftModel

    assert (final / "adapter" / "adapter_config.json").exists()
    with_adapter = PeftModel.from_pretrained(base, final / "adapter")
    ids = torch.tensor([ex[0].prompt_ids + ex[0].chosen_ids])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)
    assert "library_name: transformers" in (final / "README.md").read_text()


def test_lora_saves_a_peft_adapter_that_loads_and_trains_on(pairs, tmp_path, tiny_model_dir):
    """Without --merge, final/ is the adapter: PeftModel.from_pretrained loads it, the card says
    peft, and a later stage can start from the run (the adapter merged into its base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = train_dpo(cfg(pairs, tmp_path / "ad", tiny_model_dir, lora=True, lora_r=4,
                          lora_targets=["q_proj", "v_proj"], max_steps=2))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in
                                                                    final.iterdir()}
    assert not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, final)(ids).logits
    assert not torch.allclose(before, after)  # the adapter changes the model
    card = (final / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card
    again = train_dpo(cfg(pairs, tmp_path / "next", tmp_path / "ad", max_steps=1))
    assert (again / "model.safetensors").exists()


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(pairs, tmp_path, tiny_model_dir,
                                                        monkeypatch):
    import training.dpo as dpo

    real, calls = dpo.preference_loss, {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(dpo, "preference_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(CharterError, match="loss became nan at step 3.*checkpoint-2"):
        train_dpo(cfg(pairs, out, tiny_model_dir, save_every=2))
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "final").exists()


def test_bad_settings_fail_before_loading(tmp_path):
    with pytest.raises(CharterError) as e:
        train_dpo(DPOConfig(data="x", out=str(tmp_path), loss="ipo", label_smoothing=0.1))
    assert e.value.field == "label_smoothing"
    shutil.rmtree(tmp_path, ignore_errors=True)
