"""AI preference labelling from a constitution (RL-CAI feedback, Bai et al. 2022 §4).

    charter label --constitution principles/harmless.yaml --pairs pairs.jsonl --out runs/labels
    charter label --constitution principles/harmless.yaml --prompts prompts.jsonl \\
        --policy runs/sft --samples 4 --principles-per-pair 4 --out runs/prefs

The labeller reads the conversation, a preference principle and two responses as a
multiple-choice question; the label is the normalised probability of "(A)" vs "(B)" from the
option log-probs (`backend.score`), never parsed from generated text. Every comparison is read in
both orders and averaged, which cancels a labeller's preference for a position (Lee et al. 2023
report it matters most for small labellers); `position_bias` in report.json says how strong it
was. P principles are drawn per pair (seeded by the pair id) and their labels averaged.

Pairs mode (`--pairs`): JSONL with `id`, `prompt` (messages or a string), `response_a`,
`response_b`, optional `preferred` (a/b) → `labels.jsonl` (`id`, `p_a`, `orders`, `votes`, ...).
Prompts mode (`--prompts`): K responses per prompt are sampled from the policy, every pair of
distinct responses (or a seeded subset of `pairs_per_prompt`) is labelled → `pairs.jsonl` in
TRL's conversational prompt/chosen/rejected format with `p_chosen`, `votes`, `orders`,
`low_margin` and provenance. `--mode rate` rates each response 1-10 instead (expected rating
over the score tokens) and pairs the best with the worst.

Crash safety: records are appended as each chunk finishes; a re-run with the same settings skips
what is done (prompts mode also keeps `prompts_done.jsonl`), and refuses a directory made with
different settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

from charter.core.config import config_to_dict
from charter.core.errors import CharterError
from charter.core.records import (
    JsonlAppender,
    LabelRecord,
    PreferencePair,
    PromptDone,
    content_id,
    load_jsonl_for_resume,
    read_prompts,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from charter.core.rundir import RunFolder, same_place
from constitution import draw, load_constitution
from critique.backends.base import Sampling, by_length, not_continued
from critique.backends.context import check_context
from critique.backends.options import build_backend, spec_of
from critique.label.config import PATH_SETTINGS, RESUME_FREE, LabelConfig
from critique.label.inputs import LabelPair, read_label_pairs  # noqa: F401  (re-exported)
from critique.label.report import build_report, write_diagnostics
from critique.preference.labelmath import (
    low_margin,
)
from critique.preference.score import (  # noqa: F401  (compare_pairs re-exported)
    CompareSettings,
    compare_pairs,
    rate_responses,
)

# ---------------------------------------------------------------------------------------------
# the run


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _open_run(out: Path, cfg: LabelConfig, constitution_sha: str) -> None:
    """Claim `out` (writable, locked); refuse to resume into a folder made with different
    settings (paths compared by place: a moved run folder resumes); else record them."""
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}
    settings["constitution_sha256"] = constitution_sha
    guard = RunFolder(out, state="config.json", key="settings", what="labels")
    guard.claim()
    has_records = any((out / name).exists() and (out / name).stat().st_size > 0
                      for name in ("labels.jsonl", "pairs.jsonl", "prompts_done.jsonl"))
    if has_records:  # a run that saved nothing (bad model path...) may change its settings
        guard.check(settings, same=same_place((guard.read() or {}).get("folder"), out,
                                              PATH_SETTINGS))
    guard.record({"settings": settings, "folder": os.path.abspath(out),
                  "config": config_to_dict(cfg)})


def run_label(cfg: LabelConfig, backend=None, policy_backend=None, second_backend=None) -> dict:
    """Label pairs or sampled responses per `cfg`; returns report.json's content.

    `backend` labels, `policy_backend` samples (prompts mode) and `second_backend` relabels the
    low-margin pairs (`relabel_below`); those not given are loaded here from `cfg`."""
    cfg.validate()
    constitution = load_constitution(cfg.constitution)
    pool = constitution.preference_principles
    if not pool:
        raise CharterError("no principle has a `preference` template; labelling needs at "
                           "least one", path=constitution.path, field="principles")
    # read the input first: a bad file fails before anything is written
    input_errors: list[str] = []
    if cfg.pairs:
        items = read_label_pairs(cfg.pairs, cfg.on_error, input_errors)[: cfg.limit]
    else:
        items = read_prompts(cfg.prompts, cfg.prompt_field, cfg.on_error,
                             input_errors)[: cfg.limit]
        # each prompt fits the sampling policy's context, before any model loads
        items = check_context(items, cfg, cfg.on_error, input_errors, model=cfg.policy)
    out = Path(cfg.out)
    _open_run(out, cfg, constitution.sha256)  # before any model loads
    write_text_atomic(out / "constitution.yaml", constitution.source_text)
    owned = []
    if backend is None:
        backend = build_backend(spec_of(cfg, cfg.labeler_model))
        owned.append(backend)
    if cfg.prompts and policy_backend is None:
        if cfg.labeler is None or cfg.labeler == cfg.policy:
            policy_backend = backend  # the same model: load it once
        else:
            policy_backend = build_backend(spec_of(cfg, cfg.policy))
            owned.append(policy_backend)
    if cfg.relabel_below and second_backend is None and cfg.second_labeler is not None:
        second_backend = build_backend(spec_of(cfg, cfg.second_labeler))
        owned.append(second_backend)
    provenance = {"labeler": backend.model_name, "backend": backend.name,
                  "constitution": constitution.name,
                  "constitution_sha256": constitution.sha256, "mode": cfg.mode,
                  "cot": cfg.cot, "seed": cfg.seed}
    start = time.monotonic()
    try:
        if cfg.pairs:
            records, done_now, extra = _run_pairs(cfg, items, out, constitution, pool, backend)
        else:
            provenance.update(policy=policy_backend.model_name,
                              policy_backend=policy_backend.name, temperature=cfg.temperature,
                              top_p=cfg.top_p, samples=cfg.samples)
            if cfg.relabel_below:
                provenance["second_labeler"] = (
                    {"model": second_backend.model_name, "backend": second_backend.name}
                    if second_backend is not None else {"model": backend.model_name,
                                                        "backend": backend.name, "cot": True})
            records, done_now, extra = _run_prompts(cfg, items, out, constitution, pool,
                                                    backend, policy_backend, provenance,
                                                    second_backend)
    finally:
        for b in owned:
            b.close()
    seconds = time.monotonic() - start
    usage = {"labeler": dataclasses.asdict(backend.usage)}
    if policy_backend is not None and policy_backend is not backend:
        usage["policy"] = dataclasses.asdict(policy_backend.usage)
    report = build_report(records, cfg, seconds=seconds, done_now=done_now, usage=usage,
                          provenance=provenance, extra=extra)
    report["input_errors"] = {"count": len(input_errors), "first": input_errors[:20]}
    write_json_atomic(out / "report.json", report)
    write_diagnostics(out, report, records, cfg.min_margin)
    return report


def _run_pairs(cfg, items, out, constitution, pool, backend) -> tuple[list[dict], int, dict]:
    path = out / "labels.jsonl"
    records = [LabelRecord.from_dict(r, path).to_dict() for r in load_jsonl_for_resume(path)]
    done = {r["id"] for r in records}
    # similar lengths share a batch (less padding)
    todo = by_length([it for it in items if it.id not in done],
                     lambda it: [*it.messages, {"content": it.response_a + it.response_b}])
    from tqdm.auto import tqdm

    with JsonlAppender(path) as sink, tqdm(total=len(todo), desc="label pairs", unit="pair",
                                           disable=not cfg.progress) as bar:
        for chunk in _chunks(todo, cfg.batch_size):
            drawn = [draw(pool, cfg.principles_per_pair, cfg.seed, it.id) for it in chunk]
            try:
                if cfg.mode == "compare":
                    jobs = [(it.messages, it.response_a, it.response_b, d)
                            for it, d in zip(chunk, drawn)]
                    results = compare_pairs(backend, constitution, jobs, cfg)
                else:
                    jobs = [(it.messages, r, d) for it, d in zip(chunk, drawn)
                            for r in (it.response_a, it.response_b)]
                    rated = rate_responses(backend, constitution, jobs)
                    results = [_rated_pair(rated[2 * k], rated[2 * k + 1])
                               for k in range(len(chunk))]
            except CharterError as e:  # e.g. a pair longer than the model's context
                where = ", ".join(it.source for it in chunk)
                raise CharterError(f"{e}; while labelling the pairs at {where} (the "
                                   "labels before them are saved)", field=e.field) from e
            for it, res in zip(chunk, results):
                rec = LabelRecord.of(it.id, res, it.preferred).to_dict()
                sink.append(rec)
                records.append(rec)
            bar.update(len(chunk))
    return records, len(todo), {}


def _rated_pair(ra: dict, rb: dict) -> dict:
    """Pairs mode, rate mode: both ratings, their gap, and each principle's [r_a, r_b]."""
    return {"ratings": [ra["rating"], rb["rating"]], "rating_gap": ra["rating"] - rb["rating"],
            "rating_votes": {pid: [ra["votes"][pid], rb["votes"][pid]] for pid in ra["votes"]}}


def _run_prompts(cfg, prompts, out, constitution, pool, backend, policy, provenance,
                 second=None) -> tuple[list[dict], int, dict]:
    pairs_path, done_path = out / "pairs.jsonl", out / "prompts_done.jsonl"
    finished = [PromptDone.from_dict(r, done_path) for r in load_jsonl_for_resume(done_path)]
    done = {m.key for m in finished}
    records = load_jsonl_for_resume(pairs_path)
    kept = [r for r in records if r.get("prompt_key") in done]
    if len(kept) != len(records):  # pairs of a prompt cut off before its done marker
        write_jsonl_atomic(pairs_path, kept)
        records = kept
    keyed = [(content_id(p.id, p.messages), p) for p in prompts]
    todo = by_length([(k, p) for k, p in keyed if k not in done], lambda kp: kp[1].messages)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.samples,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    from tqdm.auto import tqdm

    with JsonlAppender(pairs_path) as sink, JsonlAppender(done_path) as marks, \
            tqdm(total=len(todo), desc="sample and label", unit="prompt",
                 disable=not cfg.progress) as bar:
        for chunk in _chunks(todo, cfg.batch_size):
            with not_continued(policy):  # no later call continues a sample: keep no caches
                samples = policy.generate([p.messages for _, p in chunk], sampling)
            per_prompt = []
            for (key, p), texts in zip(chunk, samples):
                # the template puts its own newline before an answer: a sample that starts with
                # whitespace would tokenise differently inside the conversation (DPO refuses it)
                unique = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
                per_prompt.append((key, p, unique, len(texts) - len(unique)))
            if cfg.mode == "compare":
                made = _compare_prompts(cfg, constitution, pool, backend, per_prompt, second)
            else:
                made = _rate_prompts(cfg, constitution, pool, backend, per_prompt)
            # a pair whose every reading lacked an option token has no label: not a pair
            unlabelled = [[r for r in pairs if r.get("p_chosen", 0.5) is None] for pairs in made]
            made = [[r for r in pairs if r.get("p_chosen", 0.5) is not None] for pairs in made]
            for (key, p, unique, skipped), pairs, lost in zip(per_prompt, made, unlabelled):
                for rec in pairs:
                    rec["provenance"] = {**provenance, "prompt_id": p.id}
                    rec["prompt_key"] = key
                    sink.append(rec)
                    records.append(rec)
                mark = PromptDone(key, p.id, len(pairs), len(unique), skipped, len(lost))
                marks.append(mark.to_dict())
                finished.append(mark)
            bar.update(len(chunk))
    extra = {"prompts": len(finished),
             "skipped_identical": sum(m.skipped_identical for m in finished),
             "prompts_without_pairs": sum(m.pairs == 0 for m in finished),
             "pairs_without_label": sum(m.unlabelled for m in finished)}
    return records, len(todo), extra


def _pair_record(messages, chosen: str, rejected: str, p_chosen: float | None, **extra) -> dict:
    """A labelled preference pair's JSONL row (`PreferencePair`, id = content hash)."""
    return PreferencePair.of(messages, chosen, rejected, id=content_id(messages, chosen, rejected),
                             p_chosen=p_chosen, **extra).to_dict()


def _compare_prompts(cfg, constitution, pool, backend, per_prompt, second=None
                     ) -> list[list[dict]]:
    """All (or a seeded subset of) pairs of each prompt's distinct responses, labelled; the
    low-margin ones relabelled (`relabel_below`). A pair no reading could label has
    p_chosen None (the caller counts it and writes no pair)."""
    jobs, owner = [], []
    for idx, (key, p, unique, _) in enumerate(per_prompt):
        combos = list(itertools.combinations(range(len(unique)), 2))
        if cfg.pairs_per_prompt is not None and len(combos) > cfg.pairs_per_prompt:
            combos = sorted(draw(combos, cfg.pairs_per_prompt, cfg.seed, key, "pairs"))
        for i, j in combos:
            pid = content_id(key, unique[i], unique[j])
            jobs.append((p.messages, unique[i], unique[j],
                         draw(pool, cfg.principles_per_pair, cfg.seed, pid)))
            owner.append(idx)
    results = compare_pairs(backend, constitution, jobs, cfg) if jobs else []
    firsts = [None] * len(results)
    if cfg.relabel_below:
        results, firsts = _relabel(cfg, constitution, jobs, results, backend, second)
    made: list[list[dict]] = [[] for _ in per_prompt]
    for (messages, ra, rb, _), res, first, idx in zip(jobs, results, firsts, owner):
        if res["p_a"] is None:
            made[idx].append({"p_chosen": None, **res})
            continue
        a_wins = res["p_a"] >= 0.5
        flip = (lambda x: x) if a_wins else (lambda x: 1.0 - x)  # to chosen's terms
        p = flip(res["p_a"])
        extra = {k: res[k] for k in ("reasoning", "missing_option_reads") if k in res}
        if first is not None:  # relabelled: the first label in the chosen response's terms
            extra["first_label"] = {"p_chosen": None if first["p_a"] is None
                                    else flip(first["p_a"]), "labeler": backend.model_name}
        rec = _pair_record(messages, ra if a_wins else rb, rb if a_wins else ra, p,
                           votes={k: flip(v) for k, v in res["votes"].items()},
                           orders=[flip(o) for o in res["orders"]],
                           vote_orders={k: [flip(o) for o in v]
                                        for k, v in res["vote_orders"].items()},
                           low_margin=low_margin(p, cfg.min_margin), **extra)
        made[idx].append(rec)
    return made


def _relabel(cfg, constitution, jobs, results, backend, second) -> tuple[list, list]:
    """Relabel the jobs whose label is within `relabel_below` of 0.5 (or has none): by the
    second labeller, else by the labeller with chain of thought. Returns (results, first labels
    of the relabelled jobs, None elsewhere)."""
    low = [k for k, r in enumerate(results)
           if r["p_a"] is None or abs(r["p_a"] - 0.5) < cfg.relabel_below]
    firsts: list = [None] * len(results)
    if not low:
        return results, firsts
    rcfg = cfg if second is not None else dataclasses.replace(cfg, cot=True)
    again = compare_pairs(second or backend, constitution, [jobs[k] for k in low], rcfg)
    results = list(results)
    for k, res in zip(low, again):
        if res["p_a"] is None and results[k]["p_a"] is not None:
            continue  # the second labeller could not read it either: the first label stays
        firsts[k] = results[k]
        results[k] = res
    return results, firsts


def _rate_prompts(cfg, constitution, pool, backend, per_prompt) -> list[list[dict]]:
    """Rate every distinct response under the prompt's principles; pair best with worst."""
    jobs, owner = [], []
    drawn = {}
    for idx, (key, p, unique, _) in enumerate(per_prompt):
        if len(unique) < 2:
            continue
        drawn[idx] = draw(pool, cfg.principles_per_pair, cfg.seed, key)
        for r in unique:
            jobs.append((p.messages, r, drawn[idx]))
            owner.append(idx)
    rated = rate_responses(backend, constitution, jobs) if jobs else []
    made: list[list[dict]] = [[] for _ in per_prompt]
    for idx, (_, p, unique, _) in enumerate(per_prompt):
        mine = [res for res, o in zip(rated, owner) if o == idx]
        if not mine:
            continue
        ratings = [m["rating"] for m in mine]
        best = max(range(len(mine)), key=lambda k: ratings[k])
        worst = min(range(len(mine)), key=lambda k: ratings[k])
        lower = [k for k in range(len(mine)) if ratings[k] < ratings[best]]
        if cfg.rate_rejected == "random" and lower:  # UltraFeedback's binarisation
            worst = draw(lower, 1, cfg.seed, p.id, "rejected")[0]
        if best == worst:  # all ratings equal: pick distinct slots, the gap is 0
            best, worst = 0, 1
        gap = ratings[best] - ratings[worst]
        rec = _pair_record(p.messages, unique[best], unique[worst], None, rating_gap=gap,
                           ratings=ratings, chosen_index=best, rejected_index=worst,
                           rating_votes={pid: [mine[best]["votes"][pid],
                                               mine[worst]["votes"][pid]]
                                         for pid in mine[best]["votes"]},
                           low_margin=gap < cfg.min_rating_gap)
        made[idx].append(rec)
    return made
