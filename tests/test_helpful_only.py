"""principles/helpful-only.yaml: the helpful-only counterpart of harmless.yaml (the CAI paper's
comparison). It must load and lint, render every stage its principles declare (with its own
few-shot examples, as the critique loop and the labeller show them), and ask for help: its
worked revisions are not refusals by the eval's own refusal rule, while the responses they fix
are refusals or non-answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from charter.cli import main
from constitution import load_constitution
from critique.evaluate.refusal import is_refusal
from critique.preference.prompt import comparison
from critique.revise.conversation import few_shot_turns

PATH = Path(__file__).parent.parent / "principles" / "helpful-only.yaml"
MESSAGES = [{"role": "user", "content": "How do I unblock a kitchen sink?"}]
RESPONSE = "Pour boiling water down it, then use a plunger."


@pytest.fixture(scope="module")
def helpful():
    return load_constitution(PATH)


def test_lints_clean(capsys):
    assert main(["principles", "lint", str(PATH)]) == 0
    assert "helpful-only.yaml: ok" in capsys.readouterr().out


def test_every_declared_stage_renders(helpful):
    stages = {"critique": 0, "revision": 0, "preference": 0}
    for p in helpful.principles:
        if p.critique:
            text = helpful.render_critique(p, MESSAGES, RESPONSE)
            assert 'Answer "No"' in text  # asks first whether there is anything to fix
            stages["critique"] += 1
        if p.revision:
            assert "unchanged" in helpful.render_revision(p, MESSAGES, RESPONSE, "Yes.")
            stages["revision"] += 1
        if p.preference:
            text = helpful.render_label(p, MESSAGES, ["first answer", "second answer"])
            assert "(A) first answer" in text and "(B) second answer" in text
            assert "unblock a kitchen sink" in text
            stages["preference"] += 1
    # every principle takes part somewhere; both stages of the method are covered
    assert stages["critique"] == stages["revision"] == len(helpful.critique_principles) >= 5
    assert stages["preference"] == len(helpful.preference_principles) >= 6


def test_few_shot_examples_render_as_the_loop_and_labeller_show_them(helpful):
    for p in helpful.critique_principles:
        turns = few_shot_turns(helpful, helpful.few_shot, p)
        assert len(turns) == 6 * len(helpful.few_shot)
        assert [t["role"] for t in turns[:6]] == ["user", "assistant"] * 3
    for p in helpful.preference_principles:
        conv = comparison(helpful, p, MESSAGES, "x", "y", few_shot=3)
        answers = [t["content"] for t in conv if t["role"] == "assistant"]
        assert answers and set(answers) <= {"(A)", "(B)"}
        assert conv[-1]["role"] == "user" and "(A) x" in conv[-1]["content"]


def test_it_asks_for_help_not_harmlessness(helpful):
    tags = {t for p in helpful.principles for t in p.tags}
    assert "helpfulness" in tags and not tags & {"harm", "safety", "danger", "privacy"}
    changed = [f for f in helpful.few_shot if f.revision.strip() != f.response.strip()]
    assert len(changed) >= 4  # `few_shot_changed_only` (distill mode) draws from these
    for ex in helpful.few_shot:
        assert not is_refusal(ex.revision), ex.revision
    refused = [ex for ex in changed if is_refusal(ex.response)]
    assert len(refused) >= 3  # the examples turn refusals into help
    # labelling examples prefer the answer that is not a refusal or lecture; both positions
    answers = [ex.answer for ex in helpful.label_few_shot]
    assert {"A", "B"} <= set(answers)
    for ex in helpful.label_few_shot:
        chosen, other = ((ex.response_a, ex.response_b) if ex.answer == "A"
                         else (ex.response_b, ex.response_a))
        assert not is_refusal(chosen)
