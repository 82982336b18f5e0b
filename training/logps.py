"""Log-probabilities of label tokens under a causal LM's logits: pure, masked, shift-aware.

Labels use the convention of `transformers`: `labels[:, t]` is the token at position t, and
-100 marks positions that carry no loss (prompt, padding). Logits at position t predict the
token at t+1, so both are shifted by one before gathering.
"""

from __future__ import annotations

import torch

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the next label and its mask.

    logits: (B, T, V); labels: (B, T) with IGNORE where no loss applies.
    Returns (logps (B, T-1) with 0 where masked, mask (B, T-1) bool).
    """
    logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    # log softmax at the target only: logit[target] - logsumexp(logits), in fp32 for accuracy;
    # this avoids materialising a second (B, T, V) tensor of log-probs.
    logits = logits.float()
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed and mean log-prob of each row's label tokens, and their count.

    logits: (B, T, V); labels: (B, T). Returns (sum (B,), mean (B,), count (B,) long); the mean
    of a row with no label tokens is 0.
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)  # (B,)
    count = mask.sum(-1)  # (B,)
    return total, total / count.clamp(min=1), count
