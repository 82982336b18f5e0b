"""The openai backend: any OpenAI-compatible server (vLLM serve, llama.cpp server, hosted APIs).

    python -m vllm.entrypoints.openai.api_server --model "$(charter models path)" --port 8000
    charter critique ... --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME

`--model` is the served model name (vLLM's default is the path it was given; None asks the
server's /v1/models and takes its only model). Requests are async (httpx) with at most
`concurrency` in flight over all servers. With several base URLs (replicas of one model) each
request goes to the least busy server, ties broken round-robin; a server that just failed is
avoided while another is healthy, and a retry goes to a different server when there is one.

Failures: HTTP 408/409/429/5xx, timeouts, connection errors and truncated or invalid JSON are
retried up to `max_retries` times with exponential backoff and jitter (delay drawn from
[d/2, d], d = min(max_backoff, backoff * 2**attempt), at least a server's Retry-After); then a
`CharterError` names the URL and the last status. Other 4xx are not retried.

The API key is read from the environment variable named by `api_key_env` (default
OPENAI_API_KEY) and sent as a bearer token; it is kept only in the HTTP client's headers, never
logged, returned, or written to manifests (configs hold the variable's name).

How each call maps to the API (a choice, documented here):
- `generate`: /v1/chat/completions (works with every compatible server). An assistant prefix
  is sent as a final assistant message with vLLM's `continue_final_message: true,
  add_generation_prompt: false`, so the server renders the model's own chat template and
  continues that message; servers without that extension need prefix-free prompts.
- `score`: /v1/completions with `echo: true, logprobs: 1, max_tokens: 1` over the token ids of
  the locally rendered chat template + prefix + option (the tokenizer is loaded locally:
  `tokenizer=`, or the model name when it is a local directory). The scored tokens follow the
  token rule as the transformers and vLLM backends (`critique.backends.tokens`), so all three
  agree. Servers that return no prompt
  log-probs (most hosted chat APIs) raise a `CharterError` that points to `--cot` labelling,
  which needs only generation. Servers that return only the next token's top-k log-probs:
  `score_logprobs: top` (critique/backends/topk.py; an option outside the top k is reported
  missing, never guessed).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Sequence

from charter.core.errors import CharterError
from critique.backends.base import Conversation, Sampling, Usage, generate_args
from critique.backends.replies import ReplyError, chat_problem, choices_problem, models_problem
from critique.backends.tokens import chat_prompt, encode, finish_score, option_rows, score_args

RETRY_STATUS = frozenset({408, 409, 429})
NO_LOGPROBS_HINT = ("this server cannot return prompt log-probs, which `score` needs; label with "
                    "generation instead (`--cot`), or serve the model with vLLM")


def normalise_base_url(url: str) -> str:
    """`http://host:8000` → `http://host:8000/v1`; trailing slashes dropped."""
    from urllib.parse import urlsplit

    u = str(url).strip().rstrip("/")
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CharterError(f"expected an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}",
                           field="base_url")
    return u if parts.path else u + "/v1"


class ServerPool:
    """Picks a base URL per request: least in flight, not recently failed, ties round-robin."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.inflight = dict.fromkeys(self.urls, 0)
        self.failures = dict.fromkeys(self.urls, 0)  # consecutive failures
        self.sent = dict.fromkeys(self.urls, 0)  # requests sent, for stats and tests
        self._turn = 0

    def pick(self, avoid: str | None = None) -> str:
        cands = [u for u in self.urls if u != avoid] or self.urls
        k = self._turn % len(cands)
        self._turn += 1
        order = cands[k:] + cands[:k]  # min() keeps the first of equals: round-robin ties
        return min(order, key=lambda u: (self.failures[u] > 0, self.inflight[u]))


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str | None = None, *, base_url: str | Sequence[str],
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0, tokenizer: str | None = None,
                 progress: bool = True, score_logprobs: str = "prompt", top_k: int = 20):
        import httpx

        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise CharterError("the openai backend needs at least one base URL", field="base_url")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise CharterError("need concurrency >= 1, max_retries >= 0 and timeout > 0",
                               field="concurrency")
        self.pool = ServerPool([normalise_base_url(u) for u in urls])
        self.api_key_env = api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.tokenizer_name, self._tokenizer = tokenizer, None
        if score_logprobs not in ("prompt", "top") or top_k < 1:
            raise CharterError("score_logprobs must be prompt (echoed prompt log-probs) or top "
                               "(the next token's top_k log-probs, top_k >= 1)",
                               field="score_logprobs")
        self.score_logprobs, self.top_k = score_logprobs, top_k
        self.progress = progress
        self.usage = Usage()
        self.retries = 0
        self.delays: list[float] = []  # every backoff sleep, for reports and tests
        headers = {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="charter-openai")
        self._thread.start()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = self._call(self._make_client(httpx, headers, limits))
        self._sem = asyncio.Semaphore(concurrency)
        self.served_model = model if model is not None else self._only_served_model()
        self.model_name = self.served_model

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.served_model!r}, base_url={self.pool.urls!r})"

    async def _make_client(self, httpx, headers, limits):
        return httpx.AsyncClient(headers=headers, limits=limits, timeout=self.timeout)

    def _call(self, coro):
        """Run a coroutine on the backend's own event loop thread (safe from any caller)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -----------------------------------------------------------------------------------------
    # HTTP with retries

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** attempt)
        delay = d / 2 + random.uniform(0, d / 2)  # "equal jitter": spreads retrying clients
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    async def _request(self, method: str, path: str, body: dict | None = None,
                       check=None) -> dict:
        """The reply's JSON object. `check(data)` names what is wrong with a reply of the wrong
        shape (None when it is right); such a reply is retried like a failed request."""
        import httpx

        last, url, malformed = "", None, False
        for attempt in range(self.max_retries + 1):
            retry_after = None
            async with self._sem:  # pick the server only once a slot is free: least busy now
                url = self.pool.pick(avoid=url if attempt else None)
                self.pool.inflight[url] += 1
                self.pool.sent[url] += 1
                try:
                    r = await self._client.request(method, url + path, json=body)
                except httpx.TimeoutException:
                    last = f"timed out after {self.timeout:g}s"
                except httpx.TransportError as e:  # refused, reset, truncated body
                    last = f"connection error ({type(e).__name__}: {e})"
                else:
                    if r.status_code == 200:
                        data = _json_object(r.content)
                        problem = None if data is None or check is None else check(data)
                        if data is not None and problem is None:
                            self.pool.failures[url] = 0
                            return data
                        malformed = data is not None
                        last = (f"HTTP 200 with invalid or truncated JSON ({r.content[:80]!r})"
                                if data is None else f"HTTP 200 with a malformed reply: "
                                f"{problem} ({_snippet(r.content, 80)})")
                    elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                        malformed = False
                        last = f"HTTP {r.status_code}: {_snippet(r.content)}"
                        retry_after = _retry_after(r.headers.get("retry-after"))
                    else:
                        raise self._client_error(url + path, r.status_code, r.content)
                finally:
                    self.pool.inflight[url] -= 1
            self.pool.failures[url] += 1
            if attempt < self.max_retries:
                self.retries += 1
                delay = self._delay(attempt, retry_after)
                self.delays.append(delay)
                await asyncio.sleep(delay)
        error = ReplyError if malformed else CharterError
        raise error(f"{url}{path}: gave up after {self.max_retries + 1} attempts; "
                    f"last: {last}", field="base_url")

    def _client_error(self, where: str, status: int, content: bytes) -> CharterError:
        msg = f"{where}: HTTP {status}: {_snippet(content)}"
        if status in (401, 403):
            msg += f" (is ${self.api_key_env} set to a valid key?)"
        if status == 404 and "model" in _snippet(content).lower():
            msg += " (--model is the served model name; see GET /v1/models)"
        return CharterError(msg, field="base_url")

    def _only_served_model(self) -> str:
        data = self._call(self._request("GET", "/models", check=models_problem))
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if len(ids) != 1:
            raise CharterError(f"the server offers {len(ids)} models ({', '.join(map(str, ids))});"
                               " name one with --model", field="model")
        return str(ids[0])

    def _gather(self, coros: list, desc: str) -> list:
        async def run():
            tasks = [asyncio.ensure_future(c) for c in coros]
            bar = None
            if self.progress and len(tasks) > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(tasks), desc=desc, unit="req", leave=False)
                for t in tasks:
                    t.add_done_callback(lambda _t: bar.update(1))
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                if bar is not None:
                    bar.close()

        return self._call(run())

    # -----------------------------------------------------------------------------------------
    # generate

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling,
                 prefixes: Sequence[str] | None = None) -> list[list[str]]:
        """`sampling.n` completions per conversation through /v1/chat/completions."""
        prefixes = generate_args(conversations, sampling, prefixes, check_ranges=False)
        if sampling.max_new_tokens == 0:
            return [[""] * sampling.n for _ in conversations]
        t0 = time.perf_counter()
        greedy = sampling.temperature == 0
        k = 1 if greedy else sampling.n  # greedy samples are identical: ask once, copy
        bodies = []
        for conv, prefix in zip(conversations, prefixes):
            body = {"model": self.served_model, "messages": list(conv), "n": k,
                    "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "max_tokens": sampling.max_new_tokens, "seed": sampling.seed}
            if sampling.stop:
                body["stop"] = [s for s in sampling.stop if s]
            if prefix:  # vLLM extension: continue the assistant's started message
                body["messages"] = [*conv, {"role": "assistant", "content": prefix}]
                body.update(continue_final_message=True, add_generation_prompt=False)
            bodies.append(body)
        results = self._gather([self._request("POST", "/chat/completions", b,
                                              check=lambda d: chat_problem(d, k))
                                for b in bodies], "generate")
        out = []
        for data in results:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] or "" for c in choices]
            out.append(texts * sampling.n if greedy else texts)
            self._count(data.get("usage"))
        self.usage.generate_calls += 1
        self.usage.generate_seconds += time.perf_counter() - t0
        return out

    def _count(self, usage: dict | None) -> None:
        if isinstance(usage, dict):  # bookkeeping only: a malformed count is ignored
            for key, attr in (("prompt_tokens", "prompt_tokens"),
                              ("completion_tokens", "generated_tokens")):
                n = usage.get(key)
                if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                    setattr(self.usage, attr, getattr(self.usage, attr) + n)

    # -----------------------------------------------------------------------------------------
    # score

    @property
    def tokenizer(self):
        """The served model's tokenizer, loaded locally (score renders prompts itself)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from charter.core.models import resolve_model

            name = self.tokenizer_name or self.served_model
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
            except (OSError, ValueError, CharterError) as e:
                raise CharterError(f"score needs the served model's tokenizer locally and "
                                   f"cannot load {name!r} ({str(e).splitlines()[0]}); pass "
                                   "tokenizer=PATH (backend_options: {tokenizer: PATH})",
                                   field="tokenizer") from None
        return self._tokenizer

    def score(self, conversations: Sequence[Conversation], options: Sequence[Sequence[str]],
              prefixes: Sequence[str] | None = None) -> list[list[float]]:
        """Summed log-prob of each option's tokens (see the module docstring)."""
        t0 = time.perf_counter()
        prefixes = score_args(conversations, options, prefixes)
        if self.score_logprobs == "top":  # only top-k log-probs: critique/backends/topk.py
            from critique.backends.topk import score_top

            out = score_top(self, conversations, options, prefixes, self.top_k)
            self.usage.score_seconds += time.perf_counter() - t0
            return out
        tok = self.tokenizer
        rows: list[tuple[list[int], int]] = []
        for conv, opts, prefix in zip(conversations, options, prefixes):
            rows += option_rows(lambda t: encode(tok, t), chat_prompt(tok, conv, prefix), opts)
        scores = self._gather([self._score_row(full, start) for full, start in rows], "score")
        return finish_score(self.usage, rows, scores, options, time.perf_counter() - t0)

    async def _score_row(self, full: list[int], start: int) -> float:
        body = {"model": self.served_model, "prompt": full, "max_tokens": 1, "temperature": 0,
                "echo": True, "logprobs": 1}
        try:
            data = await self._request("POST", "/completions", body, check=choices_problem)
        except CharterError as e:
            if any(w in e.detail for w in ("HTTP 400", "HTTP 404", "HTTP 422")):
                raise CharterError(f"{e.detail}; {NO_LOGPROBS_HINT}", field="base_url") from None
            raise
        choice = data["choices"][0]
        lps = (choice.get("logprobs") or {}).get("token_logprobs") if isinstance(
            choice.get("logprobs"), dict) else None
        if not isinstance(lps, list) or len(lps) < len(full):
            raise CharterError(f"no prompt log-probs in the server's reply; {NO_LOGPROBS_HINT}",
                               field="base_url")
        picked = lps[start:len(full)]
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or x != x or x > 0
               for x in picked):
            raise CharterError(f"missing prompt log-probs in the server's reply; "
                               f"{NO_LOGPROBS_HINT}", field="base_url")
        return float(sum(picked))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _snippet(content: bytes, n: int = 200) -> str:
    text = content.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("…" if len(text) > n else "") or "(empty body)"


def _json_object(content: bytes) -> dict | None:
    import json

    try:
        data = json.loads(content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None
