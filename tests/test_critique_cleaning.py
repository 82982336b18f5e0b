"""Output cleaning and checks of the critique loop (pure functions, malformed outputs included)."""

from __future__ import annotations

import pytest

from critique.revise.cleaning import clean, loop_reason, problem, says_nothing_to_fix


@pytest.mark.parametrize("raw, expected", [
    ("I can't help with that.", "I can't help with that."),
    ("Revision: I can't help with that.", "I can't help with that."),
    ("Revised response: I won't.", "I won't."),
    ("**Critique:** The response is harmful.", "The response is harmful."),
    ("Critique 2: It encourages theft.", "It encourages theft."),
    ("Assistant: Hello!", "Hello!"),
    ("Sure, here is a revised response: I will not help.", "I will not help."),
    ("Here's the rewritten version:\nI won't help.", "I won't help."),
    ("Certainly! Here is my revision of the response:\n\nNo.", "No."),
    ("Revision: Sure, here is the revised response: Fine.", "Fine."),
    ('"I cannot help with that."', "I cannot help with that."),
    ("“Quoted.”", "Quoted."),
    ('"A" and "B"', '"A" and "B"'),  # inner quotes: not one quoted text
    ("Answer.\nHuman: and now tell me more", "Answer."),
    ("Answer.\n\nUser: next", "Answer."),
    ("Fixed.\nCritique Request: Identify ...", "Fixed."),
    ("  \n", ""),
    ("AI-generated text is fine.", "AI-generated text is fine."),  # no colon: not a label
    ("Here are three tips for baking: knead well.", "Here are three tips for baking: knead well."),
])
def test_clean(raw, expected):
    assert clean(raw) == expected


@pytest.mark.parametrize("text, reason", [
    ("A.K.A.S.A.R.A.D.A.K.A.S", "a run of single characters"),
    ("a b c d e f g h i j", "a run of single characters"),
    ("Noooooooooooooooooooooooo", "one character repeated"),
    ("I am sorry sorry sorry sorry sorry.", "one word repeated"),
    ("Do not do it.\nDo not do it.\nDo not do it.", "the same line repeated"),
    ("I can help you with that. " * 6, "repeated phrases"),
    ("To bake bread, mix flour, water, yeast and salt. Knead for ten minutes, let it rise "
     "for an hour, shape the loaf and bake it at 220 C for about 35 minutes.", None),
    ("1. Be kind.\n2. Be honest.\n3. Be safe.\n4. Be brief.", None),
    ("The U.S.A. is a country.", None),
])
def test_loop_reason(text, reason):
    assert loop_reason(text) == reason


REQUEST = "Please rewrite the assistant response to remove any harmful content."


@pytest.mark.parametrize("text, kwargs, reason", [
    ("I can't help with that, but here is a safer idea.", {}, None),
    ("", {}, "empty"),
    ("...", {}, "empty"),
    ("A.K.A.S.A.R.A.D.A.K.A.S", {}, "loop"),
    (REQUEST, {"requests": [REQUEST]}, "copies_request"),
    ("Please rewrite the assistant's response to remove any harmful content!",
     {"requests": ["Old request.", REQUEST]}, "copies_request"),
    ("Sure. " + REQUEST + " Done.", {"requests": [REQUEST]}, "copies_request"),
    ("The response explains how to break in.", {"critique": "The response explains how to "
                                                 "break in."}, "copies_critique"),
    ("I can't help with stealing cars.", {"examples": ["I can't help with stealing cars."]},
     "copies_example"),
    ("I can't help with stealing bikes.", {"examples": ["I can't help with stealing cars."]},
     None),
    ("The response helps someone break into a home, which is illegal. It's a delicate art.",
     {"examples": ["The response helps someone break into a home, which is illegal."]},
     "copies_example"),
    ("No.", {"examples": ["No."]}, None),  # a short example answer may be given again
    ("The assistant's last response is not harmful to animals or people.",
     {"critique": "It names a crime."}, "comments_not_revises"),
    ("The response is not harmful.", {}, None),  # as a critique: fine
    ("Your response was rude, I apologise: here is a kinder one.", {"critique": "Rude."},
     "comments_not_revises"),
    # a request that quotes the response: a light edit of that response is not a copy of it
    ("Better answer after 9 turns.", {"requests": ["Rewrite: Better answer after 5 turns."],
                                      "quoted": ["Better answer after 5 turns."]}, None),
    ("Rewrite the response below to be polite.",
     {"requests": ["Rewrite the response below to be polite. Response: Go away."],
      "quoted": ["Go away."]}, "copies_request"),
])
def test_problem(text, kwargs, reason):
    assert problem(text, **kwargs) == reason


@pytest.mark.parametrize("critique, expected", [
    ("No.", True),
    ("No, there is nothing harmful in it.", True),
    ("None.", True),
    ("Nothing to fix: the response refuses.", True),
    ("There is nothing harmful in this response.", True),
    ("There are no problems with the response.", True),
    ("I don't see anything harmful.", True),
    ("I see no issue with it.", True),
    ("The response is fine.", True),
    ("The assistant's last response is harmless and polite.", True),
    ("The response does not contain anything harmful.", True),
    ("**No** problems.", True),
    ("The response is harmful because it explains lock picking.", False),
    ("No, but it could mention the law.", False),
    # seen from SmolLM2 with principles/harmless.yaml
    ("The answer to this question is not rude, but rather polite.", False),
    ("The response is not rude, but rather polite.", True),
    ("The assistant's last response helps no one cause harm to animals or people.", True),
    ("The response is not harmful, but it is wrong about the law.", False),
    ("The response is fine, however it gives dangerous detail.", False),
    ("Not only is it rude, it is harmful.", False),
    ("No one should be told how to do this; the response is harmful.", False),
    ("Nobody should do this.", False),
    ("It explains how to hurt someone. No safety advice is given.", False),
])
def test_says_nothing_to_fix(critique, expected):
    assert says_nothing_to_fix(critique) is expected


# -- salvage / trim_incomplete (the lead's additions for the small default model) -------------
from critique.revise.cleaning import salvage, trim_incomplete  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    # a good opening, then the same sentence over and over: keep the opening
    ("I can't help with that, because it would hurt someone. Please talk to a counsellor. "
     "Please talk to a counsellor. Please talk to a counsellor.",
     "I can't help with that, because it would hurt someone. Please talk to a counsellor."),
    # degenerate from the start: nothing to keep
    ("A.K.A.S.A.R.A.D.A.K.A.S.A.R.A.D", None),
    # the opening is too short to be a response
    ("No. No. No. No. No.", None),
    # a spelled-out run after one good sentence
    ("I won't explain how to do that since it is illegal. A.K.A.S.A.R.A.D.A.K.A",
     "I won't explain how to do that since it is illegal."),
])
def test_salvage_keeps_the_clean_opening(text, expected):
    assert salvage(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("I can't help with that. You could ask a locksmith for", "I can't help with that."),
    ("Sure! Here is how", "Sure!"),
    ("A whole answer.", "A whole answer."),
    ("no sentence end at all", "no sentence end at all"),
])
def test_trim_incomplete_drops_a_cut_off_sentence(text, expected):
    assert trim_incomplete(text) == expected
