"""What every backend shares about tokens and scoring: the chat prompt and its ids, which tokens
are an option's, and `score`'s argument checks and bookkeeping.

The prompt: the model's chat template renders the conversation (with the generation prompt) and
the assistant-turn prefix is appended; the template already wrote the special tokens (BOS,
<|im_start|>...), so encoding adds none.

Which tokens are an option's:

BPE may merge the prompt's last characters with the option's first (" (" + "A" vs " (A"), so
an option is not always a clean run of extra tokens after the prompt. Every backend encodes the
prompt and prompt+option and scores the ids of prompt+option after their longest common prefix.
When a merge happens, the merged token (which carries a few prompt characters) counts as the
option's: it is what the model would have to produce. Position 0 has no context to be
predicted from, so scoring starts at 1 at the earliest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from charter.core.tokens import common_prefix_len
from critique.backends.base import Conversation, Usage


def chat_prompt(tokenizer, conversation: Conversation, prefix: str = "") -> str:
    """The templated conversation, ready for the assistant's turn, plus `prefix`."""
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False,
                                         add_generation_prompt=True)
    return text + (prefix or "")


def encode(tokenizer, text: str) -> list[int]:
    """Ids of a `chat_prompt` text (no special tokens added: the template wrote them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def option_rows(encode: Callable[[str], list[int]], text: str, options: Sequence[str]
                ) -> list[tuple[list[int], int]]:
    """Per option: (ids of `text` + option, index of the first id scored as the option's).
    `encode` is the backend's tokenizer (text -> ids, no special tokens added)."""
    prompt_ids = encode(text)
    rows = []
    for opt in options:
        full = encode(text + opt)
        rows.append((full, max(common_prefix_len(prompt_ids, full), 1)))
    return rows


def score_args(conversations: Sequence[Conversation], options: Sequence[Sequence[str]],
               prefixes: Sequence[str] | None) -> list[str]:
    """Check `score`'s arguments; returns one prefix per conversation."""
    from charter.core.errors import CharterError

    out = list(prefixes) if prefixes is not None else [""] * len(conversations)
    if len(out) != len(conversations) or len(options) != len(conversations):
        raise CharterError("options and prefixes must have one entry per conversation",
                           field="options")
    return out


def finish_score(usage: Usage, rows: Sequence[tuple[list[int], int]], scores: Sequence[float],
                 options: Sequence[Sequence[str]], seconds: float) -> list[list[float]]:
    """Count a score call in `usage` and regroup the flat per-option `scores` by conversation
    (`rows`: the (ids, first scored position) that were run)."""
    usage.score_calls += 1
    usage.scored_tokens += sum(len(f) for f, _ in rows)
    usage.score_seconds += seconds
    it = iter(scores)
    return [[next(it) for _ in opts] for opts in options]
