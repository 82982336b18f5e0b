"""The token rule every backend's `score` shares: which tokens are an option's.

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
