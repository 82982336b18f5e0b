"""Masked, shifted log-prob gathering with literal token ids."""

from __future__ import annotations

import math

import pytest
import torch

from training.logps import sequence_logps


def test_sequence_logps_shift_and_mask():
    """Vocab 3. Position 0 logits (0,0,0): uniform, p = 1/3 each. Position 1 logits
    (0, ln 2, 0): p = (1/4, 1/2, 1/4). Position 2 predicts nothing (shifted out), so its
    logits (1e4, ...) must not matter.
    Row 0, labels [-100, 2, 1]: token 2 from pos 0 → ln(1/3); token 1 from pos 1 → ln(1/2).
      sum = −ln 6 = −1.7917595, mean = −0.8958797, count 2.
    Row 1, labels [-100, -100, 0]: token 0 from pos 1 → ln(1/4) = −1.3862944, count 1.
    Row 2, labels all -100: sum 0, mean 0, count 0."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [1e4, -1e4, 3.0]])
    logits = pos.expand(3, 3, 3).clone()
    labels = torch.tensor([[-100, 2, 1], [-100, -100, 0], [-100, -100, -100]])
    total, mean, count = sequence_logps(logits, labels)
    assert total.tolist() == pytest.approx([-math.log(6), -math.log(4), 0.0], abs=1e-6)
    assert mean.tolist() == pytest.approx([-math.log(6) / 2, -math.log(4), 0.0], abs=1e-6)
    assert count.tolist() == [2, 1, 0]


def test_masked_positions_have_no_gradient():
    """Only logits at positions that predict a label token get gradient."""
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[7, -100, 3, -100]])  # only token 3 at t=2 counts: predicted by t=1
    total, _, _ = sequence_logps(logits, labels)
    total.sum().backward()
    touched = logits.grad.abs().sum(-1)[0].tolist()
    assert touched[1] > 0 and touched[0] == touched[2] == touched[3] == 0
