"""Batches of token ids: right padding, attention masks, labels with -100 where no loss applies.

Pairs are collated into one concatenated batch, chosen rows first then rejected rows, so both go
through the model in a single forward pass: rows [0, B) are chosen, rows [B, 2B) rejected.
"""

from __future__ import annotations

import torch

from training.data import IGNORE, PairExample, SFTExample


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """(N, T) long tensor, T = longest row; shorter rows are right-padded with `value`."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, T)."""
    ids = [e.input_ids for e in examples]
    return {"input_ids": pad(ids, pad_id), "attention_mask": _mask(ids),
            "labels": pad([e.labels for e in examples], IGNORE)}


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (2B, T), chosen rows then rejected rows;
    p_chosen: (B,) float, NaN where a pair has no soft label."""
    seqs, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            resp = getattr(e, side)
            seqs.append(e.prompt_ids + resp)
            labels.append([IGNORE] * len(e.prompt_ids) + resp)
    p = [float("nan") if e.p_chosen is None else e.p_chosen for e in examples]
    return {"input_ids": pad(seqs, pad_id), "attention_mask": _mask(seqs),
            "labels": pad(labels, IGNORE), "p_chosen": torch.tensor(p, dtype=torch.float32)}
