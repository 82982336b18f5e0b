"""Does a label set carry signal? Missing option tokens (servers with only top-k log-probs),
low-margin relabelling by a second labeller, and the diagnostics and warnings of report.json /
report.md. Fake backends; expected values worked out in the docstrings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from critique.backends.fake import FakeBackend
from critique.backends.topk import option_logprobs, option_token, score_top
from critique.label.report import label_warnings, margin_histogram
from critique.label.run import LabelConfig, run_label
from tests.test_label import ONE_PRINCIPLE, biased_scorer, read_out, sigmoid, write_prompts
from tests.test_label_prompts import StubPolicy


@pytest.fixture
def constitution_path(tmp_path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(ONE_PRINCIPLE)
    return p


def test_option_logprobs_reports_missing_tokens_as_nan():
    out = option_logprobs({"A": -0.1, "C": -3.0}, ["A", "B"])
    assert out[0] == -0.1 and math.isnan(out[1])


def test_margin_histogram_and_warnings_hand_worked():
    """|p - 0.5| of 0.5, 0.52, 0.56, 0.9, 0.0 → 0, 0.02, 0.06, 0.4, 0.5 → bins [0,.05) 2,
    [.05,.1) 1, [.4,.5] 2. 2 of 5 within 0.05 = 40%: below the 50% warning share."""
    assert margin_histogram([0.5, 0.52, 0.56, 0.9, 0.0]) == [2, 1, 0, 0, 0, 2]
    assert label_warnings(5, 2, 0.5, None, 0, 0) == []
    w = label_warnings(100, 93, 0.94, 0.5, 20, 3)
    assert w[0].startswith("93% of pairs within 0.05 of 0.5: DPO on these labels will change "
                           "little")
    assert "same position in 94%" in w[1] and "50% on 20 pairs" in w[2]
    assert w[3].startswith("3 pair(s) got no label")


def test_missing_option_is_counted_never_a_silent_half(tmp_path, constitution_path):
    """Prompt 0: the labeller's "B" token is outside the top-k in every reading → that pair has
    no label: not written, counted. Prompt 1: readable (quality 1 nat): p_chosen = σ(1)."""
    def scorer(conv, option, prefix):
        if "prompt 0?" in conv[-1]["content"] and option == "B":
            return math.nan
        return biased_scorer(0.0, 1.0)(conv, option, prefix)

    cfg = LabelConfig(constitution=str(constitution_path),
                      prompts=str(write_prompts(tmp_path / "p.jsonl", 2)),
                      out=str(tmp_path / "out"), samples=2, principles_per_pair=1)
    report = run_label(cfg, backend=FakeBackend(scorer=scorer),
                       policy_backend=StubPolicy(["good a", "bad b"]))
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert len(rows) == 1 and rows[0]["p_chosen"] == pytest.approx(sigmoid(1.0))
    assert report["pairs_without_label"] == 1
    d = report["diagnostics"]
    assert d["pairs_without_label"] == 1
    assert any("got no label" in w for w in d["warnings"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "pairs left without a label: 1" in md
    assert (tmp_path / "out" / "margins.png").stat().st_size > 0


def test_low_margin_pairs_go_to_the_second_labeller(tmp_path, constitution_path):
    """First labeller: no preference (equal log-probs) → p = 0.5 for every pair, all below
    relabel_below 0.1. Second labeller prefers "good" by 2 nats → p_chosen = σ(2) = 0.880797,
    chosen "good a"; the first label (0.5) is kept in first_label."""
    cfg = LabelConfig(constitution=str(constitution_path),
                      prompts=str(write_prompts(tmp_path / "p.jsonl", 3)),
                      out=str(tmp_path / "out"), samples=2, principles_per_pair=1,
                      relabel_below=0.1)
    second = FakeBackend(scorer=biased_scorer(0.0, 2.0), model_name="big")
    report = run_label(cfg, backend=FakeBackend(scorer=lambda c, o, p: -1.0, model_name="small"),
                       policy_backend=StubPolicy(["bad b", "good a"]), second_backend=second)
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert [r["p_chosen"] for r in rows] == pytest.approx([sigmoid(2.0)] * 3)
    assert all(r["chosen"][0]["content"] == "good a" for r in rows)
    assert rows[0]["first_label"] == {"p_chosen": 0.5, "labeler": "small"}
    assert rows[0]["provenance"]["second_labeler"] == {"model": "big", "backend": "fake"}
    assert report["diagnostics"]["relabel"] == {"relabelled": 3, "flipped": 0,
                                                "still_near_half": 0}
    assert report["diagnostics"]["warnings"] == []


def test_no_signal_warning_in_label_report(tmp_path, constitution_path):
    """A position-only labeller (3 nats for "A", nothing for content): every label is 0.5."""
    cfg = LabelConfig(constitution=str(constitution_path),
                      prompts=str(write_prompts(tmp_path / "p.jsonl", 4)),
                      out=str(tmp_path / "out"), samples=2, principles_per_pair=1)
    report = run_label(cfg, backend=FakeBackend(scorer=biased_scorer(3.0, 0.0)),
                       policy_backend=StubPolicy(["good a", "bad b"]))
    d = report["diagnostics"]
    assert d["share_within_0.05"] == 1.0 and d["position_bias"] == 1.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Warning:** 100% of pairs within 0.05 of 0.5: DPO on these labels will change " \
        "little" in md


class TopServer:
    """Stands in for the openai backend's transport: answers /completions with top-k maps."""

    def __init__(self, tok, top):
        self.tokenizer, self.top = tok, top
        self.served_model = "served"
        from critique.backends.base import Usage

        self.usage = Usage()
        self.bodies = []

    async def _request(self, method, path, body):
        self.bodies.append(body)
        return {"choices": [{"logprobs": {"top_logprobs": [self.top]}}]}

    def _gather(self, coros, desc):
        import asyncio

        async def run():
            return await asyncio.gather(*coros)
        return asyncio.run(run())


def test_score_top_reads_options_from_top_k(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    server = TopServer(tok, {"A": -0.2, "C": -2.0})
    conv = [{"role": "user", "content": "Which? (A) or (B)"}]
    out = score_top(server, [conv], [["A", "B"]], ["("], k=5)
    assert out[0][0] == -0.2 and math.isnan(out[0][1])
    assert server.bodies[0]["logprobs"] == 5 and server.bodies[0]["max_tokens"] == 1
    with pytest.raises(Exception, match="one token per option"):
        option_token(tok, [1, 2], [1, 2, 3, 4], "10")


def test_rate_mode_k4_best_vs_a_lower_rated_one_recorded(tmp_path, constitution_path):
    """K = 4 rated samples (expected ratings 6, 8, 4, 6: each puts 0.5 on two adjacent odd
    ratings). UltraFeedback binarisation (rate_rejected random): chosen = the best (index 1),
    rejected = a seeded draw among the lower-rated 0, 2, 3; both indices recorded and the gap
    is the best's rating minus the drawn one's."""
    peaks = {"(sample 1)": ("7", "9"), "(sample 2)": ("3", "5")}

    def scorer(conv, option, prefix):
        text = conv[-1]["content"]
        hit = next((v for k, v in peaks.items() if k in text), ("5", "7"))
        return math.log(0.5) if option in hit else -30.0

    cfg = LabelConfig(constitution=str(constitution_path),
                      prompts=str(write_prompts(tmp_path / "p.jsonl", 3)),
                      out=str(tmp_path / "out"), samples=4, mode="rate",
                      principles_per_pair=1, rate_rejected="random")
    run_label(cfg, backend=FakeBackend(responder=lambda c, p: "answer", scorer=scorer))
    rows = read_out(tmp_path / "out" / "pairs.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert r["chosen_index"] == 1 and r["rejected_index"] in (0, 2, 3)
        assert r["ratings"] == pytest.approx([6.0, 8.0, 4.0, 6.0], abs=1e-6)
        assert r["rating_gap"] == pytest.approx(8.0 - r["ratings"][r["rejected_index"]])
