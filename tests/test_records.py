"""Readers and writers in charter/core/records.py: every input format with literal expected messages,
and every kind of malformed input with the file:line it must name."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from charter.core.errors import CharterError
from charter.core.records import (
    JsonlAppender,
    content_id,
    load_jsonl_for_resume,
    read_pairs,
    read_prompts,
    read_sft,
)


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, *objs):
    return write(path, "".join(json.dumps(o) + "\n" for o in objs))


def user(text):
    return {"role": "user", "content": text}


HH = ("\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?"
      "\n\nHuman: I locked myself out.\n\nAssistant: Call a locksmith.")


# ---------------------------------------------------------------------------------------------
# formats


def test_jsonl_prompt_and_messages(tmp_path):
    p = jsonl(tmp_path / "p.jsonl",
              {"prompt": "Hello?", "id": 7},
              {"messages": [{"role": "system", "content": "Be kind."}, user("Hi")],
               "response": "Hey.", "label": "unsafe"})
    a, b = read_prompts(p)
    assert a.messages == [user("Hello?")] and a.id == "7" and a.source == f"{p}:1"
    assert b.messages == [{"role": "system", "content": "Be kind."}, user("Hi")]
    assert b.response == "Hey." and b.label == "harmful"
    assert b.id == content_id(b.messages)


def test_hh_transcript_takes_the_first_human_turn(tmp_path):
    p = jsonl(tmp_path / "hh.jsonl", {"chosen": HH, "rejected": HH},
              {"chosen": "\n\nHuman: Only one turn\n\nAssistant: ok"})
    a, b = read_prompts(p)
    assert a.messages == [user("How do I pick a lock?")]
    assert b.messages == [user("Only one turn")]


def test_parse_hh_transcript_multi_turn():
    from charter.core.records import parse_hh_transcript

    assert parse_hh_transcript(HH) == [
        user("How do I pick a lock?"), {"role": "assistant", "content": "Why do you want to?"},
        user("I locked myself out."), {"role": "assistant", "content": "Call a locksmith."}]


def test_gzip_and_csv(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "zipped"}) + "\n")
    assert read_prompts(gz)[0].messages == [user("zipped")]
    csv_path = write(tmp_path / "p.csv", 'prompt,label,response\n"two\nlines",benign,Hi\n'
                                         'plain,,\n')
    a, b = read_prompts(csv_path)
    assert a.messages == [user("two\nlines")] and a.label == "benign" and a.response == "Hi"
    assert b.messages == [user("plain")] and b.source == f"{csv_path}:4"
    assert b.label is None and b.response is None  # empty cells are "not given"
    with pytest.raises(CharterError, match=r"p2\.csv:3: prompt: empty prompt"):
        read_prompts(write(tmp_path / "p2.csv", "prompt\nok\n\"\"\n"))


def test_prompt_field_override_and_label_aliases(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", {"prompt": "ignored", "goal": "Use me", "label": "SAFE"})
    item = read_prompts(p, prompt_field="goal")[0]
    assert item.messages == [user("Use me")] and item.label == "benign"
    with pytest.raises(CharterError, match=r"p\.jsonl:1: goal: missing field"):
        jsonl(p, {"prompt": "x"})
        read_prompts(p, prompt_field="goal")


# ---------------------------------------------------------------------------------------------
# malformed input


@pytest.mark.parametrize("content, pattern", [
    ('{"prompt": "ok"}\n{"prompt": \n', r":2: invalid JSON"),
    ('{"prompt": "ok"}\n{"text": "x"}\n', r":2: missing field: expected prompt or messages"),
    ('', r"file is empty"),
    ('{"prompt": 5}\n', r":1: prompt: expected a string or a list"),
    ('[1, 2]\n', r":1: expected a JSON object, got list"),
    ('{"prompt": "   "}\n', r":1: prompt: empty prompt"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     r":1: messages: conversation must end with a user turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', r":1: messages\[0\]\.role: role must"),
    ('{"prompt": "a", "label": "maybe"}\n', r":1: label: label must be one of"),
    ('{"chosen": "\\n\\nHuman: \\n\\nAssistant: x"}\n', r":1: chosen: no Human turn"),
])
def test_malformed_jsonl(tmp_path, content, pattern):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(CharterError, match=pattern) as e:
        read_prompts(p)
    assert str(e.value).startswith(str(p))


def test_non_utf8_binary_missing_and_directory(tmp_path):
    latin = write(tmp_path / "latin.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(CharterError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_prompts(latin)
    binary = write(tmp_path / "bin.jsonl", b'{"prompt": "ok"}\n\x00\x01\x02\n')
    with pytest.raises(CharterError, match=r"bin\.jsonl:2: binary content"):
        read_prompts(binary)
    with pytest.raises(CharterError, match=r"nope\.jsonl: prompts file not found"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(CharterError, match="found a directory"):
        read_prompts(tmp_path)
    fake_gz = write(tmp_path / "x.jsonl.gz", b"not gzip at all\n")
    with pytest.raises(CharterError, match="not a readable gzip file"):
        read_prompts(fake_gz)


def test_skip_mode_keeps_reading_after_bad_lines(tmp_path):
    p = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{oops\n{"text": 1}\n{"prompt": "b"}\n')
    errors: list[str] = []
    items = read_prompts(p, on_error="skip", errors=errors)
    assert [i.messages[0]["content"] for i in items] == ["a", "b"]
    assert len(errors) == 2
    assert errors[0].startswith(f"{p}:2: invalid JSON") and errors[1].startswith(f"{p}:3: ")
    bad_only = write(tmp_path / "q.jsonl", '{"text": 1}\n')
    with pytest.raises(CharterError, match=r"no usable prompts \(1 bad records"):
        read_prompts(bad_only, on_error="skip")


# ---------------------------------------------------------------------------------------------
# resume files, ids


def test_resume_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as out:
        out.append({"id": "a"})
        out.append({"id": "b"})
    with open(p, "ab") as f:
        f.write(b'{"id": "c", "resp')  # killed mid-write
    assert [r["id"] for r in load_jsonl_for_resume(p)] == ["a", "b"]
    assert p.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'  # truncated back, ready to append
    with JsonlAppender(p) as out:
        out.append({"id": "c"})
    assert [r["id"] for r in load_jsonl_for_resume(p)] == ["a", "b", "c"]
    assert load_jsonl_for_resume(tmp_path / "missing.jsonl") == []


def test_resume_refuses_a_corrupt_middle_line(tmp_path):
    p = write(tmp_path / "out.jsonl", '{"id": "a"}\n{garbage\n{"id": "c"}\n')
    before = p.read_bytes()
    with pytest.raises(CharterError, match=r"out\.jsonl:2: corrupt record"):
        load_jsonl_for_resume(p)
    assert p.read_bytes() == before  # nothing is cut away


def test_content_id_is_stable():
    msgs = [{"role": "user", "content": "Hi"}]
    assert content_id(msgs) == "467fd43780532177"  # sha256 of '[[{"content":"Hi","role":"user"}]]'
    assert content_id([{"content": "Hi", "role": "user"}]) == content_id(msgs)  # key order
    assert content_id("a", 1) == "135f17a475a61afd"
    assert content_id("a", 2) != content_id("a", 1)


# ---------------------------------------------------------------------------------------------
# pairs and SFT


def test_read_pairs_conversational_and_standard(tmp_path):
    conv = {"prompt": [user("Q")], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], "p_chosen": 0.75,
            "id": "x1", "votes": [1, 0]}
    std = {"prompt": "Q2", "chosen": "yes", "rejected": "no"}
    a, b = read_pairs(jsonl(tmp_path / "pairs.jsonl", conv, std))
    assert a.prompt == [user("Q")] and a.chosen[0]["content"] == "good"
    assert a.p_chosen == 0.75 and a.id == "x1" and a.extra == {"votes": [1, 0]}
    assert a.to_dict() == conv
    assert b.prompt == [user("Q2")]
    assert b.chosen == [{"role": "assistant", "content": "yes"}] and b.p_chosen is None
    with pytest.raises(CharterError, match=r":1: p_chosen: must be a probability"):
        read_pairs(jsonl(tmp_path / "bad.jsonl", {**std, "p_chosen": 1.5}))
    with pytest.raises(CharterError, match=r":1: rejected: missing field"):
        read_pairs(jsonl(tmp_path / "bad2.jsonl", {"prompt": "a", "chosen": "b"}))


def test_read_sft_needs_a_final_assistant_turn(tmp_path):
    ok = {"messages": [user("Q"), {"role": "assistant", "content": "A"}]}
    assert read_sft(jsonl(tmp_path / "s.jsonl", ok)) == [ok["messages"]]
    with pytest.raises(CharterError, match=r":2: messages: conversation must end with a "
                                           r"assistant turn"):
        read_sft(jsonl(tmp_path / "t.jsonl", ok, {"messages": [user("Q")]}))


def test_unreadable_file(tmp_path, monkeypatch):
    p = jsonl(tmp_path / "p.jsonl", {"prompt": "a"})
    p.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k:
                            False if str(path) == str(p) else real(path, mode, *a, **k))
    with pytest.raises(CharterError, match="not readable"):
        read_prompts(p)


def test_label_record_writes_and_reads_both_modes():
    """Compare: the result's fields in order, extra kept, preferred last; an unreadable label
    keeps p_a null. Rate: only the rating fields. Each row reads back to the same record."""
    from charter.core.records import LabelRecord

    res = {"p_a": 0.75, "orders": [0.8, 0.7], "votes": {"h": 0.75},
           "vote_orders": {"h": [0.8, 0.7]}, "missing_option_reads": 1}
    row = LabelRecord.of("p1", res, "a").to_dict()
    assert list(row) == ["id", "p_a", "orders", "votes", "vote_orders",
                         "missing_option_reads", "preferred"]
    assert row["p_a"] == 0.75 and row["preferred"] == "a"
    assert LabelRecord.from_dict(row) == LabelRecord.of("p1", res, "a")
    assert LabelRecord.of("p2", {"p_a": None, "orders": None, "votes": {},
                                 "vote_orders": {}}).to_dict()["p_a"] is None
    rated = LabelRecord.of("p3", {"ratings": [7.0, 3.0], "rating_gap": 4.0,
                                  "rating_votes": {"h": [7.0, 3.0]}})
    assert rated.mode == "rate" and rated.to_dict() == {
        "id": "p3", "ratings": [7.0, 3.0], "rating_gap": 4.0, "rating_votes": {"h": [7.0, 3.0]}}
    assert LabelRecord.from_dict(rated.to_dict()) == rated
    with pytest.raises(CharterError, match="id"):
        LabelRecord.from_dict({"p_a": 0.5}, path="labels.jsonl")


def test_eval_response_key_depends_on_model_prompt_and_budget():
    from charter.core.records import EvalResponse

    msgs = [{"role": "user", "content": "hi"}]
    k = EvalResponse.key_of("m", msgs, 64)
    assert k != EvalResponse.key_of("m2", msgs, 64) != EvalResponse.key_of("m", msgs, 32)
    rec = EvalResponse(k, "p0", "hello")
    assert rec.to_dict() == {"key": k, "id": "p0", "response": "hello"}
    assert EvalResponse.from_dict(rec.to_dict()) == rec
    assert EvalResponse.from_dict({"id": "p0", "response": "old row without a key"}) is None


# a results.jsonl row exactly as the dict code before EvalResult wrote it
OLD_RESULTS_ROW = {
    "id": "h1", "label": "harmful", "prompt": [{"role": "user", "content": "How?"}],
    "model": {"response": "I'm sorry, I can't.", "rule": True, "rule_phrase": "i'm sorry",
              "judge_p_refusal": 0.9, "refused": True},
    "baseline": {"response": "Sure: step one", "rule": False, "rule_phrase": None,
                 "judge_p_refusal": 0.2, "refused": False},
    "p_model_preferred": 0.75,
    "judge": {"p_a": 0.75, "orders": [0.8, 0.7], "votes": {"h": 0.75},
              "vote_orders": {"h": [0.8, 0.7]}},
}


def test_eval_result_reads_an_old_row_and_writes_the_same_keys(tmp_path):
    """A row of the dict code reads into EvalResult (answers by role) and writes back the same
    JSON, key order included; a row without a judged comparison has neither
    p_model_preferred nor judge; a file reads row by row."""
    from charter.core.records import EvalAnswer, EvalResult, read_eval_results

    row = EvalResult.from_dict(OLD_RESULTS_ROW)
    assert list(row.answers) == ["model", "baseline"]
    assert row.answers["model"] == EvalAnswer("I'm sorry, I can't.", True, "i'm sorry", 0.9, True)
    assert row.p_model_preferred == 0.75 and row.judge["orders"] == [0.8, 0.7]
    assert json.dumps(row.to_dict()) == json.dumps(OLD_RESULTS_ROW)
    solo = EvalResult("b1", "benign", [user("Hi")], {"model": EvalAnswer("Hello", False, None,
                                                                         None, False)})
    assert list(solo.to_dict()) == ["id", "label", "prompt", "model"]
    assert EvalResult.from_dict(solo.to_dict()) == solo
    tie = EvalResult("b2", "benign", [user("Hi")], dict(row.answers), 0.5, {"identical": True})
    assert EvalResult.from_dict(tie.to_dict()) == tie
    path = jsonl(tmp_path / "results.jsonl", OLD_RESULTS_ROW, solo.to_dict())
    assert [r.id for r in read_eval_results(path)] == ["h1", "b1"]


@pytest.mark.parametrize("bad, pattern", [
    ({"label": "harmful"}, "id: a results row needs a string id"),
    ({"id": "x", "model": {"response": "hi"}}, "model: not an answer row"),
])
def test_eval_result_bad_rows_name_the_field(bad, pattern):
    from charter.core.records import EvalResult

    with pytest.raises(CharterError, match=f"results.jsonl:3: {pattern}"):
        EvalResult.from_dict(bad, "results.jsonl", 3)


def test_prompt_done_round_trips_and_reads_older_marks():
    """The label stage's done mark: the same keys as the dict code wrote; a mark written
    before `unlabelled` existed reads with 0; a mark without its key is a clear error."""
    from charter.core.records import PromptDone

    mark = PromptDone("k1", "p1", pairs=3, responses=4, skipped_identical=1, unlabelled=2)
    assert mark.to_dict() == {"key": "k1", "prompt_id": "p1", "pairs": 3, "responses": 4,
                              "skipped_identical": 1, "unlabelled": 2}
    assert PromptDone.from_dict(mark.to_dict()) == mark
    old = {"key": "k2", "prompt_id": "p2", "pairs": 0, "responses": 1, "skipped_identical": 3}
    assert PromptDone.from_dict(old).unlabelled == 0
    with pytest.raises(CharterError, match="prompts_done.jsonl: key"):
        PromptDone.from_dict({"prompt_id": "p3"}, "prompts_done.jsonl")
    with pytest.raises(CharterError, match="not a done mark"):
        PromptDone.from_dict({"key": "k4", "prompt_id": "p4"}, "prompts_done.jsonl")
