"""Every TRL dataset shape, from every file kind: detected, converted, refused clearly, trained one
step; standard (string) rows tokenised exactly as TRL does."""

from __future__ import annotations

import json

import pytest

from charter.core.errors import CharterError
from charter.core.records import PreferencePair
from training.data import encode_pair, encode_sft, load_pair_rows, load_sft_rows
from training.shapes import ChatCompletion, TextPair, TextSFT


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


Q = "How do I pick a lock?"
HH_C = "\n\nHuman: " + Q + "\n\nAssistant: I can't help with that."
HH_R = "\n\nHuman: " + Q + "\n\nAssistant: Use a tension wrench."
SHAPES = {  # name -> (rows, kind, shape logged, type of the converted row)
    "messages": ([{"messages": [u(Q), a("No.")]}], "sft",
                 "language modeling (conversational)", list),
    "text": ([{"text": "The sky is blue."}], "sft", "language modeling (standard)", TextSFT),
    "prompt-completion-conv": ([{"prompt": [u(Q)], "completion": [a("No.")]}], "sft",
                               "prompt-completion (conversational)", ChatCompletion),
    "prompt-completion-std": ([{"prompt": "The sky is", "completion": " blue."}], "sft",
                              "prompt-completion (standard)", TextSFT),
    "pref-explicit-conv": ([{"prompt": [u(Q)], "chosen": [a("No.")], "rejected": [a("Yes.")]}],
                           "dpo", "preference, explicit prompt (conversational)",
                           PreferencePair),
    "pref-explicit-std": ([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}],
                          "dpo", "preference, explicit prompt (standard)", TextPair),
    "pref-implicit-conv": ([{"chosen": [u(Q), a("No.")], "rejected": [u(Q), a("Yes.")]}], "dpo",
                           "preference, implicit prompt (conversational)", PreferencePair),
    "pref-implicit-std": ([{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
                          "dpo", "preference, implicit prompt (standard)", TextPair),
    "hh-rlhf": ([{"chosen": HH_C, "rejected": HH_R}], "dpo",
                "preference, implicit prompt (HH-RLHF transcripts, read as conversations)",
                PreferencePair),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(kind, path, **kw):
    return (load_sft_rows if kind == "sft" else load_pair_rows)(path, **kw)


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_is_detected_and_converted(name, tmp_path):
    rows, kind, shape, typ = SHAPES[name]
    got = load(kind, write_jsonl(tmp_path / "d.jsonl", rows * 2))
    assert got.shape == shape and len(got.rows) == 2 and isinstance(got.rows[0], typ)
    assert got.sources == [(str(tmp_path / "d.jsonl"), 1), (str(tmp_path / "d.jsonl"), 2)]


def test_implicit_prompts_are_split_as_trl_does():
    """Conversations: the common turns up to the last shared user turn; strings: the common
    character prefix without its trailing space (TRL's extract_prompt)."""
    (conv,), (std,), (hh,) = (load_rows(n) for n in ("pref-implicit-conv", "pref-implicit-std",
                                                     "hh-rlhf"))
    assert conv.prompt == [u(Q)] and conv.chosen == [a("No.")] and conv.rejected == [a("Yes.")]
    assert (std.prompt, std.chosen, std.rejected) == ("The sky is", " blue.", " green.")
    assert hh.prompt == [u(Q)] and hh.chosen == [a("I can't help with that.")]


def load_rows(name, tmp=None):
    from training.shapes import Rows, convert

    rows, kind, _, _ = SHAPES[name]
    return convert(Rows(rows, [("x", 1)], "x"), kind)[0]


def test_hh_transcripts_can_stay_plain_text(tmp_path):
    got = load_pair_rows(write_jsonl(tmp_path / "hh.jsonl", SHAPES["hh-rlhf"][0]),
                         hh_transcripts="text")
    assert "read as plain text" in got.shape and isinstance(got.rows[0], TextPair)
    assert got.rows[0].prompt == "\n\nHuman: " + Q + "\n\nAssistant:"


def test_every_file_kind_gives_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": "Grass is", "chosen": " green.", "rejected": " red."}]
    want = load_pair_rows(write_jsonl(tmp_path / "p.jsonl", rows)).rows
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "l.json", rows)  # JSON Lines named .json
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nThe sky is, blue., green.\n"
                                    "Grass is, green., red.\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    for f in ("p.json", "w.json", "l.json", "p.csv", "p.parquet", "ds"):
        assert load_pair_rows(tmp_path / f).rows == want, f
    assert load_pair_rows(tmp_path / "dd", split="test").rows == want
    with pytest.raises(CharterError, match=r"dd: split: dataset has splits \['test'\], no 'train'"):
        load_pair_rows(tmp_path / "dd")
    pq_rows = load_pair_rows(tmp_path / "p.parquet")
    assert pq_rows.sources[1] == (f"{tmp_path / 'p.parquet'}[row 1]", None)


@pytest.mark.parametrize("rows, kind, where, match", [
    ([{"prompt": "q", "completion": "a", "label": True}], "dpo", ":1: label:",
     "unpaired preference data .*KTO"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}], "dpo",
     ":2: rejected:", "missing field: the first row is preference, explicit prompt"),
    ([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a", "label": 1}], "sft",
     ":2: label:", "this row is unpaired preference data"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"},
      {"prompt": "q", "chosen": [a("x")], "rejected": "b"}], "dpo", ":2: chosen:",
     "expected a string like the first row's"),
    ([{"messages": [u("q"), a("a")]}], "dpo", ":1: data:", "trains with `charter train sft`"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}], "sft", ":1: data:",
     "trains with `charter train dpo`"),
    ([{"chosen": [u("q"), a("a")], "rejected": [u("q"), a("a")]}], "dpo", ":1: rejected:",
     "the same conversation"),
    ([{"chosen": [a("a")], "rejected": [a("b")]}], "dpo", ":1: chosen:", "no opening user turn"),
    ([{"question": "q"}], "sft", ":1: data:", "no known dataset shape in keys"),
    ([{"text": ""}], "sft", ":1: text:", "empty"),
])
def test_refusals_name_file_line_and_field(tmp_path, rows, kind, where, match):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CharterError, match=match) as e:
        load(kind, f)
    assert str(e.value).startswith(str(f) + where)


def test_a_hub_name_offline_gives_a_clear_message(tmp_path, monkeypatch):
    """No network here: the name is not cached, so loading fails without a download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CharterError, match=r"^charter-test/no-such-set: data: .*offline.*"
                                           r"save_to_disk"):
        load_pair_rows("charter-test/no-such-set", split="train")
    with pytest.raises(CharterError, match="data not found"):
        load_pair_rows(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# tokens: ours equal TRL's on standard rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


STD_PAIRS = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."},
             {"prompt": "Q: is 7 prime?\nA:", "chosen": " Yes", "rejected": " No, it is 3x3"}]


def test_standard_pairs_tokenise_as_in_trl(tmp_path, tiny_model_dir, tok):
    trl = pytest.importorskip("trl", reason="trl is the `bench` extra; runs where it is installed")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                         max_length=None, precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             args=args, train_dataset=Dataset.from_list(STD_PAIRS),
                             processing_class=tok)
    ours = load_pair_rows(write_jsonl(tmp_path / "p.jsonl", STD_PAIRS))
    assert "standard" in ours.shape
    for i, row in enumerate(trainer.train_dataset):
        ex = encode_pair(tok, ours.rows[i], ("p", i))
        assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (
            row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        assert ex.chosen_ids[-1] == tok.eos_token_id  # TRL appends EOS to standard responses
        # and not the chat template: no "<|im_start|>" in a standard pair's tokens
        assert "<|im_start|>" not in tok.decode(ex.prompt_ids + ex.chosen_ids)


def test_standard_sft_tokenises_as_in_trl(tmp_path, tiny_model_dir, tok):
    trl = pytest.importorskip("trl", reason="trl is the `bench` extra; runs where it is installed")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for rows in ([{"text": "The sky is blue."}, {"text": "Two and two make four."}],
                 [{"prompt": "The sky is", "completion": " blue."},
                  {"prompt": "2 + 2 =", "completion": " 4"}]):
        args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                             max_length=None)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok)
        ours = load_sft_rows(write_jsonl(tmp_path / "s.jsonl", rows))
        for i, row in enumerate(trainer.train_dataset):
            ex = encode_sft(tok, ours.rows[i], ("s", i))
            assert ex.input_ids == row["input_ids"]
            # token 0 is never a target (labels shift by one), so it may differ
            assert ex.labels[1:] == row["labels"][1:]
            if "prompt" in rows[0]:
                assert ex.labels.count(-100) > 0  # the prompt is masked, as in TRL


# ---------------------------------------------------------------------------------------------
# one training step on each shape


@pytest.mark.parametrize("name", SHAPES)
def test_one_training_step_on_each_shape(name, tmp_path, tiny_model_dir, capsys):
    from training.dpo import train_dpo
    from training.options import DPOConfig, SFTConfig
    from training.sft import train_sft

    rows, kind, shape, _ = SHAPES[name]
    data = write_jsonl(tmp_path / "d.jsonl", rows * 2)
    common = dict(data=str(data), out=str(tmp_path / "run"), model=str(tiny_model_dir),
                  max_steps=1, batch_size=2, max_length=64, save_every=None)
    if kind == "sft":
        final = train_sft(SFTConfig(**common))
    else:
        final = train_dpo(DPOConfig(**common))
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 1 and m[0]["loss"] > 0 and (final / "config.json").exists()
    assert f"data: {data}: 2 rows, {shape}" in capsys.readouterr().err  # the shape is logged
