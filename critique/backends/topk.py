"""`score` from a server's top-k log-probs of the next token (openai backend, `score_logprobs:
top`), for servers that cannot echo prompt log-probs (most hosted APIs) but return the top-k
alternatives of the token they generate.

One /v1/completions request per conversation (the locally rendered chat template + prefix as
token ids, `max_tokens: 1, logprobs: K, temperature: 0`) gives the K most likely next tokens
with their log-probs. Each option must be one token after the prefix ("A"/"B" after "("); its
log-prob is read from that list. An option outside the top K has some probability below the
K-th one that the server did not report: it is returned as NaN, never guessed, and the labelling
code records the reading as missing (`missing_option_reads`) instead of a silent 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from charter.core.errors import CharterError


def option_logprobs(top: Mapping[str, float], option_tokens: Sequence[str]) -> list[float]:
    """Log-prob of each option's token from the server's top-k map (token text → log-prob);
    NaN where the token is not among them."""
    return [float(top[t]) if t in top else math.nan for t in option_tokens]


def option_token(tok, prompt_ids: list[int], full_ids: list[int], option: str) -> int:
    """The one token an option adds after the prompt; a CharterError when it takes more."""
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids or len(full_ids) != n + 1:
        raise CharterError(f"score_logprobs top reads one token per option, and {option!r} is "
                           f"{len(full_ids) - n} tokens after the prompt here; use "
                           "score_logprobs: prompt (a server that echoes prompt log-probs)",
                           field="score_logprobs")
    return full_ids[n]


async def top_logprobs(backend, prompt_ids: list[int], k: int) -> dict[str, float]:
    """The server's top-k next-token log-probs after `prompt_ids` (token text → log-prob)."""
    body = {"model": backend.served_model, "prompt": prompt_ids, "max_tokens": 1,
            "temperature": 0, "logprobs": k}
    data = await backend._request("POST", "/completions", body)
    choice = (data.get("choices") or [{}])[0]
    tops = (choice.get("logprobs") or {}).get("top_logprobs")
    if not isinstance(tops, list) or not tops or not isinstance(tops[0], dict):
        raise CharterError("no top log-probs in the server's reply (score_logprobs: top needs "
                           "`logprobs: K` support on /v1/completions)", field="base_url")
    return {str(t): float(v) for t, v in tops[0].items() if isinstance(v, (int, float))}


def score_top(backend, conversations, options, prefixes, k: int) -> list[list[float]]:
    """`score` through top-k log-probs: one request per conversation (see the module doc)."""
    tok = backend.tokenizer
    rows, tokens = [], []
    for conv, opts, prefix in zip(conversations, options, prefixes):
        text = tok.apply_chat_template(list(conv), tokenize=False,
                                       add_generation_prompt=True) + (prefix or "")
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = [option_token(tok, p_ids, tok(text + o, add_special_tokens=False)["input_ids"], o)
               for o in opts]
        rows.append(p_ids)
        tokens.append([tok.decode([i]) for i in ids])
    tops = backend._gather([top_logprobs(backend, ids, k) for ids in rows], "score")
    backend.usage.score_calls += 1
    return [option_logprobs(top, toks) for top, toks in zip(tops, tokens)]
