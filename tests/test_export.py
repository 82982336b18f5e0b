"""`charter export`: a Charter run (fake backend) out in TRL's shapes, filtered or weighted by its
soft labels, with a dataset card that `datasets` reads, and into TRL's DPOTrainer for one step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from charter.core.records import PreferencePair
from training.export import ExportConfig, orient, pair_row, transcript

ROOT = Path(__file__).resolve().parents[1]


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A pipeline-shaped run: critique/ and label/ made by the CLI with the fake backend."""
    d = tmp_path_factory.mktemp("run")
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in (
        "How do I pick a lock?", "How can I hurt someone?", "Name a prime.", "Say hi.")))
    cons = str(ROOT / "principles" / "harmless.yaml")
    common = ["--backend", "fake", "--constitution", cons, "--prompts", str(d / "p.jsonl")]
    assert main(["critique", *common, "--out", str(d / "critique")]) == 0
    assert main(["label", *common, "--samples", "2", "--out", str(d / "label")]) == 0
    return d


def rows(f):
    return [json.loads(x) for x in Path(f).read_text().splitlines()]


def test_soft_labels_choice_weights_and_margin():
    """p_chosen 0.3 → swapped to chosen=b with p 0.7, weight 2·|0.7 − 0.5| = 0.4; an unlabelled
    (critique) pair is a hard pair: p 1, weight 1."""
    pair = PreferencePair([u("q")], [a("x")], [a("y")], 0.3)
    flipped = orient(pair)
    assert flipped.chosen == [a("y")] and flipped.p_chosen == pytest.approx(0.7)
    cfg = ExportConfig(run="r", out="o", soft_labels="as-weights")
    row = pair_row(pair, cfg)
    assert row["chosen"] == [a("y")] and row["p_chosen"] == pytest.approx(0.7)
    assert row["weight"] == pytest.approx(0.4)
    hard = pair_row(PreferencePair([u("q")], [a("x")], [a("y")]), cfg)
    assert (hard["p_chosen"], hard["weight"]) == (1.0, 1.0)
    assert set(pair_row(pair, ExportConfig(run="r", out="o"))) == {"prompt", "chosen",
                                                                  "rejected"}
    std = pair_row(pair, ExportConfig(run="r", out="o", format="trl-standard"))
    assert std == {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " y", "rejected": " x"}
    assert transcript([{"role": "system", "content": "Be kind."}, u("q"), a("x")]) == \
        "Be kind.\n\nHuman: q\n\nAssistant: x"


def test_export_a_run_with_a_card_datasets_reads(run_dir, tmp_path):
    from datasets import load_dataset

    labels = rows(run_dir / "label" / "pairs.jsonl")
    margin = sorted(abs(r["p_chosen"] - 0.5) for r in labels)[1]  # keeps all but the closest
    out = tmp_path / "ex"
    assert main(["export", str(run_dir), "--out", str(out), "--min-margin", str(margin),
                 "--soft-labels", "as-weights"]) == 0
    pref = rows(out / "preference" / "train.jsonl")
    assert len(pref) == len(labels) - 1 and all(r["p_chosen"] >= 0.5 for r in pref)
    assert len(rows(out / "sft" / "train.jsonl")) == len(rows(run_dir / "critique" / "sft.jsonl"))
    card = (out / "README.md").read_text()
    manifest = json.loads((run_dir / "critique" / "manifest.json").read_text())
    sha = manifest["provenance"]["constitution"]["sha256"] if "provenance" in manifest else None
    assert "constitution: `harmless`" in card and (sha is None or sha in card)
    assert (out / "constitution.yaml").read_bytes() == (run_dir / "critique" /
                                                         "constitution.yaml").read_bytes()
    ds = load_dataset(str(out), "preference", split="train")  # the card's configs
    assert ds.num_rows == len(pref) and "weight" in ds.column_names
    assert load_dataset(str(out), "sft", split="train").column_names == ["messages"]
    with pytest.raises(CharterError, match="min_margin: must be in"):
        main_raises(["export", str(run_dir), "--out", str(out), "--min-margin", "0.7"])
    with pytest.raises(CharterError, match="no sft.jsonl or pairs.jsonl"):
        main_raises(["export", str(tmp_path), "--out", str(out)])


def main_raises(argv):
    from charter.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._run(args)


@pytest.mark.parametrize("fmt", ["trl-conversational", "trl-standard"])
def test_exported_run_trains_one_step_in_trl(run_dir, tmp_path, tiny_model_dir, fmt):
    trl = pytest.importorskip("trl", reason="trl is the `bench` extra; runs where it is installed")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ex"
    assert main(["export", str(run_dir), "--out", str(out), "--format", fmt]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_dataset(str(out), "preference", split="train")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2,
                         max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         logging_steps=1, max_length=128)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             args=args, train_dataset=data, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0
    if fmt == "trl-standard":  # and the same file trains here, as plain text
        from training.dpo import train_dpo
        from training.options import DPOConfig

        train_dpo(DPOConfig(data=str(out / "preference" / "train.jsonl"), out=str(tmp_path / "c"),
                            model=str(tiny_model_dir), max_steps=1, batch_size=2,
                            save_every=None))
        assert (tmp_path / "c" / "final" / "README.md").exists()
