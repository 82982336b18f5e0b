"""Training data: read SFT conversations and preference pairs, tokenise once into token ids.

Inputs (`--data`): every TRL dataset shape, from JSONL / JSON / CSV / parquet files, run
folders, `save_to_disk` folders or `datasets` hub names (training/shapes.py reads and converts
them). Conversational rows go through the model's chat template; standard (string) rows are
tokenised as plain text exactly as TRL does (EOS appended to completions; the completion starts
where the ids of prompt and prompt+completion diverge), so a file trains on the same tokens here
and in TRL.

For conversational rows, tokenisation keeps the prompt/response boundary exact: the templated prompt (with the generation
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
from charter.core.tokens import common_prefix_len
from training import shapes

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
    """Rows read from `path`, with where each came from (for error messages) and their shape."""

    rows: list  # SFT: list[Message] | ChatCompletion | TextSFT; DPO: PreferencePair | TextPair
    sources: list[tuple[str, int | None]]
    path: Path | str  # the file or dataset directory actually read, or the hub name
    shape: str = ""  # TRL's name of the data's shape, e.g. "preference, implicit prompt (...)"


def _load(path: str | os.PathLike, kind: str, split: str, hh_transcripts: str) -> Loaded:
    got = shapes.read_rows(path, kind, split)
    rows, shape = shapes.convert(got, kind, hh_transcripts)
    return Loaded(rows, got.sources, got.path, shape)


def load_sft_rows(path: str | os.PathLike, split: str = "train",
                  hh_transcripts: str = "chat") -> Loaded:
    """SFT rows of any TRL SFT shape (training/shapes.py)."""
    return _load(path, "sft", split, hh_transcripts)


def load_pair_rows(path: str | os.PathLike, split: str = "train",
                   hh_transcripts: str = "chat") -> Loaded:
    """Preference rows of any TRL preference shape (training/shapes.py)."""
    return _load(path, "dpo", split, hh_transcripts)


def drop_degenerate_pairs(loaded: Loaded) -> list[str]:
    """Remove pairs whose chosen equals rejected (no preference to learn: their DPO gradient is
    zero and they only dilute the batch); return where each came from. None left: an error."""
    keep, dropped = [], []
    for row, src in zip(loaded.rows, loaded.sources):
        if row.chosen == row.rejected:
            dropped.append(_where(src))
        else:
            keep.append((row, src))
    if dropped and not keep:
        raise CharterError(f"every pair has chosen equal to rejected ({len(dropped)} pairs); "
                           "expected two different responses", path=loaded.path, field="data")
    loaded.rows, loaded.sources = [r for r, _ in keep], [s for _, s in keep]
    return dropped


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


def _plain(tok, text: str) -> list[int]:
    """TRL's tokenisation of standard (string) data: the tokenizer's own call, no template."""
    return tok(text)["input_ids"]


def _with_eos(tok, text: str) -> str:
    """TRL appends the EOS token to standard completions that lack it."""
    eos = tok.eos_token
    return text if not eos or text.endswith(eos) else text + eos


def _encode_text_sft(tok, row: shapes.TextSFT, source, max_length: int | None) -> SFTExample:
    """As TRL's SFTTrainer: tokenise prompt and prompt+completion+EOS as plain text; the
    completion starts where they diverge; `text` rows (prompt "") train on every token."""
    full = _plain(tok, row.prompt + _with_eos(tok, row.completion))
    first = common_prefix_len(_plain(tok, row.prompt), full) if row.prompt else 0
    labels = [IGNORE] * first + full[first:]
    if first >= len(full):
        raise CharterError("no completion tokens to train on", path=source[0], line=source[1],
                           field="completion")
    if max_length and len(full) > max_length:
        keep_p, keep_r = truncation(first, len(full) - first, max_length)
        full, labels = full[first - keep_p:first + keep_r], labels[first - keep_p:first + keep_r]
    return SFTExample(full, labels, _where(source))


def encode_sft(tok, messages, source: tuple[str, int | None],
               max_length: int | None = None) -> SFTExample:
    """Input ids with labels on every assistant turn's tokens (IGNORE elsewhere); for a
    prompt-completion row only the completion's turns; standard rows as plain text."""
    if isinstance(messages, shapes.TextSFT):
        return _encode_text_sft(tok, messages, source, max_length)
    first_turn = 1
    if isinstance(messages, shapes.ChatCompletion):
        first_turn = len(messages.prompt)
        messages = messages.prompt + messages.completion
    full = render_ids(tok, messages, False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_turn:
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


def _text_pair_ids(tok, pair: shapes.TextPair) -> tuple[list[int], list[int], list[int]]:
    """As TRL's DPOTrainer on standard data: EOS appended to both responses, prompt and
    prompt+response tokenised as plain text, responses start where the ids diverge."""
    prompt = _plain(tok, pair.prompt)
    pc = _plain(tok, pair.prompt + _with_eos(tok, pair.chosen))
    pr = _plain(tok, pair.prompt + _with_eos(tok, pair.rejected))
    n = min(common_prefix_len(prompt, pc), common_prefix_len(prompt, pr))
    return prompt[:n], pc[n:], pr[n:]


def encode_pair(tok, pair, source: tuple[str, int | None],
                max_length: int | None = None, max_prompt_length: int | None = None
                ) -> PairExample:
    """Prompt ids and each response's ids, the boundary checked for both responses; standard
    (string) pairs as plain text, as TRL tokenises them."""
    if isinstance(pair, shapes.TextPair):
        prompt, chosen, rejected = _text_pair_ids(tok, pair)
    else:
        prompt = render_ids(tok, pair.prompt, True)
        parts = []
        for name, resp in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            full = render_ids(tok, pair.prompt + resp, False)
            _check_prefix(tok, prompt, full, source, f"prompt (with the {name} response)")
            parts.append(full[len(prompt):])
        chosen, rejected = parts
    if max_prompt_length and len(prompt) > max_prompt_length:  # keep the end, as TRL does
        prompt = prompt[len(prompt) - max_prompt_length:]
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


def tokenise_pairs(tok, loaded: Loaded, max_length: int | None, progress: bool = True,
                   max_prompt_length: int | None = None) -> list[PairExample]:
    from tqdm.auto import tqdm

    it = zip(loaded.rows, loaded.sources)
    return [encode_pair(tok, p, s, max_length, max_prompt_length) for p, s in
            tqdm(it, total=len(loaded.rows), desc="tokenise", disable=not progress)]


def pairs_fingerprint(examples: list[PairExample]) -> str:
    """A hash of the token ids (what the reference log-probs depend on, with the model)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


def data_provenance(path: Path | str) -> dict:
    """The data file's hash and, where a manifest/report beside it has one, the constitution's."""
    out: dict = {"data": str(path)}
    path = Path(path)
    if not path.exists():  # a datasets hub name
        return out
    if path.is_file():
        out["data_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = path if path.is_dir() else path.parent
    for name in ("manifest.json", "report.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            found = find_constitution(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if found:
            out["constitution_sha256"] = found["sha256"]
            if "name" in found:
                out["constitution_name"] = found["name"]
            break
    return out


def find_constitution(obj) -> dict | None:
    """{"sha256", "name"?} of the constitution named anywhere in a manifest or report."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "constitution" in k and isinstance(v, str) and len(v) == 64:
                out = {"sha256": v}  # label's report: "constitution_sha256", "constitution"
                name = obj.get("constitution_name", obj.get("constitution"))
                return {**out, "name": name} if isinstance(name, str) and name != v else out
            if "constitution" in k and isinstance(v, dict) and isinstance(v.get("sha256"), str):
                # critique's manifest: "constitution": {"name", "sha256"}
                return {k2: v[k2] for k2 in ("sha256", "name") if isinstance(v.get(k2), str)}
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for v in children:
        found = find_constitution(v)
        if found:
            return found
    return None
