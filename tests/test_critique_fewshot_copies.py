"""Few-shot copies: a revision or critique that repeats an example of the principle file (whole
or in part, with its own topic words around it) is flagged, counted in the manifest and kept out
of sft.jsonl and pairs.jsonl; answers that only share the file's style or the prompt's topic are
not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constitution import load_constitution
from critique.backends.fake import FakeBackend
from critique.revise.cleaning import copied_example, problem, shared_phrases
from critique.revise.run import CritiqueConfig, _example_texts, run_critique

ROOT = Path(__file__).resolve().parents[1]
CONS = load_constitution(ROOT / "principles" / "harmless.yaml")
MATHS = next(e for e in CONS.few_shot if "math" in e.prompt)
BLEACH = next(e for e in CONS.few_shot if "bleach" in e.prompt)
COMMON = shared_phrases([_example_texts([e]) for e in CONS.few_shot])

PROMPT = "Which household chemicals make a toxic gas when you mix them?"
RESPONSE = "Mix bleach with ammonia or with vinegar and you get a toxic gas quickly."
CRITIQUE = "Yes. The response tells the person how to make a toxic gas at home."
# the model's revision: the prefix it was given, then the maths-and-gender example's revision
MATHS_COPY = ("I'm sorry, but I can't help with that. Math ability does not depend on gender; "
              "differences in results mostly come from opportunity and")  # cut at max tokens
CONTEXT = [PROMPT, RESPONSE, CRITIQUE]


def check(text, critique=CRITIQUE, examples=(MATHS, BLEACH)):
    return problem(text, requests=[PROMPT], critique=critique, quoted=[PROMPT, RESPONSE],
                   examples=_example_texts(list(examples)), common=COMMON)


def test_a_revision_that_goes_on_with_another_examples_answer_is_flagged():
    assert MATHS.revision not in MATHS_COPY  # not a string match: the copy is partial
    assert check(MATHS_COPY) == "copies_example"
    # the example's critique, given as the critique of this prompt
    assert problem("Yes. The response states a false and demeaning stereotype about women.",
                   requests=[PROMPT], quoted=[PROMPT, RESPONSE],
                   examples=_example_texts([MATHS]), common=COMMON) == "copies_example"


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",  # the file's style, nothing of an example
    "I'm sorry, but I can't help with that. Mixing cleaners can release a toxic gas, so use one "
    "product at a time and open a window.",  # the prompt's topic and the bleach example's advice
    "I can't help with making a toxic gas. If you want to clean safely, use one product at a "
    "time and keep the room aired.",
])
def test_own_answers_on_the_same_topic_are_not_copies(text):
    assert check(text) is None


def test_shared_phrases_are_style_found_in_two_or_more_examples():
    """'i can t' opens two example revisions of harmless.yaml (car, phone number); 'math
    ability does' is one example's content."""
    assert ("i", "can", "t") in COMMON and ("math", "ability", "does") not in COMMON
    assert copied_example("x y z w v u t s", ["x y z w v u t s"], common=frozenset()) is True
    assert copied_example("x y z w v u t s", ["x y z w v u t s"], context=["x y z w v u t s"]) \
        is False  # words the conversation itself holds are never a copy


def copying_responder(conv, prefix):
    """The fake model: an answer, a critique, and a revision (completing the pre-filled prefix)
    that, for the toxic-gas prompt, goes on with the maths example; an honest one otherwise."""
    gas = any(m["content"] == PROMPT for m in conv)
    if len(conv) == 1:  # the initial answer: the prompt alone
        return RESPONSE if gas else "Use a tension wrench and a pick."
    if not prefix:  # the critique
        return CRITIQUE if gas else "Yes. The response helps someone open a lock that is not theirs."
    return MATHS_COPY.removeprefix(prefix) if gas else " help with picking locks that are not yours."


def test_the_loop_flags_counts_and_drops_the_copy(tmp_path):
    rows = [{"prompt": PROMPT}, {"prompt": "How do I pick a lock?"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CritiqueConfig(constitution=str(ROOT / "principles" / "harmless.yaml"),
                         prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "out"),
                         backend="fake", progress=False, few_shot=6, trust_ok_critiques=False,
                         revision_prefix="I'm sorry, but I can't")
    m = run_critique(cfg, backend=FakeBackend(copying_responder))
    assert m["counts"]["flagged_by_reason"] == {"revision:copies_example": 1}
    out = tmp_path / "out"
    sft = (out / "sft.jsonl").read_text()
    pairs = (out / "pairs.jsonl").read_text()
    assert "Math ability" not in sft + pairs and "picking locks" in sft
    assert "toxic gas" not in sft + pairs  # the whole record is left out, not only its revision
