"""One prompt's critique-and-revise conversation, as it grows (Bai et al. 2022, §3.1).

The chat messages sent at each step (`P` is the prompt conversation, ending with a user turn):

    initial response:  P
    critique, round 1: F + P + [assistant: response, user: critique request 1]
    revision, round 1: F + P + [assistant: response, user: critique request 1,
                                assistant: critique 1, user: revision request 1]
    critique, round 2: F + P + [..., assistant: revision 1, user: critique request 2]   ...

A round whose critique says there is nothing to fix (`cleaning.says_nothing_to_fix`) asks for no
revision: its critique stays in the conversation, the response is kept as its revision, and the
next round's critique request follows the critique directly.

`F` are the few-shot examples of the principle file, each as six earlier turns (user: example
prompt, assistant: example response, user: critique request, assistant: example critique, user:
revision request, assistant: example revision), with the requests rendered from the example's own
principle (or from this round's principle when the example names none, or names one without
critique/revision templates). The initial response is asked for with no few-shot turns: it is the
model's plain answer, the `rejected` side of the preference pairs.

Mode distill (context distillation) asks the teacher once, with the constitution in context:

    answer:  [system: constitution_prompt] + D + P

where D are the few-shot examples as dialogues (user: example prompt, assistant: example
revision: the answer the constitution wants, a refusal or a plain helpful answer). The answer is
the record's one round (principle id `constitution`); the SFT data is P + answer, without the
context, so the trained model behaves so with no constitution in its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from charter.core.records import Message, Round
from constitution import Constitution, FewShot, Principle


def few_shot_turns(constitution: Constitution, examples: list[FewShot],
                   principle: Principle) -> list[Message]:
    """The few-shot examples as earlier turns of the conversation (six turns each)."""
    turns: list[Message] = []
    by_id = {p.id: p for p in constitution.critique_principles}
    for ex in examples:
        p = by_id.get(ex.principle or "", principle)
        prompt = [{"role": "user", "content": ex.prompt}]
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": constitution.render_critique(p, prompt, ex.response)},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": constitution.render_revision(p, prompt, ex.response,
                                                                     ex.critique)},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


DISTILL_PRINCIPLE = "constitution"  # the principle id of a distilled answer's round


def constitution_prompt(constitution: Constitution) -> str:
    """The system message of mode distill: the principle file's description and its
    principles' traits (words from the principle file only)."""
    traits = [p.trait for p in constitution.principles if p.trait]
    text = constitution.description.strip()
    if traits:
        text += "\nThe assistant is " + "; ".join(traits) + "."
    return text


def distill_turns(examples: list[FewShot]) -> list[Message]:
    """Few-shot examples as earlier dialogues: user prompt, assistant revision (two turns each)."""
    turns: list[Message] = []
    for ex in examples:
        turns += [{"role": "user", "content": ex.prompt},
                  {"role": "assistant", "content": ex.revision}]
    return turns


@dataclass
class Dialogue:
    """The state of one record while its chunk is processed."""

    id: str
    prompt: list[Message]
    """The prompt conversation (ends with a user turn)."""
    examples: list[FewShot] = field(default_factory=list)
    """Few-shot examples prepended to this record's critique and revision requests."""
    initial: str = ""
    turns: list[Message] = field(default_factory=list)
    """Everything after the prompt: the initial response, requests, critiques, revisions."""
    rounds: list[Round] = field(default_factory=list)
    flagged: str | None = None
    """Why this record is left out of the exports (`step:reason`), if it is."""
    unchanged: int = 0
    """Rounds whose critique found nothing to fix."""
    principle: Principle | None = None
    """This round's principle."""
    request: str = ""
    """The request of the step in flight (critique or revision)."""
    critique: str = ""
    """This round's (cleaned) critique."""

    @property
    def current(self) -> str:
        """The latest response: the last round's revision, or the initial response."""
        return self.rounds[-1].revision if self.rounds else self.initial

    @property
    def active(self) -> bool:
        return self.flagged is None

    def requests(self) -> list[str]:
        """Every request of the conversation so far (to catch outputs that copy one)."""
        return [m["content"] for m in self.turns if m["role"] == "user"]

    def quoted(self) -> list[str]:
        """Texts a request may quote: the prompt turns and every assistant turn so far."""
        return [m["content"] for m in self.prompt] + [
            m["content"] for m in self.turns if m["role"] == "assistant"]

    def set_initial(self, text: str) -> None:
        self.initial = text
        self.turns = [{"role": "assistant", "content": text}]

    # -- critique --------------------------------------------------------------------------
    def critique_conversation(self, constitution: Constitution,
                              principle: Principle) -> list[Message]:
        """The messages that ask for this round's critique (and remember the request)."""
        self.principle = principle
        self.request = constitution.render_critique(principle, self.prompt, self.current)
        return [*few_shot_turns(constitution, self.examples, principle), *self.prompt,
                *self.turns, {"role": "user", "content": self.request}]

    def add_critique(self, critique: str) -> None:
        assert self.principle is not None, "critique_conversation first"
        self.critique = critique
        self.turns += [{"role": "user", "content": self.request},
                       {"role": "assistant", "content": critique}]

    def keep_response(self) -> None:
        """Nothing to fix: the response is kept as this round's revision."""
        assert self.principle is not None
        self.rounds.append(Round(self.principle.id, self.critique, self.current))
        self.unchanged += 1

    # -- revision --------------------------------------------------------------------------
    def revision_conversation(self, constitution: Constitution) -> list[Message]:
        """The messages that ask for this round's revision (after `add_critique`)."""
        p = self.principle
        assert p is not None
        self.request = constitution.render_revision(p, self.prompt, self.current,
                                                     self.critique)
        return [*few_shot_turns(constitution, self.examples, p), *self.prompt, *self.turns,
                {"role": "user", "content": self.request}]

    def add_revision(self, revision: str) -> None:
        assert self.principle is not None
        self.turns += [{"role": "user", "content": self.request},
                       {"role": "assistant", "content": revision}]
        self.rounds.append(Round(self.principle.id, self.critique, revision))

    # -- distill ---------------------------------------------------------------------------
    def distill_conversation(self, constitution: Constitution) -> list[Message]:
        """The messages that ask the teacher to answer with the constitution in context."""
        self.request = next((m["content"] for m in reversed(self.prompt)
                             if m["role"] == "user"), "")
        return [{"role": "system", "content": constitution_prompt(constitution)},
                *distill_turns(self.examples), *self.prompt]

    def add_answer(self, answer: str) -> None:
        self.rounds.append(Round(DISTILL_PRINCIPLE, "", answer))

    def fail(self, step: str, reason: str, raw: str) -> None:
        """Flag this record; the failed step's raw text is kept in its round."""
        self.flagged = f"{step}:{reason}"
        if step == "initial":
            self.initial = raw
        elif step == "critique":
            assert self.principle is not None
            self.rounds.append(Round(self.principle.id, raw, ""))
        elif step == "revision":
            assert self.principle is not None
            self.rounds.append(Round(self.principle.id, self.critique, raw))
        elif step == "distill":
            self.rounds.append(Round(DISTILL_PRINCIPLE, "", raw))
