"""A run's training data for other tools: TRL's conversational or standard shapes, with the AI
labels' soft information filtered (`min_margin`) or turned into a choice or weights, and a
dataset card.

    charter export runs/quick --out exports/quick
    charter export runs/quick/label --format trl-standard --min-margin 0.1 --soft-labels as-weights \\
        --out exports/strict

Input: a pipeline run folder (its critique/sft.jsonl, and label*/pairs.jsonl or else
critique/pairs.jsonl), or one stage's folder (sft.jsonl and/or pairs.jsonl). Output:
`OUT/sft/train.jsonl`, `OUT/preference/train.jsonl`, `OUT/README.md` (front matter with configs
for `datasets.load_dataset(OUT, "preference")` and the Hub) and the constitution beside them.

Soft labels: `as-choice` (default) orients each pair by its label (chosen = the side with
p_chosen >= 0.5) and writes hard pairs; `as-weights` also keeps `p_chosen` (what `charter train
dpo --loss soft` reads) and adds `weight` = 2·|p_chosen − 0.5| (0 = a tie, 1 = certain) for
tools that weight pairs. Pairs without a label (critique pairs: revision over first answer) are
hard pairs. `min_margin` drops labelled pairs with |p_chosen − 0.5| below it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from charter.core.errors import CharterError
from charter.core.records import (
    Message,
    PreferencePair,
    read_pairs,
    read_sft,
    write_jsonl_atomic,
    write_text_atomic,
)
from training.cards import dataset_card

FORMATS = ("trl-conversational", "trl-standard")


@dataclass(kw_only=True)
class ExportConfig:
    run: str
    """a pipeline run folder, or a critique or label stage's folder"""
    out: str
    """folder to write: sft/train.jsonl, preference/train.jsonl, README.md"""
    format: Literal["trl-conversational", "trl-standard"] = "trl-conversational"
    """chat-message lists (TRL conversational) or strings (TRL standard, HH-RLHF-style turns)"""
    min_margin: float | None = None
    """drop labelled pairs with |p_chosen - 0.5| below this (None = keep all)"""
    soft_labels: Literal["as-choice", "as-weights"] = "as-choice"
    """as-choice: hard pairs oriented by the label; as-weights: also p_chosen and weight"""
    license: str = "other"
    """the dataset card's license field (set it to your prompts' and models' terms)"""

    def validate(self) -> None:
        if self.min_margin is not None and not 0 <= self.min_margin <= 0.5:
            raise CharterError(f"must be in [0, 0.5], got {self.min_margin}", field="min_margin")


def find_sources(run: Path) -> tuple[Path | None, list[Path]]:
    """(sft.jsonl or None, the pairs files) of a pipeline run or a stage folder."""
    if not run.is_dir():
        raise CharterError("expected a run folder (a pipeline run, or a critique or label "
                           "stage's output)", path=run, field="run")
    if (run / "sft.jsonl").exists() or (run / "pairs.jsonl").exists():
        sft, pairs = run / "sft.jsonl", run / "pairs.jsonl"
        return (sft if sft.exists() else None), ([pairs] if pairs.exists() else [])
    sft = run / "critique" / "sft.jsonl"
    labels = sorted((d / "pairs.jsonl" for d in run.glob("label*") if (d / "pairs.jsonl").exists()),
                    key=lambda f: (len(f.parent.name), f.parent.name))  # label, label-2, ...
    pairs = labels or ([run / "critique" / "pairs.jsonl"]
                       if (run / "critique" / "pairs.jsonl").exists() else [])
    if not sft.exists() and not pairs:
        raise CharterError("no sft.jsonl or pairs.jsonl here or in critique/ and label*/",
                           path=run, field="run")
    return (sft if sft.exists() else None), pairs


def transcript(messages: list[Message]) -> str:
    """Chat turns as HH-RLHF-style text (`\\n\\nHuman: …\\n\\nAssistant: …`); a system message
    opens it as plain text."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ")
                         + m["content"])
    return "".join(parts)


def _standard(prompt: list[Message], completion: list[Message]) -> tuple[str, str]:
    """(prompt, completion) strings: the prompt ends "\\n\\nAssistant:", the completion starts
    with a space (so prompt + completion is the whole transcript)."""
    whole = transcript(prompt + completion)
    head = transcript(prompt) + "\n\nAssistant:"
    return head, whole[len(head):]


def orient(pair: PreferencePair) -> PreferencePair:
    """Chosen = the side the label prefers (swap when p_chosen < 0.5)."""
    if pair.p_chosen is None or pair.p_chosen >= 0.5:
        return pair
    return PreferencePair(pair.prompt, pair.rejected, pair.chosen, 1.0 - pair.p_chosen, pair.id,
                          pair.extra)


def pair_row(pair: PreferencePair, cfg: ExportConfig) -> dict:
    pair = orient(pair)
    if cfg.format == "trl-standard":
        prompt, chosen = _standard(pair.prompt, pair.chosen)
        _, rejected = _standard(pair.prompt, pair.rejected)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if cfg.soft_labels == "as-weights":
        p = 1.0 if pair.p_chosen is None else pair.p_chosen
        row.update(p_chosen=p, weight=round(2 * abs(p - 0.5), 6))
    return row


def sft_row(messages: list[Message], cfg: ExportConfig) -> dict:
    if cfg.format == "trl-standard":
        prompt, completion = _standard(messages[:-1], messages[-1:])
        return {"prompt": prompt, "completion": completion}
    return {"messages": messages}


def keep(pair: PreferencePair, min_margin: float | None) -> bool:
    return min_margin is None or pair.p_chosen is None or abs(pair.p_chosen - 0.5) >= min_margin


def export(cfg: ExportConfig) -> dict:
    """Write the export; returns counts and what was read (also in the card)."""
    cfg.validate()
    run, out = Path(cfg.run), Path(cfg.out)
    sft_file, pair_files = find_sources(run)
    configs, counts, dropped = {}, {}, 0
    if sft_file is not None:
        rows = [sft_row(m, cfg) for m in read_sft(sft_file)]
        write_jsonl_atomic(out / "sft" / "train.jsonl", rows)
        configs["sft"], counts["sft"] = "sft/train.jsonl", len(rows)
    if pair_files:
        pairs = [p for f in pair_files for p in read_pairs(f)]
        kept = [p for p in pairs if keep(p, cfg.min_margin)]
        dropped = len(pairs) - len(kept)
        write_jsonl_atomic(out / "preference" / "train.jsonl", [pair_row(p, cfg) for p in kept])
        configs["preference"], counts["preference"] = "preference/train.jsonl", len(kept)
    constitution = _constitution(run, [f for f in [sft_file, *pair_files] if f])
    if constitution.get("file"):
        shutil.copyfile(constitution.pop("file"), out / "constitution.yaml")
        constitution["copied"] = True
    options = {"format": cfg.format, "soft_labels": cfg.soft_labels,
               "min_margin": cfg.min_margin, "pairs_dropped_by_min_margin": dropped}
    write_text_atomic(out / "README.md", dataset_card(
        source=str(run), constitution=constitution, configs=configs, counts=counts,
        fmt=cfg.format.removeprefix("trl-"), options=options, license=cfg.license))
    return {"out": str(out), "counts": counts, "dropped": dropped,
            "read": [str(f) for f in [sft_file, *pair_files] if f]}


def _constitution(run: Path, files: list[Path]) -> dict:
    """Name, sha256 and file of the constitution that made the data, from the stages' records."""
    from training.data import find_constitution

    found: dict = {}
    for folder in dict.fromkeys(f.parent for f in files):
        for name in ("manifest.json", "report.json"):
            try:
                obj = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # no record here (or a damaged one): the card says "not recorded"
            got = find_constitution(obj)
            if got:
                found = {**got, **found}
        if (folder / "constitution.yaml").is_file() and "file" not in found:
            found["file"] = folder / "constitution.yaml"
    return found
