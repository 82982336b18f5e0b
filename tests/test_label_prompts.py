"""Labelling in prompts mode (sample K responses from a policy, pair them, label them), rating
mode, and resume after a kill, with the fake backend. Pairs mode and the label prompts are in
tests/test_label.py, whose helpers these tests share."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from critique.backends.base import Usage
from critique.backends.fake import FakeBackend
from critique.label.run import LabelConfig, run_label
from tests.test_label import (
    ONE_PRINCIPLE,
    biased_scorer,
    pair,
    read_out,
    shown,
    sigmoid,
    write_pairs,
    write_prompts,
)


@pytest.fixture
def constitution_path(tmp_path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(ONE_PRINCIPLE)
    return p


class StubPolicy:
    """A policy that returns fixed samples (to get identical responses)."""

    name, model_name = "stub", "stub"

    def __init__(self, texts):
        self.texts, self.usage, self.sampling = texts, Usage(), None

    def generate(self, conversations, sampling, prefixes=None):
        self.sampling = sampling
        return [list(self.texts) for _ in conversations]

    def close(self):
        pass


def test_prompts_mode_pairs_skip_identical_and_mark_margin(tmp_path, constitution_path):
    """K = 3 samples "good a", "good a", "bad c": the duplicate is skipped, one pair remains.
    No bias, quality 0.2 nats: p_chosen = σ(0.2) = 0.549834 → |p - 0.5| < 0.1: low_margin."""
    policy = StubPolicy(["good a", "good a", "bad c"])
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=3, principles_per_pair=1, seed=7)
    report = run_label(cfg, backend=FakeBackend(scorer=biased_scorer(0.0, 0.2)),
                       policy_backend=policy)
    assert policy.sampling.n == 3 and policy.sampling.temperature > 0
    assert policy.sampling.seed == 7
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert len(rows) == 2
    r = rows[0]
    assert r["prompt"] == [{"role": "user", "content": "prompt 0?"}]
    assert r["chosen"] == [{"role": "assistant", "content": "good a"}]
    assert r["rejected"] == [{"role": "assistant", "content": "bad c"}]
    assert r["p_chosen"] == pytest.approx(sigmoid(0.2))
    assert r["orders"] == pytest.approx([sigmoid(0.2)] * 2)
    assert r["low_margin"] is True
    assert r["provenance"]["constitution"] == "test"
    assert report["skipped_identical"] == 2 and report["low_margin"] == 2
    from charter.core.records import read_pairs

    assert [p.p_chosen for p in read_pairs(tmp_path / "out" / "pairs.jsonl")] == \
        pytest.approx([sigmoid(0.2)] * 2)


def test_the_policy_samples_without_keeping_caches(tmp_path, constitution_path):
    """No later call continues a sampled answer, so the sampler generates with keep_caches
    off (`not_continued`), and keeps caches again afterwards."""
    seen = []

    class Keeper(StubPolicy):
        keep_caches = True

        def generate(self, conversations, sampling, prefixes=None):
            seen.append(self.keep_caches)
            return super().generate(conversations, sampling, prefixes)

    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=2, principles_per_pair=1, seed=7,
                      batch_size=2)
    policy = Keeper(["good a", "bad c"])
    run_label(cfg, backend=FakeBackend(scorer=biased_scorer(0.0, 0.2)), policy_backend=policy)
    assert seen == [False, False] and policy.keep_caches is True


def test_samples_are_stored_without_surrounding_whitespace(tmp_path, constitution_path):
    """A sample that starts with whitespace would tokenise differently after the template's
    own newline (DPO refuses such an example): samples are stripped, and two that differ only
    in whitespace are one."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=3, principles_per_pair=1, seed=7)
    report = run_label(cfg, backend=FakeBackend(scorer=biased_scorer(0.0, 0.2)),
                       policy_backend=StubPolicy(["\n \n good a", "good a ", "bad c"]))
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert len(rows) == 1 and report["skipped_identical"] == 1
    assert {rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]} == {
        "good a", "bad c"}


def test_prompts_mode_all_pairs_for_k3(tmp_path, constitution_path):
    """K = 3 distinct samples (the fake appends " (sample i)" to i ≥ 1) → all 3 pairs; the
    fake prefers the plain "good" sample 0 by 2 nats, so it is chosen in its two pairs."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)

    def scorer(conv, option, prefix):
        return 2.0 * ("sample" not in shown(conv, option)) - 5.0

    fake = FakeBackend(responder=lambda c, p: "good", scorer=scorer)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=3, principles_per_pair=1)
    run_label(cfg, backend=fake)
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    assert [r["chosen"][0]["content"] for r in rows] == ["good", "good", "good (sample 1)"]
    assert rows[0]["p_chosen"] == pytest.approx(sigmoid(2.0))
    assert rows[2]["p_chosen"] == pytest.approx(0.5) and rows[2]["low_margin"] is True


def test_rating_mode_best_vs_worst(tmp_path, constitution_path):
    """Rating log-probs: sample 1 puts 0.5 on "7" and "9" (E = 8); sample 2 on "3" and "5"
    (E = 4); sample 0 on "5" and "7" (E = 6); every other rating gets e^-30 (negligible).
    Best = sample 1, worst = sample 2, rating gap 8 - 4 = 4 (≥ 1: not low margin)."""
    peaks = {"(sample 1)": ("7", "9"), "(sample 2)": ("3", "5")}

    def scorer(conv, option, prefix):
        text = conv[-1]["content"]
        hit = next((v for k, v in peaks.items() if k in text), ("5", "7"))
        return math.log(0.5) if option in hit else -30.0

    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)
    fake = FakeBackend(responder=lambda c, p: "answer", scorer=scorer)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=3, mode="rate", principles_per_pair=1)
    report = run_label(cfg, backend=fake)
    (r,) = read_out(tmp_path / "out" / "pairs.jsonl")
    assert r["chosen"][0]["content"] == "answer (sample 1)"
    assert r["rejected"][0]["content"] == "answer (sample 2)"
    assert r["ratings"] == pytest.approx([6.0, 8.0, 4.0], abs=1e-6)
    assert r["rating_gap"] == pytest.approx(4.0, abs=1e-6)
    assert r["low_margin"] is False and "p_chosen" not in r
    assert report["mean_rating_gap"] == pytest.approx(4.0, abs=1e-5)
    assert fake.calls[-1][0] == "score" and len(fake.calls[-1][1]) == 3


def test_resume_after_torn_line_no_duplicates(tmp_path, constitution_path):
    rows = [pair(i, f"good {i}", f"bad {i}", "a") for i in range(4)]
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    kw = dict(constitution=str(constitution_path), pairs=str(pairs), out=str(out),
              principles_per_pair=1, batch_size=1)
    run_label(LabelConfig(**kw, limit=2), backend=FakeBackend(scorer=biased_scorer(0, 2)))
    with open(out / "labels.jsonl", "a") as f:
        f.write('{"id": "p2", "p_a": 0.')  # a kill mid-write
    fake = FakeBackend(scorer=biased_scorer(0, 2))
    report = run_label(LabelConfig(**kw), backend=fake)
    ids = [r["id"] for r in read_out(out / "labels.jsonl")]
    assert ids == ["p0", "p1", "p2", "p3"]
    assert len([c for c in fake.calls if c[0] == "score"]) == 2  # only p2 and p3 redone
    assert report["n"] == 4 and report["labelled_this_run"] == 2
    with pytest.raises(CharterError, match="labels made with other settings.*principles_per_pair"):
        run_label(LabelConfig(**{**kw, "principles_per_pair": 2}), backend=fake)


def test_prompts_resume_drops_pairs_of_unfinished_prompt(tmp_path, constitution_path):
    """A kill after a prompt's pairs but before its done marker: the re-run drops those pairs
    and redoes the prompt, so nothing is duplicated."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "out"
    kw = dict(constitution=str(constitution_path), prompts=str(prompts), out=str(out),
              samples=2, principles_per_pair=1, batch_size=1)
    run_label(LabelConfig(**kw), backend=FakeBackend(scorer=biased_scorer(0, 2)))
    first = read_out(out / "pairs.jsonl")
    done = (out / "prompts_done.jsonl").read_text().splitlines()
    (out / "prompts_done.jsonl").write_text("\n".join(done[:2]) + "\n")
    with open(out / "pairs.jsonl", "a") as f:
        f.write('{"prompt": [')
    report = run_label(LabelConfig(**kw), backend=FakeBackend(scorer=biased_scorer(0, 2)))
    again = read_out(out / "pairs.jsonl")
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert report["labelled_this_run"] == 1 and report["prompts"] == 3


def test_moved_label_folder_resumes_and_a_changed_outside_path_is_refused(tmp_path,
                                                                           constitution_path):
    """A run folder (RUN/data, RUN/label) moved elsewhere resumes its label stage: the prompts
    path inside it is compared relative to the folder; the principle file outside it, named
    otherwise, is still a difference. The done marks of older runs read back (PromptDone)."""
    import shutil

    from charter.core.runlock import release_all

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    write_prompts(run / "data" / "train.jsonl", 2)

    def kw(root, cons=constitution_path):
        return dict(constitution=str(cons), prompts=str(root / "data" / "train.jsonl"),
                    out=str(root / "label"), samples=2, principles_per_pair=1)

    run_label(LabelConfig(**kw(run)), backend=FakeBackend(scorer=biased_scorer(0, 2)))
    release_all()  # as when the first process ended
    moved = tmp_path / "elsewhere"
    shutil.move(str(run), str(moved))
    report = run_label(LabelConfig(**kw(moved)), backend=FakeBackend(scorer=biased_scorer(0, 2)))
    assert report["labelled_this_run"] == 0 and report["prompts"] == 2
    copy = tmp_path / "copy.yaml"
    shutil.copy(constitution_path, copy)
    with pytest.raises(CharterError, match=r"labels made with other settings \(constitution:"):
        run_label(LabelConfig(**kw(moved, copy)), backend=FakeBackend(scorer=biased_scorer(0, 2)))
