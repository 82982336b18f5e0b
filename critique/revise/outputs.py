"""What the critique loop leaves in its output directory, and the guard against mixing runs.

    OUT/records.jsonl      one revision record a line (append-only, never rewritten)
    OUT/helpful.jsonl      plain answers to the helpful prompts (append-only)
    OUT/sft.jsonl          `messages`: prompt + assistant final revision, plus helpful answers
    OUT/pairs.jsonl        `prompt`, `chosen` (final revision), `rejected` (initial response)
    OUT/manifest.json      resolved config, provenance, counts, principle usage, timings
    OUT/constitution.yaml  the principle file that was used, byte for byte

Exports and the manifest are rewritten atomically from the append-only files at the end of each
run, for the prompts of that run's selection, in input order. Flagged records and helpful
answers are left out of the exports; pairs whose chosen and rejected are identical are skipped
(no preference signal).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from charter.core.errors import CharterError
from charter.core.records import (
    PreferencePair,
    PromptItem,
    SFTRecord,
    load_jsonl_for_resume,
    write_jsonl_atomic,
    write_text_atomic,
)
from charter.core.rundir import RunFolder
from constitution import Constitution

RECORDS, HELPFUL = "records.jsonl", "helpful.jsonl"
SFT, PAIRS, MANIFEST, CONSTITUTION = "sft.jsonl", "pairs.jsonl", "manifest.json", \
    "constitution.yaml"


def run_folder(out: Path) -> RunFolder:
    """The guard of a critique folder: its settings are the manifest's provenance."""
    return RunFolder(out, state=MANIFEST, key="provenance", what="a run")


def check_resumable(out: Path, prov: dict, constitution: Constitution) -> None:
    """Refuse to add to a directory made with another constitution or other settings.

    The earlier settings come from `manifest.json` (written before the first record), else from
    the first record's provenance; the constitution copy must match byte for byte.
    """
    guard = run_folder(out)
    old = guard.stored()
    if old is None:
        records = load_jsonl_for_resume(out / RECORDS)
        old = records[0].get("provenance") if records else None
    guard.check(prov, stored=old)
    copy = out / CONSTITUTION
    if copy.exists() and copy.read_text(encoding="utf-8") != constitution.source_text:
        raise CharterError(f"this directory was made with another principle file "
                           f"({copy.name} differs from {constitution.path}); use a new --out",
                           path=out, field="out")


def save_constitution(out: Path, constitution: Constitution) -> None:
    """Ship the data with the principle file that made it."""
    if not (out / CONSTITUTION).exists():
        write_text_atomic(out / CONSTITUTION, constitution.source_text)


def manifest_base(cfg, prov: dict, constitution: Constitution) -> dict:
    return {
        "stage": "critique",
        "config": dataclasses.asdict(cfg),
        "provenance": prov,
        "constitution": {"name": constitution.name, "sha256": constitution.sha256,
                         "path": str(constitution.path), "copy": CONSTITUTION},
    }


def write_manifest(out: Path, manifest: dict) -> None:
    run_folder(out).record(manifest)


def _round_counts(rec: dict) -> tuple[int, int]:
    """(revised, unchanged) rounds of a finished record: unchanged = nothing to fix."""
    revised = unchanged = 0
    prev = rec["initial_response"]
    for r in rec["rounds"]:
        if r["revision"] == prev:
            unchanged += 1
        else:
            revised += 1
        prev = r["revision"]
    return revised, unchanged


def finish(out: Path, base: dict, *, items: list[PromptItem], helpful: list[PromptItem],
           steps: dict, backend, new: int, new_helpful: int, duplicates: int,
           helpful_duplicates: int, input_errors: list[str], warnings: list[str],
           seconds: float) -> dict:
    """Write sft.jsonl, pairs.jsonl and manifest.json from the append-only files."""
    records = {r["id"]: r for r in load_jsonl_for_resume(out / RECORDS)}
    answers = {r["id"]: r for r in load_jsonl_for_resume(out / HELPFUL)}
    sft, pairs = [], []
    reasons: Counter = Counter()
    usage: Counter = Counter()
    revised = unchanged = identical = 0
    for it in items:
        rec = records[it.id]
        for r in rec["rounds"]:
            usage[r["principle_id"]] += 1
        if rec.get("flagged"):
            reasons[rec["flagged"]] += 1
            continue
        rv, un = _round_counts(rec)
        revised, unchanged = revised + rv, unchanged + un
        sft.append(SFTRecord.of(rec["id"], "critique", rec["prompt"], rec["final_response"]))
        if rec["final_response"] == rec["initial_response"]:
            identical += 1
            continue
        pairs.append(PreferencePair.of(rec["prompt"], rec["final_response"],
                                       rec["initial_response"], id=rec["id"]))
    helpful_done = 0
    for it in helpful:
        ans = answers[it.id]
        if ans.get("flagged"):
            reasons[ans["flagged"]] += 1
            continue
        helpful_done += 1
        sft.append(SFTRecord.of(ans["id"], "helpful", ans["prompt"], ans["response"]))
    write_jsonl_atomic(out / SFT, [r.to_dict() for r in sft])
    write_jsonl_atomic(out / PAIRS, [p.to_dict() for p in pairs])

    gen_tokens = sum(s["generated_tokens"] for s in steps.values())
    gen_seconds = sum(s["seconds"] for s in steps.values())
    manifest = {
        **base,
        "status": "complete",
        "counts": {
            "prompts": len(items),
            "done": len(items) - sum(v for k, v in reasons.items() if not k.startswith("helpful")),
            "flagged": sum(v for k, v in reasons.items() if not k.startswith("helpful")),
            "flagged_by_reason": dict(sorted(reasons.items())),
            "new_this_run": new,
            "resumed": len(items) - new,
            "duplicate_prompts": duplicates,
            "input_errors": len(input_errors),
            "revised_rounds": revised,
            "unchanged_rounds": unchanged,
            "sft_examples": len(sft),
            "pairs": len(pairs),
            "identical_pairs_skipped": identical,
            "helpful_prompts": len(helpful),
            "helpful_done": helpful_done,
            "helpful_new_this_run": new_helpful,
            "helpful_duplicate_prompts": helpful_duplicates,
        },
        "principle_usage": dict(sorted(usage.items())),
        "timings": {
            "total_seconds": round(seconds, 3),
            "generate_seconds": round(gen_seconds, 3),
            "steps": {k: {**v, "seconds": round(v["seconds"], 3)} for k, v in steps.items()},
        },
        "generated_tokens": gen_tokens,
        "tokens_per_second": round(gen_tokens / seconds, 2) if seconds > 0 else None,
        "backend_usage": dataclasses.asdict(backend.usage) if backend is not None else None,
        "input_errors": input_errors[:20],
        "warnings": warnings,
        "files": {"records": RECORDS, "helpful": HELPFUL if helpful else None, "sft": SFT,
                  "pairs": PAIRS, "constitution": CONSTITUTION},
    }
    write_manifest(out, manifest)
    return manifest
