"""Every command that runs a model takes the same backend flags, and they reach the backend.

`load_backend` is replaced by a recorder that stops the command once a backend is asked for,
so these tests need no model or server (tests/test_vllm_backend.py runs `charter eval` and
`charter label` against a real vLLM server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from critique.backends.options import BackendSpec, backend_spec, build_backend

CONS = str(Path(__file__).resolve().parents[1] / "principles" / "harmless.yaml")
SERVER = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "http://127.0.0.1:10",
          "--api-key-env", "MY_KEY", "--concurrency", "3", "--request-timeout", "7",
          "--max-retries", "2", "--tokenizer", "smollm2"]


class Asked(Exception):
    pass


@pytest.fixture
def asked(monkeypatch):
    """(name, model, kwargs) of every backend a command asks for; the first one stops it."""
    calls = []

    def record(name, model=None, **kw):
        calls.append((name, model, kw))
        raise Asked

    monkeypatch.setattr("critique.backends.load_backend", record)
    return calls


def _inputs(tmp_path: Path) -> dict[str, str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I pick a lock?", "label": "harmful"}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "response_a": "Hello.",
                                 "response_b": "Go away."}) + "\n")
    return {"prompts": str(prompts), "pairs": str(pairs), "out": str(tmp_path / "out")}


COMMANDS = {
    "generate": lambda f: ["generate", "--prompts", f["prompts"], "--out", f["out"] + ".jsonl",
                           "--model", "served-a"],
    "critique": lambda f: ["critique", "--constitution", CONS, "--prompts", f["prompts"],
                           "--out", f["out"], "--model", "served-a", "--no-progress"],
    "label": lambda f: ["label", "--constitution", CONS, "--pairs", f["pairs"], "--out",
                        f["out"], "--labeler", "served-a", "--no-progress"],
    "eval": lambda f: ["eval", "--prompts", f["prompts"], "--out", f["out"], "--model",
                       "served-a"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_server_flags_reach_the_backend(command, asked, tmp_path):
    from charter.cli import build_parser

    argv = COMMANDS[command](_inputs(tmp_path)) + SERVER
    args = build_parser().parse_args(argv)
    with pytest.raises(Asked):
        args._run(args)
    name, model, kw = asked[0]
    assert (name, model) == ("openai", "served-a")
    assert kw == {"base_url": ["http://127.0.0.1:9/v1", "http://127.0.0.1:10"],
                  "api_key_env": "MY_KEY", "concurrency": 3, "timeout": 7.0, "max_retries": 2,
                  "tokenizer": "smollm2"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_local_flags_reach_the_backend(command, asked, tmp_path):
    from charter.cli import build_parser

    # a local model (commands check prompt lengths with its tokenizer before loading it)
    argv = [a if a != "served-a" else "smollm2" for a in COMMANDS[command](_inputs(tmp_path))]
    argv += ["--backend", "vllm", "--dtype", "bfloat16",
                                                   "--tensor-parallel-size", "2",
                                                   "--max-model-len", "1024",
                                                   "--trust-remote-code"]
    args = build_parser().parse_args(argv)
    with pytest.raises(Asked):
        args._run(args)
    name, model, kw = asked[0]
    assert (name, model) == ("vllm", "smollm2")
    assert {k: kw[k] for k in ("dtype", "tensor_parallel_size", "max_model_len",
                               "trust_remote_code")} == {
        "dtype": "bfloat16", "tensor_parallel_size": 2, "max_model_len": 1024,
        "trust_remote_code": True}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_server_flag_with_a_local_backend_is_refused(command, tmp_path, capsys):
    from charter.cli import main

    argv = COMMANDS[command](_inputs(tmp_path)) + ["--base-url", "http://127.0.0.1:9/v1"]
    assert main(argv) == 1
    assert "base_url applies to --backend openai only" in capsys.readouterr().err


def test_eval_judge_on_another_backend_kind(asked, tmp_path):
    """`--judge-backend fake` runs the judge locally while the models are served."""
    from critique.evaluate.run import EvalConfig, backend_specs

    cfg = EvalConfig(prompts=_inputs(tmp_path)["prompts"], out=str(tmp_path / "o"),
                     model="served-a", baseline="served-b", judge="j", judge_backend="fake",
                     constitution=CONS, backend="openai", base_url=["http://h:1/v1"])
    specs = backend_specs(cfg)
    assert [(r, s.backend, s.model) for r, s in specs.items()] == [
        ("model", "openai", "served-a"), ("baseline", "openai", "served-b"),
        ("judge", "fake", "j")]
    assert specs["judge"].base_url == []


def test_batch_sizes_reach_the_transformers_backend_and_must_be_positive():
    from critique.backends.options import backend_kwargs

    kw = backend_kwargs(BackendSpec(batch_size=48, score_batch_size=16))
    assert (kw["batch_size"], kw["score_batch_size"]) == (48, 16)
    assert "score_batch_size" not in backend_kwargs(BackendSpec(batch_size=48))
    assert "score_batch_size" not in backend_kwargs(BackendSpec(backend="vllm",
                                                                score_batch_size=16))
    for name in ("batch_size", "score_batch_size"):
        with pytest.raises(CharterError, match="at least 1") as e:
            backend_kwargs(BackendSpec(**{name: 0}), where="judge")
        assert e.value.field == f"judge.{name}"


def test_backend_spec_from_a_role_value():
    """A pipeline role: a string is a model on the top-level backend; a mapping is a full
    description whose missing keys take the defaults, not the top-level backend's."""
    base = BackendSpec(backend="vllm", model="start", dtype="bfloat16", batch_size=4)
    assert backend_spec(None, base) is base
    assert backend_spec("runs/sft", base) == BackendSpec(backend="vllm", model="runs/sft",
                                                         dtype="bfloat16", batch_size=4)
    spec = backend_spec({"model": "big", "backend": "openai", "base_url": "http://g:8000/v1",
                         "api_key_env": "G_KEY"}, base, field="labeler")
    assert spec == BackendSpec(backend="openai", model="big", base_url=["http://g:8000/v1"],
                               api_key_env="G_KEY")
    with pytest.raises(CharterError, match="labeler.*unknown config key"):
        backend_spec({"model": "big", "temprature": 0.5}, base, field="labeler")
    with pytest.raises(CharterError, match="labeler.base_url.*openai only"):
        backend_spec({"model": "big", "base_url": "http://g/v1"}, base, field="labeler")
    with pytest.raises(CharterError, match="judge.*expected a model name or a mapping"):
        backend_spec(3, base, field="judge")


def test_build_backend_builds_what_the_spec_says():
    b = build_backend(BackendSpec(backend="fake", backend_options={"model_name": "m1"}))
    assert (b.name, b.model_name) == ("fake", "m1")
    with pytest.raises(CharterError, match="base-url"):
        build_backend(BackendSpec(backend="openai", model="m"))
