"""The openai backend against local stub servers on 127.0.0.1: retries, backoff, clear errors,
API-key hygiene, spreading requests over several base URLs and scoring. No model and no vLLM
needed (the real-server tests are in test_vllm_backend.py; settings, the CLI and malformed
replies in test_openai_replies.py)."""

from __future__ import annotations

import json
import time

import pytest

from charter.core.errors import CharterError
from critique.backends.base import Sampling
from tests.openai_stub import CONV, Stub, dead_url, make, serve


@pytest.fixture
def stub():
    yield from serve()


def test_generate_sends_chat_request_and_reads_choices(stub):
    with make(stub.url) as b:
        out = b.generate([CONV, [{"role": "user", "content": "Bye"}]],
                         Sampling(temperature=0.7, n=2, max_new_tokens=9, seed=3, stop=["\n"]))
    assert out == [["echo Say hi #0", "echo Say hi #1"], ["echo Bye #0", "echo Bye #1"]]
    body = stub.log[0]["body"]
    assert stub.log[0]["path"] == "/v1/chat/completions"
    assert (body["model"], body["n"], body["max_tokens"], body["seed"], body["stop"]) == \
        ("stub-model", 2, 9, 3, ["\n"])
    assert "continue_final_message" not in body
    assert b.usage.generated_tokens == 6 and b.usage.prompt_tokens == 10


def test_prefix_continues_the_assistant_message(stub):
    with make(stub.url) as b:
        b.generate([CONV], Sampling(max_new_tokens=4), prefixes=["Sure, "])
    body = stub.log[0]["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": "Sure, "}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["n"] == 1  # greedy: asked once


def test_model_none_asks_the_server(stub):
    with make(stub.url, model=None) as b:
        assert b.model_name == "stub-model"


@pytest.mark.parametrize("failure", [429, 500, 503, "truncated", "garbage", "drop"])
def test_retries_transient_failures_then_succeeds(stub, failure):
    stub.script = [failure, failure]
    with make(stub.url, max_retries=3) as b:
        out = b.generate([CONV], Sampling(max_new_tokens=4))
        assert b.retries == 2
    assert out == [["echo Say hi #0"]]
    assert len(stub.log) == 3


def test_timeout_is_retried(stub):
    stub.script = [("sleep", 3.0)]
    with make(stub.url, timeout=1.0, max_retries=2) as b:
        assert b.generate([CONV], Sampling(max_new_tokens=4)) == [["echo Say hi #0"]]
        assert b.retries == 1


def test_gives_up_with_url_and_last_status(stub):
    stub.script = [500, 502, 503]
    with make(stub.url, max_retries=2) as b, pytest.raises(CharterError) as e:
        b.generate([CONV], Sampling(max_new_tokens=4))
    msg = str(e.value)
    assert stub.url + "/chat/completions" in msg
    assert "3 attempts" in msg and "HTTP 503" in msg
    assert len(stub.log) == 3


def test_timeout_error_message(stub):
    stub.script = [("sleep", 1.0)] * 2
    with make(stub.url, timeout=0.2, max_retries=1) as b, pytest.raises(CharterError) as e:
        b.generate([CONV], Sampling(max_new_tokens=4))
    assert "timed out after 0.2s" in str(e.value)


def test_refused_connection_error_names_url():
    url = dead_url()
    with make(url, max_retries=1) as b, pytest.raises(CharterError) as e:
        b.generate([CONV], Sampling(max_new_tokens=4))
    assert url in str(e.value) and "connection error" in str(e.value)


def test_backoff_doubles_with_jitter_and_honours_retry_after(stub):
    """backoff=0.01: attempt i sleeps in [0.01*2**i/2, 0.01*2**i]: [.005,.01], [.01,.02],
    [.02,.04]; a Retry-After: 0.3 header raises that sleep to 0.3 s."""
    stub.script = [503, 503, 503, ("status", 429, {"Retry-After": "0.3"})]
    with make(stub.url, max_retries=5) as b:
        t0 = time.perf_counter()
        b.generate([CONV], Sampling(max_new_tokens=4))
        elapsed = time.perf_counter() - t0
        delays = list(b.delays)
    assert len(delays) == 4
    for i, d in enumerate(delays[:3]):
        assert 0.01 * 2 ** i / 2 <= d <= 0.01 * 2 ** i
    assert delays[3] == pytest.approx(0.3)
    assert elapsed >= sum(delays)


def test_client_errors_are_not_retried(stub, monkeypatch):
    stub.script = [401]
    monkeypatch.setenv("CHARTER_TEST_KEY", "sk-secret-123")
    with make(stub.url, api_key_env="CHARTER_TEST_KEY") as b, pytest.raises(CharterError) as e:
        b.generate([CONV], Sampling(max_new_tokens=4))
    assert len(stub.log) == 1
    assert "HTTP 401" in str(e.value) and "$CHARTER_TEST_KEY" in str(e.value)
    assert "sk-secret-123" not in str(e.value)


def test_api_key_sent_but_never_shown(stub, monkeypatch, caplog):
    import logging

    from critique.backends.options import BackendSpec, backend_kwargs

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CHARTER_TEST_KEY", "sk-secret-456")
    cfg = BackendSpec(backend="openai", model="stub-model", base_url=[stub.url],
                        api_key_env="CHARTER_TEST_KEY")
    kw = backend_kwargs(cfg)
    with make(**kw, progress=False) as b:
        b.generate([CONV], Sampling(max_new_tokens=4))
        shown = repr(b) + json.dumps(kw) + json.dumps(b.usage.__dict__) + caplog.text
        shown += json.dumps({k: v for k, v in vars(b).items() if isinstance(v, (str, int, list))})
    assert stub.log[0]["headers"]["Authorization"] == "Bearer sk-secret-456"
    assert kw["api_key_env"] == "CHARTER_TEST_KEY"
    assert "sk-secret-456" not in shown


def test_no_key_no_header(stub, monkeypatch):
    monkeypatch.delenv("CHARTER_TEST_KEY", raising=False)
    with make(stub.url, api_key_env="CHARTER_TEST_KEY") as b:
        b.generate([CONV], Sampling(max_new_tokens=4))
    assert "Authorization" not in stub.log[0]["headers"]


def test_requests_spread_across_two_servers():
    a, b_ = Stub(delay=0.2), Stub(delay=0.2)
    try:
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
        with make([a.url, b_.url], concurrency=4) as b:
            t0 = time.perf_counter()
            out = b.generate(convs, Sampling(max_new_tokens=4))
            elapsed = time.perf_counter() - t0
        assert [o[0] for o in out] == [f"echo q{i} #0" for i in range(20)]
        assert len(a.log) + len(b_.log) == 20
        assert 5 <= len(a.log) <= 15  # least-busy + round-robin: about half each
        assert elapsed < 20 * 0.2 * 0.75  # concurrent (about 5 x 0.2 s), not one by one (4 s)
    finally:
        for s in (a, b_):
            s.shutdown()
            s.server_close()


def test_dead_server_is_avoided_and_retries_go_elsewhere(stub):
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
    with make([dead_url(), stub.url], concurrency=1, max_retries=2) as b:
        out = b.generate(convs, Sampling(max_new_tokens=4))
        assert b.retries == 1  # the first failure marks the dead server; later requests avoid it
    assert len(out) == 10 and len(stub.log) == 10


def test_score_sums_option_token_logprobs(stub, tiny_model_dir):
    """The stub gives every prompt token log-prob -1.0, so a score is minus the number of
    option tokens: "A" after "(" is 1 token, " hello world" is 2 (" hello", " world")."""
    with make(stub.url, tokenizer=str(tiny_model_dir)) as b:
        got = b.score([CONV, CONV], [["A", "B"], [" hello world"]],
                      prefixes=["The answer is (", ""])
    assert got == [[-1.0, -1.0], [-2.0]]
    body = stub.log[0]["body"]
    assert stub.log[0]["path"] == "/v1/completions"
    assert body["echo"] is True and body["logprobs"] == 1 and isinstance(body["prompt"][0], int)


@pytest.mark.parametrize("action", ["nologprobs", 400])
def test_score_without_logprobs_points_to_cot(stub, tiny_model_dir, action):
    stub.script = [action]
    with make(stub.url, tokenizer=str(tiny_model_dir)) as b, pytest.raises(CharterError) as e:
        b.score([CONV], [["A"]])
    assert "--cot" in str(e.value)


def test_score_without_local_tokenizer_says_so(stub):
    with make(stub.url, tokenizer="/nonexistent/tok") as b, pytest.raises(CharterError) as e:
        b.score([CONV], [["A"]])
    assert "tokenizer" in str(e.value) and "/nonexistent/tok" in str(e.value)
    assert stub.log == []  # failed before sending anything
