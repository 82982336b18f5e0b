"""Cleaning and checking model outputs of the critique-and-revise loop (pure functions).

Small models wrap their answers in echoes of the instructions ("Revision:", "Sure, here is a
revised response:"), keep writing the next turns of the conversation ("Human: ..."), loop
("A.K.A.S.A.R.A.D...", the same phrase over and over) or copy the request instead of answering
it. Each step's text goes through `clean(text)` and then `problem(text, ...)`; a step with a
problem flags its record (see `critique.revise.run`). `says_nothing_to_fix(critique)` implements the
rule that lets a critique end a round without a revision.

The rules are heuristics, written out below so they can be read and tested; each returns a short
reason code, counted in the manifest:

- `empty`: nothing left after cleaning (or only punctuation).
- `loop`: degenerate, repetitive text, any of: a run of 8+ single characters joined by dots or
  spaces ("A.K.A.S.A.R.A.D"), one character repeated 20+ times in a row, one word repeated 5+
  times in a row, the same non-trivial line 3+ times, or, over 20+ word trigrams, fewer than
  half of them distinct.
- `copies_request`: the output repeats the request it answers (or an earlier request of the
  conversation): similarity ratio >= 0.8, or the request's text (20+ characters) contained in
  the output. Texts the request quotes (the prompt, the response, the critique: templates may
  embed them) are cut out of it first, so that a revision close to the response it revises is
  not taken for a copy of a request that quotes that response.
- `copies_critique`: a revision that repeats the critique instead of rewriting the response.
- `comments_not_revises`: a revision that talks about the response ("The assistant's last
  response is not harmful ...") instead of being a response.
- `copies_example`: the output repeats a few-shot example of the principle file (small models
  copy an example's critique or revision whatever the prompt, whole or in part: an answer about
  toxic gases that goes on with the example about maths and gender). Either the output holds an
  example text (20+ characters) word for word, or they share many word trigrams
  (`copied_example`): counting only trigrams that are not in this conversation (the prompt, the
  responses, the requests: the topic's own words) and not in two or more of the file's examples
  (`shared_phrases`: style such as "I can't help with", not content), at least `MIN_SHARED` and
  at least `COPY_OVERLAP` of the smaller side's such trigrams. A short example ("No.") may be
  repeated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from difflib import SequenceMatcher

# Leading labels a model echoes from the instructions ("Revision:", "**Critique**:").
_LABEL = re.compile(
    r"^\s*[*_#\s]*(?:assistant|ai|response|revised response|revision|rewritten response|"
    r"revision request|critique request|critique|answer|final answer|rewrite)"
    r"(?:\s*\d+)?[*_\s]*:\s*[*_]*\s*",
    re.IGNORECASE)
# A first line such as "Sure, here is a revised response:" / "Here's the rewritten version:".
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|alright)[,.!]?\s*)?"
    r"(?:here(?:'s| is| are)|below is|i(?:'ve| have) (?:revised|rewritten))\b[^\n:]{0,80}"
    r"\b(?:revis\w*|rewrit\w*|critique|response|version|answer)\b[^\n:]{0,40}:\s*",
    re.IGNORECASE)
# A later turn the model went on to write: cut the text there.
_NEXT_TURN = re.compile(
    r"\n\s*(?:human|user|critique ?request|revision ?request)\s*:", re.IGNORECASE)
_QUOTES = {'"': '"', "“": "”", "'": "'", "«": "»", "`": "`"}

_SPELLED = re.compile(r"(?:\b\w[.\s]){8,}")  # A.K.A.S.A.R.A.D / "a b c d e f g h"
_SAME_CHAR = re.compile(r"(\S)\1{19,}")
_SAME_WORD = re.compile(r"\b(\w+)(?:\W+\1\b){4,}", re.IGNORECASE)

# "Nothing to fix": the critique's first sentence opens with one of these...
_NOTHING_TO_FIX = re.compile(
    r"^(?:no\b(?!t\b)(?! one\b)|none\b|nothing\b|"
    r"there (?:is|are|was|were) (?:no|nothing)\b|"
    r"i (?:do not|don't|did not|didn't|cannot|can't|could not|couldn't) "
    r"(?:see|find|identify|spot|notice)\b|"
    r"i (?:see|found|find|notice) no(?:thing)?\b|"
    r"(?:the |this |that )?(?:assistant'?s? )?(?:last |previous |above )?response "
    r"(?:is|was) (?:already |entirely |perfectly |completely )?"
    r"(?:fine|appropriate|harmless|safe|acceptable|ethical|helpful and harmless|not (?:harmful|"
    r"rude|toxic|dangerous|illegal|offensive|misleading|false|inappropriate|problematic))\b|"
    r"(?:the |this |that )?(?:assistant'?s? )?(?:last |previous |above )?response "
    r"(?:helps no one|does not help anyone|doesn't help anyone)\b|"
    r"(?:the |this |that )?(?:assistant'?s? )?(?:last |previous |above )?response "
    r"(?:does not|doesn't|did not|didn't) (?:contain|include|have|need)\b)",
    re.IGNORECASE)
# ...and goes on without a turn that brings a problem back.
_BUT = re.compile(r"\b(?:but(?! rather)|however|although|though|except|yet)\b", re.IGNORECASE)
# A "revision" that talks about the response instead of being one.
_COMMENT = re.compile(r"^(?:the|this|that|your|my) (?:assistant'?s? )?(?:last |previous |original "
                      r"|above )?response (?:is|was|does|did|helps|contains|has)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def clean(text: str) -> str:
    """Strip echoes of the instructions and anything after a turn the model went on to write.

    In order: cut at a line that starts a new turn ("Human:", "User:", "Critique request:",
    "Revision request:"); drop leading labels ("Revision:", "Critique:", "Assistant:", ...)
    and a leading preamble line ("Sure, here is a revised response:"); drop quotes around the
    whole text; trim whitespace.
    """
    text = text.replace("\r\n", "\n")
    m = _NEXT_TURN.search(text)
    if m:
        text = text[: m.start()]
    for _ in range(3):  # labels and preambles can stack: "Revision: Sure, here it is: ..."
        before = text
        text = _LABEL.sub("", text, count=1)
        text = _PREAMBLE.sub("", text, count=1)
        if text == before:
            break
    text = text.strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]] \
            and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    return text


def loop_reason(text: str) -> str | None:
    """Why `text` looks degenerate (a short description), or None if it does not."""
    if _SPELLED.search(text):
        return "a run of single characters"
    if _SAME_CHAR.search(text):
        return "one character repeated"
    if _SAME_WORD.search(text):
        return "one word repeated"
    lines = [ln.strip().lower() for ln in text.splitlines() if len(ln.strip()) >= 8]
    if lines and max(lines.count(ln) for ln in set(lines)) >= 3:
        return "the same line repeated"
    words = re.findall(r"\w+", text.lower())
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= 20 and len(set(trigrams)) < 0.5 * len(trigrams):
        return "repeated phrases"
    return None


def salvage(text: str, min_chars: int = 20) -> str | None:
    """The clean opening of a text that degenerates later, or None.

    Small models often start a revision well ("I can't help with that: ...") and then loop or
    drift. Rule: keep whole sentences from the start while the kept text has no `loop_reason`
    and no sentence repeats an earlier one (same words); stop before the first that breaks
    this. The opening is used when it has at least `min_chars` characters and ends a sentence.
    """
    kept: list[str] = []
    seen: set[str] = set()
    for sentence in _SENTENCE_END.split(text.strip()):
        if not sentence.strip():
            continue
        key = _norm(sentence)
        if key in seen or loop_reason(" ".join([*kept, sentence])):
            break
        seen.add(key)
        kept.append(sentence.strip())
    out = " ".join(kept)
    if len(out) < min_chars or not out.endswith((".", "!", "?")):
        return None
    return out


def trim_incomplete(text: str) -> str:
    """Drop a cut-off last sentence (a generation that hit its token limit), keeping at least
    one whole sentence; texts with no sentence end are returned as they are."""
    stripped = text.rstrip()
    if stripped.endswith((".", "!", "?", ":", ")", '"', "*")):
        return stripped
    cut = max(stripped.rfind(". "), stripped.rfind("! "), stripped.rfind("? "),
              stripped.rfind(".\n"))
    return stripped[: cut + 1] if cut > 0 else stripped


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _copies(output: str, source: str) -> bool:
    a, b = _norm(output), _norm(source)
    if not a or not b:
        return False
    if len(b) >= 20 and b in a:
        return True
    return SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.8


def _instruction(request: str, quoted: Sequence[str]) -> str:
    """The request without the texts it quotes (longest first)."""
    for q in sorted((q for q in quoted if q.strip()), key=len, reverse=True):
        request = request.replace(q, " ")
    return request


COPY_OVERLAP = 0.5  # share of the smaller side's specific trigrams that makes a copy
MIN_SHARED = 6  # specific trigrams (~8 words in a row) an output shares with an example


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return set(zip(words, words[1:], words[2:]))


def shared_phrases(examples: Sequence[Sequence[str]]) -> frozenset:
    """Word trigrams found in two or more examples (each a sequence of its texts): the file's
    style, which an output may share with an example without copying it."""
    seen: dict[tuple[str, ...], int] = {}
    for texts in examples:
        for g in set().union(*(_trigrams(t) for t in texts)) if texts else ():
            seen[g] = seen.get(g, 0) + 1
    return frozenset(g for g, n in seen.items() if n >= 2)


def copied_example(text: str, examples: Sequence[str], context: Sequence[str] = (),
                   common: frozenset = frozenset()) -> bool:
    """Whether `text` repeats one of `examples` beyond chance: counting only trigrams that are in
    neither `context` (this conversation's own texts) nor `common` (`shared_phrases`), they share
    at least MIN_SHARED trigrams and at least COPY_OVERLAP of the smaller side's."""
    skip = set(common).union(*(_trigrams(c) for c in context))
    own = _trigrams(text) - skip
    for e in examples:
        specific = _trigrams(e) - skip
        shared = len(own & specific)
        if shared >= MIN_SHARED and shared >= COPY_OVERLAP * min(len(own), len(specific)):
            return True
    return False


def problem(text: str, *, requests: Sequence[str] = (), critique: str | None = None,
            examples: Sequence[str] = (), quoted: Sequence[str] = (),
            common: frozenset = frozenset()) -> str | None:
    """The reason code why a cleaned output cannot be used, or None if it can.

    `requests`: the request this output answers and earlier ones of the conversation;
    `critique`: for a revision, the critique it should act on; `examples`: the texts of the
    few-shot examples the model was shown (prompts, responses, critiques, revisions); `quoted`:
    the texts that requests may quote (prompt, responses, critiques), cut out of them before
    comparing; `common`: the file's `shared_phrases`.
    """
    if not re.search(r"\w", text):
        return "empty"
    if loop_reason(text):
        return "loop"
    if any(_copies(text, _instruction(r, quoted)) for r in requests):
        return "copies_request"
    if critique is not None and _copies(text, critique):
        return "copies_critique"
    if critique is not None and _COMMENT.match(text):
        return "comments_not_revises"
    norm = _norm(text)
    if any(len(_norm(e)) >= 20 and _norm(e) in norm for e in examples):
        return "copies_example"
    if copied_example(text, examples, [*requests, *quoted, *([critique] if critique else [])],
                      common):
        return "copies_example"
    return None


def says_nothing_to_fix(critique: str) -> bool:
    """True when a (cleaned) critique says the response has no problem under the principle.

    Rule: the first sentence starts with a "no problem" opening ("No", "None", "Nothing",
    "There is no/nothing", "I don't see/find", "I see no", "The response is fine/appropriate/
    harmless/safe/not harmful/not rude/...", "The response does not contain ...", "The
    response helps no one ...") and has no "but" (except "but rather"), "however", "although",
    "except" or "yet" in it. "Not ..." and "No one ..." do not count. The loop
    then keeps the previous response as this round's revision and asks for no revision.
    """
    first = _SENTENCE_END.split(critique.strip(), maxsplit=1)[0]
    first = first.lstrip("*_#>-• \t\"'“")
    return bool(_NOTHING_TO_FIX.match(first)) and not _BUT.search(first)


def checked(raw: str, rescue: bool = True, **context) -> tuple[str, str | None]:
    """A generated output `clean`ed, and why it cannot be used (`problem` given `context`:
    requests, critique, examples, quoted, common) or None. With `rescue`, a looping output keeps
    its clean opening sentences (`salvage`) and a usable one drops a cut-off last sentence
    (`trim_incomplete`), whenever what is left is usable."""
    text = clean(raw)
    why = problem(text, **context)
    if rescue:
        rescued = salvage(text) if why == "loop" else trim_incomplete(text)
        if rescued and (why == "loop" or not why) and not problem(rescued, **context):
            text, why = rescued, None
    return text, why
