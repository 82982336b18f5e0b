"""Pure parts of the loop: data order per process and step, learning-rate schedule."""

from __future__ import annotations

import pytest

from training.loop import lr_factor, step_indices


def test_processes_and_accumulation_partition_the_global_batch():
    """10 examples, global batch 2·2·2 = 8 → 1 step per epoch (the last 2 dropped). The 4
    micro-batches of step k (2 processes × 2 accumulation steps) are disjoint and together are
    the same 8 examples one process with micro-batch 8 sees."""
    one = step_indices(0, 10, 8, 1, 1, 0, seed=3)[0]
    parts = [mb for r in range(2) for mb in step_indices(0, 10, 2, 2, 2, r, seed=3)]
    assert all(len(mb) == 2 for mb in parts)
    flat = [i for mb in parts for i in mb]
    assert sorted(flat) == sorted(one) and len(set(flat)) == 8
    # the next step is the next epoch: a different permutation, same seed → reproducible
    assert step_indices(1, 10, 8, 1, 1, 0, seed=3) == step_indices(1, 10, 8, 1, 1, 0, seed=3)
    assert step_indices(1, 10, 8, 1, 1, 0, seed=3) != [one]


def test_lr_schedule_values():
    """total 10, warm-up 2: steps 0, 1 → 1/3, 2/3 (linear from 0); step 2 starts the decay at
    1.0; step 6 is halfway through the 8 decay steps: cosine 0.5·(1 + cos(π/2)) = 0.5, linear
    1 − 4/8 = 0.5; step 4: cosine 0.5·(1 + cos(π/4)) = 0.8535534, linear 0.75."""
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(2 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.8535534)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(4, 10, 2, "linear") == pytest.approx(0.75)
    assert lr_factor(9, 10, 2, "constant") == 1.0


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_and_step_equals_clip_then_step(max_norm):
    """The clipping factor folded into the fused AdamW kernel (grad_scale) gives the weights
    that torch's clip_grad_norm_ followed by the step gives, with clipping active (0.5), idle
    (1e6: the norm is far below) and off (0)."""
    import copy

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from training.loop import clip_and_step

    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.05, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.05, fused=True)
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    for _ in range(4):
        for m in (a, b):
            (10 * (m(x) - y) ** 2).mean().backward()
        want = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm) if max_norm else None
        opt_a.step()
        got = clip_and_step(acc, b, opt_b, max_norm)
        if max_norm:
            assert float(got) == pytest.approx(float(want), rel=1e-6)
            assert opt_b.grad_scale is None  # not left behind for a later step
        else:
            assert got is None
        for o in (opt_a, opt_b):
            o.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert float((pa - pb).abs().max()) <= 1e-6
    if max_norm == 0.5:  # clipping was active: without it the weights would differ
        assert float(want) > 0.5


def test_group_by_length_keeps_each_epochs_examples_and_pads_less():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([40, 60, 100, 200, 380]) + rng.randrange(10) for _ in range(152)]
    n, g = len(lengths), 8
    steps = n // g  # 19 steps an epoch

    def batches(lens):
        return [step_indices(s, n, g, 1, 1, 0, seed=0, lengths=lens)[0] for s in range(2 * steps)]

    plain, grouped = batches(None), batches(lengths)
    for e in range(2):  # every epoch uses exactly the examples the plain order uses
        epoch = slice(e * steps, (e + 1) * steps)
        assert sorted(i for b in grouped[epoch] for i in b) == \
            sorted(i for b in plain[epoch] for i in b)
        assert all(len(set(b)) == g for b in grouped[epoch])

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    real = sum(lengths[i] for b in plain for i in b)
    assert padded(plain) > 1.4 * real  # random batches of these lengths pad a lot
    assert padded(grouped) < 1.15 * real
    # the steps are not in length order (the batches are shuffled again), and seeded
    longest = [max(lengths[i] for i in b) for b in grouped[:steps]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert batches(lengths) == grouped
    # processes and accumulation split one grouped global batch as before
    parts = [mb for r in range(2) for mb in step_indices(3, n, 2, 2, 2, r, 0, lengths)]
    assert sorted(i for mb in parts for i in mb) == sorted(grouped[3])
