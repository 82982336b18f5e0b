"""Principles learned from preference pairs: Inverse Constitutional AI (Findeis et al. 2024).

    charter principles induce --pairs pairs.jsonl --out induced.yaml
    charter principles induce --pairs pairs.jsonl --out induced.yaml --backend openai \\
        --model Qwen/Qwen2.5-7B-Instruct --base-url http://127.0.0.1:8000/v1

1. Split: the pairs are shuffled (seeded) and cut into proposal pairs and held-out test pairs
   (`holdout`, a fraction).
2. Propose: for each proposal pair the model is asked which general rule explains the
   preference (`critique.label.propose`: a template rendered in the principle-file sandbox,
   the answer pre-filled with "Which response", parsed by a pure parser that drops junk).
3. De-duplicate: candidates whose normalised texts are at least `similarity` alike are merged
   (the first kept; its support is how many pairs proposed it).
4. Test: each candidate is the one preference principle of a labelling run on the held-out
   pairs, with the labelling code of `charter label` (`critique.preference.score.compare_pairs`:
   log-probs of "(A)"/"(B)", both orders averaged); its agreement is the share of held-out pairs
   where its label sides with `preferred` (ties count half, `labelmath.accuracy`).
5. Keep the candidates above `min_agreement` (best first, at most `max_principles`) and write a
   principle file (checked with the loader before it is written) with each principle's measured
   agreement in a comment above it, plus OUT.report.json with every candidate, kept or not.

Input pairs: the label stage's pairs format (`id`, `prompt`, `response_a`, `response_b`,
`preferred` a/b: required here), TRL preference data (`prompt`, `chosen`, `rejected`), or
HH-RLHF transcripts (`chosen`, `rejected`: whole Human:/Assistant: dialogues that differ in the last
reply); a chosen response is put in position a or b by a seeded coin per pair.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from charter.core.errors import CharterError
from charter.core.records import (
    content_id,
    parse_hh_transcript,
    read_jsonl,
    read_pairs,
    write_json_atomic,
    write_text_atomic,
)
from charter.core.writable import check_output
from constitution import parse_constitution
from critique.backends.base import Sampling
from critique.backends.options import BackendSettings, build_backend, spec_of
from critique.label.inputs import LabelPair, read_label_pairs
from critique.label.propose import (
    PREFIX,
    PROPOSE_TEMPLATE,
    deduplicate,
    parse_principle,
    render_proposal,
)
from critique.preference.labelmath import accuracy
from critique.preference.score import compare_pairs


@dataclass(kw_only=True)
class InduceConfig(BackendSettings):
    """Settings of `charter principles induce` (flags, or keys of a `--config` YAML file); the
    backend settings (backend, dtype, base_url, ...) come from `BackendSettings`."""

    model: str | None = None
    """Model that proposes principles: a model dir, a run dir, a hub id, or the served model
    name (openai); None: the embedded SmolLM2."""

    pairs: str
    """Preference pairs (JSONL): id/prompt/response_a/response_b/preferred, or prompt/chosen/
    rejected (TRL)."""
    out: str
    """The principle file to write (YAML); OUT.report.json gets every candidate."""
    name: str = "induced"
    """The `name` of the written principle file."""
    holdout: float = 0.5
    """Share of the pairs held out to test the candidates (the rest propose them)."""
    limit: int | None = None
    """Use only the first N pairs of the file."""
    min_agreement: float = 0.5
    """Keep candidates whose held-out agreement is above this (0.5: better than chance)."""
    max_principles: int = 10
    """Keep at most this many (the best agreeing)."""
    similarity: float = 0.8
    """Candidates at least this alike (normalised text, 0-1) are merged."""
    max_new_tokens: int = 48
    """Length limit of each proposal."""
    propose_template: str | None = None
    """A file holding the proposal prompt (jinja2; variables conversation, prompt, preferred,
    rejected); None: the built-in one."""
    seed: int = 0
    """Seed of the split and of the a/b placement of TRL pairs."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> None:
        checks = [(0.0 < self.holdout < 1.0, "holdout", "must be between 0 and 1"),
                  (0.0 <= self.min_agreement < 1.0, "min_agreement", "must be in [0, 1)"),
                  (self.max_principles >= 1, "max_principles", "must be at least 1"),
                  (0.0 < self.similarity <= 1.0, "similarity", "must be in (0, 1]"),
                  (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
                  (self.limit is None or self.limit >= 2, "limit", "must be at least 2")]
        for ok, name, msg in checks:
            if not ok:
                raise CharterError(msg, field=name)


def read_preference_pairs(path: str, seed: int, skipped: list[str] | None = None
                          ) -> list[LabelPair]:
    """Pairs with a human `preferred` side, from any input format of the module docstring.
    HH-RLHF rows whose two dialogues differ before the last reply (a few in the public data)
    are not a pair: with a `skipped` list their messages go there, else they raise."""
    first = next((obj for _, obj in read_jsonl(path)), {})
    if "response_a" in first:
        pairs = read_label_pairs(path)
        missing = [p for p in pairs if p.preferred is None]
        if missing:
            raise CharterError("missing field: induce needs every pair's `preferred` (a or b)",
                               path=missing[0].source, field="preferred")
        return pairs
    rows = _hh_pairs(path, skipped) if "prompt" not in first else [
        (p.prompt, p.chosen[-1]["content"], p.rejected[-1]["content"], p.id)
        for p in read_pairs(path)]
    out = []
    for k, (prompt, chosen, rejected, pid) in enumerate(rows):
        pid = pid or content_id(prompt, chosen, rejected)
        a_first = random.Random(f"{seed}:{pid}").random() < 0.5
        a, b = (chosen, rejected) if a_first else (rejected, chosen)
        out.append(LabelPair(str(pid), prompt, a, b, "a" if a_first else "b",
                             f"{path}:{k + 1}"))
    return out


def _hh_pairs(path: str, skipped: list[str] | None) -> list[tuple]:
    """(prompt messages, chosen, rejected, None) from HH-RLHF transcripts (`chosen` and
    `rejected` strings of Human:/Assistant: turns that differ in the last assistant turn)."""
    rows = []
    for line, obj in read_jsonl(path):
        convs = []
        for key in ("chosen", "rejected"):
            text = obj.get(key)
            msgs = parse_hh_transcript(text) if isinstance(text, str) else []
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise CharterError("expected prompt/chosen/rejected, response_a/response_b, or an "
                                   "HH-RLHF transcript ending with an Assistant turn", path=path,
                                   line=line, field=key)
            convs.append(msgs)
        if convs[0][:-1] != convs[1][:-1]:
            err = CharterError("chosen and rejected differ before their last Assistant turn",
                               path=path, line=line, field="rejected")
            if skipped is None:
                raise err
            skipped.append(str(err))
            continue
        rows.append((convs[0][:-1], convs[0][-1]["content"], convs[1][-1]["content"], None))
    return rows


def split_pairs(pairs: list, holdout: float, seed: int) -> tuple[list, list]:
    """(proposal pairs, held-out pairs): a seeded shuffle, then round(n·holdout) held out (at
    least one of each)."""
    if len(pairs) < 2:
        raise CharterError(f"need at least 2 pairs (one to propose, one to test), got "
                           f"{len(pairs)}", field="pairs")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(len(order) * holdout)))
    return order[n_test:], order[:n_test]


def _sides(pair: LabelPair) -> tuple[str, str]:
    """(preferred, other) response of a pair."""
    a, b = pair.response_a, pair.response_b
    return (a, b) if pair.preferred == "a" else (b, a)


def propose(backend, pairs: list[LabelPair], cfg: InduceConfig, template: str) -> list[dict]:
    """One proposal per pair: {pair, raw, principle (None when unusable)}."""
    convs = [[{"role": "user", "content": render_proposal(template, p.messages, *_sides(p))}]
             for p in pairs]
    sampling = Sampling(temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        stop=["\n\n"])
    texts = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(convs), cfg.batch_size), desc="propose", unit="batch",
                  disable=not cfg.progress):
        chunk = convs[i:i + cfg.batch_size]
        texts += [t[0] for t in backend.generate(chunk, sampling, prefixes=[PREFIX] * len(chunk))]
    return [{"pair": p.id, "raw": PREFIX + t, "principle": parse_principle(PREFIX + t)}
            for p, t in zip(pairs, texts)]


def candidates_file(name: str, description: str, principles: list[dict],
                    header: list[str] = ()) -> str:
    """A principle file of preference-only principles, each with its comment lines above it;
    the texts are written as JSON strings (valid YAML double-quoted scalars)."""
    lines = [f"# {' '.join(h.split())}" for h in header]  # a newline in a path ends no comment
    lines += [f"name: {json.dumps(name)}", f"description: {json.dumps(description)}", "",
              "principles:"]
    for p in principles:
        lines += [f"  # {c}" for c in p.get("comments", [])]
        lines += [f"  - id: {p['id']}", "    tags: [induced]",
                  f"    preference: {json.dumps(p['text'], ensure_ascii=False)}"]
    return "\n".join(lines) + "\n"


def measure(backend, candidates: list[dict], test: list[LabelPair], cfg: InduceConfig) -> None:
    """Each candidate's agreement with `preferred` on the held-out pairs (in place)."""
    text = candidates_file("candidates", "candidates under test", candidates)
    constitution = parse_constitution(text, path=f"{cfg.out} (candidates)")
    by_id = {p.id: p for p in constitution.principles}
    jobs = [(pair.messages, pair.response_a, pair.response_b, [by_id[c["id"]]])
            for c in candidates for pair in test]
    opts = SimpleNamespace(cot=False, few_shot=0, seed=cfg.seed)  # no examples, no reasoning
    results = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(jobs), cfg.batch_size), desc="test candidates", unit="batch",
                  disable=not cfg.progress):
        results += compare_pairs(backend, constitution, jobs[i:i + cfg.batch_size], opts)
    prefs = [pair.preferred for pair in test]
    for k, c in enumerate(candidates):
        ps = [r["p_a"] for r in results[k * len(test):(k + 1) * len(test)]]
        c["agreement"] = accuracy(ps, prefs)
        c["held_out"] = len(test)


def run_induce(cfg: InduceConfig, backend=None) -> dict:
    """Propose, de-duplicate, test and write; returns OUT.report.json's content."""
    cfg.validate()
    skipped: list[str] = []
    pairs = read_preference_pairs(cfg.pairs, cfg.seed, skipped)[: cfg.limit]
    template = PROPOSE_TEMPLATE
    if cfg.propose_template:
        try:
            template = Path(cfg.propose_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CharterError(f"cannot read the proposal template ({e})",
                               path=cfg.propose_template, field="propose_template") from None
    train, test = split_pairs(pairs, cfg.holdout, cfg.seed)
    out = Path(cfg.out)
    if out.is_dir():
        raise CharterError("--out is a principle file to write, found a directory", path=out,
                           field="out")
    check_output(out, is_dir=False)  # writable and not in use, before any model loads
    owned = backend is None
    backend = build_backend(spec_of(cfg, cfg.model)) if owned else backend
    start = time.monotonic()
    try:
        proposals = propose(backend, train, cfg, template)
        texts = [p["principle"] for p in proposals if p["principle"]]
        groups = deduplicate(texts, cfg.similarity)
        candidates = [{"id": f"induced-{k + 1}", "text": t, "support": len(members)}
                      for k, (t, members) in enumerate(groups)]
        if candidates:
            measure(backend, candidates, test, cfg)
    finally:
        if owned:
            backend.close()
    ranked = sorted(candidates, key=lambda c: (-c["agreement"], -c["support"], c["id"]))
    kept = [c for c in ranked if c["agreement"] > cfg.min_agreement][: cfg.max_principles]
    report = {"pairs": cfg.pairs, "model": getattr(backend, "model_name", cfg.model),
              "backend": cfg.backend, "proposal_pairs": len(train), "held_out_pairs": len(test),
              "proposals": proposals, "unparsed": sum(p["principle"] is None for p in proposals),
              "candidates": ranked, "kept": [c["id"] for c in kept],
              "input_skipped": {"count": len(skipped), "first": skipped[:5]},
              "seconds": round(time.monotonic() - start, 2)}
    write_json_atomic(out.with_name(out.name + ".report.json"), report)
    if not candidates:
        raise CharterError(f"the model proposed no usable principle for any of the "
                           f"{len(train)} proposal pairs (first answer: "
                           f"{proposals[0]['raw'][:120]!r}; all are in {out.name}.report.json); "
                           "try a larger model", path=cfg.pairs)
    if not kept:
        best = ranked[0]
        raise CharterError(f"no candidate agreed with the held-out preferences above "
                           f"{cfg.min_agreement} (best: {best['text']!r} at "
                           f"{best['agreement']:.2f} on {len(test)} pairs; all candidates are in "
                           f"{out.name}.report.json); lower --min-agreement or add pairs",
                           field="min_agreement")
    write_text_atomic(out, induced_file(cfg, report, kept))
    return report


def induced_file(cfg: InduceConfig, report: dict, kept: list[dict]) -> str:
    """The output principle file's text, checked with the loader."""
    kept = [{**c, "comments": [f"agreement {c['agreement']:.3f} with `preferred` on "
                               f"{c['held_out']} held-out pairs (both orders); proposed for "
                               f"{c['support']} of {report['proposal_pairs']} pairs"]}
            for c in kept]
    header = ["Principles induced from preference pairs (Inverse Constitutional AI, Findeis et "
              "al. 2024)", f"by charter principles induce --pairs {cfg.pairs}",
              f"proposer and labeller: {report['model']} ({cfg.backend}); "
              f"{report['proposal_pairs']} pairs proposed, {report['held_out_pairs']} held out",
              "agreement: the share of held-out pairs where the principle's label (log-probs "
              "of (A)/(B), both orders) sides with the human preference"]
    description = (f"Preference principles induced from {Path(cfg.pairs).name}: the rules that "
                   "best explain which response people preferred.")
    text = candidates_file(cfg.name, description, kept, header)
    parse_constitution(text, path=cfg.out)  # lint-clean, or a bug here
    return text
