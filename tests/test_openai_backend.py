"""The openai backend against local stub servers on 127.0.0.1: retries, backoff, clear errors,
API-key hygiene and spreading requests over several base URLs. No model and no vLLM needed
(the real-server tests are in test_vllm_backend.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from critique.backends.base import Sampling

CONV = [{"role": "user", "content": "Say hi"}]


def chat_reply(body: dict) -> dict:
    n = body.get("n", 1)
    last = body["messages"][-1]["content"]
    return {"choices": [{"index": i, "message": {"role": "assistant",
                                                 "content": f"echo {last} #{i}"}}
                        for i in range(n)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


def completion_reply(body: dict) -> dict:
    """Every prompt token gets log-prob -1.0 (the first has none), the sampled one -5.0."""
    lps = [None] + [-1.0] * (len(body["prompt"]) - 1) + [-5.0]
    return {"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": lps}}]}


class Stub(ThreadingHTTPServer):
    """An OpenAI-like server. `script` holds actions for the next requests, then "ok":
    an int status (error body), ("status", code, headers), "truncated" (200 with half a JSON
    body), "garbage" (200, not JSON), ("sleep", s) (answer after s seconds), "drop" (close the
    connection without answering), "nologprobs"."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list = []
        self.log: list[dict] = []
        self.delay = delay
        self.bad_for: tuple[str, dict] | None = None  # (text in the prompt, malformed reply)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else "ok"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, payload: bytes, headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.server.log.append({"path": self.path, "headers": dict(self.headers)})
        self._send(200, json.dumps({"data": [{"id": "stub-model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append({"path": self.path, "headers": dict(self.headers), "body": body})
        action = self.server.next_action()
        if self.server.delay:
            time.sleep(self.server.delay)
        if isinstance(action, tuple) and action[0] == "reply":  # any JSON, e.g. malformed
            return self._send(200, json.dumps(action[1]).encode())
        if self.server.bad_for and self.server.bad_for[0] in json.dumps(body):
            return self._send(200, json.dumps(self.server.bad_for[1]).encode())
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            action = "ok"
        if isinstance(action, int):
            return self._send(action, b'{"error": {"message": "stub error"}}')
        if isinstance(action, tuple) and action[0] == "status":
            return self._send(action[1], b'{"error": "busy"}', action[2])
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        reply = completion_reply(body) if self.path.endswith("/completions") and \
            "prompt" in body else chat_reply(body)
        if action == "nologprobs":
            reply["choices"][0]["logprobs"] = None
        payload = json.dumps(reply).encode()
        if action == "truncated":  # a body cut short but complete per Content-Length
            return self._send(200, payload[: len(payload) // 2])
        if action == "garbage":
            return self._send(200, b"<html>proxy error</html>")
        self._send(200, payload)


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.shutdown()
    s.server_close()


def dead_url() -> str:
    """A 127.0.0.1 URL with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make(base_url, **kw):
    from critique.backends.openai_backend import OpenAIBackend

    kw.setdefault("backoff", 0.01)
    kw.setdefault("progress", False)
    return OpenAIBackend(kw.pop("model", "stub-model"), base_url=base_url, **kw)


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
