"""bf16 training: BF16AdamW keeps fp32's update, the optimizer step in backward, chunked
label log-probs equal to the full path, and the precision settings."""

from __future__ import annotations

import copy

import pytest
import torch

from charter.core.errors import CharterError
from training.optim import BF16AdamW, attach_in_backward, stochastic_round_
from training.options import DPOConfig


def _run(opt_cls, w0, grads, **kw):
    w = torch.nn.Parameter(w0.clone())
    opt = opt_cls([w], **kw)
    for g in grads:
        w.grad = g.to(w.dtype)
        opt.step()
    return w, opt


@pytest.mark.parametrize("lr", [1e-4, 1e-6])
def test_bf16_adamw_tracks_fp32_adamw_where_plain_bf16_loses_the_update(lr):
    torch.manual_seed(0)
    w0 = (torch.randn(200, 300) * 0.05).to(torch.bfloat16).float()  # exact in bf16
    grads = [(torch.randn(200, 300) + 0.3).to(torch.bfloat16).float() for _ in range(30)]
    ref, _ = _run(torch.optim.AdamW, w0, grads, lr=lr, weight_decay=0.01)
    ours, opt = _run(BF16AdamW, w0.to(torch.bfloat16), grads, lr=lr, weight_decay=0.01)
    plain, _ = _run(torch.optim.AdamW, w0.to(torch.bfloat16), grads, lr=lr, weight_decay=0.01)
    want = ref.detach() - w0
    # the weight the model sees plus what the compensation buffer still holds back
    got = ours.detach().float() + opt.state[ours]["comp"].float() - w0
    rel = lambda d: float((d - want).norm() / want.norm())  # noqa: E731
    assert ours.dtype == torch.bfloat16 and opt.state[ours]["exp_avg"].dtype == torch.bfloat16
    assert rel(got) < 0.02
    assert rel(plain.detach().float() - w0) > 0.5  # round-to-nearest loses most of it


@pytest.mark.parametrize("lr", [1e-4, 1e-6])
def test_bf16_moments_for_fp32_weights_track_fp32_adamw(lr):
    """fp32 weights with bf16 moments: the weight change of 30 steps within 1% of torch's
    AdamW (fp32 moments), clipping factor included."""
    torch.manual_seed(0)
    w0 = torch.randn(200, 300) * 0.05
    grads = [torch.randn(200, 300) * (1 + 0.1 * k) + 0.3 for k in range(30)]
    ref, _ = _run(torch.optim.AdamW, w0, grads, lr=lr, weight_decay=0.01)
    ours, opt = _run(BF16AdamW, w0, grads, lr=lr, weight_decay=0.01, bf16_moments=True)
    st = opt.state[ours]
    assert ours.dtype == torch.float32 and "comp" not in st
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    want = ref.detach() - w0
    assert float((ours.detach() - w0 - want).norm() / want.norm()) < 0.01
    # the stored second moment agrees with fp32's on average (unbiased rounding)
    ref_opt = torch.optim.AdamW([w := torch.nn.Parameter(w0.clone())], lr=lr)
    for g in grads:
        w.grad = g
        ref_opt.step()
    v_ref = ref_opt.state[w]["exp_avg_sq"]
    assert abs(float(st["exp_avg_sq"].float().sum() / v_ref.sum()) - 1) < 1e-3
    # a clipping factor is applied as torch's fused kernel applies it
    half = [g * 0.5 for g in grads]
    ref2, _ = _run(torch.optim.AdamW, w0, half, lr=lr)
    w2 = torch.nn.Parameter(w0.clone())
    opt2 = BF16AdamW([w2], lr=lr, bf16_moments=True)
    opt2.grad_scale = torch.tensor(2.0)
    for g in grads:
        w2.grad = g.clone()
        opt2.step()
    want2 = ref2.detach() - w0
    assert float((w2.detach() - w0 - want2).norm() / want2.norm()) < 0.01


def test_bf16_second_moment_keeps_growing_past_bf16_resolution():
    """After ~512 steps exp_avg_sq's per-step change (1e-3 of itself) is below half a bf16
    ulp: rounded to nearest it drifts (20% above fp32's after 2000 steps here, measured);
    stochastically rounded it stays within 1% of fp32's."""
    torch.manual_seed(2)
    grads = torch.randn(2000, 1024)
    w = torch.nn.Parameter(torch.zeros(1024))
    ref = torch.nn.Parameter(torch.zeros(1024))
    opt = BF16AdamW([w], lr=1e-6, bf16_moments=True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-6)
    for g in grads:
        w.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    ratio = float(opt.state[w]["exp_avg_sq"].float().sum() / ref_opt.state[ref]["exp_avg_sq"].sum())
    assert abs(ratio - 1) < 0.01


def test_bf16_moments_stay_bf16_after_a_state_dict_round_trip():
    """torch's load_state_dict casts state to the parameter's dtype; ours casts the moments
    back, exactly, so a resumed run neither grows to 16 bytes per parameter nor changes."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(70_000))
    opt = BF16AdamW([w], lr=1e-3, bf16_moments=True)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = BF16AdamW([w2], lr=1e-3, bf16_moments=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read back from a file
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[w2][key].dtype == torch.bfloat16
        assert torch.equal(opt2.state[w2][key], opt.state[w][key])
    g = torch.randn_like(w)
    w.grad, w2.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)


def test_stochastic_rounding_is_unbiased_and_lands_on_bf16_values():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way from 1 to the next bf16
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32)
    r = stochastic_round_(x.clone(), noise)
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert torch.equal(r.to(torch.bfloat16).float(), r)
    assert abs(float(r.mean()) - (1.0 + 2 ** -10)) < 2e-5  # ~25% round up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_in_backward_matches_a_step_after_backward(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4)) for _ in range(2)]
    for t in twin:
        t.load_state_dict(net.state_dict())
        t.to(dtype)
    a, b = twin
    opt_a = BF16AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = BF16AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    attach_in_backward(opt_b)
    for _ in range(3):
        x = torch.randn(8, 16, dtype=dtype)
        a(x).square().mean().backward()
        opt_a.step()
        opt_a.zero_grad()
        b(x).square().mean().backward()
        assert all(p.grad is None for p in b.parameters())  # stepped and freed in backward
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()).float(), next(net.parameters()))


def _tiny_llama(bias_head: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=not bias_head)
    model = AutoModelForCausalLM.from_config(cfg)
    if bias_head:
        model.lm_head = torch.nn.Linear(32, 300, bias=True)
    return model


@pytest.mark.parametrize("bias_head", [False, True])
def test_chunked_logps_equal_the_full_logits_path(monkeypatch, bias_head):
    import training.chunked_logps as cl
    from training.loop import forward_logps

    monkeypatch.setattr(cl, "CHUNK", 7)  # several chunks, one of them partial
    model = _tiny_llama(bias_head)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[2, 15:] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    used = []
    real = cl.HeadLogps.apply
    monkeypatch.setattr(cl.HeadLogps, "apply", lambda *a: used.append(1) or real(*a))
    results = []
    for chunked in (False, True):
        model.zero_grad()
        total, mean, count = forward_logps(model, batch, chunked=chunked)
        (total.sum() + mean.sum()).backward()
        results.append((total.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (t0, c0, g0), (t1, c1, g1) = results
    assert bool(used) != bias_head  # a head with a bias falls back to the full logits
    assert torch.equal(c0, c1) and c0.tolist() == [12, 12, 7]
    assert torch.allclose(t0, t1, atol=1e-4) and t0.abs().min() > 1
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_precision_settings():
    base = dict(data="d", out="o")
    cfg = DPOConfig(**base, mixed_precision="bf16")
    cfg.validate()
    assert cfg.precision == "bf16-mixed"  # the older name still works
    with pytest.raises(CharterError) as e:
        DPOConfig(**base, mixed_precision="bf16", precision="bf16").validate()
    assert e.value.field == "mixed_precision"
    with pytest.raises(CharterError) as e:
        DPOConfig(**base, optimizer_in_backward=True).validate()  # clipping on by default
    assert e.value.field == "optimizer_in_backward" and "max_grad_norm" in str(e.value)
    DPOConfig(**base, optimizer_in_backward=True, max_grad_norm=0).validate()


@pytest.mark.parametrize("mode", [dict(precision="bf16"), dict(bf16_moments=True)],
                         ids=["bf16", "fp32-bf16-moments"])
def test_dpo_in_bf16_trains_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir,
                                                            monkeypatch, mode):
    """precision bf16 (bf16 weights saved) or fp32 weights with bf16 moments: step 1 at log 2
    (policy = reference, same path), margins grow; killed after the step-2 checkpoint and
    resumed, the same weights as an uninterrupted run (the optimizer's rounding noise is a
    function of seed and step), and the checkpoint's moments are bf16."""
    import json

    from safetensors.torch import load_file

    from tests.test_training_dpo import cfg, write_pairs
    from training import checkpoint
    from training.dpo import train_dpo

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    kw = dict(**mode, save_every=2, lr=5e-3)
    full = train_dpo(cfg(pairs, tmp_path / "a", tiny_model_dir, **kw))
    m = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["loss"] == pytest.approx(0.693147, abs=1e-3)
    assert m[-1]["rewards/margins"] > 0
    real_save = checkpoint.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(pairs, tmp_path / "b", tiny_model_dir, **kw))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = train_dpo(cfg(pairs, tmp_path / "b", tiny_model_dir, **kw))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    weights = torch.bfloat16 if mode.get("precision") == "bf16" else torch.float32
    assert all(v.dtype == weights for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    from charter.core.safestate import load_state

    state = load_state(next((tmp_path / "b").glob("checkpoint-*")) / "optimizer.safetensors")
    moments = [st[k] for st in state["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)


@pytest.mark.parametrize("chunk,vocab_slice", [(8, 8192), (64, 8192), (64, 128)],
                         ids=["by-chunk", "1-slice", "capped"])
def test_bf16_head_gradient_by_vocab_slices_matches_fp32_and_keeps_no_fp32_weight_copy(
        monkeypatch, chunk, vocab_slice):
    """bf16 weights: HeadLogps' backward runs by vocabulary slices (several, or one when the
    positions fit a chunk). Its gradients agree with fp32 autograd on the full logits to bf16
    accuracy, and no fp32 tensor of the weight's shape is made (the accumulator and product
    copies it replaced: 2.6 GB at Llama-3.2-1B's vocabulary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import training.chunked_logps as cl

    monkeypatch.setattr(cl, "VOCAB_SLICE", vocab_slice)
    torch.manual_seed(0)
    n, hid, vocab = 40, 16, 300
    h32 = torch.randn(n, hid)
    w32 = torch.randn(vocab, hid) * 0.3
    targets = torch.randint(0, vocab, (n,))
    targets[:5] = vocab - 1  # the last, partial slice holds targets too
    go = torch.randn(n)
    hr, wr = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ((hr @ wr.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1) * go).sum().backward()

    shapes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    shapes.append((tuple(t.shape), t.dtype))
            return out

    h = h32.to(torch.bfloat16).requires_grad_()
    w = w32.to(torch.bfloat16).requires_grad_()
    out = cl.HeadLogps.apply(h, w, targets, chunk)
    with Watch():
        (out * go).sum().backward()
    assert w.grad.dtype == h.grad.dtype == torch.bfloat16
    assert ((vocab, hid), torch.float32) not in shapes
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert rel(w.grad, wr.grad) < 0.02 and rel(h.grad, hr.grad) < 0.02
    # the same answer as the path by positions (which fp32 weights still take)
    g32 = [t.clone().requires_grad_() for t in (h32, w32)]
    (cl.HeadLogps.apply(*g32, targets, chunk) * go).sum().backward()
    assert rel(w.grad, g32[1].grad) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logps_with_a_frozen_head_gives_the_hidden_gradient_only(dtype):
    """A frozen head (LoRA): no weight gradient, the hidden-state gradient by position chunks
    equal to fp32 autograd's (to bf16 accuracy in bf16)."""
    import training.chunked_logps as cl

    torch.manual_seed(1)
    h32, w32 = torch.randn(30, 16), torch.randn(200, 16) * 0.3
    targets, go = torch.randint(0, 200, (30,)), torch.randn(30)
    hr = h32.clone().requires_grad_()
    ((hr @ w32.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1) * go).sum().backward()
    h, w = h32.to(dtype).requires_grad_(), w32.to(dtype)
    (cl.HeadLogps.apply(h, w, targets, 8) * go).sum().backward()
    assert w.grad is None and h.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 0.02
    assert float((h.grad.float() - hr.grad).norm() / hr.grad.norm()) < tol


def test_head_logps_with_no_label_positions_gives_zero_gradients():
    """A batch whose rows have no label position left (all truncated): zero gradients, no
    division by the zero positions."""
    import training.chunked_logps as cl

    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    out = cl.HeadLogps.apply(h, w, torch.zeros(0, dtype=torch.long), 8)
    (out.sum() + (w * 0).sum()).backward()
    assert out.shape == (0,) and h.grad.shape == (0, 16)
    assert w.grad is not None and not w.grad.any()
