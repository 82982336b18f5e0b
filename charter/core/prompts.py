"""Chat messages and prompts: the message-list check every reader uses, `PromptItem`, and
`read_prompts` (JSONL, JSON, CSV or parquet prompts, HH-RLHF transcripts). A leaf module
(`charter.core`); `charter.core.records` re-exports it, so the stages import it from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from charter.core.errors import CharterError
from charter.core.jsonl import check_readable, content_id
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
