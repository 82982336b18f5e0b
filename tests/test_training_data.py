"""Tokenisation boundary, truncation and collation, with literal token ids."""

from __future__ import annotations

import json

import pytest
import torch

from charter.core.errors import CharterError
from charter.core.records import PreferencePair
from training.collate import collate_pairs, collate_sft
from training.data import (
    PairExample,
    SFTExample,
    encode_pair,
    encode_sft,
    load_pair_rows,
    load_sft_rows,
    render_ids,
    truncation,
)


def test_collate_sft_literal_ids():
    """Rows [5 6 7] and [8 9] with labels on their last tokens; pad id 0 on the right."""
    ex = [SFTExample([5, 6, 7], [-100, 6, 7], "a"), SFTExample([8, 9], [-100, 9], "b")]
    b = collate_sft(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def test_collate_pairs_concatenates_chosen_then_rejected():
    """Pair 1: prompt [1 2], chosen [3], rejected [4 5]; pair 2: prompt [6], chosen [7 8 9],
    rejected [10]. Rows: chosen1, chosen2, rejected1, rejected2; prompt labels -100; pad 0."""
    ex = [PairExample([1, 2], [3], [4, 5], 0.8, "a"), PairExample([6], [7, 8, 9], [10], None, "b")]
    b = collate_pairs(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1],
                                            [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 3, -100], [-100, 7, 8, 9],
                                    [-100, -100, 4, 5], [-100, 10, -100, -100]]
    assert b["p_chosen"][0].item() == pytest.approx(0.8) and torch.isnan(b["p_chosen"][1])


@pytest.mark.parametrize("p, r, L, want", [
    (3, 4, 10, (3, 4)),      # fits: unchanged
    (10, 100, 50, (10, 40)),  # long response: the response is cut
    (100, 10, 50, (40, 10)),  # long prompt: the prompt's start is cut
    (100, 100, 50, (25, 25)),  # both long: the prompt keeps half
])
def test_truncation(p, r, L, want):
    assert truncation(p, r, L) == want


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_sft_labels_cover_every_assistant_turn_only(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    ex = encode_sft(tok, msgs, ("f.jsonl", 1))
    labelled = tok.decode([t for t in ex.labels if t != -100])
    assert labelled == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
    assert ex.input_ids == render_ids(tok, msgs, False)


def test_pair_boundary_and_truncation(tok):
    pair = PreferencePair([{"role": "user", "content": "Q " * 40}],
                          [{"role": "assistant", "content": "yes"}],
                          [{"role": "assistant", "content": "no " * 30}], 0.7)
    ex = encode_pair(tok, pair, ("f.jsonl", 3))
    assert tok.decode(ex.chosen_ids) == "yes<|im_end|>\n"
    assert ex.prompt_ids + ex.chosen_ids == render_ids(tok, pair.prompt + pair.chosen, False)
    short = encode_pair(tok, pair, ("f.jsonl", 3), max_length=40)
    assert short.prompt_ids == ex.prompt_ids[-20:]  # both long: the prompt keeps half, its end
    assert short.rejected_ids == ex.rejected_ids[:20] and short.chosen_ids == ex.chosen_ids


def test_boundary_that_retokenises_differently_is_named(tok, tmp_path):
    """A template whose generation prompt ends in a space: alone, "Assistant: " tokenises with
    a trailing " " token, but in the conversation the space merges with the answer's first word
    (" Sure"), so the prompt ids are not a prefix of the full ids."""
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    pair = PreferencePair([{"role": "user", "content": "hi"}],
                          [{"role": "assistant", "content": "Sure"}],
                          [{"role": "assistant", "content": "No"}])
    p = render_ids(tok, pair.prompt, True)
    f = render_ids(tok, pair.prompt + pair.chosen, False)
    assert f[:len(p)] != p  # the template really re-tokenises at the boundary
    with pytest.raises(CharterError) as e:
        encode_pair(tok, pair, ("pairs.jsonl", 7))
    assert str(e.value).startswith("pairs.jsonl:7: ") and "differently" in str(e.value)


def test_loaders_read_dirs_files_and_saved_datasets(tmp_path):
    from datasets import Dataset

    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
           "p_chosen": 0.9}
    (tmp_path / "pairs.jsonl").write_text("\n" + json.dumps(row) + "\n")
    got = load_pair_rows(tmp_path)
    assert got.sources == [(str(tmp_path / "pairs.jsonl"), 2)] and got.rows[0].p_chosen == 0.9
    Dataset.from_list([row, {**row, "p_chosen": 2.0}]).save_to_disk(tmp_path / "ds")
    with pytest.raises(CharterError, match=r"ds\[row 1\].*p_chosen"):
        load_pair_rows(tmp_path / "ds")
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    Dataset.from_list([msgs]).save_to_disk(tmp_path / "sft")
    assert load_sft_rows(tmp_path / "sft").rows[0][1]["content"] == "a"
    with pytest.raises(CharterError, match=r"sft\[row 0\]: data: this is language modeling "
                       r"\(conversational\) data, which trains with `charter train sft`"):
        load_pair_rows(tmp_path / "sft")


def test_provenance_finds_the_constitution_hash(tmp_path):
    from training.data import data_provenance

    h = "ab" * 32
    (tmp_path / "sft.jsonl").write_text("{}\n")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"provenance": {"constitution": {"name": "harmless", "sha256": h}}}))
    prov = data_provenance(tmp_path / "sft.jsonl")
    assert prov["constitution_sha256"] == h and len(prov["data_sha256"]) == 64
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "report.json").write_text(json.dumps({"constitution_sha256": h}))
    assert data_provenance(tmp_path / "sft.jsonl")["constitution_sha256"] == h
    (tmp_path / "report.json").unlink()
    assert "constitution_sha256" not in data_provenance(tmp_path / "sft.jsonl")
