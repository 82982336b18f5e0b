"""What the AI labeller is shown: comparison and rating conversations, prefixes and options.

A comparison is the constitution's `render_label(principle, messages, [first, second])` as the
last user turn, after the principle file's labelling few-shot examples as earlier user/assistant
turns (each example's assistant turn is its answer, "(A)" or "(B)"). The assistant's reply is
then read, not generated: `backend.score` gets the prefix "(" and the options "A" / "B". Keeping
the parenthesis in the prefix makes each option one letter token right after "(", and the same
shape as the few-shot answers, so the two options differ only in that letter.

With chain of thought the assistant first writes reasoning after "Let's think step by step:";
the options are then read after `reasoning + "\\nSo the better response is ("`.

A rating is `render_rating(principle, messages, response, 1, 10)`, read through the options
"1" ... "10" with no prefix; see `labelmath.rating_expectation` for how "1" and "10" are
kept apart.
"""

from __future__ import annotations

from constitution import Constitution, Principle

Message = dict[str, str]
Conversation = list[Message]

OPTIONS = ("A", "B")
ANSWER_PREFIX = "("
COT_PREFIX = "Let's think step by step:"
COT_ANSWER = "\nSo the better response is ("
COT_STOP = ["So the better response", "\nHuman:"]
RATING_LOW, RATING_HIGH = 1, 10
RATING_OPTIONS = tuple(str(i) for i in range(RATING_LOW, RATING_HIGH + 1))


def few_shot_turns(constitution: Constitution, principle: Principle, limit: int) -> Conversation:
    """Up to `limit` labelling examples for this principle (those tagged with it, or untagged),
    in file order, as user/assistant turns. An example tagged with this principle is rendered
    with it; an untagged one with the principle being asked about."""
    turns: Conversation = []
    picked = [ex for ex in constitution.label_few_shot
              if ex.principle is None or ex.principle == principle.id][:max(0, limit)]
    for ex in picked:
        ask = [{"role": "user", "content": ex.prompt}]
        text = constitution.render_label(principle, ask, [ex.response_a, ex.response_b],
                                         OPTIONS)
        turns.append({"role": "user", "content": text})
        turns.append({"role": "assistant", "content": f"{ANSWER_PREFIX}{ex.answer})"})
    return turns


def comparison(constitution: Constitution, principle: Principle, messages: Conversation,
               first: str, second: str, few_shot: int) -> Conversation:
    """The conversation that asks which of `first` (A) and `second` (B) is better."""
    question = constitution.render_label(principle, messages, [first, second], OPTIONS)
    return [*few_shot_turns(constitution, principle, few_shot),
            {"role": "user", "content": question}]


def rating(constitution: Constitution, principle: Principle, messages: Conversation,
           response: str) -> Conversation:
    """The conversation that asks for a RATING_LOW..RATING_HIGH rating of one response."""
    text = constitution.render_rating(principle, messages, response, RATING_LOW, RATING_HIGH)
    return [{"role": "user", "content": text}]


def cot_answer_prefix(reasoning: str) -> str:
    """The assistant text before the option letter once the reasoning is written."""
    return f"{COT_PREFIX}{reasoning.rstrip()}{COT_ANSWER}"


def ratings_nested(tokenizer) -> bool:
    """Whether the tokenizer writes the top rating ("10") as the token(s) of "1" plus more, so
    "10"'s probability is inside "1"'s (see `labelmath.rating_expectation`). Backends without a
    local tokenizer are assumed to split digits, as most small open models do."""
    if tokenizer is None or not callable(tokenizer):
        return True
    one = tokenizer(RATING_OPTIONS[0], add_special_tokens=False)["input_ids"]
    top = tokenizer(RATING_OPTIONS[-1], add_special_tokens=False)["input_ids"]
    return len(top) > len(one) and top[:len(one)] == one
