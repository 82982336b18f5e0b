"""Record schemas and the readers every stage shares: preference pairs, SFT data, the records
each stage writes (prompts and chat messages: `charter.core.prompts`, re-exported here).

This is a leaf module: it imports no stage, so `critique/` and `training/` can both use it without
importing each other. Everything on disk is JSONL (one JSON object a line, loadable with
`datasets.load_dataset("json", data_files=...)`); the low-level JSONL writing and reading (ids,
atomic writes, crash-safe appends, resume) is in `charter.core.jsonl` and re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from charter.core.errors import CharterError
from charter.core.jsonl import (  # noqa: F401  (re-exported: the stages import them from here)
    JsonlAppender,
    check_readable,
    content_id,
    file_sha256,
    load_jsonl_for_resume,
    read_jsonl,
    read_text_lines,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from charter.core.prompts import (  # noqa: F401  (re-exported: the stages import them from here)
    LABEL_ALIASES,
    PROMPT_FIELDS,
    ROLES,
    Message,
    PromptItem,
    parse_hh_transcript,
    read_prompts,
    validate_messages,
)
from charter.core.reader import read_records

# ---------------------------------------------------------------------------------------------
# records written by the stages


@dataclass
class Round:
    principle_id: str
    critique: str
    revision: str


@dataclass
class RevisionRecord:
    """One prompt's critique-and-revise history (critique/ writes it, `records.jsonl`)."""

    id: str
    prompt: list[Message]
    initial_response: str
    rounds: list[Round]
    final_response: str
    provenance: dict = field(default_factory=dict)
    flagged: str | None = None  # why this record is left out of the exports, if it is

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RevisionRecord:
        d = dict(d)
        d["rounds"] = [Round(**r) for r in d.get("rounds", [])]
        return cls(**d)


@dataclass
class PreferencePair:
    """TRL's conversational preference format plus the AI label (`pairs.jsonl`)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    p_chosen: float | None = None  # the AI label's probability that `chosen` is preferred
    id: str | None = None
    extra: dict = field(default_factory=dict)  # votes, orders, provenance, ...

    @classmethod
    def of(cls, prompt: list[Message], chosen: str, rejected: str, *, id: str,
           p_chosen: float | None = None, **extra: Any) -> PreferencePair:
        """A pair of two assistant replies to `prompt` (as the critique and label stages
        write them)."""
        return cls(prompt, [{"role": "assistant", "content": chosen}],
                   [{"role": "assistant", "content": rejected}], p_chosen, id, extra)

    def to_dict(self) -> dict:
        """The JSONL row: id, prompt, chosen, rejected, p_chosen (when labelled), then extra;
        `read_pairs` reads it back."""
        d: dict = {} if self.id is None else {"id": self.id}
        d.update(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected)
        if self.p_chosen is not None:
            d["p_chosen"] = self.p_chosen
        d.update(self.extra)
        return d


@dataclass
class SFTRecord:
    """One SFT example (`sft.jsonl`): `messages` ending with the assistant turn to learn (the
    conversational format TRL and the alignment handbook read); `read_sft` reads it back."""

    id: str
    source: str  # critique (a final revision) or helpful (a plain answer)
    messages: list[Message]

    @classmethod
    def of(cls, id: str, source: str, prompt: list[Message], reply: str) -> SFTRecord:
        return cls(id, source, [*prompt, {"role": "assistant", "content": reply}])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LabelRecord:
    """One labelled pair of `charter label --pairs` (`labels.jsonl`). Compare mode: `p_a` (the
    principle ensemble of P(A preferred), None when no reading had both option tokens), the
    two orders' means `orders`, and per principle `votes` and `vote_orders`. Rate mode: both
    responses' `ratings`, their `rating_gap` and each principle's [r_a, r_b] `rating_votes`.
    `preferred` is the input's human label (a/b); `extra` holds the rest (reasoning,
    missing_option_reads). `from_dict` reads a row back."""

    id: str
    p_a: float | None = None
    orders: list[float] | None = None
    votes: dict[str, float] = field(default_factory=dict)
    vote_orders: dict[str, list[float]] = field(default_factory=dict)
    ratings: list[float] | None = None
    rating_gap: float | None = None
    rating_votes: dict[str, list[float]] | None = None
    preferred: str | None = None
    extra: dict = field(default_factory=dict)

    _COMPARE = ("p_a", "orders", "votes", "vote_orders")
    _RATE = ("ratings", "rating_gap", "rating_votes")

    @classmethod
    def of(cls, id: str, label: dict, preferred: str | None = None) -> LabelRecord:
        """The record of pair `id` from a comparison's or rating's result dict."""
        known = {k: v for k, v in label.items() if k in cls._COMPARE + cls._RATE}
        rest = {k: v for k, v in label.items() if k not in known}
        return cls(id=id, preferred=preferred, extra=rest, **known)

    @property
    def mode(self) -> str:
        return "rate" if self.ratings is not None else "compare"

    def to_dict(self) -> dict:
        """The JSONL row: id, the mode's label fields, extra, then preferred (if given)."""
        d: dict = {"id": self.id}
        d.update({k: getattr(self, k) for k in (self._RATE if self.mode == "rate"
                                                 else self._COMPARE)})
        d.update(self.extra)
        if self.preferred is not None:
            d["preferred"] = self.preferred
        return d

    @classmethod
    def from_dict(cls, d: dict, path: object = None) -> LabelRecord:
        if not isinstance(d.get("id"), str):
            raise CharterError("a label record needs a string id", path=path, field="id")
        rest = {k: v for k, v in d.items() if k not in ("id", "preferred")}
        return cls.of(d["id"], rest, d.get("preferred"))


@dataclass
class EvalResponse:
    """One greedy response of `charter eval` (`responses-<role>.jsonl`). `key` is a content
    hash of (model, prompt, token budget), so a resumed run, or a file reused from another eval
    of the same model, never serves a stale answer; `id` is the prompt's id."""

    key: str
    id: str
    response: str

    @staticmethod
    def key_of(model: str, messages: list[Message], max_new_tokens: int) -> str:
        return content_id("eval-response", model, messages, max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResponse | None:
        """The record of a row; None for a row without a key (an older file's: regenerated)."""
        if not isinstance(d.get("key"), str) or not isinstance(d.get("response"), str):
            return None
        return cls(d["key"], str(d.get("id")), d["response"])


@dataclass
class EvalAnswer:
    """One model's answer in a row of eval's `results.jsonl`: the response, the phrase rule's
    verdict (`rule`, the phrase it matched), the judge's P(refusal) (None without a judge) and
    the headline verdict `refused` (per `refusal_detector`)."""

    response: str
    rule: bool
    rule_phrase: str | None
    judge_p_refusal: float | None
    refused: bool


@dataclass
class EvalResult:
    """One prompt's row of `charter eval`'s `results.jsonl`: the prompt, each evaluated role's
    `EvalAnswer` (model, baseline, sft_model), and with a judged comparison the judge's
    P(model preferred) and its detail (`{"identical": true}` when both answers were the same).
    `to_dict` writes the row (roles as top-level keys); `from_dict` reads it back, older files
    included (the keys are the same)."""

    id: str
    label: str | None
    prompt: list[Message]
    answers: dict[str, EvalAnswer] = field(default_factory=dict)
    p_model_preferred: float | None = None
    judge: dict | None = None

    ANSWERING = ("model", "baseline", "sft_model")  # the roles whose answers a row holds

    def to_dict(self) -> dict:
        d: dict = {"id": self.id, "label": self.label, "prompt": self.prompt}
        d.update({role: asdict(a) for role, a in self.answers.items()})
        if self.p_model_preferred is not None:
            d["p_model_preferred"] = self.p_model_preferred
            d["judge"] = self.judge
        return d

    @classmethod
    def from_dict(cls, d: dict, path: object = None, line: int | None = None) -> EvalResult:
        if not isinstance(d.get("id"), str):
            raise CharterError("a results row needs a string id", path=path, line=line,
                               field="id")
        answers = {}
        for role in cls.ANSWERING:
            if isinstance(d.get(role), dict):
                try:
                    answers[role] = EvalAnswer(**d[role])
                except TypeError as e:  # a missing or unknown key
                    raise CharterError(f"not an answer row ({e})", path=path, line=line,
                                       field=role) from None
        return cls(d["id"], d.get("label"), d.get("prompt") or [], answers,
                   d.get("p_model_preferred"), d.get("judge"))


def read_eval_results(path: str | os.PathLike) -> list[EvalResult]:
    """The rows of an eval's `results.jsonl`."""
    return [EvalResult.from_dict(obj, where, line) for where, line, obj in read_records(path)]


@dataclass
class PromptDone:
    """The label stage's mark that one prompt is finished (`prompts_done.jsonl`, prompts mode):
    `key` (content hash of the prompt's id and messages), its `prompt_id`, how many pairs it
    gave, its distinct `responses`, the samples dropped as identical, and the pairs no reading
    could label (`unlabelled`; older marks lack it: 0). A prompt's pairs count only once its
    mark is written, so a killed run redoes a cut-off prompt whole."""

    key: str
    prompt_id: str
    pairs: int
    responses: int
    skipped_identical: int
    unlabelled: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: object = None) -> PromptDone:
        if not isinstance(d.get("key"), str):
            raise CharterError("a done mark needs a string key", path=path, field="key")
        known = {f: d[f] for f in ("prompt_id", "pairs", "responses", "skipped_identical",
                                   "unlabelled") if f in d}
        try:
            return cls(key=d["key"], **known)
        except TypeError as e:  # a field missing
            raise CharterError(f"not a done mark ({e})", path=path) from None


def _completion(value: Any, path: object, line: int, field: str) -> list[Message]:
    if isinstance(value, str):  # TRL's "standard" format: a plain completion string
        return [{"role": "assistant", "content": value}]
    return validate_messages(value, path=path, line=line, field=field)


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from JSONL: `prompt`/`chosen`/`rejected` as chat lists (TRL
    conversational) or strings (TRL standard); `p_chosen` optional in [0, 1]."""
    pairs = []
    for path, lineno, obj in read_records(path):  # noqa: B020 (path: the record's file/row)
        for k in ("prompt", "chosen", "rejected"):
            if k not in obj:
                raise CharterError("missing field: expected prompt, chosen and rejected",
                                   path=path, line=lineno, field=k)
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = validate_messages(prompt, path=path, line=lineno, field="prompt",
                                   must_end_with="user")
        chosen = _completion(obj["chosen"], path, lineno, "chosen")
        rejected = _completion(obj["rejected"], path, lineno, "rejected")
        p = obj.get("p_chosen")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0.0 <= p <= 1.0):
            raise CharterError(f"must be a probability in [0, 1], got {p!r}", path=path,
                               line=lineno, field="p_chosen")
        extra = {k: v for k, v in obj.items()
                 if k not in ("prompt", "chosen", "rejected", "p_chosen", "id")}
        pairs.append(PreferencePair(prompt, chosen, rejected,
                                    None if p is None else float(p), obj.get("id"), extra))
    return pairs


def read_sft(path: str | os.PathLike) -> list[list[Message]]:
    """SFT conversations from JSONL with a `messages` chat list (ending with an assistant turn)."""
    out = []
    for path, lineno, obj in read_records(path):  # noqa: B020 (path: the record's file/row)
        if "messages" not in obj:
            raise CharterError("missing field: expected messages", path=path, line=lineno,
                               field="messages")
        msgs = validate_messages(obj["messages"], path=path, line=lineno,
                                 must_end_with="assistant")
        out.append(msgs)
    return out
