"""Preference losses as pure functions of summed (or mean) log-probabilities.

Every function takes 1-D tensors of shape (B,), one entry per preference pair, and returns a
`PreferenceLoss` with per-pair losses (B,) and the implicit rewards of chosen and rejected (B,),
so the loop decides how to reduce them and which metrics to log. No model, config or device here.

Notation: for a pair (x, y_w, y_l), with policy log-probs π_w = log π(y_w|x), π_l and reference
log-probs r_w, r_l (sums over response tokens),
    h = (π_w − r_w) − (π_l − r_l)             the log-ratio margin,
    rewards: chosen β(π_w − r_w), rejected β(π_l − r_l).
`preference_loss` dispatches on the loss name and rejects unknown or conflicting settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charter.core.errors import CharterError
from training.options import check_loss_settings


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


def preference_loss(loss: str, pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.0, rpo_alpha: float = 0.0, p=None, chosen_tokens=None,
                    rejected_tokens=None) -> PreferenceLoss:
    """Dispatch on `loss`. pc/pr: policy summed log-probs (B,); rc/rr: reference (B,) or None
    for simpo; p: soft labels (B,) for `soft`; *_tokens: response lengths (B,) for simpo/RPO."""
    check_loss_settings(loss, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                        rpo_alpha=rpo_alpha)
    if loss == "simpo":
        if chosen_tokens is None or rejected_tokens is None:
            raise CharterError("simpo needs response token counts", field="loss")
        out = simpo_loss(pc / chosen_tokens.clamp(min=1), pr / rejected_tokens.clamp(min=1),
                         beta=beta, gamma=gamma)
    elif rc is None or rr is None:
        raise CharterError(f"the {loss!r} loss needs reference log-probs", field="loss")
    elif loss == "sigmoid":
        out = sigmoid_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    elif loss == "ipo":
        out = ipo_loss(pc, pr, rc, rr, beta=beta)
    elif loss == "hinge":
        out = hinge_loss(pc, pr, rc, rr, beta=beta)
    elif loss == "robust":
        out = robust_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    else:  # soft
        if p is None or bool(torch.isnan(p).any()):
            raise CharterError("the soft loss needs p_chosen on every pair (the AI label's "
                               "probability); use --loss sigmoid for hard labels",
                               field="p_chosen")
        out = soft_loss(pc, pr, rc, rr, p, beta=beta)
    if rpo_alpha:
        if chosen_tokens is None:
            raise CharterError("rpo_alpha needs chosen token counts", field="rpo_alpha")
        out.losses = out.losses + nll_term(pc, chosen_tokens, alpha=rpo_alpha)
    return out
