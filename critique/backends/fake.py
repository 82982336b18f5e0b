"""A deterministic fake backend for tests and dry runs (no model).

`generate` answers with `responder(conversation, prefix)` (default: a canned text derived from the
last user message) and `score` with `scorer(conversation, option, prefix)` (default: a stable
hash-based log-prob). Every call is recorded in `calls`, so tests can assert the exact
conversations sent at each step.

`delay` (seconds, or the `CHARTER_FAKE_DELAY` environment variable when not given) sleeps that
long per conversation in each call, so a CLI run on `--backend fake` takes a predictable time:
the kill-and-resume tests (tests/kill_harness.py) use it to land kills mid-run.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence

from critique.backends.base import Conversation, Sampling, Usage


def _default_responder(conversation: Conversation, prefix: str) -> str:
    last = conversation[-1]["content"]
    digest = hashlib.sha256(last.encode()).hexdigest()[:6]
    return f"Response {digest} to: {last[:40]}"


def _default_scorer(conversation: Conversation, option: str, prefix: str) -> float:
    blob = "\x1f".join(m["content"] for m in conversation) + "\x1e" + prefix + "\x1e" + option
    h = int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)
    return -1.0 - (h % 1000) / 250.0  # in (-5, -1]


class FakeBackend:
    name = "fake"

    def __init__(self, responder: Callable[[Conversation, str], str] | None = None,
                 scorer: Callable[[Conversation, str, str], float] | None = None,
                 model_name: str = "fake", delay: float | None = None):
        self.responder = responder or _default_responder
        self.scorer = scorer or _default_scorer
        self.model_name = model_name
        self.delay = float(os.environ.get("CHARTER_FAKE_DELAY", 0)) if delay is None else delay
        self.usage = Usage()
        self.calls: list[tuple[str, list]] = []  # ("generate"|"score", the conversations)

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling,
                 prefixes: Sequence[str] | None = None) -> list[list[str]]:
        prefixes = prefixes or [""] * len(conversations)
        self.calls.append(("generate", [list(c) for c in conversations]))
        self.usage.generate_calls += 1
        time.sleep(self.delay * len(conversations))
        out = []
        for conv, prefix in zip(conversations, prefixes):
            texts = []
            for i in range(sampling.n):
                text = self.responder(conv, prefix)
                if sampling.n > 1 and i:
                    text = f"{text} (sample {i})"
                for s in sampling.stop:
                    if s and s in text:
                        text = text[: text.index(s)]
                texts.append(text)
                self.usage.generated_tokens += len(text.split())
            out.append(texts)
        return out

    def score(self, conversations: Sequence[Conversation], options: Sequence[Sequence[str]],
              prefixes: Sequence[str] | None = None) -> list[list[float]]:
        prefixes = prefixes or [""] * len(conversations)
        self.calls.append(("score", [list(c) for c in conversations]))
        self.usage.score_calls += 1
        time.sleep(self.delay * len(conversations))
        return [[float(self.scorer(conv, o, prefix)) for o in opts]
                for conv, opts, prefix in zip(conversations, options, prefixes)]

    def close(self) -> None:
        pass
