"""Our sigmoid DPO loss equals TRL's DPOTrainer loss on one batch (same models, same pairs).

TRL is a benchmark/dev-only dependency: imported inside the test."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_model


def test_sigmoid_loss_matches_trl(tmp_path, tiny_model_dir):
    trl = pytest.importorskip("trl", reason="trl is the `bench` extra; runs where it is installed")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from charter.core.records import PreferencePair
    from training.collate import collate_pairs
    from training.data import encode_pair
    from training.loop import forward_logps
    from training.losses import preference_loss

    rows = [{"prompt": [{"role": "user", "content": f"How do I do thing {i}?" + " more" * i}],
             "chosen": [{"role": "assistant", "content": f"I can't help with thing {i}."}],
             "rejected": [{"role": "assistant", "content": "Sure: " + "step " * (2 * i + 1)}]}
            for i in range(4)]
    ref_dir = build_tiny_model(tmp_path / "ref", seed=1)  # a reference unlike the policy
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                         beta=0.1, report_to=[], use_cpu=True, max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # all 4 pairs (order shuffled)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()

    ex = [encode_pair(tok, PreferencePair(r["prompt"], r["chosen"], r["rejected"]), ("t", i))
          for i, r in enumerate(rows)]
    b = collate_pairs(ex, tok.pad_token_id)
    with torch.no_grad():
        pol, _, _ = forward_logps(policy, b)
        refl, _, _ = forward_logps(ref, b)
    ours = preference_loss("sigmoid", pol[:4], pol[4:], refl[:4], refl[4:], beta=0.1)
    ours = ours.losses.mean().item()
    assert abs(ours - 0.6931) > 1e-3  # the models differ, so the comparison is not trivial
    assert abs(ours - theirs) / abs(theirs) < 1e-5, (ours, theirs)
