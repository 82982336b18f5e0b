"""Pairs with the prompt run once (training/shared_prompt.py) against the concatenated pass:
same log-probs and the same gradients, on a tiny random llama and literal token ids."""

from __future__ import annotations

import pytest

from training.data import PairExample as _Pair


def PairExample(**kw):  # noqa: N802 - the dataclass, with its bookkeeping fields filled
    return _Pair(p_chosen=None, source="test", **kw)


def examples():
    # prompts of different lengths (left padding), responses of different lengths (right
    # padding), one response of a single token
    return [PairExample(prompt_ids=[5, 6, 7, 8, 9, 10, 11, 12], chosen_ids=[20, 21, 22],
                        rejected_ids=[30]),
            PairExample(prompt_ids=[5, 6, 40, 41], chosen_ids=[23, 24, 25, 26, 27],
                        rejected_ids=[31, 32]),
            PairExample(prompt_ids=[50, 51, 52, 53, 54, 55], chosen_ids=[28, 29],
                        rejected_ids=[33, 34, 35, 36])]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def test_collate_literal():
    from training.shared_prompt import collate

    b = collate(examples()[:2], pad_id=0)
    assert b["prompt_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 5, 6, 40, 41]]
    assert b["prompt_mask"].tolist() == [[1] * 8, [0] * 4 + [1] * 4]
    assert b["response_ids"].tolist() == [[20, 21, 22, 0, 0], [23, 24, 25, 26, 27],
                                          [30, 0, 0, 0, 0], [31, 32, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0],
                                           [1, 1, 0, 0, 0]]


def test_decide(tiny_model_dir, model):
    from types import SimpleNamespace

    from training.shared_prompt import MIN_SAVED, decide

    ex = examples()  # mean prompt length (8 + 4 + 6) / 3 = 6 tokens
    on = SimpleNamespace(share_prompt=True, batch_size=MIN_SAVED // 6 + 1)
    assert decide(on, 1, model, ex)  # 43 x 6 = 258 >= 256
    assert not decide(SimpleNamespace(share_prompt=True, batch_size=MIN_SAVED // 6 - 1), 1,
                      model, ex)  # 41 x 6 = 246
    assert not decide(on, 2, model, ex)  # DDP: one forward per backward
    assert not decide(SimpleNamespace(share_prompt=False, batch_size=1000), 1, model, ex)
    assert not decide(on, 1, model, [])


def test_same_logps_and_gradients_as_the_concatenated_pass(model):

    from training.collate import collate_pairs
    from training.loop import forward_logps
    from training.shared_prompt import collate, pair_logps

    ex = examples()
    results = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        batch = collate(ex, 0) if shared else collate_pairs(ex, 0)
        total, mean, count = (pair_logps if shared else forward_logps)(model, batch)
        (total[:3] - 0.5 * total[3:]).sum().backward()  # chosen and rejected both matter
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((total.detach(), mean.detach(), count, grads))
    (t0, m0, c0, g0), (t1, m1, c1, g1) = results
    assert c1.tolist() == c0.tolist() == [3, 5, 2, 1, 2, 4]
    assert float((t1 - t0).abs().max()) <= 1e-4
    assert float((m1 - m0).abs().max()) <= 1e-5
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        scale = float(g0[name].abs().max()) + 1e-8
        assert float((g1[name] - g0[name]).abs().max()) / scale <= 1e-3, name


def test_dpo_with_and_without_sharing_train_alike(tmp_path, tiny_model_dir, monkeypatch):
    import json

    from training import shared_prompt
    from training.dpo import train_dpo
    from training.options import DPOConfig

    monkeypatch.setattr(shared_prompt, "MIN_SAVED", 1)  # these small prompts would not pay
    calls = []
    real = shared_prompt.pair_logps
    monkeypatch.setattr(shared_prompt, "pair_logps", lambda m, b, *a: calls.append(1) or real(m, b, *a))

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Question number {i} about rivers?"}],
             "chosen": [{"role": "assistant", "content": f"A careful answer {i}."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = []
    for share in (True, False):
        out = tmp_path / f"run-{share}"
        train_dpo(DPOConfig(data=str(data), out=str(out), model=str(tiny_model_dir),
                            batch_size=4, max_steps=2, lr=1e-3, save_every=None,
                            share_prompt=share))
        logs.append([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
        assert bool(calls) == share  # the shared pass ran (reference and policy) or did not
        calls.clear()
    for a, b in zip(*logs):
        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
