"""What a server's reply must look like, for the openai backend.

A reply of the wrong shape (no `choices`, a number where text belongs, the wrong number of
choices, a lone surrogate or NUL in the text) is named by these checks and retried like a failed
request; after the last retry it is a `ReplyError`, which `--on-error skip` reports per record.
"""

from __future__ import annotations

from charter.core.errors import CharterError


class ReplyError(CharterError):
    """The server answered, but not in the expected shape (after every retry): a problem of
    this request, so `--on-error skip` can report it per record and go on."""


def choices_problem(data: dict) -> str | None:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "expected a non-empty list `choices`"
    if not all(isinstance(c, dict) for c in choices):
        return "expected `choices` to hold objects"
    return None


def chat_problem(data: dict, k: int) -> str | None:
    """What is wrong with a /chat/completions reply for `k` choices (None: nothing)."""
    from charter.core.reader import check_text

    problem = choices_problem(data)
    if problem:
        return problem
    choices = data["choices"]
    if len(choices) != k:
        return f"expected {k} choices, got {len(choices)}"
    for i, c in enumerate(choices):
        msg = c.get("message")
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), (str, type(None))):
            return f"choices[{i}].message.content: expected text"
        if not isinstance(c.get("index", 0), int):
            return f"choices[{i}].index: expected an integer"
        try:
            check_text(msg.get("content") or "", None, None, f"choices[{i}].message.content")
        except CharterError as e:
            return str(e)
    return None


def models_problem(data: dict) -> str | None:
    if not isinstance(data.get("data"), list):
        return "expected a list `data` of models"
    return None
