"""Answer prompts with a model; one JSON line per prompt (`id`, `prompt` messages, `response`).

    charter generate --prompts prompts.jsonl --out answers.jsonl
    charter generate --prompts hh.jsonl.gz --out a.jsonl --model smollm2 --max-new-tokens 128 \\
        --temperature 0.7 --seed 1 --limit 50

Prompts: JSONL with `prompt` (string) or `messages` (chat list), an HH-RLHF `chosen` transcript
(its first human turn), CSV with a `prompt` column, optionally gzipped; `--prompt-field` names
another field. `--backend vllm`, or `--backend openai --base-url URL`, use those engines.
Lines are appended as each batch finishes; re-running the same command skips the ids already
in `--out`, so a killed run resumes without duplicates. `OUT.settings.json` records the model
and sampling settings: a re-run with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from critique.backends.options import BackendSettings, backend_kwargs


@dataclass(kw_only=True)
class GenerateConfig(BackendSettings):
    """`backend`, `dtype`, `batch_size` and the server settings come from `BackendSettings`
    (critique/backends/options.py), shared with every command that talks to a model."""

    model: str | None = None
    """Model that answers: a model dir, a run dir, a hub id, or the served model name
    (openai); None: the embedded SmolLM2."""

    prompts: str
    """Prompts file: JSONL, CSV or HH-RLHF transcripts (.gz allowed)."""
    out: str
    """Output JSONL file (appended to; ids already there are skipped)."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens per response."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int = 0
    """Sampling seed; the same seed and inputs give the same responses."""
    prompt_field: str | None = None
    """Field that holds the prompt (default: prompt, messages, chosen, instruction, question)."""
    limit: int | None = None
    """Use only the first N prompts."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad prompt records: raise, or skip them (each reported, and counted in the summary)."""

    def validate(self) -> None:
        from charter.core.errors import CharterError

        if self.max_new_tokens < 1:
            raise CharterError("must be >= 1", field="max_new_tokens")
        if self.temperature < 0:
            raise CharterError("must be >= 0", field="temperature")
        if not 0 < self.top_p <= 1:
            raise CharterError("must be in (0, 1]", field="top_p")
        if self.batch_size < 1:
            raise CharterError("must be >= 1", field="batch_size")
        if self.limit is not None and self.limit < 1:
            raise CharterError("must be >= 1", field="limit")
        backend_kwargs(self)  # server settings given with a local backend, ... (fail early)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from charter.core.config import add_config_args

    p.add_argument("--config", metavar="YAML", help="YAML file with these settings; "
                   "flags given on the command line override it")
    add_config_args(p, GenerateConfig)


# Settings that change what a response is: an output made with others is not resumed.
RESPONSE_SETTINGS = ("backend", "model", "dtype", "max_model_len", "tokenizer",
                     "backend_options", "max_new_tokens", "temperature", "top_p", "seed",
                     "prompt_field")


def guard_settings(cfg: GenerateConfig) -> None:
    """`OUT.settings.json` records the settings of the responses in OUT; a re-run with other
    settings is refused (it would mix answers from two models or samplers in one file)."""
    from pathlib import Path

    from charter.core.errors import CharterError
    from charter.core.rundir import RunFolder

    out = Path(cfg.out)
    guard = RunFolder(out.parent, state=out.name + ".settings.json", key=None, what="responses",
                      output=out, advice="use another --out or move it away")
    now = {k: getattr(cfg, k) for k in RESPONSE_SETTINGS}
    old = guard.stored()
    if old is not None:
        guard.check(now, stored=old, current_only=True)
        return
    if out.exists() and out.stat().st_size > 0:
        raise CharterError(f"this file already holds records, made with unknown settings (no "
                           f"{guard.state} beside it); use another --out or move it away",
                           path=out, field="out")
    guard.record(now)


def run_generate(cfg: GenerateConfig, backend=None) -> dict:
    """Answer every prompt not yet in `cfg.out`; returns counts."""
    from charter.core.records import JsonlAppender, load_jsonl_for_resume, read_prompts
    from charter.core.writable import check_output
    from critique.backends import Sampling
    from critique.backends.context import check_context
    from critique.backends.options import build_backend, spec_of

    errors: list[str] = []
    items = read_prompts(cfg.prompts, prompt_field=cfg.prompt_field, on_error=cfg.on_error,
                         errors=errors)
    if cfg.limit is not None:
        items = items[:cfg.limit]
    check_output(cfg.out, is_dir=False)  # writable, before anything is read or loaded
    guard_settings(cfg)  # an output made with other settings is refused, not mixed into
    done = {r.get("id") for r in load_jsonl_for_resume(cfg.out)}
    seen: set[str] = set()
    todo = []
    for it in items:  # duplicate prompts in the input are answered once
        if it.id not in done and it.id not in seen:
            todo.append(it)
            seen.add(it.id)
    if todo and backend is None:
        todo = check_context(todo, cfg, cfg.on_error, errors)  # before the model loads
        backend = build_backend(spec_of(cfg, cfg.model))
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    chunks = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    bar = chunks
    if len(chunks) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(chunks, desc="prompts", unit="batch")
    with JsonlAppender(cfg.out) as out:
        for chunk in bar:
            for it, texts in zip(chunk, _answers(backend, chunk, sampling, cfg, errors)):
                if texts is not None:
                    out.append({"id": it.id, "prompt": it.messages, "response": texts[0]})
    return {"prompts": len(items), "skipped": len(items) - len(todo), "written": len(todo),
            "input_errors": errors}


def _answers(backend, chunk: list, sampling, cfg: GenerateConfig, errors: list[str]) -> list:
    """The backend's answers to a chunk. With --on-error skip, a reply that stays malformed
    after the backend's retries is reported for its record (FILE:LINE) and skipped (None); an
    unreachable server still stops the run (the re-run resumes)."""
    from critique.backends.replies import ReplyError

    try:
        return backend.generate([it.messages for it in chunk], sampling)
    except ReplyError:
        if cfg.on_error != "skip":
            raise
    out = []
    for it in chunk:  # one by one, to find the records whose replies are bad
        try:
            out.extend(backend.generate([it.messages], sampling))
        except ReplyError as e:
            errors.append(f"{it.source}: server reply: {e}")
            out.append(None)
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from charter.core.config import build_config

    cfg = build_config(GenerateConfig, args, getattr(args, "config", None))
    counts = run_generate(cfg)
    for e in counts["input_errors"]:
        print(f"charter generate: skipped: {e}", file=sys.stderr)
    if counts["input_errors"]:
        print(f"{len(counts['input_errors'])} bad records skipped", file=sys.stderr)
    print(f"{cfg.out}: wrote {counts['written']} responses "
          f"({counts['skipped']} already there)", file=sys.stderr)
    return 0
