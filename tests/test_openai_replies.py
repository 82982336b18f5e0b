"""The openai backend's settings (base URLs, flags, YAML, the CLI over two stub servers), API
keys kept out of manifests, and replies of the wrong shape from a local stub server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from critique.backends.base import Sampling
from tests.openai_stub import CONV, Stub, make, serve


@pytest.fixture
def stub():
    yield from serve()


def test_bad_base_url_and_missing_url():
    from critique.backends.options import BackendSpec, backend_kwargs

    with pytest.raises(CharterError, match="http"):
        make("localhost:8000")
    with pytest.raises(CharterError, match="base-url"):
        backend_kwargs(BackendSpec(backend="openai"))
    with pytest.raises(CharterError, match="openai only"):
        backend_kwargs(BackendSpec(backend="transformers", base_url=["http://x/v1"]))


def test_backend_kwargs_per_backend():
    from critique.backends.openai_backend import normalise_base_url
    from critique.backends.options import BackendSpec, backend_kwargs

    cfg = BackendSpec(backend="vllm", dtype="bfloat16", tensor_parallel_size=2,
                        backend_options={"enforce_eager": True})
    assert backend_kwargs(cfg) == {"dtype": "bfloat16", "tensor_parallel_size": 2,
                                   "enforce_eager": True}
    cfg = BackendSpec(backend="openai", base_url=["http://a:1/v1", "http://b:2"],
                        concurrency=3, request_timeout=5.0)
    assert backend_kwargs(cfg) == {"base_url": ["http://a:1/v1", "http://b:2"],
                                   "api_key_env": "OPENAI_API_KEY", "concurrency": 3,
                                   "timeout": 5.0, "max_retries": 5}
    assert normalise_base_url("http://b:2/") == "http://b:2/v1"


def test_backend_flags_and_yaml(tmp_path):
    """`--base-url` repeats or takes several URLs; a YAML string is one URL; the key's
    variable name is the only key-related thing a config holds."""
    import argparse

    from charter.core.config import add_config_args, build_config
    from critique.backends.options import BackendSpec

    p = argparse.ArgumentParser()
    add_config_args(p, BackendSpec)
    args = p.parse_args(["--backend", "openai", "--base-url", "http://a/v1", "--base-url",
                         "http://b/v1", "http://c/v1", "--api-key-env", "MY_KEY"])
    cfg = build_config(BackendSpec, args)
    assert cfg.base_url == ["http://a/v1", "http://b/v1", "http://c/v1"]
    assert cfg.api_key_env == "MY_KEY"
    y = tmp_path / "c.yaml"
    y.write_text("backend: openai\nbase_url: http://a/v1\nbackend_options: {backoff: 2}\n")
    cfg = build_config(BackendSpec, p.parse_args([]), y)
    assert cfg.base_url == ["http://a/v1"] and cfg.backend_options == {"backoff": 2}


def test_cli_generate_over_two_servers(tmp_path, monkeypatch):
    """`charter generate --backend openai --base-url A --base-url B`: both servers answer, the
    key goes in the header only."""
    from charter.cli import main

    monkeypatch.setenv("CHARTER_TEST_KEY", "sk-secret-789")
    a, b_ = Stub(delay=0.1), Stub(delay=0.1)
    try:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8)))
        out = tmp_path / "o.jsonl"
        rc = main(["generate", "--prompts", str(prompts), "--out", str(out), "--backend",
                   "openai", "--model", "stub-model", "--base-url", a.url, "--base-url", b_.url,
                   "--api-key-env", "CHARTER_TEST_KEY", "--max-new-tokens", "8"])
        assert rc == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(r["response"] for r in rows) == sorted(f"echo q{i} #0" for i in range(8))
        assert a.log and b_.log
        assert all(e["headers"]["Authorization"] == "Bearer sk-secret-789"
                   for e in a.log + b_.log)
        assert "sk-secret-789" not in out.read_text()
    finally:
        for s in (a, b_):
            s.shutdown()
            s.server_close()


def test_critique_manifest_never_holds_the_key(stub, tmp_path, monkeypatch):
    """The critique stage built from its config (`build_backend`) writes no key anywhere."""
    from critique.revise.run import CritiqueConfig, run_critique

    monkeypatch.setenv("CHARTER_TEST_KEY", "sk-secret-000")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    cons = str(Path(__file__).resolve().parents[1] / "principles" / "harmless.yaml")
    cfg = CritiqueConfig(constitution=cons, prompts=str(prompts), out=str(tmp_path / "c"),
                         backend="openai", model="stub-model", base_url=[stub.url],
                         api_key_env="CHARTER_TEST_KEY", max_new_tokens=8, few_shot=0,
                         progress=False)
    run_critique(cfg)
    assert stub.log and stub.log[0]["headers"]["Authorization"] == "Bearer sk-secret-000"
    written = {p.name: p.read_text() for p in (tmp_path / "c").iterdir() if p.is_file()}
    assert "manifest.json" in written
    assert "CHARTER_TEST_KEY" in "".join(written.values())  # the variable's name is recorded
    assert not [n for n, text in written.items() if "sk-secret-000" in text]


# -- replies of the wrong shape: retried, then one clear error (or skipped per record) ---------

MALFORMED = {
    "choices-not-a-list": {"choices": "x"},
    "no-choices": {"choices": []},
    "content-a-number": {"choices": [{"index": 0, "message": {"content": 5}}]},
    "message-null": {"choices": [{"index": 0, "message": None}]},
    "index-a-string": {"choices": [{"index": "a", "message": {"content": "x"}}]},
    "lone-surrogate": {"choices": [{"index": 0, "message": {"content": "bad \ud800"}}]},
    "nul-in-text": {"choices": [{"index": 0, "message": {"content": "bad \u0000"}}]},
    "a-list": [1, 2],
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_reply_is_retried_then_one_clear_error(stub, name):
    from critique.backends.replies import ReplyError

    stub.script = [("reply", MALFORMED[name])]
    with make(stub.url, max_retries=2) as b:  # once bad, then good: the retry succeeds
        assert b.generate([CONV], Sampling(max_new_tokens=4)) == [["echo Say hi #0"]]
    stub.script = [("reply", MALFORMED[name])] * 3
    with make(stub.url, max_retries=2) as b, pytest.raises(CharterError) as e:
        b.generate([CONV], Sampling(max_new_tokens=4))
    assert str(e.value).startswith(f"base_url: {stub.url}/chat/completions: gave up after 3 "
                                   "attempts; last: HTTP 200 with"), str(e.value)
    assert isinstance(e.value, ReplyError) == (name != "a-list")  # a list is not an object


def test_malformed_usage_counts_are_ignored(stub):
    stub.script = [("reply", {"choices": [{"index": 0, "message": {"content": "ok"}}],
                              "usage": {"prompt_tokens": "many", "completion_tokens": -3}})]
    with make(stub.url) as b:
        assert b.generate([CONV], Sampling(max_new_tokens=4)) == [["ok"]]
        assert b.usage.prompt_tokens == 0 and b.usage.generated_tokens == 0


def test_generate_skips_records_with_bad_replies_per_record(stub, tmp_path, capsys):
    from charter.cli import main

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("one", "POISON", "three")))
    stub.bad_for = ("POISON", MALFORMED["content-a-number"])
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--prompts", str(p), "--out", str(out), "--backend", "openai",
            "--base-url", stub.url, "--model", "stub-model", "--max-retries", "1"]
    assert main(argv) == 1  # without skip: one clear error
    err = capsys.readouterr().err
    assert err.count("charter: error:") == 1 and "malformed reply" in err, err
    assert main([*argv, "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"skipped: {p}:2: server reply: " in err and "1 bad records skipped" in err, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["prompt"][0]["content"] for r in rows) == ["one", "three"]
