"""Pairs-mode input of `charter label`: JSONL pairs to label, checked record by record."""

from __future__ import annotations

from dataclasses import dataclass

from charter.core.errors import CharterError
from charter.core.reader import read_records
from charter.core.records import content_id, validate_messages


@dataclass
class LabelPair:
    """One pair to label (pairs mode input)."""

    id: str
    messages: list[dict[str, str]]
    response_a: str
    response_b: str
    preferred: str | None = None
    source: str = ""


def read_label_pairs(path: str, on_error: str = "raise",
                     errors: list[str] | None = None) -> list[LabelPair]:
    """Pairs from JSONL (or JSON, CSV, parquet: `charter.core.reader`): `id` (optional; default a content hash), `prompt` (chat messages ending
    with a user turn, or a string), `response_a`, `response_b`, optional `preferred` (a/b).

    `on_error="skip"` appends each bad record's message to `errors` and goes on."""
    found: list[str] = []
    out: list[LabelPair] = []
    for where, lineno, obj in read_records(path, found if on_error == "skip" else None,
                                           "pairs file"):
        try:
            out.append(_label_pair(where, lineno, obj))
        except CharterError as e:
            if on_error != "skip":
                raise
            found.append(str(e))
    seen: dict[str, str] = {}
    for it in out:
        if it.id in seen:
            raise CharterError(f"duplicate id {it.id!r} (first at {seen[it.id]})",
                               path=it.source, field="id")
        seen[it.id] = it.source
    if errors is not None:
        errors.extend(found)
    if not out:
        raise CharterError(f"no usable pairs ({len(found)} bad records)", path=path)
    return out


def _label_pair(path: str, lineno: int, obj: dict) -> LabelPair:
    if "prompt" not in obj:
        raise CharterError("missing field: expected prompt", path=path, line=lineno,
                           field="prompt")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CharterError("empty prompt", path=path, line=lineno, field="prompt")
        prompt = [{"role": "user", "content": prompt}]
    messages = validate_messages(prompt, path=path, line=lineno, field="prompt",
                                 must_end_with="user")
    responses = []
    for key in ("response_a", "response_b"):
        value = obj.get(key)
        if not isinstance(value, str):
            what = "missing field" if value is None else f"got {type(value).__name__}"
            raise CharterError(f"{what}: expected a response string", path=path,
                               line=lineno, field=key)
        responses.append(value)
    pref = obj.get("preferred")
    if pref is not None:
        if not isinstance(pref, str) or pref.strip().lower() not in ("a", "b"):
            raise CharterError(f"expected a or b, got {pref!r}", path=path, line=lineno,
                               field="preferred")
        pref = pref.strip().lower()
    pid = obj.get("id")
    pid = str(pid) if pid is not None else content_id(messages, *responses)
    return LabelPair(pid, messages, *responses, pref, f"{path}:{lineno}")
