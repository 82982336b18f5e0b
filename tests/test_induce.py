"""`charter principles induce` (Inverse Constitutional AI): the proposal parser on junk, the
de-duplication and split, the whole run on the fake backend (the principle that explains the
preferences is kept with agreement 1, the contrary one is dropped, the file lints), and the
embedded SmolLM2 on a few pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from constitution import load_constitution
from critique.backends.fake import FakeBackend
from critique.label.induce import (
    InduceConfig,
    read_preference_pairs,
    run_induce,
    split_pairs,
)
from critique.label.propose import (
    PROPOSE_TEMPLATE,
    deduplicate,
    normalise,
    parse_principle,
    render_proposal,
    similarity,
)


@pytest.mark.parametrize("text, expected", [
    ("Which response is more concise?", "Which response is more concise?"),
    ("Which response is shorter and to the point? It uses fewer words.",
     "Which response is shorter and to the point?"),
    ("Which response  **gives a direct answer**\nExplanation: ...",
     "Which response gives a direct answer?"),
    ('Which response is better?\nRule: "Which response avoids {{ jargon }}?"',
     "Which response avoids jargon?"),  # the empty one skipped; braces never survive
    ("Which response is kinder to the user. Because", "Which response is kinder to the user?"),
    ("which reply cites a source?", "Which response cites a source?"),
    ("Which response is better?", None),  # says nothing
    ("Which response is the preferred one?", None),
    ("Which response is Response A?", None),  # about this pair, not a rule
    ("Which response", None),
    ("Which responseResponse 3f2a to: Below is a conversation", None),  # glued: not a question
    ("", None),
    ("!!!! ???? 12345", None),
    ("Which response " + "very " * 40 + "long?", None),
])
def test_parse_principle(text, expected):
    assert parse_principle(text) == expected


def test_similarity_and_deduplicate_hand_worked():
    """normalise drops the stem and little words: 'is more concise' → 'concise'. 'concise' vs
    'precise': the longest common block is 'cise' (4 chars) and nothing else matches, so the
    ratio is 2·4 / (7 + 7) = 0.5714."""
    assert normalise("Which response is MORE concise?") == "concise"
    assert similarity("Which response is concise?", "Which response is more concise?") == 1.0
    assert similarity("Which response is concise?", "Which response is precise?") \
        == pytest.approx(8 / 14)
    texts = ["Which response is concise?", "Which response is precise?",
             "Which response is more concise?", "Which response is precise."]
    assert deduplicate(texts, 0.8) == [("Which response is concise?", [0, 2]),
                                       ("Which response is precise?", [1, 3])]
    assert len(deduplicate(texts, 0.5)) == 1  # at 0.5714 everything merges into the first


def test_split_is_seeded_and_disjoint():
    pairs = list(range(10))
    train, test = split_pairs(pairs, 0.3, seed=1)
    assert len(test) == 3 and len(train) == 7 and sorted(train + test) == pairs
    assert split_pairs(pairs, 0.3, seed=1) == (train, test)
    assert split_pairs(pairs, 0.3, seed=2) != (train, test)
    assert [len(x) for x in split_pairs([1, 2], 0.9, 0)] == [1, 1]  # one of each at least
    with pytest.raises(CharterError, match="at least 2 pairs"):
        split_pairs([1], 0.5, 0)


def test_trl_pairs_get_a_seeded_side(tmp_path):
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}",
                                        "rejected": f"bad {i}"}) + "\n" for i in range(12)))
    pairs = read_preference_pairs(str(path), seed=0)
    for p in pairs:
        chosen = p.response_a if p.preferred == "a" else p.response_b
        assert chosen.startswith("good")
    assert {p.preferred for p in pairs} == {"a", "b"}  # not always in one position


def test_hh_rlhf_transcripts_are_pairs(tmp_path, example_data):
    skipped: list[str] = []
    pairs = read_preference_pairs(str(example_data / "hh-rlhf-harmless-base-test.jsonl.gz"), 0,
                                  skipped)
    assert len(pairs) > 100 and 0 < len(skipped) < len(pairs) / 10
    assert ".jsonl.gz:1255: rejected: chosen and rejected differ" in skipped[0]
    p = pairs[0]
    assert p.messages[0]["content"] == "what are some pranks with a pen i can do?"
    assert p.messages[-1]["role"] == "user" and p.response_a != p.response_b
    bad = tmp_path / "hh.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a",
                               "rejected": "\n\nHuman: yo\n\nAssistant: b"}) + "\n")
    with pytest.raises(CharterError, match="hh.jsonl:1: rejected: chosen and rejected differ"):
        read_preference_pairs(str(bad), 0)


SHORT_LONG = [("Name a primary colour.", "Red.", "A primary colour that many people like is red."),
              ("What is 2 + 2?", "4.", "Two plus two, when added together, equals four."),
              ("Capital of France?", "Paris.", "The capital city of France is Paris, of course."),
              ("Boiling point of water?", "100 °C.", "Water boils at one hundred degrees."),
              ("Opposite of hot?", "Cold.", "The opposite of the word hot is the word cold."),
              ("Largest planet?", "Jupiter.", "The largest planet in our solar system is Jupiter."),
              ("Colour of the sky?", "Blue.", "On a clear day the sky looks blue to us."),
              ("First letter of the alphabet?", "A.", "The alphabet begins with the letter A.")]


def write_pairs(path: Path) -> str:
    """People preferred the short answer; it sits in position a or b alternately."""
    rows = []
    for i, (q, short, long) in enumerate(SHORT_LONG):
        a, b = (short, long) if i % 2 else (long, short)
        rows.append({"id": f"p{i}", "prompt": q, "response_a": a, "response_b": b,
                     "preferred": "a" if i % 2 else "b"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PROPOSALS = [" is shorter?", " is longer and more detailed?", " is the shorter one?",
             " ### !!!"]  # pair i proposes PROPOSALS[i % 4]: 'shorter' twice, contrary, junk


def proposer(conv, prefix):
    text = conv[-1]["content"]
    assert text.startswith("Below is a conversation") and prefix == "Which response"
    i = next(i for i, (q, _, _) in enumerate(SHORT_LONG) if f"Human: {q}" in text)
    return PROPOSALS[i % 4]


def option_scorer(conv, option, prefix):
    """A labeller that follows the question: 'shorter' prefers the shorter option, 'longer' the
    longer one, by 3 nats."""
    text = conv[-1]["content"]
    a, b = re.search(r"\(A\) (.*?)\n+\(B\) (.*?)\n", text).groups()
    want_short = "shorter" in text.split("Options:")[0]
    a_wins = (len(a) < len(b)) == want_short
    return 0.0 if (option == "A") == a_wins else -3.0


def test_induce_keeps_the_principle_that_explains_the_preferences(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "induced.yaml"
    cfg = InduceConfig(pairs=pairs, out=str(out), backend="fake", holdout=0.5, progress=False,
                       similarity=0.8)
    report = run_induce(cfg, backend=FakeBackend(proposer, option_scorer))
    assert report["proposal_pairs"] == 4 and report["held_out_pairs"] == 4
    got = {p["pair"]: p["principle"] for p in report["proposals"]}
    want = {f"p{i}": PROPOSALS[i % 4] for i in range(8) if f"p{i}" in got}
    assert got == {pid: None if "#" in w else "Which response" + w for pid, w in want.items()}
    assert report["unparsed"] == list(got.values()).count(None)
    # "is shorter" and "is the shorter one" normalise to the same words: one candidate
    texts = {c["text"]: c for c in report["candidates"]}
    distinct = {normalise(t) for t in got.values() if t}
    assert len(texts) == len(distinct)
    shorter = next(c for t, c in texts.items() if "shorter" in t)
    assert shorter["agreement"] == 1.0 and shorter["held_out"] == 4
    assert shorter["support"] == sum(bool(t) and "shorter" in t for t in got.values())
    for t, c in texts.items():
        if "longer" in t:
            assert c["agreement"] == 0.0
    assert report["kept"] == [shorter["id"]]
    c = load_constitution(out)  # a valid principle file
    assert [p.preference for p in c.principles] == [shorter["text"]]
    assert "# agreement 1.000 with `preferred` on 4 held-out pairs" in out.read_text()
    assert main(["principles", "lint", str(out)]) == 0
    saved = json.loads((tmp_path / "induced.yaml.report.json").read_text())
    assert saved["candidates"] == report["candidates"]


def test_rendered_proposal_keeps_pair_text_as_data():
    text = render_proposal(PROPOSE_TEMPLATE, [{"role": "user", "content": "{{ 7*7 }}"}],
                           "good", "bad")
    assert "Human: {{ 7*7 }}" in text and "49" not in text
    assert text.index("good") < text.index("bad")


def test_cli_errors_are_one_line(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = str(tmp_path / "x.yaml")
    # the fake backend's canned text proposes nothing usable
    assert main(["principles", "induce", "--pairs", pairs, "--out", out, "--backend",
                 "fake", "--no-progress"]) == 1
    assert "proposed no usable principle" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response_a": "x", "response_b": "y"}\n')
    assert main(["principles", "induce", "--pairs", str(bad), "--out", out, "--backend",
                 "fake"]) == 1
    assert "bad.jsonl:1: preferred: missing field" in capsys.readouterr().err
    assert main(["principles", "induce", "--pairs", pairs, "--out", out, "--holdout",
                 "1.5"]) == 1
    assert "holdout: must be between 0 and 1" in capsys.readouterr().err


def test_nothing_above_min_agreement_is_an_error_with_the_report(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "induced.yaml"
    cfg = InduceConfig(pairs=pairs, out=str(out), backend="fake", progress=False)
    contrary = FakeBackend(lambda c, p: " is longer and more detailed?", option_scorer)
    with pytest.raises(CharterError, match="no candidate agreed .* above 0.5"):
        run_induce(cfg, backend=contrary)
    assert not out.exists() and (tmp_path / "induced.yaml.report.json").exists()


class ProposeFakeScoreReal:
    """Proposals from `proposer` (the embedded model proposes nothing usable: "Which response
    is more better than the other?"), labels from the embedded model's real log-probs."""

    def __init__(self, real):
        self.real, self.fake = real, FakeBackend(proposer)
        self.model_name, self.name = real.model_name, real.name

    def generate(self, *a, **kw):
        return self.fake.generate(*a, **kw)

    def score(self, *a, **kw):
        return self.real.score(*a, **kw)


@pytest.mark.integration
def test_embedded_smollm2_on_three_pairs(tmp_path):
    """3 pairs: 2 propose, 1 is held out. The embedded model's own proposals are read (and, for
    this 135M model, rejected as saying nothing: the error names the report, which keeps the raw
    answers); then its log-probs test the fake proposer's candidates on the held-out pair."""
    from critique.backends import load_backend

    rows = [json.loads(x) for x in open(write_pairs(tmp_path / "all.jsonl"))][:3]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "induced.yaml"
    cfg = InduceConfig(pairs=str(pairs), out=str(out), progress=False, holdout=0.34,
                       min_agreement=0.0, max_new_tokens=24)
    real = load_backend("transformers", None, progress=False)
    try:
        report = run_induce(cfg, backend=real)
    except CharterError as e:
        assert "proposed no usable principle" in str(e) or "no candidate agreed" in str(e)
        report = json.loads((tmp_path / "induced.yaml.report.json").read_text())
    assert report["proposal_pairs"] == 2 and report["held_out_pairs"] == 1
    assert [p["raw"][:14] for p in report["proposals"]] == ["Which response"] * 2
    if out.exists():  # the model's own proposal was kept
        assert load_constitution(out).principles[0].preference.startswith("Which response")
    out = tmp_path / "hybrid.yaml"
    cfg.out = str(out)
    try:
        report = run_induce(cfg, backend=ProposeFakeScoreReal(real))
    except CharterError as e:  # every candidate at 0 on the one held-out pair
        assert "no candidate agreed" in str(e) and not out.exists()
        report = json.loads((tmp_path / "hybrid.yaml.report.json").read_text())
    assert report["candidates"] and report["held_out_pairs"] == 1
    for c in report["candidates"]:
        assert c["agreement"] in (0.0, 0.5, 1.0) and c["held_out"] == 1
    kept = [c["text"] for c in report["candidates"] if c["agreement"] > 0]
    if kept:  # written, in agreement order, and lint-clean
        assert [p.preference for p in load_constitution(out).principles] == kept
