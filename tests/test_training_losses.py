"""Preference losses against values worked out by hand (see each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from charter.core.errors import CharterError
from training.losses import preference_loss

T = torch.tensor


def pair():
    """pc=-1, pr=-2, rc=rr=-1.5 → h = (−1+1.5) − (−2+1.5) = 0.5 + 0.5 = 1.0."""
    return T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5])


def approx(x, v):
    return x.item() == pytest.approx(v, abs=1e-6)


def test_sigmoid_is_dpo():
    """β=1, h=1: −log σ(1) = log(1 + e^−1) = log(1.3678794) = 0.3132617.
    Rewards: β(pc−rc) = 0.5, β(pr−rr) = −0.5."""
    out = preference_loss("sigmoid", *pair(), beta=1.0)
    assert approx(out.losses, 0.3132617)
    assert approx(out.chosen_rewards, 0.5) and approx(out.rejected_rewards, -0.5)


def test_sigmoid_beta_scales_margin_and_rewards():
    """β=0.1, h=1: log(1 + e^−0.1) = log(1.9048374) = 0.6443967; rewards 0.05, −0.05."""
    out = preference_loss("sigmoid", *pair(), beta=0.1)
    assert approx(out.losses, 0.6443967)
    assert approx(out.chosen_rewards, 0.05) and approx(out.rejected_rewards, -0.05)


def test_conservative_dpo_applies_label_smoothing():
    """ε=0.1, β=1, h=1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1))
    = 0.9·0.3132617 + 0.1·1.3132617 = 0.2819355 + 0.1313262 = 0.4132617."""
    out = preference_loss("sigmoid", *pair(), beta=1.0, label_smoothing=0.1)
    assert approx(out.losses, 0.4132617)


def test_ipo():
    """β=0.25: (h − 1/(2β))² = (1 − 2)² = 1; β=0.5: (1 − 1)² = 0."""
    assert approx(preference_loss("ipo", *pair(), beta=0.25).losses, 1.0)
    assert approx(preference_loss("ipo", *pair(), beta=0.5).losses, 0.0)


def test_hinge():
    """β=0.5: max(0, 1 − 0.5·1) = 0.5; β=2: max(0, 1 − 2) = 0."""
    assert approx(preference_loss("hinge", *pair(), beta=0.5).losses, 0.5)
    assert approx(preference_loss("hinge", *pair(), beta=2.0).losses, 0.0)


def test_robust():
    """ε=0.25, β=1: [0.75·0.3132617 − 0.25·1.3132617] / (1 − 0.5)
    = (0.2349463 − 0.3283154) / 0.5 = −0.1867383. With ε=0 it is DPO: 0.3132617."""
    assert approx(preference_loss("robust", *pair(), beta=1.0, label_smoothing=0.25).losses,
                  -0.1867383)
    assert approx(preference_loss("robust", *pair(), beta=1.0).losses, 0.3132617)


def test_soft_label_per_pair():
    """Two identical pairs (h=1, β=1) with p = 1 and p = 0.5:
    p=1: −log σ(1) = 0.3132617; p=0.5: 0.5·(0.3132617 + 1.3132617) = 0.8132617."""
    pc, pr, rc, rr = (x.repeat(2) for x in pair())
    out = preference_loss("soft", pc, pr, rc, rr, beta=1.0, p=T([1.0, 0.5]))
    assert out.losses.tolist() == pytest.approx([0.3132617, 0.8132617], abs=1e-6)


def test_soft_gradient_vanishes_at_label():
    """d/dh of −[p log σ(h) + (1−p) log σ(−h)] = σ(h) − p; at p = σ(1) = 0.7310586 it is 0."""
    pc = T([-1.0], requires_grad=True)
    out = preference_loss("soft", pc, T([-2.0]), T([-1.5]), T([-1.5]), beta=1.0,
                          p=T([1 / (1 + math.exp(-1))]))
    out.losses.sum().backward()
    assert abs(pc.grad.item()) < 1e-6


def test_simpo_is_length_normalised_and_reference_free():
    """Chosen sum −4 over 4 tokens (mean −1), rejected sum −6 over 2 (mean −3), β=2, γ=1:
    −log σ(2·(−1) − 2·(−3) − 1) = −log σ(3) = log(1 + e^−3) = 0.0485874; rewards −2, −6."""
    out = preference_loss("simpo", T([-4.0]), T([-6.0]), None, None, beta=2.0, gamma=1.0,
                          chosen_tokens=T([4]), rejected_tokens=T([2]))
    assert approx(out.losses, 0.0485874)
    assert approx(out.chosen_rewards, -2.0) and approx(out.rejected_rewards, -6.0)


def test_rpo_adds_per_token_nll_of_chosen():
    """DPO 0.3132617 + α·(−pc/|y_w|) = 0.3132617 + 0.5·(1/2) = 0.5632617."""
    out = preference_loss("sigmoid", *pair(), beta=1.0, rpo_alpha=0.5, chosen_tokens=T([2]))
    assert approx(out.losses, 0.5632617)


@pytest.mark.parametrize("kwargs, field", [
    (dict(loss="nope"), "loss"),
    (dict(loss="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss="soft", label_smoothing=0.1), "label_smoothing"),
    (dict(loss="sigmoid", label_smoothing=0.7), "label_smoothing"),
    (dict(loss="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss="sigmoid", gamma=0.5), "gamma"),
    (dict(loss="sigmoid", beta=0.0), "beta"),
    (dict(loss="simpo", ref_model="m"), "ref_model"),
])
def test_bad_settings_name_the_field_when_the_config_is_built(kwargs, field):
    """Loss settings are checked once, against the registry, when the DPO config is built."""
    from charter.core.config import config_from_dict
    from training.options import DPOConfig

    with pytest.raises(CharterError) as e:
        config_from_dict(DPOConfig, {"data": "d", "out": "o", "beta": 1.0, **kwargs})
    assert e.value.field == field


def test_every_registered_loss_runs_with_what_it_declares():
    from training.losses import LOSSES

    pc, pr, rc, rr = pair()
    for name, kind in LOSSES.items():
        out = preference_loss(name, pc, pr, rc if kind.reference else None,
                              rr if kind.reference else None, beta=1.0,
                              p=T([0.7]) if kind.soft_labels else None,
                              chosen_tokens=T([2.0]), rejected_tokens=T([3.0]))
        assert out.losses.shape == (1,) and torch.isfinite(out.losses).all(), name
    with pytest.raises(CharterError, match="reference log-probs"):
        preference_loss("sigmoid", pc, pr, None, None, beta=1.0)
    with pytest.raises(CharterError, match="p_chosen"):
        preference_loss("soft", pc, pr, rc, rr, beta=1.0)


def test_soft_with_missing_p_on_one_pair_is_an_error():
    pc, pr, rc, rr = (x.repeat(2) for x in pair())
    with pytest.raises(CharterError, match="p_chosen"):
        preference_loss("soft", pc, pr, rc, rr, beta=1.0, p=T([1.0, float("nan")]))


def test_likelihood_displacement_needs_three_logs_with_both_rewards_negative():
    """Rewards are β·(policy − reference) log-probs: both negative = both log-probs fell."""
    from training.dpo import likelihood_displacement

    assert likelihood_displacement([(0.1, -0.2), (-0.1, -0.3), (-0.2, -0.5), (-0.3, -0.9)])
    assert not likelihood_displacement([(-0.1, -0.3), (0.01, -0.5), (-0.3, -0.9)])
    assert not likelihood_displacement([(-0.1, -0.3), (-0.2, -0.5)])  # too few logs yet
