"""Record schemas and the readers/writers every stage shares.

This is a leaf module: it imports no stage, so `critique/` and `training/` can both use it without
importing each other. Everything on disk is JSONL (one JSON object a line, loadable with
`datasets.load_dataset("json", data_files=...)`).

Crash safety: records are appended one line at a time, flushed and fsynced (`JsonlAppender`). A
run killed mid-write leaves at most one partial last line; `load_jsonl_for_resume` drops it (and
truncates the file back to the last complete record) so the re-run appends after it. Ids are
content hashes (`content_id`), so a resumed run skips what is done and never writes it twice.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from charter.errors import CharterError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# ids, atomic writes, appends


def content_id(*parts: Any) -> str:
    """A stable 16-hex-digit id: sha256 of the canonical JSON of `parts`."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temp name in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write a whole JSONL file at once (exports derived from records)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class JsonlAppender:
    """Append-only JSONL writer: each `append` is one whole line, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_jsonl_for_resume(path: str | os.PathLike) -> list[dict]:
    """Records already finished in an append-only file, repairing a torn last line.

    A last line that has no newline or is not valid JSON is what a kill mid-write leaves: it is
    cut off (the file is truncated to the end of the last good line). A bad line *before* the
    last one is not a torn write but corruption, and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        lineno += 1
        is_last = end >= len(data)
        if nl >= 0 and not raw.strip():  # a blank line (hand-edited file): nothing to keep
            good_end = pos = end
            continue
        try:
            if nl < 0:
                raise ValueError("no newline")
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if is_last:
                break  # torn write: drop it below
            raise CharterError(f"corrupt record ({e}); move the file away to start over",
                               path=path, line=lineno) from None
        records.append(obj)
        good_end = end
        pos = end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


# ---------------------------------------------------------------------------------------------
# reading


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise CharterError(f"{what} not found", path=path)
    if path.is_dir():
        raise CharterError(f"expected a {what}, found a directory", path=path)
    if not os.access(path, os.R_OK):
        raise CharterError(f"{what} is not readable (permissions)", path=path)
    return path


def read_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) for a UTF-8 text file (optionally .gz), with clear errors.

    Lines are split as bytes and decoded one by one, so a decoding error names its own line
    (a text-mode reader decodes ahead in chunks and would blame an earlier line).
    """
    path = check_readable(path)
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if b"\x00" in raw:
                    raise CharterError("binary content (NUL byte); expected UTF-8 text",
                                       path=path, line=lineno)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CharterError(f"not valid UTF-8 text ({e.reason} at byte {e.start} "
                                       "of the line)", path=path, line=lineno) from None
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a BOM is not content
                yield lineno, line
    except (OSError, EOFError) as e:
        if isinstance(e, (gzip.BadGzipFile, EOFError)):
            raise CharterError(f"not a readable gzip file ({e})", path=path) from None
        raise CharterError(f"cannot read: {e.strerror or e}", path=path) from None


def read_jsonl(path: str | os.PathLike, errors: list[str] | None = None
               ) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line.

    With an `errors` list, a line that is not a JSON object is reported there and skipped
    (the lines after it are still read) instead of raising.
    """
    seen = False
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        seen = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            err = CharterError(f"invalid JSON ({e.msg} at column {e.colno})",
                               path=path, line=lineno)
        else:
            if isinstance(obj, dict):
                yield lineno, obj
                continue
            err = CharterError(f"expected a JSON object, got {type(obj).__name__}",
                               path=path, line=lineno)
        if errors is None:
            raise err
        errors.append(str(err))
    if not seen:
        raise CharterError("file is empty: expected at least one JSON line", path=path)


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


def _prompt_from_obj(obj: dict, path: Path, lineno: int, prompt_field: str | None) -> PromptItem:
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
    return PromptItem(pid, messages, response, label, f"{path}:{lineno}")


def read_prompts(path: str | os.PathLike, prompt_field: str | None = None,
                 on_error: str = "raise", errors: list[str] | None = None) -> list[PromptItem]:
    """Prompts from JSONL (`prompt`, `messages`, an HH-RLHF `chosen` transcript, `instruction`),
    optionally gzipped, or CSV with a `prompt` column (`prompt_field` overrides the field name).

    `on_error="skip"` skips bad records and appends their messages to `errors` instead of raising.
    """
    path = check_readable(path, "prompts file")
    if on_error not in ("raise", "skip"):
        raise CharterError(f"on_error must be raise or skip, got {on_error!r}")
    items: list[PromptItem] = []
    found: list[str] = []  # messages of skipped records (on_error="skip")
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        rows = _read_csv(path)
    else:
        rows = read_jsonl(path, errors=None if on_error == "raise" else found)
    for lineno, obj in rows:
        try:
            items.append(_prompt_from_obj(obj, path, lineno, prompt_field))
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


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    lines = [line for _, line in read_text_lines(path)]
    reader = csv.DictReader(lines)
    if not reader.fieldnames:
        raise CharterError("empty CSV file: expected a header row with a prompt column",
                           path=path)
    start = reader.line_num + 1  # the first data row's line
    for row in reader:
        # an empty optional cell means "not given" (CSV cannot tell null from ""); an empty
        # prompt cell stays, so that it is reported as an empty prompt
        yield start, {k: v for k, v in row.items()
                      if k is not None and not (v in ("", None) and k in _CSV_OPTIONAL)}
        start = reader.line_num + 1  # a quoted field may span lines


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

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.id is not None:
            d["id"] = self.id
        if self.p_chosen is not None:
            d["p_chosen"] = self.p_chosen
        d.update(self.extra)
        return d


def _completion(value: Any, path: object, line: int, field: str) -> list[Message]:
    if isinstance(value, str):  # TRL's "standard" format: a plain completion string
        return [{"role": "assistant", "content": value}]
    return validate_messages(value, path=path, line=line, field=field)


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from JSONL: `prompt`/`chosen`/`rejected` as chat lists (TRL
    conversational) or strings (TRL standard); `p_chosen` optional in [0, 1]."""
    pairs = []
    for lineno, obj in read_jsonl(path):
        for k in ("prompt", "chosen", "rejected"):
            if k not in obj:
                raise CharterError("missing field: expected prompt, chosen and rejected",
                                   path=path, line=lineno, field=k)
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = validate_messages(prompt, path=path, line=lineno, field="prompt")
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
    for lineno, obj in read_jsonl(path):
        if "messages" not in obj:
            raise CharterError("missing field: expected messages", path=path, line=lineno,
                               field="messages")
        msgs = validate_messages(obj["messages"], path=path, line=lineno,
                                 must_end_with="assistant")
        out.append(msgs)
    return out
