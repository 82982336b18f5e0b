"""Model loading runs no code from the model: safetensors only, `trust_remote_code` off unless
`--trust-remote-code` is given. Checked at every place a model is loaded (transformers backend,
vLLM backend, SFT/DPO training, the DPO reference model) by recording the loader's kwargs."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError


@pytest.fixture
def pickle_only_dir(tmp_path, tiny_model_dir) -> Path:
    """A model folder with config and tokenizer but only a pytorch_model.bin."""
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")  # never opened
    return d


class Stop(Exception):
    """Raised by the recording loaders once they have seen the kwargs."""


@pytest.fixture
def recorded(monkeypatch):
    """Replace AutoModelForCausalLM/AutoTokenizer.from_pretrained with recorders that stop."""
    import transformers

    calls: list[tuple[str, dict]] = []
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def recorder(kind):
        def from_pretrained(path, *args, **kwargs):
            calls.append((kind, dict(kwargs)))
            if kind == "tokenizer":  # tokenizers load for real; the model load stops the run
                return real_tokenizer(path, *args, **kwargs)
            raise Stop(kind)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        recorder("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    return calls


def test_transformers_backend_refuses_pickle_weights(pickle_only_dir):
    from critique.backends import load_backend

    with pytest.raises(CharterError, match="only pickle weights here .pytorch_model.bin.") as e:
        load_backend("transformers", str(pickle_only_dir))
    assert str(pickle_only_dir) in str(e.value)


def test_cli_refuses_pickle_weights(pickle_only_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for argv in (["generate", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                  "--model", str(pickle_only_dir)],
                 ["train", "sft", "--data", str(prompts), "--out", str(tmp_path / "sft"),
                  "--model", str(pickle_only_dir)]):
        if argv[0] == "train":
            prompts.write_text(json.dumps({"messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                + "\n")
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"charter: error: {pickle_only_dir}: model: only pickle weights" in err, err


def test_transformers_backend_defaults(recorded, tiny_model_dir):
    from critique.backends import load_backend

    with pytest.raises(Stop):
        load_backend("transformers", str(tiny_model_dir))
    with pytest.raises(Stop):
        load_backend("transformers", str(tiny_model_dir), trust_remote_code=True)
    tok_default, tok_trusted = [kw for kind, kw in recorded if kind == "tokenizer"]
    model_default, model_trusted = [kw for kind, kw in recorded if kind == "model"]
    assert tok_default["trust_remote_code"] is False
    assert model_default["trust_remote_code"] is False
    assert model_default["use_safetensors"] is True
    assert tok_trusted["trust_remote_code"] is True
    assert model_trusted["trust_remote_code"] is True


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_loaders_default_to_safe(stage, recorded, tiny_model_dir, tmp_path):
    from training.options import DPOConfig, SFTConfig

    cls = SFTConfig if stage == "sft" else DPOConfig
    data = tmp_path / "d.jsonl"
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    row = {"messages": [u, a]} if stage == "sft" else {
        "prompt": [u], "chosen": [a], "rejected": [{"role": "assistant", "content": "no"}]}
    data.write_text(json.dumps(row) + "\n")
    cfg = cls(data=str(data), out=str(tmp_path / "out"), model=str(tiny_model_dir))
    assert cfg.trust_remote_code is False
    from training.dpo import train_dpo
    from training.sft import train_sft

    with pytest.raises(Stop):
        (train_sft if stage == "sft" else train_dpo)(cfg)
    assert [kind for kind, _ in recorded] == ["tokenizer", "model"]
    assert all(kw.get("trust_remote_code") is False for _, kw in recorded)
    assert recorded[1][1].get("use_safetensors") is True


def test_dpo_reference_model_is_loaded_safely(monkeypatch, tiny_model_dir, pickle_only_dir,
                                              tmp_path):
    """--ref-model goes through the same check (a pickle-only reference is refused)."""
    from training.dpo import train_dpo
    from training.options import DPOConfig

    data = tmp_path / "d.jsonl"
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    data.write_text("".join(json.dumps({"prompt": [u], "chosen": [a], "rejected": [
        {"role": "assistant", "content": f"no {i}"}]}) + "\n" for i in range(4)))
    cfg = DPOConfig(data=str(data), out=str(tmp_path / "out"), model=str(tiny_model_dir),
                    ref_model=str(pickle_only_dir))
    with pytest.raises(CharterError, match="only pickle weights"):
        train_dpo(cfg)


def test_vllm_backend_defaults(monkeypatch, tiny_model_dir, pickle_only_dir):
    """A stand-in `vllm` module records the engine kwargs: no remote code, safetensors only."""
    seen: list[dict] = []

    class LLM:
        def __init__(self, **kwargs):
            seen.append(kwargs)
            raise Stop("vllm")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    from critique.backends import load_backend

    with pytest.raises(Stop):
        load_backend("vllm", str(tiny_model_dir))
    assert seen[0]["trust_remote_code"] is False
    assert seen[0]["load_format"] == "safetensors"
    with pytest.raises(Stop):
        load_backend("vllm", str(tiny_model_dir), trust_remote_code=True)
    assert seen[1]["trust_remote_code"] is True
    with pytest.raises(CharterError, match="only pickle weights"):
        load_backend("vllm", str(pickle_only_dir))


@pytest.mark.parametrize("command", ["generate", "critique", "label", "eval", "train sft",
                                     "train dpo"])
def test_trust_remote_code_flag_defaults_off(command, capsys):
    """Every command that loads a model has --trust-remote-code, off by default."""
    from charter.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(command.split() + ["--help"])
    assert "--trust-remote-code" in capsys.readouterr().out

    configs = {
        "generate": "charter.commands.generate:GenerateConfig",
        "critique": "critique.revise.run:CritiqueConfig",
        "label": "critique.label.run:LabelConfig",
        "eval": "critique.evaluate.run:EvalConfig",
        "train sft": "training.options:SFTConfig",
        "train dpo": "training.options:DPOConfig",
    }
    import dataclasses
    import importlib

    mod, name = configs[command].split(":")
    cls = getattr(importlib.import_module(mod), name)
    field = {f.name: f for f in dataclasses.fields(cls)}["trust_remote_code"]
    assert field.default is False


def test_flag_reaches_the_loader_only_when_given():
    from critique.backends.options import BackendSpec, backend_kwargs

    assert "trust_remote_code" not in backend_kwargs(BackendSpec(backend="transformers"))
    on = BackendSpec(backend="transformers", trust_remote_code=True)
    assert backend_kwargs(on)["trust_remote_code"] is True
    assert "trust_remote_code" not in backend_kwargs(
        BackendSpec(backend="openai", base_url=["http://h:1/v1"], trust_remote_code=True))
