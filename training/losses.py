"""Preference losses as pure functions of summed (or mean) log-probabilities.

Every function takes 1-D tensors of shape (B,), one entry per preference pair, and returns a
`PreferenceLoss` with per-pair losses (B,) and the implicit rewards of chosen and rejected (B,),
so the loop decides how to reduce them and which metrics to log. No model, config or device here.

Notation: for a pair (x, y_w, y_l), with policy log-probs π_w = log π(y_w|x), π_l and reference
log-probs r_w, r_l (sums over response tokens),
    h = (π_w − r_w) − (π_l − r_l)             the log-ratio margin,
    rewards: chosen β(π_w − r_w), rejected β(π_l − r_l).
`LOSSES` is the registry (name → function and what it needs); `check_loss_settings` validates
a name and its settings once, when the DPO config is built; `preference_loss` dispatches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charter.core.errors import CharterError


@dataclass
class PreferenceLoss:
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) implicit reward of the chosen response (detached)
    rejected_rewards: torch.Tensor  # (B,)


def _margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)  # h: (B,)


def _rewards(beta, pc, pr, rc, rr):
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def sigmoid_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO, with conservative DPO's label smoothing ε (ε = 0 is plain DPO).

    loss = −(1−ε)·log σ(βh) − ε·log σ(−βh)
    """
    h = _margin(pc, pr, rc, rr)
    eps = label_smoothing
    # Rafailov et al. 2023 Eq. 7; ε term: conservative DPO, Mitchell 2023 https://ericmitchell.ai/cdpo.pdf Eq. 3
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return PreferenceLoss(losses, *_rewards(beta, pc, pr, rc, rr))


def ipo_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLoss:
    """IPO: squared distance of the margin to 1/(2β); β plays the role of the paper's τ.

    Uses the log-probs it is given (the loop passes sums over response tokens, as in the paper).
    """
    h = _margin(pc, pr, rc, rr)
    losses = (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023 Eq. 17
    return PreferenceLoss(losses, *_rewards(beta, pc, pr, rc, rr))


def hinge_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLoss:
    """SLiC-HF's calibration hinge on the reference-normalised margin: max(0, 1 − βh)."""
    h = _margin(pc, pr, rc, rr)
    losses = torch.relu(1 - beta * h)  # Zhao et al. 2023 (SLiC-HF) calibration hinge, δ = 1, on βh
    return PreferenceLoss(losses, *_rewards(beta, pc, pr, rc, rr))


def robust_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float) -> PreferenceLoss:
    """Robust DPO for labels flipped with probability ε (0 ≤ ε < 0.5): an unbiased loss.

    loss = [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε)
    """
    h = _margin(pc, pr, rc, rr)
    eps = label_smoothing
    # Chowdhury et al. 2024 (rDPO), the unbiased loss of §3
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return PreferenceLoss(losses, *_rewards(beta, pc, pr, rc, rr))


def soft_loss(pc, pr, rc, rr, p, *, beta: float) -> PreferenceLoss:
    """Binary cross-entropy of the DPO preference model against a per-pair soft label p (B,).

    loss = −[p·log σ(βh) + (1−p)·log σ(−βh)]; p = 1 is DPO, p = 0.5 pulls the margin to 0.
    """
    h = _margin(pc, pr, rc, rr)
    # Bradley-Terry likelihood of Rafailov et al. 2023 Eq. 7 with a soft target p (the AI label)
    losses = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    return PreferenceLoss(losses, *_rewards(beta, pc, pr, rc, rr))


def simpo_loss(pc_mean, pr_mean, *, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO: reference-free, on length-normalised log-probs (mean per response token) (B,).

    loss = −log σ(β·π̄_w − β·π̄_l − γ); rewards β·π̄.
    """
    losses = -F.logsigmoid(beta * pc_mean - beta * pr_mean - gamma)  # Meng et al. 2024 Eq. 6
    return PreferenceLoss(losses, (beta * pc_mean).detach(), (beta * pr_mean).detach())


def nll_term(chosen_logps_sum, chosen_tokens, *, alpha: float) -> torch.Tensor:
    """RPO's extra negative log-likelihood of the chosen response, per token: (B,).

    α · (−log π(y_w|x) / |y_w|)
    """
    return alpha * (-chosen_logps_sum / chosen_tokens.clamp(min=1))  # Pang et al. 2024 (IRPO) objective, NLL term


@dataclass(frozen=True)
class LossKind:
    """One entry of the loss registry: the pure function and what it needs."""

    fn: Callable[..., PreferenceLoss]
    reference: bool = True
    """needs reference log-probs (rc, rr); else it is reference-free"""
    soft_labels: bool = False
    """needs each pair's AI label probability p_chosen"""
    length_normalised: bool = False
    """reads mean per-token log-probs (needs response token counts) instead of sums"""
    settings: tuple[str, ...] = ()
    """settings it reads besides beta (others must stay at their neutral defaults)"""


# The loss registry: `--loss NAME` is validated against it once, when the config is built.
LOSSES: dict[str, LossKind] = {
    "sigmoid": LossKind(sigmoid_loss, settings=("label_smoothing",)),
    "ipo": LossKind(ipo_loss),
    "hinge": LossKind(hinge_loss),
    "robust": LossKind(robust_loss, settings=("label_smoothing",)),
    "soft": LossKind(soft_loss, soft_labels=True),
    "simpo": LossKind(simpo_loss, reference=False, length_normalised=True, settings=("gamma",)),
}


def check_loss_settings(loss: str, *, beta: float, label_smoothing: float, gamma: float,
                        rpo_alpha: float) -> LossKind:
    """The registry entry of `loss`; CharterError (naming the field) for unknown or
    conflicting settings. Called once, by `DPOConfig.validate`."""
    kind = LOSSES.get(loss)
    if kind is None:
        raise CharterError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}",
                           field="loss")
    if not beta > 0:
        raise CharterError(f"must be > 0, got {beta}", field="beta")
    if label_smoothing and "label_smoothing" not in kind.settings:
        users = [n for n, k in LOSSES.items() if "label_smoothing" in k.settings]
        raise CharterError(f"label smoothing is defined for the {' and '.join(users)} losses "
                           f"(conservative DPO, flip rate), not {loss!r}; set it to 0 (soft "
                           "labels: --loss soft uses each pair's p_chosen)",
                           field="label_smoothing")
    if loss == "sigmoid" and not 0 <= label_smoothing <= 0.5:
        raise CharterError(f"must be in [0, 0.5], got {label_smoothing}", field="label_smoothing")
    if loss == "robust" and not 0 <= label_smoothing < 0.5:
        raise CharterError(f"the robust loss needs 0 <= ε < 0.5 (the flip rate), got "
                           f"{label_smoothing}", field="label_smoothing")
    if gamma and "gamma" not in kind.settings:
        raise CharterError(f"gamma is SimPO's target margin; it has no meaning for {loss!r}",
                           field="gamma")
    if rpo_alpha < 0:
        raise CharterError(f"must be >= 0, got {rpo_alpha}", field="rpo_alpha")
    return kind


def preference_loss(loss: str, pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.0, rpo_alpha: float = 0.0, p=None, chosen_tokens=None,
                    rejected_tokens=None) -> PreferenceLoss:
    """The registry's loss `loss` (settings checked once, by the config). pc/pr: policy summed
    log-probs (B,); rc/rr: reference (B,), or None for a reference-free loss; p: soft labels
    (B,); *_tokens: response lengths (B,) for length-normalised losses and RPO."""
    kind = LOSSES[loss]
    extra = {"label_smoothing": label_smoothing, "gamma": gamma}
    kw = {"beta": beta, **{name: extra[name] for name in kind.settings}}
    if kind.length_normalised:
        if chosen_tokens is None or rejected_tokens is None:
            raise CharterError(f"{loss} needs response token counts", field="loss")
        out = kind.fn(pc / chosen_tokens.clamp(min=1), pr / rejected_tokens.clamp(min=1), **kw)
    elif kind.reference and (rc is None or rr is None):
        raise CharterError(f"the {loss!r} loss needs reference log-probs", field="loss")
    elif kind.soft_labels:
        if p is None or bool(torch.isnan(p).any()):
            raise CharterError(f"the {loss} loss needs p_chosen on every pair (the AI label's "
                               "probability); use --loss sigmoid for hard labels",
                               field="p_chosen")
        out = kind.fn(pc, pr, rc, rr, p, **kw)
    else:
        out = kind.fn(pc, pr, rc, rr, **kw)
    if rpo_alpha:
        if chosen_tokens is None:
            raise CharterError("rpo_alpha needs chosen token counts", field="rpo_alpha")
        out.losses = out.losses + nll_term(pc, chosen_tokens, alpha=rpo_alpha)
    return out
