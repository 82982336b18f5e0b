"""Proposing principles from preference pairs, parsing and de-duplicating them (pure functions
except `render_proposal`, which renders the proposal template in the principle-file sandbox).

The model is shown one pair (the conversation, the preferred and the other response) and asked
for one general rule that explains the preference, written as a labelling question; its answer
is pre-filled with `PREFIX` ("Which response"), so it only completes the question. Model output
is untrusted text: `parse_principle` keeps one question of sane length that says something
("Which response is better?" says nothing), and strips `{`, `}` so nothing in it can act as
template syntax once it is a principle's `preference` template.
"""

from __future__ import annotations

import difflib
import re

from constitution import transcript
from constitution.render import compile_template, render

PREFIX = "Which response"

PROPOSE_TEMPLATE = """\
Below is a conversation and two possible replies from an assistant. A person compared them and \
preferred the first one.

{{ conversation }}

Preferred reply:
{{ preferred }}

Other reply:
{{ rejected }}

In what way is the preferred reply better than the other one? Answer with one general \
question that a judge could ask about any two replies, of the form "Which response is more \
___?" or "Which response ___?", naming the quality that matters. Do not mention this \
conversation."""
"""The default proposal prompt; variables: conversation, prompt, preferred, rejected."""

MIN_WORDS, MAX_WORDS = 2, 30  # words after "Which response"
# words that carry no criterion: "Which response is better?", "... is the preferred one?"
_EMPTY_WORDS = {"is", "was", "the", "a", "an", "one", "more", "most", "better", "best", "good",
                "preferred", "preferable", "chosen", "first", "second", "reply", "response",
                "answer", "option", "overall", "of", "two", "these", "this", "that", "would",
                "you", "prefer", "do", "should", "be", "i", "we", "than", "other", "likely",
                "judge", "by", "to", "liked", "people", "person", "human", "humans"}
_ANCHORED = re.compile(r"\b(response|reply|option) [ab12]\b|\bpreferred (reply|response)\b", re.I)
_MARKUP = re.compile(r"[*_`#>{}\[\]\\|]")
_STOP_WORDS = {"a", "an", "the", "is", "are", "more", "most", "and", "or", "of", "to", "that",
               "it", "its", "with", "for", "in", "on", "by", "be", "one", "which", "response"}


def render_proposal(template: str, messages: list[dict[str, str]], preferred: str,
                    rejected: str) -> str:
    """The proposal request for one pair (rendered in the principle-file sandbox: the pair's
    text is data, never evaluated)."""
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return render(compile_template(template), {
        "conversation": transcript(messages), "prompt": prompt, "preferred": preferred,
        "rejected": rejected})


def parse_principle(text: str) -> str | None:
    """The first usable "Which response ...?" question in `text` (the pre-filled prefix plus
    the model's continuation), tidied; None when there is none.

    Usable: 2-30 words after "Which response", at least one of them naming a quality (not only
    "is better"), and no reference to this pair ("Response A", "the preferred reply")."""
    flat = _MARKUP.sub(" ", text.replace("\r", "\n"))
    for m in re.finditer(r"\bwhich (response|reply|answer)\b", flat, re.I):
        rest = flat[m.end():]
        cut = re.search(r"\?|\n|(?<=[a-z0-9])\.(\s|$)", rest)
        body = rest[:cut.start()] if cut else rest
        body = " ".join(body.strip(" \t\"'“”‘’:;,-").split())
        words = re.findall(r"[\w'-]+", body.lower())
        if not MIN_WORDS <= len(words) <= MAX_WORDS:
            continue
        if all(w in _EMPTY_WORDS for w in words) or _ANCHORED.search(body):
            continue
        return f"{PREFIX} {body}?"
    return None


def normalise(text: str) -> str:
    """Lowercase content words of a principle, without the "Which response" stem and the
    common little words (for comparing candidates)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(w for w in words if w not in _STOP_WORDS)


def similarity(a: str, b: str) -> float:
    """Similarity in [0, 1] of two principles' normalised texts (difflib's ratio: twice the
    matched characters over the total)."""
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return 1.0
    return difflib.SequenceMatcher(None, na, nb).ratio()


def deduplicate(texts: list[str], threshold: float) -> list[tuple[str, list[int]]]:
    """Group near-duplicate principles: each text joins the first kept one whose similarity is
    at least `threshold`, else is kept itself. Returns (kept text, indices it stands for)."""
    kept: list[tuple[str, list[int]]] = []
    for i, t in enumerate(texts):
        for text, members in kept:
            if similarity(text, t) >= threshold:
                members.append(i)
                break
        else:
            kept.append((t, [i]))
    return kept
