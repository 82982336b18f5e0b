"""The critique-and-revise loop: SL-CAI data from a constitution (Bai et al. 2022, §3).

    charter critique --constitution principles/harmless.yaml \\
        --prompts examples/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 64 --out runs/crit

For each prompt the model answers; then, for `rounds` rounds, a principle is drawn (seeded by
seed, record id and round, `constitution.draw`), the model critiques its latest response under
it and revises the response (the conversation grows as in `critique.revise.conversation`). Work is
batched across prompts per step: a chunk of `batch_size` prompts goes through one `generate`
call for all initial responses, then one for all round-1 critiques, one for the round-1
revisions, and so on; then the chunk's records are appended to `OUT/records.jsonl` (flushed and
fsynced), so a killed run loses at most the chunk in flight.

Rules applied to every output (`critique.revise.cleaning`):
- echoes ("Revision:", "Sure, here is a revised response:", quotes, later turns) are stripped;
- an empty, looping or copied output flags the record (`step:reason`, e.g. `revision:loop`):
  the record keeps the raw text, does no further rounds, is counted in the manifest and is left
  out of the exports. Never fatal;
- a critique that says there is nothing to fix keeps the response as that round's revision and
  asks for no revision (saves compute; asking a small model to revise a harmless answer teaches
  it to refuse).

Record ids are `content_id(prompt messages, input response, provenance)`; the provenance holds
every setting that changes outputs (model, backend, sampling, seed, rounds, few-shot count,
constitution name and sha256). Re-running the same command skips finished ids; a different
constitution or setting in the same `--out` is refused (`critique.revise.outputs.check_resumable`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import (
    JsonlAppender,
    PromptItem,
    RevisionRecord,
    content_id,
    load_jsonl_for_resume,
    read_prompts,
)
from constitution import Constitution, draw, load_constitution
from critique.backends.base import Backend, Conversation, Sampling, by_length
from critique.backends.context import check_context
from critique.backends.options import build_backend, spec_of
from critique.revise import outputs
from critique.revise.cleaning import checked, says_nothing_to_fix, shared_phrases
from critique.revise.config import CritiqueConfig, provenance
from critique.revise.conversation import Dialogue


class _Steps:
    """Sends one batched generate call per step and keeps per-step counters. The policy writes
    the initial answers; every other step is the teacher's (the policy itself by default)."""

    def __init__(self, backend: Backend, cfg: CritiqueConfig, teacher: Backend | None = None):
        self.policy = backend
        self.teacher = teacher or backend
        self.response = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        self.critique = dataclasses.replace(
            self.response, max_new_tokens=cfg.critique_max_new_tokens or cfg.max_new_tokens)
        self.stats: dict[str, Counter] = {}

    def __call__(self, step: str, conversations: list[Conversation],
                 sampling: Sampling, prefix: str = "") -> list[str]:
        if not conversations:
            return []
        backend = self.policy if step == "initial" else self.teacher
        before = backend.usage.generated_tokens
        t0 = time.perf_counter()
        if prefix:  # the reply starts with `prefix`; the text returned includes it
            out = backend.generate(conversations, sampling,
                                   prefixes=[prefix] * len(conversations))
            out = [[prefix + t for t in texts] for texts in out]
        else:
            out = backend.generate(conversations, sampling)
        s = self.stats.setdefault(step, Counter())
        s["calls"] += 1
        s["conversations"] += len(conversations)
        s["seconds"] += time.perf_counter() - t0
        s["generated_tokens"] += backend.usage.generated_tokens - before
        if len(out) != len(conversations):
            raise RuntimeError(f"backend returned {len(out)} results for "
                               f"{len(conversations)} conversations")
        return [texts[0] if texts else "" for texts in out]


def _initial(dialogues: list[Dialogue], items: dict[str, PromptItem], steps: _Steps) -> None:
    """Initial responses: from the input's `response` field where given, else one batch."""
    todo = []
    for d in dialogues:
        given = items[d.id].response
        if given is not None and given.strip():
            d.set_initial(given.strip())
        else:
            todo.append(d)
    texts = steps("initial", [d.prompt for d in todo], steps.response)
    for d, raw in zip(todo, texts):
        text, why = checked(raw, False)
        if why:
            d.fail("initial", why, raw)
        else:
            d.set_initial(text)


def _round(dialogues: list[Dialogue], r: int, constitution: Constitution, cfg: CritiqueConfig,
           steps: _Steps) -> None:
    """One critique step and one revision step for every active dialogue of the chunk."""
    seed = cfg.seed
    active = [d for d in dialogues if d.active]
    common = shared_phrases([_example_texts([e]) for e in constitution.few_shot])
    pool = constitution.critique_principles
    convs = []
    for d in active:
        principle = draw(pool, 1, seed, d.id, r)[0]  # seeded by (seed, record, round)
        convs.append(d.critique_conversation(constitution, principle))
    texts = steps("critique", convs, steps.critique)
    revise = []
    for d, raw in zip(active, texts):
        text, why = checked(raw, False, requests=d.requests() + [d.request], quoted=d.quoted(),
                            examples=_example_texts(d.examples), common=common)
        if why:
            d.fail("critique", why, raw)
            continue
        d.add_critique(text)
        if cfg.trust_ok_critiques and says_nothing_to_fix(text):
            d.keep_response()
        else:
            revise.append(d)
    convs = [d.revision_conversation(constitution) for d in revise]
    texts = steps("revision", convs, steps.response, cfg.revision_prefix)
    for d, raw in zip(revise, texts):
        # a looping revision keeps its clean opening sentences (cfg.salvage)
        text, why = checked(raw, cfg.salvage, requests=d.requests() + [d.request],
                            critique=d.critique, quoted=d.quoted(),
                            examples=_example_texts(d.examples), common=common)
        if why:
            d.fail("revision", why, raw)
        else:
            d.add_revision(text)


def _example_texts(examples: list) -> list[str]:
    """What an output must not copy from the few-shot examples it was shown: their responses,
    critiques and revisions."""
    return list(dict.fromkeys(t for e in examples for t in (e.response, e.critique, e.revision)))


def _distill(dialogues: list[Dialogue], constitution: Constitution, steps: _Steps,
             salvage_ok: bool = True) -> None:
    """mode distill: the teacher answers each prompt with the constitution in its context; the
    answer is the record's one revision (principle id `constitution`)."""
    active = [d for d in dialogues if d.active]
    texts = steps("distill", [d.distill_conversation(constitution) for d in active],
                  steps.response)
    for d, raw in zip(active, texts):
        # as for revisions: a looping answer keeps its clean opening sentences
        text, why = checked(raw, salvage_ok, requests=[d.request],
                            examples=_example_texts(d.examples))
        if why:
            d.fail("distill", why, raw)
        else:
            d.add_answer(text)


def _examples(constitution: Constitution, cfg: CritiqueConfig, rid: str) -> list:
    """Up to `few_shot` examples, drawn per record (seeded by seed and record id, so a model
    does not copy one example everywhere), kept in the principle file's order."""
    pool = constitution.few_shot
    if cfg.few_shot_changed_only:
        pool = [e for e in pool if e.revision.strip() != e.response.strip()]
    if not cfg.few_shot or not pool:
        return []
    drawn = draw(range(len(pool)), cfg.few_shot, cfg.seed, rid, "few_shot")
    return [pool[i] for i in sorted(drawn)]


def _record(d: Dialogue, prov: dict) -> RevisionRecord:
    final = d.rounds[-1].revision if d.rounds else d.initial
    return RevisionRecord(id=d.id, prompt=d.prompt, initial_response=d.initial,
                          rounds=d.rounds, final_response=final, provenance=prov,
                          flagged=d.flagged)


def _progress(cfg: CritiqueConfig, total: int, done: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="prompt",
                disable=not cfg.progress, file=sys.stderr)


def _selection(path: str, cfg: CritiqueConfig, limit: int | None, errors: list[str],
               prov: dict, kind: str) -> tuple[list[PromptItem], int]:
    """The prompts to process, deduplicated by record id (id = content hash), and the number
    of duplicates dropped."""
    items = read_prompts(path, cfg.prompt_field if kind == "critique" else None,
                         cfg.on_error, errors)
    items = items[:limit] if limit else items
    items = check_context(items, cfg, cfg.on_error, errors)  # each fits, before the model loads
    seen: dict[str, PromptItem] = {}
    for it in items:
        rid = content_id(kind, it.messages, it.response if kind == "critique" else None, prov)
        seen.setdefault(rid, dataclasses.replace(it, id=rid))
    return list(seen.values()), len(items) - len(seen)


def run_critique(cfg: CritiqueConfig, backend: Backend | None = None,
                 teacher_backend: Backend | None = None) -> dict:
    """Run (or resume) the loop; write records, exports and the manifest; return the manifest.

    `backend` is the policy (initial answers); `teacher_backend` critiques and revises, or
    answers under the constitution (default: `cfg.teacher` loaded here, else the policy)."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    constitution = load_constitution(cfg.constitution)
    if not constitution.critique_principles:
        raise CharterError("no principle has critique and revision templates",
                           path=constitution.path, field="principles")
    prov = provenance(cfg, constitution, backend, teacher_backend)
    outputs.check_resumable(out, prov, constitution)
    errors: list[str] = []
    items, duplicates = _selection(cfg.prompts, cfg, cfg.limit, errors, prov, "critique")
    helpful: list[PromptItem] = []
    helpful_dups = 0
    if cfg.helpful_prompts:
        helpful, helpful_dups = _selection(cfg.helpful_prompts, cfg, cfg.helpful_limit, errors,
                                           prov, "helpful")
    warnings = []
    if cfg.few_shot > len(constitution.few_shot):
        warnings.append(f"--few-shot {cfg.few_shot} but the principle file has "
                        f"{len(constitution.few_shot)} few-shot example(s); using those")
    for w in warnings:
        print(f"charter critique: warning: {w}", file=sys.stderr)

    outputs.run_folder(out).claim()  # writable, with free space, locked, before any model loads
    outputs.save_constitution(out, constitution)
    base = outputs.manifest_base(cfg, prov, constitution)
    outputs.write_manifest(out, {**base, "status": "running"})
    records_path, helpful_path = out / outputs.RECORDS, out / outputs.HELPFUL
    done_ids = {r["id"] for r in load_jsonl_for_resume(records_path)}
    done_helpful = {r["id"] for r in load_jsonl_for_resume(helpful_path)}
    todo = [it for it in items if it.id not in done_ids]
    todo_helpful = [it for it in helpful if it.id not in done_helpful]

    built = []
    if backend is None and (todo or todo_helpful):
        backend = build_backend(spec_of(cfg, cfg.model))
        built.append(backend)
    if teacher_backend is None and cfg.teacher is not None and cfg.teacher != cfg.model \
            and (todo or todo_helpful):
        teacher_backend = build_backend(spec_of(cfg, cfg.teacher))
        built.append(teacher_backend)
    steps = _Steps(backend, cfg, teacher_backend) if backend is not None else None
    try:
        if todo:
            _critique_chunks(cfg, constitution, todo, len(items), steps, prov, records_path)
        if todo_helpful:
            _helpful_chunks(cfg, todo_helpful, len(helpful), steps, prov, helpful_path)
    finally:
        for b in built:
            b.close()

    manifest = outputs.finish(
        out, base, items=items, helpful=helpful, steps=steps.stats if steps else {},
        backend=backend, new=len(todo), new_helpful=len(todo_helpful), duplicates=duplicates,
        helpful_duplicates=helpful_dups, input_errors=errors, warnings=warnings,
        seconds=time.perf_counter() - t_start)
    return manifest


def _critique_chunks(cfg: CritiqueConfig, constitution: Constitution, todo: list[PromptItem],
                     total: int, steps: _Steps, prov: dict, records_path: Path) -> None:
    by_id = {it.id: it for it in todo}
    todo = by_length(todo)  # similar lengths share a batch (less padding)
    bar = _progress(cfg, total, total - len(todo), "critique")
    flagged = 0
    with JsonlAppender(records_path) as sink, bar:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            dialogues = [Dialogue(it.id, it.messages, _examples(constitution, cfg, it.id))
                         for it in chunk]
            _initial(dialogues, by_id, steps)
            if cfg.mode == "distill":
                _distill(dialogues, constitution, steps, cfg.salvage)
            else:
                for r in range(cfg.rounds):
                    _round(dialogues, r, constitution, cfg, steps)
            for d in dialogues:
                sink.append(_record(d, prov).to_dict())
            flagged += sum(not d.active for d in dialogues)
            bar.set_postfix(flagged=flagged, refresh=False)
            bar.update(len(chunk))


def _helpful_chunks(cfg: CritiqueConfig, todo: list[PromptItem], total: int, steps: _Steps,
                    prov: dict, helpful_path: Path) -> None:
    """Plain answers to benign prompts, appended to helpful.jsonl (same resume path)."""
    todo = by_length(todo)  # similar lengths share a batch (less padding)
    bar = _progress(cfg, total, total - len(todo), "helpful")
    with JsonlAppender(helpful_path) as sink, bar:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            texts = steps("helpful", [it.messages for it in chunk], steps.response)
            for it, raw in zip(chunk, texts):
                text, why = checked(raw, False)
                sink.append({"id": it.id, "prompt": it.messages,
                             "response": raw if why else text, "provenance": prov,
                             "flagged": f"helpful:{why}" if why else None})
            bar.update(len(chunk))
