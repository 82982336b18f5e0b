"""Record schemas and the readers every stage shares: prompts, preference pairs, SFT data.

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
from charter.core.reader import format_of, read_records

ROLES = ("system", "user", "assistant")
Message = dict[str, str]



def validate_messages(messages: Any, *, path: object = None, line: int | None = None,
                      field: str = "messages", must_end_with: str | None = None) -> list[Message]:
    """Check a chat-message list (`[{"role": ..., "content": ...}, ...]`) and return a clean copy."""
    if not isinstance(messages, list) or not messages:
        raise CharterError("expected a non-empty list of {role, content} messages",
                           path=path, line=line, field=field)
    out: list[Message] = []
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise CharterError(f"expected an object, got {type(m).__name__}", path=path,
                               line=line, field=f)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise CharterError(f"role must be one of {', '.join(ROLES)}, got {role!r}",
                               path=path, line=line, field=f"{f}.role")
        if not isinstance(content, str):
            raise CharterError(f"content must be a string, got {type(content).__name__}",
                               path=path, line=line, field=f"{f}.content")
        out.append({"role": role, "content": content})
    if must_end_with and out[-1]["role"] != must_end_with:
        raise CharterError(f"conversation must end with a {must_end_with} turn, "
                           f"ends with {out[-1]['role']}", path=path, line=line, field=field)
    return out


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptItem:
    """One prompt to work on: a conversation that ends with a user turn."""

    id: str
    messages: list[Message]
    response: str | None = None  # an initial response given in the input, if any
    label: str | None = None  # "harmful" / "benign" where the input says so
    source: str = ""  # "FILE:LINE", for messages about this item


LABEL_ALIASES = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}
PROMPT_FIELDS = ("prompt", "messages", "chosen", "instruction", "question")


def parse_hh_transcript(text: str) -> list[Message]:
    """Messages from an HH-RLHF transcript (`\\n\\nHuman: ... \\n\\nAssistant: ...`)."""
    msgs: list[Message] = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\nHuman:")[1:]:
        human, *assistant = chunk.split("\n\nAssistant:")
        msgs.append({"role": "user", "content": human.strip()})
        for a in assistant:
            msgs.append({"role": "assistant", "content": a.strip()})
    return msgs


def _prompt_from_obj(obj: dict, path: str, lineno: int | None, prompt_field: str | None) -> PromptItem:
    keys = [prompt_field] if prompt_field else [k for k in PROMPT_FIELDS if k in obj]
    if not keys or keys[0] not in obj:
        want = prompt_field or " or ".join(PROMPT_FIELDS)
        raise CharterError(f"missing field: expected {want}", path=path, line=lineno,
                           field=prompt_field)
    key = keys[0]
    value = obj[key]
    if key == "chosen" and isinstance(value, str) and "Human:" in value:
        hh = parse_hh_transcript(value)
        if not hh or not hh[0]["content"]:
            raise CharterError("no Human turn in the transcript", path=path, line=lineno,
                               field=key)
        messages = [hh[0]]  # the first human turn is the prompt
    elif isinstance(value, str):
        if not value.strip():
            raise CharterError("empty prompt", path=path, line=lineno, field=key)
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = validate_messages(value, path=path, line=lineno, field=key,
                                     must_end_with="user")
    else:
        raise CharterError(f"expected a string or a list of {{role, content}} messages, got "
                           f"{type(value).__name__}", path=path, line=lineno, field=key)
    response = obj.get("response")
    if response is not None and not isinstance(response, str):
        raise CharterError("response must be a string", path=path, line=lineno, field="response")
    label = obj.get("label")
    if label is not None:
        if not isinstance(label, str) or label.lower() not in LABEL_ALIASES:
            raise CharterError(f"label must be one of {', '.join(LABEL_ALIASES)}, got {label!r}",
                               path=path, line=lineno, field="label")
        label = LABEL_ALIASES[label.lower()]
    pid = obj.get("id")
    pid = str(pid) if pid is not None else content_id(messages)
    return PromptItem(pid, messages, response, label,
                      f"{path}:{lineno}" if lineno is not None else str(path))


def read_prompts(path: str | os.PathLike, prompt_field: str | None = None,
                 on_error: str = "raise", errors: list[str] | None = None) -> list[PromptItem]:
    """Prompts from JSONL (`prompt`, `messages`, an HH-RLHF `chosen` transcript, `instruction`),
    JSON, CSV (a `prompt` column) or parquet, optionally gzipped (`prompt_field` overrides the
    field name); read by `charter.core.reader`, so every decoding problem names file and line.

    `on_error="skip"` skips bad records and appends their messages to `errors` instead of raising.
    """
    path = check_readable(path, "prompts file")
    if on_error not in ("raise", "skip"):
        raise CharterError(f"on_error must be raise or skip, got {on_error!r}")
    items: list[PromptItem] = []
    found: list[str] = []  # messages of skipped records (on_error="skip")
    is_csv = format_of(path) == "csv"
    for where, lineno, obj in read_records(path, None if on_error == "raise" else found,
                                           "prompts file"):
        if is_csv:  # an empty optional cell means "not given" (CSV cannot tell null from "");
            # an empty prompt cell stays, so that it is reported as an empty prompt
            obj = {k: v for k, v in obj.items() if not (v == "" and k in _CSV_OPTIONAL)}
        try:
            items.append(_prompt_from_obj(obj, where, lineno, prompt_field))
        except CharterError as e:
            if on_error == "raise":
                raise
            found.append(str(e))
    if errors is not None:
        errors.extend(found)
    if not items:
        if found:
            raise CharterError(f"no usable prompts ({len(found)} bad records; first: "
                               f"{found[0]})", path=path)
        raise CharterError("no usable prompts", path=path)
    return items


_CSV_OPTIONAL = ("id", "response", "label")


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
