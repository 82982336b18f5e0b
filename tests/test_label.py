"""AI preference labelling with a fake backend whose log-probs are known: order swapping,
principle ensemble, chain of thought, rating mode, resume, accuracy, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from critique.backends.fake import FakeBackend
from critique.label.run import LabelConfig, run_label
from critique.preference import prompt as lp

CONSTITUTION = """\
name: test
description: two preference principles that disagree
principles:
  - id: harm
    preference: Which response is less harmful?
  - id: honest
    preference: Which response is more honest?
label_few_shot:
  - principle: harm
    prompt: How do I make a bomb?
    response_a: I cannot help with that.
    response_b: Mix these chemicals.
    answer: A
"""

ONE_PRINCIPLE = CONSTITUTION.split("  - id: honest")[0] + """\
label_few_shot:
  - principle: harm
    prompt: How do I make a bomb?
    response_a: I cannot help with that.
    response_b: Mix these chemicals.
    answer: A
"""

OPTION_RE = re.compile(r"^\(([AB])\) (.*)$", re.MULTILINE)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def shown(conv, option: str) -> str:
    """The response shown in position `option` of the last (asked) comparison."""
    return dict(OPTION_RE.findall(conv[-1]["content"]))[option]


def biased_scorer(bias: float, quality: float):
    """log p(option) = bias·[option is A] + quality·["good" in the response there] - 5."""
    def scorer(conv, option, prefix):
        return bias * (option == "A") + quality * ("good" in shown(conv, option)) - 5.0
    return scorer


@pytest.fixture
def constitution_path(tmp_path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(ONE_PRINCIPLE)
    return p


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(i: int, a: str, b: str, preferred: str | None = None) -> dict:
    row = {"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}?"}],
           "response_a": a, "response_b": b}
    if preferred:
        row["preferred"] = preferred
    return row


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}?"}) + "\n" for i in range(n)))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_comparison_prompt_literal_text(constitution_path):
    from constitution import load_constitution

    c = load_constitution(constitution_path)
    conv = lp.comparison(c, c.principles[0], [{"role": "user", "content": "How do I pick a lock?"}],
                         "first", "second", few_shot=1)
    head = "Consider the following conversation between a human and an assistant:\n\n"
    assert conv == [
        {"role": "user", "content": head + "Human: How do I make a bomb?\n\n"
         "Which response is less harmful?\n\nOptions:\n(A) I cannot help with that.\n"
         "(B) Mix these chemicals.\n\nAnswer with the letter of the better option."},
        {"role": "assistant", "content": "(A)"},
        {"role": "user", "content": head + "Human: How do I pick a lock?\n\n"
         "Which response is less harmful?\n\nOptions:\n(A) first\n(B) second\n\n"
         "Answer with the letter of the better option."},
    ]
    assert lp.comparison(c, c.principles[0], [{"role": "user", "content": "x"}], "1", "2",
                         few_shot=0)[0]["content"].startswith(head + "Human: x\n\n")
    assert lp.rating(c, c.principles[0], [{"role": "user", "content": "Hi"}], "Hello") == [
        {"role": "user", "content": head + "Human: Hi\n\nHere is the assistant's response:\n"
         "Hello\n\nWhich response is less harmful?\nRate the response on a scale from 1 (worst) "
         "to 10 (best). Answer with the number only."}]


def test_swap_removes_position_bias(tmp_path, constitution_path):
    """Fake labeller: log p = 3·[option A] + 2·[response there is "good"] - 5.
    Pair (good, bad): given order la = 3+2-5 = 0, lb = -5 → P(A) = σ(5) = 0.993307;
    swapped (bad in A) la = 3-5 = -2, lb = 2-5 = -3 → P(A) = σ(1) = 0.731059, so p_a there is
    0.268941. p_a = (0.993307 + 0.268941) / 2 = 0.631124. Pair (bad, good) mirrors it:
    orders [0.731059, 0.006693], p_a = 0.368876. Both orders pick position A each time, so
    position_bias = 1.0; given-order accuracy is 1/2 (always "a"), both orders 2/2."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "good one", "bad one", "a"),
                                                   pair(2, "bad two", "good two", "b")])
    fake = FakeBackend(scorer=biased_scorer(3.0, 2.0))
    cfg = LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                      out=str(tmp_path / "out"), principles_per_pair=1, few_shot=0)
    report = run_label(cfg, backend=fake)
    labels = read_out(tmp_path / "out" / "labels.jsonl")
    assert [r["id"] for r in labels] == ["p1", "p2"]
    assert labels[0]["p_a"] == pytest.approx(0.631124, abs=1e-6)
    assert labels[0]["orders"] == pytest.approx([0.993307, 0.268941], abs=1e-6)
    assert labels[1]["p_a"] == pytest.approx(0.368876, abs=1e-6)
    assert labels[1]["orders"] == pytest.approx([0.731059, 0.006693], abs=1e-6)
    assert labels[0]["votes"] == {"harm": pytest.approx(0.631124, abs=1e-6)}
    assert report["position_bias"] == 1.0
    assert report["accuracy"]["given_order"] == 0.5
    assert report["accuracy"]["both_orders"] == 1.0
    assert report["accuracy"]["per_principle"] == {"harm": {"n": 2, "accuracy": 1.0}}
    # one score call for the chunk, both orders of both pairs in it, prefix "(" and A/B
    score_calls = [c for c in fake.calls if c[0] == "score"]
    assert len(score_calls) == 1 and len(score_calls[0][1]) == 4
    assert json.loads((tmp_path / "out" / "report.json").read_text())["n"] == 2


def test_position_bias_weaker_than_content(tmp_path, constitution_path):
    """Bias 1, quality 2: given order (good in A) picks A; swapped (bad in A: la = 1-5 = -4,
    lb = 2-5 = -3) picks B → winning position changed. A pair of two equal responses picks A
    both times (only the bias). Bias statistic = 1 of 2 pairs = 0.5; the equal pair's
    p_a = (σ(1) + 1 - σ(1)) / 2 = 0.5 exactly."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "good", "bad"),
                                                   pair(2, "same", "same too")])
    cfg = LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                      out=str(tmp_path / "out"), principles_per_pair=1)
    report = run_label(cfg, backend=FakeBackend(scorer=biased_scorer(1.0, 2.0)))
    labels = read_out(tmp_path / "out" / "labels.jsonl")
    assert report["position_bias"] == 0.5
    assert labels[1]["p_a"] == pytest.approx(0.5)
    assert labels[1]["orders"] == pytest.approx([sigmoid(1), 1 - sigmoid(1)])
    assert "accuracy" not in report


def test_principle_ensemble_keeps_votes(tmp_path):
    """Two principles, no position bias. "harm" prefers the "good" response by 2 nats:
    vote σ(2) = 0.880797 in both orders. "honest" prefers the other by 1 nat: σ(-1) = 0.268941.
    p_a = (0.880797 + 0.268941) / 2 = 0.574869; the principles disagree: agreement 0.0."""
    c = tmp_path / "c.yaml"
    c.write_text(CONSTITUTION)

    def scorer(conv, option, prefix):
        good = "good" in shown(conv, option)
        if "less harmful" in conv[-1]["content"]:
            return 2.0 * good - 5.0
        return 1.0 * (not good) - 5.0

    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "good", "bad")])
    cfg = LabelConfig(constitution=str(c), pairs=str(pairs), out=str(tmp_path / "out"),
                      principles_per_pair=2)
    report = run_label(cfg, backend=FakeBackend(scorer=scorer))
    (rec,) = read_out(tmp_path / "out" / "labels.jsonl")
    assert rec["votes"] == {"harm": pytest.approx(0.880797, abs=1e-6),
                            "honest": pytest.approx(0.268941, abs=1e-6)}
    assert rec["p_a"] == pytest.approx(0.574869, abs=1e-6)
    assert report["principle_agreement"] == 0.0
    assert report["principle_usage"] == {"harm": 1, "honest": 1}


def test_cot_reads_options_after_reasoning_and_clamps(tmp_path, constitution_path):
    """The labeller writes "B is safer." after "Let's think step by step:"; the options are read
    after that + "\\nSo the better response is (". The fake gives the "good" response 6 nats:
    P = σ(6) = 0.9975 in each order → clamped to 0.8 → orders [0.8, 0.8], p_a = 0.8."""
    seen_prefixes = []

    def scorer(conv, option, prefix):
        seen_prefixes.append(prefix)
        return 6.0 * ("good" in shown(conv, option)) - 5.0

    def responder(conv, prefix):
        assert prefix == "Let's think step by step:"
        return " B is safer."

    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "good", "bad", "a")])
    cfg = LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                      out=str(tmp_path / "out"), principles_per_pair=1, cot=True)
    report = run_label(cfg, backend=FakeBackend(responder=responder, scorer=scorer))
    (rec,) = read_out(tmp_path / "out" / "labels.jsonl")
    assert rec["p_a"] == pytest.approx(0.8)
    assert rec["orders"] == pytest.approx([0.8, 0.8])
    assert rec["reasoning"] == {"harm": [" B is safer.", " B is safer."]}
    assert set(seen_prefixes) == {"Let's think step by step: B is safer.\n"
                                  "So the better response is ("}
    assert report["accuracy"]["cot"] is True


def test_bad_pairs_input_names_file_and_line(tmp_path, constitution_path):
    good = json.dumps(pair(1, "x", "y"))
    cases = [
        ('{"id": "q", "prompt": "hi", "response_a": "x"}', "pairs.jsonl:2: response_b: missing"),
        (json.dumps(pair(2, "x", "y", "c")), "pairs.jsonl:2: preferred: expected a or b"),
        (good, "pairs.jsonl:2: id: duplicate id 'p1'"),
        ('{"prompt": [{"role": "bot", "content": "x"}], "response_a": "a", "response_b": "b"}',
         "pairs.jsonl:2: prompt[0].role"),
        ("not json", "pairs.jsonl:2: invalid JSON"),
    ]
    for line, expected in cases:
        (tmp_path / "pairs.jsonl").write_text(good + "\n" + line + "\n")
        cfg = LabelConfig(constitution=str(constitution_path), pairs=str(tmp_path / "pairs.jsonl"),
                          out=str(tmp_path / "out"))
        with pytest.raises(CharterError) as e:
            run_label(cfg, backend=FakeBackend())
        assert expected in str(e.value)


@pytest.mark.parametrize("kw, field", [
    ({"pairs": "p.jsonl", "prompts": "q.jsonl"}, "prompts"),
    ({}, "prompts"),
    ({"prompts": "q.jsonl", "samples": 1}, "samples"),
    ({"pairs": "p.jsonl", "policy": "m"}, "policy"),
    ({"prompts": "q.jsonl", "temperature": 0.0}, "temperature"),
    ({"pairs": "p.jsonl", "clamp_low": 0.6}, "clamp_low"),
    ({"pairs": "p.jsonl", "cot": True, "mode": "rate"}, "cot"),
])
def test_conflicting_settings(kw, field):
    with pytest.raises(CharterError) as e:
        LabelConfig(constitution="c.yaml", out="o", **kw).validate()
    assert e.value.field == field


def test_cli_label_pairs_with_yaml_config(tmp_path, constitution_path, capsys, monkeypatch):
    """`charter label --config` with the fake backend: flags override the YAML."""
    from charter.cli import main

    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "good", "bad", "a")])
    conf = tmp_path / "label.yaml"
    conf.write_text(f"constitution: {constitution_path}\npairs: {pairs}\nbackend: fake\n"
                    f"principles_per_pair: 1\nout: {tmp_path / 'ignored'}\n")
    assert main(["label", "--config", str(conf), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "labels.jsonl").exists()
    assert not (tmp_path / "ignored").exists()
    conf.write_text("constitution: c.yaml\nsampels: 3\n")
    assert main(["label", "--config", str(conf)]) == 1
    assert "label.yaml:2: sampels: unknown config key" in capsys.readouterr().err


@pytest.mark.integration
def test_embedded_smollm2_labels_pairs_symmetrically(tmp_path, constitution_path):
    """The embedded SmolLM2 labels 2 pairs and the same 2 pairs swapped. Both-orders averaging
    makes the swapped pair's p_a the complement of the original's (the four conversations are
    the same, only their roles change), whatever the model's position bias."""
    from critique.backends import load_backend

    rows = [pair(1, "I can't help with hurting people.", "Hit him with a brick."),
            pair(2, "Lock picking can be illegal; call a locksmith.", "Use a tension wrench.")]
    rows += [dict(r, id=r["id"] + "-swapped", response_a=r["response_b"],
                  response_b=r["response_a"]) for r in rows]
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    backend = load_backend("transformers", None, progress=False)
    cfg = LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                      out=str(tmp_path / "out"), principles_per_pair=1, few_shot=1)
    report = run_label(cfg, backend=backend)
    labels = {r["id"]: r for r in read_out(tmp_path / "out" / "labels.jsonl")}
    for pid in ("p1", "p2"):
        a, b = labels[pid], labels[pid + "-swapped"]
        assert 0.0 < a["p_a"] < 1.0
        assert a["p_a"] == pytest.approx(sum(a["orders"]) / 2)
        assert b["p_a"] == pytest.approx(1.0 - a["p_a"], abs=1e-4)
        assert b["orders"] == pytest.approx([1 - a["orders"][1], 1 - a["orders"][0]], abs=1e-4)
    assert report["n"] == 4 and 0.0 <= report["position_bias"] <= 1.0
    assert report["usage"]["labeler"]["score_calls"] == 1


def test_pairs_jsonl_loads_with_datasets(tmp_path, constitution_path):
    """pairs.jsonl is TRL conversational data: `datasets` reads it with its extra columns."""
    import datasets

    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    cfg = LabelConfig(constitution=str(constitution_path), prompts=str(prompts),
                      out=str(tmp_path / "out"), samples=3, principles_per_pair=1)
    run_label(cfg, backend=FakeBackend())
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "out" / "pairs.jsonl"),
                               split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 9
    assert {"prompt", "chosen", "rejected", "p_chosen", "votes", "orders"} <= set(ds.column_names)
    assert ds[0]["chosen"][0]["role"] == "assistant"


def test_backend_error_names_the_pairs_and_keeps_earlier_labels(tmp_path, constitution_path):
    """A backend refusal (e.g. a pair too long for the context) names the pairs' file:line;
    the chunks labelled before it stay in labels.jsonl."""
    def scorer(conv, option, prefix):
        if "too long" in conv[-1]["content"]:
            raise CharterError("conversation 0 is 9000 tokens", field="conversations")
        return -1.0

    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "x", "y"), pair(2, "too long", "y")])
    cfg = LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                      out=str(tmp_path / "out"), batch_size=1)
    with pytest.raises(CharterError, match=r"9000 tokens; while labelling the pairs at "
                       r"\S*pairs.jsonl:2 "):
        run_label(cfg, backend=FakeBackend(scorer=scorer))
    assert [r["id"] for r in read_out(tmp_path / "out" / "labels.jsonl")] == ["p1"]


def test_transformers_score_reads_single_token_options_from_one_row(tiny_model_dir,
                                                                    constitution_path):
    """The labeller's "A"/"B" after "(" are one token each after the same context, so the
    transformers backend runs one row per conversation (not one per option) and reads both
    from its next-token log-probs; the values equal a manual unbatched computation."""
    import torch

    from constitution import load_constitution
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), batch_size=8, progress=False, device="cpu")
    c = load_constitution(constitution_path)
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    convs = [lp.comparison(c, c.principles[0], msgs, x, y, 1) for x, y in
             (("Call a locksmith.", "Use a pick."), ("Use a pick.", "Call a locksmith."))]
    rows_seen = []
    real = b._score_rows
    b._score_rows = lambda rows: rows_seen.append(len(rows)) or real(rows)
    got = b.score(convs, [list(lp.OPTIONS)] * 2, [lp.ANSWER_PREFIX] * 2)
    assert rows_seen == [2]
    for conv, values in zip(convs, got):
        for opt, value in zip(lp.OPTIONS, values):
            ids, start = b.option_tokens(conv, opt, lp.ANSWER_PREFIX)
            assert start == len(ids) - 1  # one token
            with torch.no_grad():
                logits = b.model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1].float()
            assert value == pytest.approx(float(torch.log_softmax(logits, -1)[ids[-1]]),
                                          abs=1e-4)


def test_a_run_that_saved_nothing_does_not_lock_the_directory(tmp_path, constitution_path):
    """The first chunk fails (e.g. a wrong model): nothing is saved, so a re-run with other
    settings may use the directory; once labels exist, other settings are refused."""
    def broken(conv, option, prefix):
        raise CharterError("model exploded")

    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "x", "y")])
    kw = dict(constitution=str(constitution_path), pairs=str(pairs), out=str(tmp_path / "out"))
    with pytest.raises(CharterError, match="model exploded"):
        run_label(LabelConfig(**kw, few_shot=0), backend=FakeBackend(scorer=broken))
    run_label(LabelConfig(**kw, few_shot=1), backend=FakeBackend())
    with pytest.raises(CharterError, match="few_shot: 1 → 0"):
        run_label(LabelConfig(**kw, few_shot=0), backend=FakeBackend())
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(CharterError, match="bad.jsonl:1: prompt"):
        run_label(LabelConfig(**{**kw, "pairs": str(tmp_path / "bad.jsonl"),
                                 "out": str(tmp_path / "out2")}), backend=FakeBackend())
    assert not (tmp_path / "out2").exists()  # bad input fails before anything is written


def test_ratings_nested_follows_the_tokenizer(tiny_model_dir):
    """SmolLM2's tokenizer writes "10" as "1" "0" (ids 33, 32): nested. A tokenizer with one
    "10" token is not; no tokenizer: assume split digits."""
    from transformers import AutoTokenizer

    assert lp.ratings_nested(AutoTokenizer.from_pretrained(tiny_model_dir))

    def one_token_ten(text, add_special_tokens=False):
        return {"input_ids": {"1": [5], "10": [9]}[text]}

    assert not lp.ratings_nested(one_token_ten)
    assert lp.ratings_nested(None)


def test_cot_and_rating_run_on_a_real_backend(tiny_model_dir, tmp_path, constitution_path):
    """CoT (generate, then score after the reasoning) and rate mode through the transformers
    backend on the tiny random model: the plumbing works and the numbers obey their bounds."""
    from critique.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(str(tiny_model_dir), progress=False, device="cpu")
    pairs = write_pairs(tmp_path / "pairs.jsonl", [pair(1, "Call a locksmith.", "Use a pick.")])
    run_label(LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                          out=str(tmp_path / "cot"), cot=True, cot_max_new_tokens=4,
                          progress=False), backend=b)
    (rec,) = read_out(tmp_path / "cot" / "labels.jsonl")
    assert all(0.2 <= o <= 0.8 for o in rec["orders"])
    assert len(rec["reasoning"]["harm"]) == 2
    run_label(LabelConfig(constitution=str(constitution_path), pairs=str(pairs),
                          out=str(tmp_path / "rate"), mode="rate", progress=False), backend=b)
    (rec,) = read_out(tmp_path / "rate" / "labels.jsonl")
    assert all(1.0 <= r <= 10.0 for r in rec["ratings"])
    assert rec["rating_gap"] == pytest.approx(rec["ratings"][0] - rec["ratings"][1])
