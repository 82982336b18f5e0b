"""TRL's dataset shapes in, our training rows out: detect the shape, convert every row, refuse
clearly.

Sources (`--data`): JSONL (`.jsonl`, `.jsonl.gz`), JSON (a list of objects, or JSON Lines named
`.json`), CSV (string columns: the standard shapes), parquet, a folder written by `datasets`'
`save_to_disk` (a DatasetDict: `--split`), a run folder (its sft.jsonl / pairs.jsonl), or a
`datasets` hub name (`org/name`, `--split`; loaded from the local cache when offline).

Shapes (TRL's names; https://huggingface.co/docs/trl/dataset_formats), detected from the keys of
the first row and required of every row:

| shape | keys | trains in |
|---|---|---|
| language modeling | `messages` (conversational) or `text` (standard) | sft |
| prompt-completion | `prompt` + `completion` | sft |
| preference, explicit prompt | `prompt` + `chosen` + `rejected` | dpo |
| preference, implicit prompt | `chosen` + `rejected` (whole conversations/texts; HH-RLHF) | dpo |
| unpaired preference | `prompt` + `completion` + `label` (KTO) | refused: no loss here reads it |

Conversational rows hold chat-message lists and are rendered with the model's chat template;
standard rows hold strings and are tokenised as plain text, as TRL does (training/data.py). HH-RLHF
transcript strings (`\\n\\nHuman: … \\n\\nAssistant: …`) are parsed into conversations by default
(`hh_transcripts: chat`); `text` keeps them plain text, as TRL reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError
from charter.core.reader import read_records
from charter.core.records import (
    Message,
    PreferencePair,
    parse_hh_transcript,
    validate_messages,
)

Source = tuple[str, "int | None"]  # (file or file[row N], line or None)

SHAPE_KEYS = {  # shape -> the keys that make it (most specific first)
    "unpaired preference": ("prompt", "completion", "label"),
    "preference, explicit prompt": ("prompt", "chosen", "rejected"),
    "preference, implicit prompt": ("chosen", "rejected"),
    "prompt-completion": ("prompt", "completion"),
    "language modeling": ("messages",),
    "language modeling (text)": ("text",),
}
SFT_SHAPES = ("language modeling", "language modeling (text)", "prompt-completion")
PAIR_SHAPES = ("preference, explicit prompt", "preference, implicit prompt")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class TextSFT:
    """A standard (string) SFT row: loss on `completion` only; `text` rows have prompt ""."""

    prompt: str
    completion: str


@dataclass
class ChatCompletion:
    """A conversational prompt-completion row: loss on the completion's assistant turns only."""

    prompt: list[Message]
    completion: list[Message]


@dataclass
class TextPair:
    """A standard (string) preference pair, tokenised as plain text."""

    prompt: str
    chosen: str
    rejected: str
    p_chosen: float | None = None


@dataclass
class Rows:
    """Rows of one source, where each came from, and the shape found."""

    rows: list[dict]
    sources: list[Source]
    path: Path | str  # the file or folder read, or the hub name


# ---------------------------------------------------------------------------------------------
# reading rows


def _is_saved_dataset(d: Path) -> bool:
    return any((d / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _pick_split(ds, split: str, where: object):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise CharterError(f"dataset has splits {sorted(ds)}, no {split!r}; pass --split",
                               path=where, field="split")
        ds = ds[split]
    return ds


def _indexed(where: str, rows: list[dict], path: Path | str) -> Rows:
    """Rows with no line numbers (parquet, JSON arrays, datasets): named `where[row N]`."""
    return Rows(rows, [(f"{where}[row {i}]", None) for i in range(len(rows))], path)


def _hub_rows(name: str, split: str) -> Rows:
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (datasets raises many types; all mean "not loaded")
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get(
            "HF_DATASETS_OFFLINE") == "1" or "offline" in str(e).lower() or isinstance(
            e, (ConnectionError, OSError))
        why = ("the hub cannot be reached from here (offline) and it is not in the local "
               "datasets cache" if offline else f"{type(e).__name__}: {str(e)[:200]}")
        raise CharterError(
            f"not a local file or folder, and the datasets hub name could not be loaded: {why}; "
            "on a machine with network run `datasets.load_dataset(NAME, split=SPLIT)"
            ".save_to_disk(DIR)` or write JSONL, and pass that here", path=name,
            field="data") from None
    return _indexed(f"{name}[{split}]", [dict(r) for r in ds], name)


def read_rows(data: str | os.PathLike, kind: str, split: str = "train") -> Rows:
    """Rows of `data` (see the module docstring); `kind` ("sft"/"dpo") picks a run folder's file."""
    p = Path(data).expanduser()
    if not p.exists():
        if HUB_NAME.match(str(data)):
            return _hub_rows(str(data), split)
        raise CharterError("data not found (a file, a folder, or a datasets hub name org/name)",
                           path=p, field="data")
    if p.is_dir():
        name = "sft.jsonl" if kind == "sft" else "pairs.jsonl"
        if (p / name).exists():
            p = p / name
        elif _is_saved_dataset(p):
            from datasets import load_from_disk

            ds = _pick_split(load_from_disk(str(p)), split, p)
            return _indexed(str(p), [dict(r) for r in ds], p)
        else:
            raise CharterError(f"expected {name} in this directory, or a dataset saved with "
                               "datasets' save_to_disk", path=p, field="data")
    got = read_records(p, what="data file")  # every file format: charter.core.reader
    return Rows([r for _, _, r in got], [(w, ln) for w, ln, _ in got], p)


# ---------------------------------------------------------------------------------------------
# shapes


def detect(row: dict, where: Source) -> str:
    """The TRL shape of one row (from its keys)."""
    if not isinstance(row, dict):
        raise CharterError(f"expected an object, got {type(row).__name__}", path=where[0],
                           line=where[1])
    for shape, keys in SHAPE_KEYS.items():
        if all(k in row for k in keys):
            return shape
    raise CharterError(
        f"no known dataset shape in keys {sorted(row)}: expected messages or text (language "
        "modeling), prompt+completion, prompt+chosen+rejected or chosen+rejected (preference)",
        path=where[0], line=where[1], field="data")


def _conversational(value: Any) -> bool:
    return isinstance(value, list)


def _is_hh(text: Any) -> bool:
    return isinstance(text, str) and "\n\nHuman:" in text and "\n\nAssistant:" in text


def describe(shape: str, row: dict, hh_transcripts: str = "chat") -> str:
    """The name logged for the data: shape plus conversational/standard."""
    key = SHAPE_KEYS[shape][0]  # the prompt decides: a chat prompt means the chat template
    if shape == "preference, implicit prompt" and _is_hh(row.get("chosen")):
        style = ("HH-RLHF transcripts, read as conversations" if hh_transcripts == "chat"
                 else "HH-RLHF transcripts, read as plain text as TRL does")
    else:
        style = "conversational" if _conversational(row.get(key)) else "standard"
    return f"{shape.replace(' (text)', '')} ({style})"


def _string(row: dict, key: str, where: Source) -> str:
    v = row[key]
    if not isinstance(v, str):
        raise CharterError(f"expected a string like the first row's (standard format), got "
                           f"{type(v).__name__}", path=where[0], line=where[1], field=key)
    if not v.strip():
        raise CharterError("empty", path=where[0], line=where[1], field=key)
    return v


def _msgs(row: dict, key: str, where: Source, end: str | None = None) -> list[Message]:
    if not _conversational(row[key]):
        raise CharterError(f"expected a chat-message list like the first row's (conversational "
                           f"format), got {type(row[key]).__name__}", path=where[0],
                           line=where[1], field=key)
    return validate_messages(row[key], path=where[0], line=where[1], field=key, must_end_with=end)


def to_sft(row: dict, shape: str, where: Source):
    """One SFT row: list[Message] (every assistant turn trained), ChatCompletion or TextSFT."""
    if shape == "language modeling":
        return _msgs(row, "messages", where, "assistant")
    if shape == "language modeling (text)":
        return TextSFT("", _string(row, "text", where))
    if _conversational(row["prompt"]):
        prompt = _msgs(row, "prompt", where)
        completion = _msgs(row, "completion", where, "assistant")
        return ChatCompletion(prompt, completion)
    return TextSFT(_string(row, "prompt", where), _string(row, "completion", where))


def _p_chosen(row: dict, where: Source) -> float | None:
    p = row.get("p_chosen")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                          or not 0.0 <= p <= 1.0):
        raise CharterError(f"must be a probability in [0, 1], got {p!r}", path=where[0],
                           line=where[1], field="p_chosen")
    return None if p is None else float(p)


def split_implicit(chosen: list[Message], rejected: list[Message], where: Source
                   ) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's `extract_prompt` on message lists: the longest common run of turns is the prompt."""
    if chosen == rejected:
        raise CharterError("chosen and rejected are the same conversation", path=where[0],
                           line=where[1], field="rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] != "user":  # the prompt ends with the user's turn
        n -= 1
    if n == 0:
        raise CharterError("chosen and rejected share no opening user turn, so there is no "
                           "implicit prompt", path=where[0], line=where[1], field="chosen")
    if n == len(chosen) or n == len(rejected):
        raise CharterError("one response is empty after the shared prompt", path=where[0],
                           line=where[1], field="chosen" if n == len(chosen) else "rejected")
    return chosen[:n], chosen[n:], rejected[n:]


def extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's `extract_prompt` on strings: the common character prefix (minus a trailing space)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def to_pair(row: dict, shape: str, where: Source, hh_transcripts: str = "chat"):
    """One preference row: PreferencePair (conversational) or TextPair (standard)."""
    p = _p_chosen(row, where)
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "p_chosen",
                                                        "id")}
    if shape == "preference, implicit prompt":
        if _is_hh(row["chosen"]) and hh_transcripts == "chat":
            c, r = (parse_hh_transcript(_string(row, k, where)) for k in ("chosen", "rejected"))
            prompt, chosen, rejected = split_implicit(c, r, where)
        elif _conversational(row["chosen"]):
            prompt, chosen, rejected = split_implicit(_msgs(row, "chosen", where),
                                                      _msgs(row, "rejected", where), where)
        else:
            t = extract_text_prompt(_string(row, "chosen", where), _string(row, "rejected", where))
            if not t[1] or not t[2]:
                raise CharterError("chosen and rejected are the same text", path=where[0],
                                   line=where[1], field="rejected")
            return TextPair(*t, p_chosen=p)
        return PreferencePair(prompt, chosen, rejected, p, row.get("id"), extra)
    if _conversational(row["prompt"]):  # string responses after a chat prompt: assistant turns
        resp = [[{"role": "assistant", "content": _string(row, k, where)}]
                if isinstance(row[k], str) else _msgs(row, k, where) for k in ("chosen", "rejected")]
        return PreferencePair(_msgs(row, "prompt", where, "user"), *resp, p, row.get("id"), extra)
    if _conversational(row["chosen"]):  # a string prompt with chat completions: a user turn
        prompt = [{"role": "user", "content": _string(row, "prompt", where)}]
        return PreferencePair(prompt, _msgs(row, "chosen", where), _msgs(row, "rejected", where),
                              p, row.get("id"), extra)
    return TextPair(_string(row, "prompt", where), _string(row, "chosen", where),
                    _string(row, "rejected", where), p)


def convert(rows: Rows, kind: str, hh_transcripts: str = "chat") -> tuple[list, str]:
    """Every row converted for `kind` ("sft"/"dpo"), and the shape's name (for the log)."""
    if not rows.rows:
        raise CharterError("no rows", path=rows.path, field="data")
    first, where0 = rows.rows[0], rows.sources[0]
    shape = detect(first, where0)
    name = describe(shape, first, hh_transcripts)
    if shape == "unpaired preference":
        raise CharterError(
            "unpaired preference data (prompt/completion/label: TRL's KTO shape) holds one "
            "labelled completion per row; Charter's losses train on pairs (prompt, chosen, "
            "rejected) and SFT reads messages, text or prompt/completion; pair the completions "
            "per prompt first", path=where0[0], line=where0[1], field="label")
    wanted = SFT_SHAPES if kind == "sft" else PAIR_SHAPES
    if shape not in wanted:
        other = "charter train dpo" if kind == "sft" else "charter train sft"
        needs = ("messages, text or prompt/completion" if kind == "sft"
                 else "prompt/chosen/rejected or chosen/rejected")
        raise CharterError(f"this is {name} data, which trains with `{other}`; "
                           f"`charter train {kind}` needs {needs}", path=where0[0],
                           line=where0[1], field="data")
    out = []
    for row, where in zip(rows.rows, rows.sources):
        missing = [k for k in SHAPE_KEYS[shape] if not isinstance(row, dict) or k not in row]
        if missing:
            raise CharterError(f"missing field: the first row is {name} data, which needs "
                               f"{', '.join(SHAPE_KEYS[shape])} in every row", path=where[0],
                               line=where[1], field=missing[0])
        got = detect(row, where)
        if got != shape:
            raise CharterError(f"this row is {got} data, the first row {shape}: every row must "
                               "have one shape", path=where[0], line=where[1],
                               field=SHAPE_KEYS[got][-1])
        for k in SHAPE_KEYS[shape]:  # conversational and standard values are not mixed
            if _conversational(row[k]) != _conversational(first[k]):
                want = ("a chat-message list" if _conversational(first[k]) else "a string")
                raise CharterError(f"expected {want} like the first row's, got "
                                   f"{type(row[k]).__name__}", path=where[0], line=where[1],
                                   field=k)
        out.append(to_sft(row, shape, where) if kind == "sft"
                   else to_pair(row, shape, where, hh_transcripts))
    return out, name
