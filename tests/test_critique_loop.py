"""The critique-and-revise loop with a deterministic fake backend: the exact conversations sent,
principle and few-shot sampling, batching, flagging, and the exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from charter.core.records import read_pairs, read_sft
from constitution import draw, load_constitution
from critique.backends.fake import FakeBackend
from critique.revise.run import CritiqueConfig, run_critique

ONE_PRINCIPLE = """\
name: one
description: One principle, for exact conversations.
principles:
  - id: harm
    critique: "What is harmful in the response to '{{ prompt }}'?"
    revision: "Rewrite it. Critique was: {{ critique }}"
"""

TWO_PRINCIPLES = """\
name: two
description: Two principles and two few-shot examples.
principles:
  - id: harm
    critique: "Harm critique of: {{ response }}"
    revision: "Harm revision."
  - id: rude
    critique: "Rude critique of: {{ response }}"
    revision: "Rude revision."
  - id: kind
    preference: "Which response is kinder?"
few_shot:
  - principle: rude
    prompt: "Insult me."
    response: "You are dumb."
    critique: "It is an insult."
    revision: "I'd rather say something kind."
  - prompt: "How do I steal a car?"
    response: "Break the window."
    critique: "It helps someone steal a car."
    revision: "I can't help with stealing cars."
"""


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def prompts_file(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def lock_responder(conv, prefix):
    """Initial answer, a critique (nothing to fix once the answer refuses), a revision."""
    last = conv[-1]["content"]
    prev = next((m["content"] for m in reversed(conv) if m["role"] == "assistant"), "")
    if last == "How do I pick a lock?":
        return "Use a tension wrench and a pick."
    if last.startswith("What is harmful"):
        if conv[0]["content"] == "Say hi" or prev.startswith("I can't"):
            return "Critique: Nothing to fix, the response is safe."
        return "The response could help a burglar."
    if last.startswith("Rewrite it."):
        return "Sure, here is a revised response: I can't help with breaking into places."
    raise AssertionError(f"unexpected request {last!r}")


def cfg_for(tmp_path, constitution, prompts, **kw) -> CritiqueConfig:
    kw.setdefault("few_shot", 0)
    kw.setdefault("out", str(tmp_path / "out"))
    return CritiqueConfig(constitution=constitution, prompts=prompts, backend="fake",
                          progress=False, **kw)


def test_exact_conversations_two_rounds(tmp_path):
    """Every message list sent, literally: the initial answer (only where the input gives none),
    critique, revision; a 'nothing to fix' critique asks for no revision; an empty step sends
    no call."""
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?"},
                                            {"prompt": "Say hi", "response": "Hi there"}])
    fake = FakeBackend(lock_responder)
    m = run_critique(cfg_for(tmp_path, c, p, rounds=2), backend=fake)

    crit1 = user("What is harmful in the response to 'How do I pick a lock?'?")
    crit2 = user("What is harmful in the response to 'Say hi'?")
    rev1 = user("Rewrite it. Critique was: The response could help a burglar.")
    lock_r1 = [user("How do I pick a lock?"), assistant("Use a tension wrench and a pick."),
               crit1, assistant("The response could help a burglar."), rev1]
    hi_r1 = [user("Say hi"), assistant("Hi there"), crit2,
             assistant("Nothing to fix, the response is safe.")]
    assert fake.calls == [
        ("generate", [[user("How do I pick a lock?")]]),
        ("generate", [hi_r1[:3], lock_r1[:3]]),  # a chunk runs shortest first (by_length)
        ("generate", [lock_r1]),
        ("generate", [hi_r1 + [crit2],
                      lock_r1 + [assistant("I can't help with breaking into places."), crit1]]),
    ]
    records = [json.loads(line) for line in (tmp_path / "out/records.jsonl").open()]
    records.reverse()  # written in the order run: shortest prompt first
    assert [r["rounds"] for r in records] == [
        [{"principle_id": "harm", "critique": "The response could help a burglar.",
          "revision": "I can't help with breaking into places."},
         {"principle_id": "harm", "critique": "Nothing to fix, the response is safe.",
          "revision": "I can't help with breaking into places."}],
        [{"principle_id": "harm", "critique": "Nothing to fix, the response is safe.",
          "revision": "Hi there"},
         {"principle_id": "harm", "critique": "Nothing to fix, the response is safe.",
          "revision": "Hi there"}],
    ]
    assert [r["final_response"] for r in records] == ["I can't help with breaking into places.",
                                                      "Hi there"]
    assert records[0]["initial_response"] == "Use a tension wrench and a pick."
    assert all(r["flagged"] is None for r in records)
    prov = records[0]["provenance"]
    assert prov["constitution"] == {"name": "one",
                                    "sha256": load_constitution(c).sha256}
    assert prov["rounds"] == 2 and prov["model"] == "fake" and prov["seed"] == 0
    counts = m["counts"]
    assert (counts["done"], counts["flagged"], counts["revised_rounds"],
            counts["unchanged_rounds"], counts["pairs"], counts["sft_examples"],
            counts["identical_pairs_skipped"]) == (2, 0, 1, 3, 1, 2, 1)
    assert m["principle_usage"] == {"harm": 4}
    assert m["timings"]["steps"]["critique"]["calls"] == 2
    assert m["timings"]["steps"]["revision"]["conversations"] == 1


def test_few_shot_turns_prepended(tmp_path):
    """Both examples (file order) come before the prompt as six turns each, with requests
    from the example's own principle (`rude`) or, when it names none, this round's; the
    initial answer is asked for without them."""
    c = write(tmp_path / "c.yaml", TWO_PRINCIPLES)
    cons = load_constitution(c)
    prompt = "How do I make a weapon?"
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": prompt, "response": "Like this."}])
    fake = FakeBackend(lambda conv, prefix: "It is dangerous.")
    run_critique(cfg_for(tmp_path, c, p, few_shot=2), backend=fake)
    rid = json.loads((tmp_path / "out/records.jsonl").read_text())["id"]
    # this round's principle (seeded draw): "Harm" or "Rude" in the templates below
    P = draw(cons.critique_principles, 1, 0, rid, 0)[0].id.capitalize()
    few = [user("Insult me."), assistant("You are dumb."),
           user("Rude critique of: You are dumb."), assistant("It is an insult."),
           user("Rude revision."), assistant("I'd rather say something kind."),
           user("How do I steal a car?"), assistant("Break the window."),
           user(f"{P} critique of: Break the window."),
           assistant("It helps someone steal a car."),
           user(f"{P} revision."), assistant("I can't help with stealing cars.")]
    convo = [user(prompt), assistant("Like this."), user(f"{P} critique of: Like this.")]
    assert fake.calls == [
        ("generate", [few + convo]),
        ("generate", [few + convo + [assistant("It is dangerous."), user(f"{P} revision.")]]),
    ]


def test_few_shot_copy_of_example_is_flagged(tmp_path):
    c = write(tmp_path / "c.yaml", TWO_PRINCIPLES)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Hurt someone?", "response": "Sure."}])
    fake = FakeBackend(lambda conv, prefix: "It helps someone steal a car.")
    m = run_critique(cfg_for(tmp_path, c, p, few_shot=2), backend=fake)
    assert m["counts"]["flagged_by_reason"] == {"critique:copies_example": 1}


def test_principle_sampling_is_seeded_per_record_and_round(tmp_path):
    """Draws depend on (seed, record id, round) only: the same under another batch size,
    different under another seed, and both principles are used."""
    c = write(tmp_path / "c.yaml", TWO_PRINCIPLES)
    rows = [{"prompt": f"Prompt number {i}", "response": f"Answer {i}"} for i in range(24)]
    p = prompts_file(tmp_path / "p.jsonl", rows)
    fake = FakeBackend(lambda conv, prefix: "It is rude." if "critique of" in conv[-1]["content"]
                       else "A kinder answer.")

    def principles(seed, batch_size, out):
        cfg = CritiqueConfig(constitution=c, prompts=p, out=str(tmp_path / out), rounds=3,
                             seed=seed, batch_size=batch_size, few_shot=0, backend="fake",
                             progress=False)
        m = run_critique(cfg, backend=fake)
        recs = [json.loads(x) for x in (tmp_path / out / "records.jsonl").open()]
        return [[r["principle_id"] for r in rec["rounds"]] for rec in recs], m, recs

    a, m, recs = principles(0, 24, "a")
    b, _, _ = principles(0, 5, "b")
    other, _, _ = principles(1, 24, "c")
    assert a == b
    assert a != other
    cons = load_constitution(c)
    assert a == [[draw(cons.critique_principles, 1, 0, r["id"], k)[0].id for k in range(3)]
                 for r in recs]
    assert set(m["principle_usage"]) == {"harm", "rude"}  # never the preference-only one
    assert sum(m["principle_usage"].values()) == 72


def test_one_generate_call_per_step_per_chunk(tmp_path):
    """5 prompts, batch 2: chunks of 2, 2, 1, each with one call per step; each chunk's
    records are on disk before the next chunk starts."""
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(5)])
    records = tmp_path / "out/records.jsonl"
    lines_seen = []

    def responder(conv, prefix):
        lines_seen.append(len(records.read_text().splitlines()) if records.exists() else 0)
        return "It is harmful." if conv[-1]["content"].startswith("What") else "An answer."

    fake = FakeBackend(responder)
    run_critique(cfg_for(tmp_path, c, p, batch_size=2), backend=fake)
    assert [len(convs) for _, convs in fake.calls] == [2, 2, 2, 2, 2, 2, 1, 1, 1]
    # one entry per conversation: 6 in chunk 1, 6 in chunk 2, 3 in chunk 3
    assert lines_seen == [0] * 6 + [2] * 6 + [4] * 3
    assert len(records.read_text().splitlines()) == 5


@pytest.mark.parametrize("critique, revision, flagged, final", [
    ("It is harmful.", "Revision: I won't help.", None, "I won't help."),
    ("It is harmful.", '"I won\'t help."', None, "I won't help."),
    ("It is harmful.", "", "revision:empty", ""),
    ("It is harmful.", "A.K.A.S.A.R.A.D.A.K.A.S.A.R", "revision:loop",
     "A.K.A.S.A.R.A.D.A.K.A.S.A.R"),
    ("It is harmful.", "Rewrite it. Critique was: It is harmful.", "revision:copies_request",
     "Rewrite it. Critique was: It is harmful."),
    ("It explains how to open other people's locks.",
     "It explains how to open other people's locks.", "revision:copies_critique",
     "It explains how to open other people's locks."),
    ("It is harmful.", "The response is harmful because it explains lock picking.",
     "revision:comments_not_revises", "The response is harmful because it explains lock picking."),
    ("", "unused", "critique:empty", ""),
    ("the the the the the the", "unused", "critique:loop", ""),
    ("What is harmful in the response to 'Open a lock'?", "unused",
     "critique:copies_request", ""),
    ("No, there is nothing harmful here.", "unused", None, "Pick it."),
    ("No harm, but it should mention the law.", "I'd mention the law.", None,
     "I'd mention the law."),
])
def test_cleaning_and_flagging(tmp_path, critique, revision, flagged, final):
    """A malformed output flags its record (raw text kept, no further rounds, counted, left
    out of the exports); never an exception."""
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Open a lock", "response": "Pick it."},
                                            {"prompt": "Good prompt", "response": "Fine."}])

    def responder(conv, prefix):
        if "Good prompt" in conv[0]["content"]:
            return "It is harmful." if conv[-1]["content"].startswith("What") else "Better."
        return critique if conv[-1]["content"].startswith("What") else revision

    fake = FakeBackend(responder)
    m = run_critique(cfg_for(tmp_path, c, p, rounds=2), backend=fake)
    rec = json.loads((tmp_path / "out/records.jsonl").read_text().splitlines()[0])
    assert rec["flagged"] == flagged
    assert rec["final_response"] == final
    if flagged:
        assert len(rec["rounds"]) == 1  # stopped at the failed step
        raw = critique if flagged.startswith("critique") else revision
        assert raw in (rec["rounds"][0]["critique"], rec["rounds"][0]["revision"])
        assert m["counts"]["flagged"] == 1 and m["counts"]["flagged_by_reason"] == {flagged: 1}
        sft = read_sft(tmp_path / "out/sft.jsonl")
        assert [s[0]["content"] for s in sft] == ["Good prompt"]
        assert [pr.prompt[0]["content"] for pr in read_pairs(tmp_path / "out/pairs.jsonl")] \
            == ["Good prompt"]
    else:
        assert len(rec["rounds"]) == 2 and m["counts"]["flagged"] == 0


def test_flagged_initial_response(tmp_path):
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Hello?"}])
    fake = FakeBackend(lambda conv, prefix: "ha ha ha ha ha ha ha")
    m = run_critique(cfg_for(tmp_path, c, p), backend=fake)
    rec = json.loads((tmp_path / "out/records.jsonl").read_text())
    assert rec["flagged"] == "initial:loop" and rec["rounds"] == []
    assert rec["initial_response"] == "ha ha ha ha ha ha ha"
    assert len(fake.calls) == 1  # no critique of a failed answer
    assert m["counts"]["done"] == 0 and (tmp_path / "out/sft.jsonl").read_text() == ""


def test_exports_load_with_datasets(tmp_path):
    """sft.jsonl / pairs.jsonl in the conversational formats TRL reads, through `datasets`;
    the manifest and a byte copy of the principle file sit beside them."""
    datasets = pytest.importorskip("datasets")
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?"},
                                            {"prompt": "Say hi", "response": "Hi there"}])
    h = prompts_file(tmp_path / "h.jsonl", [{"instruction": "Name a fruit."},
                                            {"instruction": "Count to three."}])

    def responder(conv, prefix):
        if conv[-1]["content"] == "Name a fruit.":
            return "An apple."
        if conv[-1]["content"] == "Count to three.":
            return "1 1 1 1 1 1 1 1 1 1 1"  # degenerate: flagged, not exported
        return lock_responder(conv, prefix)

    m = run_critique(cfg_for(tmp_path, c, p, helpful_prompts=h), backend=FakeBackend(responder))
    out = tmp_path / "out"
    sft = datasets.load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
    assert sft["messages"] == [
        [user("How do I pick a lock?"), assistant("I can't help with breaking into places.")],
        [user("Say hi"), assistant("Hi there")],
        [user("Name a fruit."), assistant("An apple.")],
    ]
    assert sft["source"] == ["critique", "critique", "helpful"]
    pairs = datasets.load_dataset("json", data_files=str(out / "pairs.jsonl"), split="train")
    assert pairs.column_names == ["id", "prompt", "chosen", "rejected"]
    assert pairs[0]["prompt"] == [user("How do I pick a lock?")]
    assert pairs[0]["chosen"] == [assistant("I can't help with breaking into places.")]
    assert pairs[0]["rejected"] == [assistant("Use a tension wrench and a pick.")]
    assert len(pairs) == 1  # "Say hi" kept its answer: identical pair skipped
    assert (out / "constitution.yaml").read_text() == ONE_PRINCIPLE
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == m and manifest["status"] == "complete"
    assert manifest["config"]["helpful_prompts"] == h
    assert manifest["counts"]["helpful_done"] == 1
    assert manifest["counts"]["flagged_by_reason"] == {"helpful:loop": 1}
    assert manifest["counts"]["flagged"] == 0  # helpful answers are counted apart
    helpful = [json.loads(x) for x in (out / "helpful.jsonl").open()]
    assert [h["flagged"] for h in helpful] == [None, "helpful:loop"]


def test_helpful_answers_resume(tmp_path):
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Say hi", "response": "Hi there"}])
    h = prompts_file(tmp_path / "h.jsonl", [{"instruction": f"Task {i}."} for i in range(3)])
    fake = FakeBackend(lambda conv, prefix: "Nothing to fix." if conv[-1]["content"]
                       .startswith("What") else "Done.")
    run_critique(cfg_for(tmp_path, c, p, helpful_prompts=h, helpful_limit=2), backend=fake)
    assert [len(convs) for _, convs in fake.calls] == [1, 2]  # critique, then helpful batch
    fake.calls.clear()
    m = run_critique(cfg_for(tmp_path, c, p, helpful_prompts=h), backend=fake)
    assert fake.calls == [("generate", [[user("Task 2.")]])]
    assert m["counts"]["helpful_done"] == 3 and m["counts"]["sft_examples"] == 4


def test_input_errors(tmp_path):
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = write(tmp_path / "p.jsonl", '{"prompt": "Fine?"}\n{"prompt": 3}\n{"nothing": 1}\n')
    fake = FakeBackend(lambda conv, prefix: "Nothing to fix.")
    with pytest.raises(CharterError, match=r"p\.jsonl:2: prompt"):
        run_critique(cfg_for(tmp_path, c, p), backend=fake)
    m = run_critique(cfg_for(tmp_path, c, p, on_error="skip"), backend=fake)
    assert m["counts"]["input_errors"] == 2 and m["counts"]["done"] == 1
    assert "p.jsonl:3" in m["input_errors"][1]


def test_bad_config_values():
    with pytest.raises(CharterError, match="rounds"):
        CritiqueConfig(constitution="c", prompts="p", out="o", rounds=0).validate()
    with pytest.raises(CharterError, match="top_p"):
        CritiqueConfig(constitution="c", prompts="p", out="o", top_p=0).validate()
    with pytest.raises(CharterError, match="needs --base-url"):
        CritiqueConfig(constitution="c", prompts="p", out="o", backend="openai").validate()
    with pytest.raises(CharterError, match="base_url applies to --backend openai only"):
        CritiqueConfig(constitution="c", prompts="p", out="o",
                       base_url=["http://127.0.0.1:8000/v1"]).validate()


def test_untrusted_ok_critique_still_asks_for_a_revision(tmp_path):
    """With trust_ok_critiques off, a "No, nothing harmful" critique is followed by a revision
    request (the paper always revises); with it on (default) the response is kept."""
    c = write(tmp_path / "c.yaml", ONE_PRINCIPLE)
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Open a lock", "response": "Pick it."}])

    def responder(conv, prefix):
        last = conv[-1]["content"]
        return "No, there is nothing harmful here." if last.startswith("What") else \
            "I won't help open locks that are not yours."

    for trust, final in ((True, "Pick it."), (False, "I won't help open locks that are not yours.")):
        fake = FakeBackend(responder)
        cfg = cfg_for(tmp_path, c, p, out=str(tmp_path / f"out-{trust}"), trust_ok_critiques=trust)
        run_critique(cfg, backend=fake)
        rec = json.loads((tmp_path / f"out-{trust}/records.jsonl").read_text())
        assert rec["final_response"] == final
        assert len([k for k, _ in fake.calls if k == "generate"]) == (1 if trust else 2)


def test_few_shot_changed_only_draws_examples_that_revise(tmp_path):
    """An example whose revision equals its response (a "nothing to fix" example) is never
    drawn with few_shot_changed_only, though few_shot asks for all three."""
    text = TWO_PRINCIPLES + """\
  - prompt: "How do I boil an egg?"
    response: "Boil it for eight minutes."
    critique: "No, nothing to fix."
    revision: "Boil it for eight minutes."
"""
    c = write(tmp_path / "c.yaml", text)
    rows = [{"prompt": f"Prompt {i}", "response": "Answer."} for i in range(6)]
    p = prompts_file(tmp_path / "p.jsonl", rows)
    fake = FakeBackend(lambda conv, prefix: "It is harmful." if "critique" in
                       conv[-1]["content"] else "Better answer.")
    run_critique(cfg_for(tmp_path, c, p, few_shot=3, few_shot_changed_only=True), backend=fake)
    sent = [m["content"] for _, convs in fake.calls for conv in convs for m in conv]
    assert "How do I boil an egg?" not in sent
    assert "How do I steal a car?" in sent
