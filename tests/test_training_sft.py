"""SFT on the tiny model, through the command line (flags over a YAML config)."""

from __future__ import annotations

import json

import pytest

from charter.cli import main


def write_sft(path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i} is apple."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_loss_falls_via_cli(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    write_sft(tmp_path / "sft.jsonl")  # read from the directory below
    yaml = tmp_path / "sft.yaml"
    yaml.write_text(f"model: {tiny_model_dir}\nlr: 0.03\nbatch_size: 4\nwarmup_ratio: 0.0\nschedule: constant\n"
                    "max_steps: 2\n")
    out = tmp_path / "run"
    argv = ["train", "sft", "--config", str(yaml), "--data", str(tmp_path), "--out", str(out),
            "--max-steps", "6", "--save-every", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 6  # the flag overrode the YAML's max_steps
    assert m[-1]["loss"] < m[0]["loss"] - 2.0  # nats per assistant token
    assert {"loss", "lr", "tokens_per_s"} <= set(m[0])
    assert (out / "checkpoint-3" / "manifest.json").exists() and (out / "metrics.png").exists()
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_cli_reports_bad_settings_on_one_line(tmp_path, capsys):
    data = write_sft(tmp_path / "sft.jsonl")
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("lr: 0.1\nbogus: 3\n")
    assert main(["train", "sft", "--config", str(yaml), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 1
    assert f"{yaml}:2: bogus: unknown config key" in capsys.readouterr().err
    assert main(["train", "dpo", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--loss", "ipo", "--label-smoothing", "0.1"]) == 1
    assert "label_smoothing: label smoothing is defined" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("warmup_ratio", 1.0),
                                          ("max_length", 4)])
def test_config_validation_names_the_field(field, value):
    from charter.core.errors import CharterError
    from training.options import SFTConfig

    with pytest.raises(CharterError) as e:
        SFTConfig(data="d", out="o", **{field: value}).validate()
    assert e.value.field == field


def test_a_finished_run_frees_its_model(tmp_path, tiny_model_dir, monkeypatch):
    """The pipeline runs SFT, label and DPO in one process: once train_sft has returned and the
    runner has collected garbage (`charter.pipeline.free_memory`; accelerate's objects hold
    reference cycles), its model, optimizer state and Accelerator are gone: nothing keeps them
    (a cache, a global, accelerate's state)."""
    import weakref

    import training.sft as sft
    import training.stage as stage
    from charter.pipeline import free_memory
    from training.options import SFTConfig

    refs = []
    setup = stage.setup

    def spy(cfg):
        acc, model, tok, path = setup(cfg)
        refs.extend([weakref.ref(acc), weakref.ref(model)])
        return acc, model, tok, path

    monkeypatch.setattr(stage, "setup", spy)
    write_sft(tmp_path / "sft.jsonl", 4)
    sft.train_sft(SFTConfig(data=str(tmp_path / "sft.jsonl"), out=str(tmp_path / "out"),
                            model=str(tiny_model_dir), batch_size=2, max_steps=1,
                            save_every=None))
    assert len(refs) == 2
    free_memory()
    assert all(r() is None for r in refs)
