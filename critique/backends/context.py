"""Does every prompt fit the model's context? Checked before the model loads.

A prompt longer than the context used to fail minutes later, inside the backend, naming neither
file nor line. `check_context` loads only the tokenizer and the model's config (fast), counts
each prompt's chat-templated tokens and, for a prompt that leaves no room for a response,
raises a `CharterError` naming its `FILE:LINE` (or, with `on_error="skip"`, drops it and reports
it in `errors`). The rule is explicit: prompts are never truncated; a response is cut where the context
ends (the backends give each prompt the room it has left, up to `max_new_tokens`). Backends whose
context is not known locally (a server, the fake backend) are not checked here; a server's
refusal is reported per record by the backend.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from charter.core.errors import CharterError


def context_limit(cfg: Any) -> tuple[Any, int] | None:
    """(tokenizer, context length) of a local model, or None when not known before loading."""
    if getattr(cfg, "backend", None) not in ("transformers", "vllm"):
        return None
    from transformers import AutoConfig, AutoTokenizer

    from charter.core.models import resolve_model

    path = resolve_model(cfg.model)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return None  # a LoRA adapter folder: its base model's context is read when it loads
    trust = getattr(cfg, "trust_remote_code", False)
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise CharterError(f"cannot read the model's config or tokenizer ({e})".splitlines()[0],
                           path=path, field="model") from None
    limit = getattr(cfg, "max_model_len", None) or getattr(conf, "max_position_embeddings", None)
    if not limit or getattr(tok, "chat_template", None) is None:
        return None
    return tok, int(limit)


def check_context(items: list, cfg: Any, on_error: str = "raise",
                  errors: list[str] | None = None, model: Any = ...) -> list:
    """`items` (PromptItems) that leave room for a response; see the module doc. `model`
    names the model that will answer them when it is not `cfg.model` (the label stage's
    policy, the eval's baseline)."""
    if model is not ...:
        cfg = SimpleNamespace(**{k: getattr(cfg, k, None) for k in
                                 ("backend", "trust_remote_code", "max_model_len")}, model=model)
    known = context_limit(cfg)
    if known is None:
        return items
    tok, limit = known
    kept = []
    for it in items:
        text = tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n >= limit:  # no room for one new token (a response is cut at the context's end)
            err = CharterError(f"prompt is {n} tokens; the model's context is {limit} tokens, "
                               "leaving no room for a response: shorten it (or skip such "
                               "prompts with --on-error skip)", path=it.source)
            if on_error != "skip":
                raise err
            if errors is not None:
                errors.append(str(err))
            continue
        kept.append(it)
    if not kept and items:
        raise CharterError("no prompt fits the model's context", path=items[0].source)
    return kept
