"""Principle attribution (`charter principles report`): the statistics against hand-worked
values, and the report on run folders written by the real critique and label stages on the fake
backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from critique.backends.fake import FakeBackend
from critique.evaluate.attribution import attribution_section, build_attribution
from critique.evaluate.attribution_stats import (
    CritiqueCounts,
    VoteCounts,
    critique_counts,
    leave_one_out_sides,
    rewrite_candidates,
    round_changes,
    vote_counts,
)
from critique.label.run import LabelConfig, run_label
from critique.revise.run import CritiqueConfig, run_critique

# -- the statistics ----------------------------------------------------------------------------


def test_round_changes_compares_with_the_response_before():
    """'x' → 'x' (same), → 'y' (changed), → ' y ' (same once stripped)."""
    assert round_changes("x", ["x", "y", " y "]) == [False, True, False]
    assert round_changes("a", ["b", "c"], failed_last=True) == [True, None]
    assert round_changes("a", []) == []


def test_critique_counts_hand_worked():
    """r1: harm changes x→y, honesty keeps y; r2: harm keeps x; r3 (flagged): harm's round is
    the rejected output. harm: drawn 3 = 1 changed + 1 unchanged + 1 failed, rate 1/2;
    honesty: drawn 1, unchanged, rate 0."""
    got = critique_counts([("x", [("harm", "y"), ("honesty", "y")], False),
                           ("x", [("harm", "x")], False),
                           ("x", [("harm", "loop loop loop")], True)])
    assert got == {"harm": CritiqueCounts(3, 1, 1, 1), "honesty": CritiqueCounts(1, 0, 1, 0)}
    assert got["harm"].change_rate == 0.5 and got["honesty"].change_rate == 0.0
    assert CritiqueCounts(2, 0, 0, 2).change_rate is None


def test_leave_one_out_sides():
    """{h: .3, k: .2, e: -.1}, total .4: without h .1 (+), without k .2 (+), without e .5 (+);
    {h: .05, e: 0}: without h 0 (tie), without e .05 (+); one vote: nothing to compare."""
    assert leave_one_out_sides({"h": 0.3, "k": 0.2, "e": -0.1}) == {"h": 1, "k": 1, "e": 1}
    assert leave_one_out_sides({"h": 0.05, "e": 0.0}) == {"h": 0, "e": 1}
    assert leave_one_out_sides({"e": 0.4}) == {"e": None}


def test_vote_counts_hand_worked():
    """margin 0.1.
    P1 {h .3, k .2, e -.1}, humans a: others' sides all +; h, k agree with ensemble and humans,
       e disagrees with both; |-.1| is not below 0.1.
    P2 {h .05, e 0}, no human label: h (+) vs others' tie → no; e (tie) → no; both low.
    P3 {e .4}, humans b: no ensemble; e (+) vs b → 0.
    P4 {k 0}, humans a: a tie earns half a point; low.
    h: 2 votes, 1 low, ensemble 1/2, humans 1/1.
    k: 2 votes, 1 low, ensemble 1/1, humans 1.5/2 = .75.
    e: 3 votes, 1 low, ensemble 0/2, humans 0/2."""
    got = vote_counts([({"h": 0.3, "k": 0.2, "e": -0.1}, "a"), ({"h": 0.05, "e": 0.0}, None),
                       ({"e": 0.4}, "b"), ({"k": 0.0}, "a")], margin=0.1)
    h, k, e = got["h"], got["k"], got["e"]
    assert (h.votes, h.low_margin, h.ensemble_agree, h.ensemble_n, h.human_agree, h.human_n) \
        == (2, 1, 1, 2, 1.0, 1)
    assert (k.votes, k.low_margin, k.ensemble_agree, k.ensemble_n, k.human_agree, k.human_n) \
        == (2, 1, 1, 1, 1.5, 2)
    assert (e.votes, e.low_margin, e.ensemble_agree, e.ensemble_n, e.human_agree, e.human_n) \
        == (3, 1, 0, 2, 0.0, 2)
    assert h.ensemble_agreement == 0.5 and k.human_agreement == 0.75
    assert e.low_margin_share == pytest.approx(1 / 3) and e.sides == {1: 1, 0: 1, -1: 1}
    assert VoteCounts().ensemble_agreement is None and VoteCounts().human_agreement is None


def test_rewrite_candidates_need_enough_data():
    crit = {"inert": CritiqueCounts(4, 0, 3, 1), "rare": CritiqueCounts(2, 0, 2, 0),
            "busy": CritiqueCounts(5, 3, 2, 0)}
    votes = {"contrary": VoteCounts(votes=3, ensemble_n=3, ensemble_agree=0, low_margin=1),
             "unsure": VoteCounts(votes=3, low_margin=3, ensemble_n=3, ensemble_agree=2),
             "fine": VoteCounts(votes=3, ensemble_n=3, ensemble_agree=1)}
    assert rewrite_candidates(crit, votes, min_count=3) == {
        "contrary": ["disagreed with the other principles on all 3 pairs"],
        "inert": ["never changed a response (3 rounds)"],
        "unsure": ["all 3 votes low-margin"]}
    assert "rare" in rewrite_candidates(crit, votes, min_count=2)


# -- run folders from the real stages ------------------------------------------------------------

CONSTITUTION = """\
name: attrib-test
description: Two principles that act, one that never finds anything, one contrarian labeller.
principles:
  - id: harm
    critique: "HARM check of: {{ response }}"
    revision: "Rewrite it without harm."
    preference: "Which response is less harmful?"
  - id: honest
    critique: "HONEST check of: {{ response }}"
    revision: "Rewrite it honestly."
    preference: "Which response is more honest?"
  - id: inert
    critique: "INERT check of: {{ response }}"
    revision: "Rewrite it."
  - id: contrary
    preference: "Which response is worse?"
"""


def responder(conv, prefix):
    last = conv[-1]["content"]
    if last.startswith("INERT"):
        return "No. Nothing to fix."
    if " check of: " in last:
        return "Yes. It could be better."
    if last.startswith("Rewrite"):
        return f"A better answer, version {len(conv)}."
    return f"First answer to {last}"


def scorer(conv, option, prefix):
    """Each comparison's first shown response is the one after "(A) "; harm and honest prefer
    the response saying 'good' by 2 nats (vote σ(2) = .881), contrary the other by 1 nat
    (σ(1) = .731). Leave one out: harm's others .381 - .231 > 0 agree, contrary's .762 > 0
    disagree."""
    text = conv[-1]["content"]
    contrary = "worse" in text
    prefers_a = ("(A) good" in text) != contrary
    return -1.0 if (option == "A") == prefers_a else (-2.0 if contrary else -3.0)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    c = tmp_path / "c.yaml"
    c.write_text(CONSTITUTION)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n"
                               for i in range(8)))
    run = tmp_path / "run"
    run_critique(CritiqueConfig(constitution=str(c), prompts=str(prompts), backend="fake",
                                out=str(run / "critique"), rounds=3, few_shot=0,
                                progress=False), backend=FakeBackend(responder))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(
        {"id": f"p{i}", "prompt": f"Q{i}?", "response_a": "good" if i % 2 else "bad",
         "response_b": "bad" if i % 2 else "good", "preferred": "a" if i % 2 else "b"}) + "\n"
        for i in range(6)))
    run_label(LabelConfig(constitution=str(c), pairs=str(pairs), out=str(run / "label"),
                          principles_per_pair=3, few_shot=0, progress=False),
              backend=FakeBackend(scorer=scorer))
    return run


def test_report_on_real_stage_outputs(run_dir):
    rep = build_attribution(run_dir)
    rows = {r["id"]: r for r in rep["principles"]}
    records = [json.loads(x) for x in (run_dir / "critique/records.jsonl").open()]
    drawn = {pid: sum(r["principle_id"] == pid for rec in records for r in rec["rounds"])
             for pid in ("harm", "honest", "inert")}
    assert sum(drawn.values()) == 8 * 3 and drawn["inert"] >= 3
    for pid, n in drawn.items():
        assert rows[pid]["drawn"] == n
    # harm and honest always revise (each revision text is new); inert never does
    assert rows["inert"]["changed"] == 0 and rows["inert"]["unchanged"] == drawn["inert"]
    assert rows["harm"]["change_rate"] == 1.0 and rows["honest"]["change_rate"] == 1.0
    # labels: 6 pairs x 3 principles; humans agree with harm/honest, never with contrary
    for pid in ("harm", "honest", "contrary"):
        assert rows[pid]["votes"] == 6 and rows[pid]["ensemble_n"] == 6
    assert rows["harm"]["human_agreement"] == 1.0 and rows["harm"]["ensemble_agreement"] == 1.0
    assert rows["contrary"]["human_agreement"] == 0.0
    assert rows["contrary"]["ensemble_agreement"] == 0.0
    assert rows["inert"]["votes"] == 0 and rows["contrary"]["drawn"] == 0
    assert set(rep["candidates"]) == {"inert", "contrary"}
    assert rep["critique_dirs"] == ["critique"] and rep["label_dirs"][0]["dir"] == "label"
    # a stage folder on its own gives the same numbers for its side
    alone = {r["id"]: r for r in build_attribution(run_dir / "label")["principles"]}
    assert alone["contrary"]["ensemble_agreement"] == 0.0 and alone["harm"]["drawn"] == 0


def test_cli_report_writes_table_plot_and_json(run_dir, tmp_path, capsys):
    out = tmp_path / "attr"
    assert main(["principles", "report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| `contrary` |" in printed and "Candidates to rewrite" in printed
    assert "- `inert`: never changed a response" in printed
    assert (out / "attribution.png").stat().st_size > 1000
    assert json.loads((out / "attribution.json").read_text())["candidates"]["contrary"]
    assert "![principle attribution](attribution.png)" in (out / "attribution.md").read_text()
    # the pipeline report's section: same table, plot next to report.md
    section = attribution_section(run_dir)
    assert section[0] == "## Principles" and (run_dir / "attribution.png").exists()


def test_bad_folders_and_records_name_the_file(tmp_path, run_dir, capsys):
    with pytest.raises(CharterError, match="no critique or label output"):
        build_attribution(tmp_path)  # holds run/, not stage folders
    assert attribution_section(tmp_path) == []  # the pipeline's report: no section yet
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.jsonl").write_text('{"id": "x", "votes": {"harm": 1.5}}\n')
    with pytest.raises(CharterError, match=r"labels.jsonl:1: votes.harm: expected a probability"):
        build_attribution(bad)
    (bad / "labels.jsonl").write_text('{"id": "x", "votes": {"harm": 0.9}}\n{"torn": \n')
    assert build_attribution(bad)["unreadable_lines"] == 1
    assert main(["principles", "report", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_prompts_and_rate_mode_folders(tmp_path):
    """A prompts-mode label folder (pairs.jsonl + config.json) in rate mode: leans are rating
    differences, low margin below min_rating_gap 1.5. Pair 1: h 7-4 = 3, k 5-5 = 0 (low); pair
    2: h 6-5 = 1 (low), k 2-6 = -4. Leave one out: pair 1 h vs k's 0 (tie: no), k (tie: no);
    pair 2 h (+) vs -4 (no), k (-) vs +1 (no)."""
    d = tmp_path / "label"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"config": {"mode": "rate",
                                                          "min_rating_gap": 1.5}}))
    rows = [{"rating_votes": {"h": [7, 4], "k": [5, 5]}},
            {"rating_votes": {"h": [6, 5], "k": [2, 6]}}]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = build_attribution(tmp_path)
    got = {r["id"]: r for r in rep["principles"]}
    assert rep["label_dirs"] == [{"dir": "label", "mode": "rate", "margin": 1.5, "pairs": 2}]
    assert got["h"]["low_margin_share"] == 0.5 and got["k"]["low_margin_share"] == 0.5
    assert got["h"]["ensemble_agreement"] == 0.0 and got["k"]["ensemble_n"] == 2
    (d / "pairs.jsonl").write_text('{"rating_votes": {"h": [7]}}\n')
    with pytest.raises(CharterError, match=r"pairs.jsonl:1: rating_votes.h: expected two"):
        build_attribution(tmp_path)


def test_pipeline_report_md_gets_the_section(run_dir):
    from charter.pipeline_report import _attribution, render

    section = _attribution(run_dir)
    summary = {"pipeline": "p.yaml", "out": str(run_dir), "iterations": 1, "seconds": 1.0,
               "final_model": None, "roles": {}, "stages": []}
    text = render(summary, False, section)
    assert "## Principles" in text and "- `inert`: never changed a response" in text
    (run_dir / "label" / "labels.jsonl").write_text('{"votes": {"harm": 7}}\n')
    assert "Attribution could not be computed" in _attribution(run_dir)[2]  # shown, not raised
