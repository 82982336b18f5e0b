"""Training data: read SFT conversations and preference pairs, tokenise once into token ids.

Inputs (`--data`):
- a JSONL file (`.jsonl`/`.jsonl.gz`): SFT rows with `messages`, or preference rows with
  `prompt`/`chosen`/`rejected` (chat lists or strings) and optional `p_chosen`;
- a directory holding our `sft.jsonl` / `pairs.jsonl` (a critique or label run's output);
- a `datasets` dataset saved with `save_to_disk` (a DatasetDict uses its `train` split).

Tokenisation keeps the prompt/response boundary exact: the templated prompt (with the generation
prompt) is tokenised alone, then the whole templated conversation; the prompt ids must be a prefix
of the full ids, otherwise the template re-tokenises differently at the boundary and we name the
example instead of training on misaligned labels.

SFT trains on every assistant turn of a conversation (multi-turn data teaches all of them), and
masks system/user tokens and the template's generation prompt.

Truncation to `max_length` tokens (`truncation`): the response keeps its start and the prompt
keeps its end (the part nearest the response); the prompt gives up tokens first but keeps at
least half the budget when the response alone would fill it. For pairs, chosen and rejected
share one truncated prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import read_pairs, read_sft, validate_messages

IGNORE = -100


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on non-assistant tokens
    source: str  # FILE:LINE or DIR[row N]


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (prompt excluded)
    rejected_ids: list[int]
    p_chosen: float | None
    source: str


@dataclass
class Loaded:
    """Rows read from `path`, with where each came from (for error messages)."""

    rows: list  # list[list[Message]] for SFT, list[PreferencePair] for DPO
    sources: list[tuple[str, int | None]]
    path: Path  # the file or dataset directory actually read


def _is_saved_dataset(d: Path) -> bool:
    return any((d / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def resolve_data_path(path: str | os.PathLike, kind: str) -> Path:
    """`kind` is "sft" or "dpo"; a run directory resolves to its sft.jsonl / pairs.jsonl."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CharterError("data not found", path=p, field="data")
    if p.is_dir():
        name = "sft.jsonl" if kind == "sft" else "pairs.jsonl"
        if (p / name).exists():
            return p / name
        if not _is_saved_dataset(p):
            raise CharterError(f"expected {name} in this directory, or a dataset saved with "
                               "datasets' save_to_disk", path=p, field="data")
    return p


def _disk_rows(d: Path) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(d))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise CharterError(f"dataset has splits {sorted(ds)}, no 'train'", path=d,
                               field="data")
        ds = ds["train"]
    return list(ds)


def load_sft_rows(path: str | os.PathLike) -> Loaded:
    p = resolve_data_path(path, "sft")
    if p.is_file():
        from charter.core.records import read_jsonl

        lines = [ln for ln, _ in read_jsonl(p)]
        return Loaded(read_sft(p), [(str(p), ln) for ln in lines], p)
    rows, sources = [], []
    for i, obj in enumerate(_disk_rows(p)):
        where = f"{p}[row {i}]"
        if "messages" not in obj:
            raise CharterError("missing field: expected messages", path=where, field="messages")
        rows.append(validate_messages(obj["messages"], path=where, must_end_with="assistant"))
        sources.append((where, None))
    return Loaded(rows, sources, p)


def load_pair_rows(path: str | os.PathLike) -> Loaded:
    p = resolve_data_path(path, "dpo")
    if p.is_dir():  # a saved dataset: write it as JSONL rows and read it with the one validator
        import tempfile

        from charter.core.records import write_jsonl_atomic

        with tempfile.TemporaryDirectory() as tmp:
            rows = [dict(r) for r in _disk_rows(p)]
            f = Path(tmp) / "pairs.jsonl"
            write_jsonl_atomic(f, rows)
            try:
                pairs = read_pairs(f)
            except CharterError as e:
                raise CharterError(e.detail, path=f"{p}[row {(e.line or 1) - 1}]",
                                   field=e.field) from None
        return Loaded(pairs, [(f"{p}[row {i}]", None) for i in range(len(pairs))], p)
    from charter.core.records import read_jsonl

    lines = [ln for ln, _ in read_jsonl(p)]
    return Loaded(read_pairs(p), [(str(p), ln) for ln in lines], p)


def render_ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of the templated conversation (the template adds any BOS itself)."""
    if not getattr(tok, "chat_template", None):
        raise CharterError("the model's tokenizer has no chat template", field="model")
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_prefix(tok, prefix: list[int], full: list[int], source: tuple[str, int | None],
                  what: str) -> None:
    if full[:len(prefix)] == prefix:
        return
    i = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b),
             min(len(prefix), len(full)))
    alone = tok.decode(prefix[i:i + 3]) if i < len(prefix) else "<end>"
    inside = tok.decode(full[i:i + 3]) if i < len(full) else "<end>"
    raise CharterError(
        f"the chat template tokenises the {what} differently alone than inside the whole "
        f"conversation (token {i}: {alone!r} alone vs {inside!r} in the conversation); the "
        "prompt/response boundary would be wrong, so this example cannot be trained on; fix the "
        "template or the text at the boundary", path=source[0], line=source[1])


def truncation(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """How many prompt tokens (kept from the end) and response tokens (kept from the start)."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    keep_p = min(prompt_len, max(max_length - response_len, max_length // 2))
    return keep_p, min(response_len, max_length - keep_p)


def encode_sft(tok, messages: list[dict], source: tuple[str, int | None],
               max_length: int | None = None) -> SFTExample:
    """Input ids with labels on every assistant turn's tokens (IGNORE elsewhere)."""
    full = render_ids(tok, messages, False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        start = render_ids(tok, messages[:i], True)
        end = full if i + 1 == len(messages) else render_ids(tok, messages[:i + 1], False)
        _check_prefix(tok, start, end, source, f"conversation before assistant turn {i}")
        _check_prefix(tok, end, full, source, f"conversation up to turn {i}")
        labels[len(start):len(end)] = full[len(start):len(end)]
    first = next((k for k, v in enumerate(labels) if v != IGNORE), None)
    if first is None:
        raise CharterError("no assistant tokens to train on", path=source[0], line=source[1],
                           field="messages")
    if max_length and len(full) > max_length:
        keep_p, keep_r = truncation(first, len(full) - first, max_length)
        full = full[first - keep_p:first + keep_r]
        labels = labels[first - keep_p:first + keep_r]
    return SFTExample(full, labels, _where(source))


def encode_pair(tok, pair, source: tuple[str, int | None],
                max_length: int | None = None) -> PairExample:
    """Prompt ids and each response's ids, the boundary checked for both responses."""
    prompt = render_ids(tok, pair.prompt, True)
    parts = []
    for name, resp in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = render_ids(tok, pair.prompt + resp, False)
        _check_prefix(tok, prompt, full, source, f"prompt (with the {name} response)")
        parts.append(full[len(prompt):])
    chosen, rejected = parts
    if not chosen or not rejected:
        raise CharterError("empty response after templating", path=source[0], line=source[1],
                           field="chosen" if not chosen else "rejected")
    if max_length:
        keep_p, _ = truncation(len(prompt), max(len(chosen), len(rejected)), max_length)
        prompt = prompt[len(prompt) - keep_p:]
        chosen, rejected = chosen[:max_length - keep_p], rejected[:max_length - keep_p]
    return PairExample(prompt, chosen, rejected, pair.p_chosen, _where(source))


def _where(source: tuple[str, int | None]) -> str:
    return source[0] if source[1] is None else f"{source[0]}:{source[1]}"


def tokenise_sft(tok, loaded: Loaded, max_length: int | None, progress: bool = True
                 ) -> list[SFTExample]:
    from tqdm.auto import tqdm

    it = zip(loaded.rows, loaded.sources)
    return [encode_sft(tok, m, s, max_length) for m, s in
            tqdm(it, total=len(loaded.rows), desc="tokenise", disable=not progress)]


def tokenise_pairs(tok, loaded: Loaded, max_length: int | None, progress: bool = True
                   ) -> list[PairExample]:
    from tqdm.auto import tqdm

    it = zip(loaded.rows, loaded.sources)
    return [encode_pair(tok, p, s, max_length) for p, s in
            tqdm(it, total=len(loaded.rows), desc="tokenise", disable=not progress)]


def pairs_fingerprint(examples: list[PairExample]) -> str:
    """A hash of the token ids (what the reference log-probs depend on, with the model)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


def data_provenance(path: Path) -> dict:
    """The data file's hash and, where a manifest/report beside it has one, the constitution's."""
    out: dict = {"data": str(path)}
    if path.is_file():
        out["data_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = path if path.is_dir() else path.parent
    for name in ("manifest.json", "report.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            found = _find_constitution_hash(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if found:
            out["constitution_sha256"] = found
            break
    return out


def _find_constitution_hash(obj) -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "constitution" in k and isinstance(v, str) and len(v) == 64:
                return v  # label's report: "constitution_sha256": "..."
            if "constitution" in k and isinstance(v, dict) and isinstance(v.get("sha256"), str):
                return v["sha256"]  # critique's manifest: "constitution": {"name", "sha256"}
        for v in obj.values():
            found = _find_constitution_hash(v)
            if found:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_constitution_hash(v)
            if found:
                return found
    return None
