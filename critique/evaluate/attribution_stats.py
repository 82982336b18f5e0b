"""Principle attribution statistics: pure functions of records already read (no I/O, no model).

Critique side (`records.jsonl` of the critique stage): each round names the principle drawn for
it; the round *changed* the response when its revision differs from the response before it (the
initial response for round 1, the previous revision after that), compared after stripping
surrounding whitespace. A round that a flagged record ended on (its output was rejected: a loop,
an echo, empty text) is drawn but counts as neither changed nor unchanged.

Label side (`pairs.jsonl` / `labels.jsonl` of the label stage): each pair carries one vote per
drawn principle, read here as a *lean* towards the record's first response (`chosen` in prompts
mode, `a` in pairs mode):
- compare mode: lean = p - 0.5, where p is the principle's both-orders probability;
- rate mode: lean = r_first - r_second, the difference of the principle's two ratings.
A vote's side is the sign of its lean (0 at an exact tie). Per principle:
- ensemble agreement, leave-one-out: on each pair with at least one other vote, does the vote's
  side equal the side of the sum of the *other* principles' leans? (With one principle per pair
  nothing is compared: agreement with an ensemble of itself would always be 1.) A tie on either
  side agrees with nothing, as in `labelmath.principle_agreement`;
- human agreement, where the pair has `preferred` (a/b): the vote's side against it, an exact
  tie earning half a point (`labelmath.accuracy`);
- low-margin share: votes with |lean| < margin (compare: the label stage's `min_margin`, rate:
  its `min_rating_gap`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


# -- critique side ----------------------------------------------------------------------------


def round_changes(initial: str, revisions: Sequence[str], failed_last: bool = False
                  ) -> list[bool | None]:
    """Per round: True when its revision differs from the response before it, False when not,
    None for the last round when `failed_last` (a flagged record's rejected output)."""
    out: list[bool | None] = []
    before = initial.strip()
    for k, text in enumerate(revisions):
        if failed_last and k == len(revisions) - 1:
            out.append(None)
            break
        now = text.strip()
        out.append(now != before)
        before = now
    return out


@dataclass
class CritiqueCounts:
    """One principle's critique rounds: drawn = changed + unchanged + failed."""

    drawn: int = 0
    changed: int = 0
    unchanged: int = 0
    failed: int = 0

    @property
    def change_rate(self) -> float | None:
        """changed / (changed + unchanged): failed rounds are left out."""
        n = self.changed + self.unchanged
        return self.changed / n if n else None


def critique_counts(records: Iterable[tuple[str, Sequence[tuple[str, str]], bool]]
                    ) -> dict[str, CritiqueCounts]:
    """Per principle id, from (initial response, [(principle id, revision)], flagged) records."""
    out: dict[str, CritiqueCounts] = {}
    for initial, rounds, flagged in records:
        changes = round_changes(initial, [r for _, r in rounds], failed_last=flagged)
        for (pid, _), changed in zip(rounds, changes):
            c = out.setdefault(pid, CritiqueCounts())
            c.drawn += 1
            if changed is None:
                c.failed += 1
            elif changed:
                c.changed += 1
            else:
                c.unchanged += 1
    return out


# -- label side -------------------------------------------------------------------------------


@dataclass
class VoteCounts:
    """One principle's labelling votes (see the module docstring for each count)."""

    votes: int = 0
    low_margin: int = 0
    ensemble_n: int = 0
    ensemble_agree: int = 0
    human_n: int = 0
    human_agree: float = 0.0  # ties count half
    sides: dict[int, int] = field(default_factory=lambda: {1: 0, 0: 0, -1: 0})

    @property
    def low_margin_share(self) -> float | None:
        return self.low_margin / self.votes if self.votes else None

    @property
    def ensemble_agreement(self) -> float | None:
        return self.ensemble_agree / self.ensemble_n if self.ensemble_n else None

    @property
    def human_agreement(self) -> float | None:
        return self.human_agree / self.human_n if self.human_n else None


def leave_one_out_sides(leans: Mapping[str, float]) -> dict[str, int | None]:
    """Per principle, the side of the sum of the other principles' leans (None: no others)."""
    total = sum(leans.values())
    if len(leans) < 2:
        return {pid: None for pid in leans}
    return {pid: sign(total - lean) for pid, lean in leans.items()}


def vote_counts(pairs: Iterable[tuple[Mapping[str, float], str | None]], margin: float
                ) -> dict[str, VoteCounts]:
    """Per principle id, from (leans: principle id → lean, preferred "a"/"b"/None) pairs."""
    out: dict[str, VoteCounts] = {}
    for leans, preferred in pairs:
        others = leave_one_out_sides(leans)
        for pid, lean in leans.items():
            c = out.setdefault(pid, VoteCounts())
            side = sign(lean)
            c.votes += 1
            c.sides[side] += 1
            c.low_margin += abs(lean) < margin
            if others[pid] is not None:
                c.ensemble_n += 1
                c.ensemble_agree += side != 0 and side == others[pid]
            if preferred in ("a", "b"):
                c.human_n += 1
                want = 1 if preferred == "a" else -1
                c.human_agree += 0.5 if side == 0 else float(side == want)
    return out


# -- candidates to rewrite ----------------------------------------------------------------------


def rewrite_candidates(critique: Mapping[str, CritiqueCounts], votes: Mapping[str, VoteCounts],
                       min_count: int = 3) -> dict[str, list[str]]:
    """Principles worth rewriting, each with the reasons (only on `min_count` or more rounds or
    compared votes, so that one unlucky draw names nothing):
    - it never changed a response in the rounds it was drawn for;
    - its votes disagreed with the rest of the ensemble on every pair where they were compared;
    - every one of its votes was low-margin (it never decided anything)."""
    out: dict[str, list[str]] = {}
    for pid, c in critique.items():
        n = c.changed + c.unchanged
        if n >= min_count and c.changed == 0:
            out.setdefault(pid, []).append(f"never changed a response ({n} rounds)")
    for pid, v in votes.items():
        if v.ensemble_n >= min_count and v.ensemble_agree == 0:
            out.setdefault(pid, []).append(
                f"disagreed with the other principles on all {v.ensemble_n} pairs")
        if v.votes >= min_count and v.low_margin == v.votes:
            out.setdefault(pid, []).append(f"all {v.votes} votes low-margin")
    return dict(sorted(out.items()))
