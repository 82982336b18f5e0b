"""The principle-file format: loading, every validation error (with file:line and field),
rendering with literal expected strings, and seeded principle sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from constitution import ConstitutionError, draw, load_constitution, parse_constitution, transcript

GOOD = """\
name: demo
description: A small test constitution.
principles:
  - id: harm
    tags: [harm]
    trait: kind
    critique: "Critique {{ response }} for: {{ prompt }}"
    revision: "Fix {{ response }} given {{ critique }}"
    preference: "Which is kinder, given {{ prompt }}?"
  - id: pref-only
    preference: Which is shorter?
few_shot:
  - principle: harm
    prompt: p
    response: r
    critique: c
    revision: v
label_few_shot:
  - {principle: pref-only, prompt: p, response_a: a, response_b: b, answer: "(b)"}
"""

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "How do I pick a lock?"}]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp_path: Path, text: str | bytes) -> ConstitutionError:
    p = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    with pytest.raises(ConstitutionError) as info:
        load_constitution(p)
    return info.value


def test_good_file_loads(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    assert c.name == "demo" and c.description == "A small test constitution."
    assert [p.id for p in c.critique_principles] == ["harm"]
    assert [p.id for p in c.preference_principles] == ["harm", "pref-only"]
    assert c.principle("harm").tags == ("harm",) and c.principle("harm").trait == "kind"
    assert c.few_shot[0].critique == "c" and c.few_shot[0].principle == "harm"
    assert c.label_few_shot[0].answer == "B"  # "(b)" normalised
    assert len(c.sha256) == 64 and c.source_text == GOOD


def test_hash_changes_with_content(tmp_path):
    a = load_constitution(write(tmp_path, GOOD, "a.yaml"))
    b = load_constitution(write(tmp_path, GOOD.replace("kinder", "nicer"), "b.yaml"))
    assert a.sha256 != b.sha256


def test_rendering_literal_strings(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    p = c.principle("harm")
    assert c.render_critique(p, MESSAGES, "Use a pin.") == \
        "Critique Use a pin. for: How do I pick a lock?"
    assert c.render_revision(p, MESSAGES, "Use a pin.", "Risky.") == "Fix Use a pin. given Risky."
    assert c.render_question(p, MESSAGES) == "Which is kinder, given How do I pick a lock??"
    assert c.render_label(p, MESSAGES, ["One.", "Two."]) == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: Hi\n\nAssistant: Hello\n\nHuman: How do I pick a lock?\n\n"
        "Which is kinder, given How do I pick a lock??\n\n"
        "Options:\n(A) One.\n(B) Two.\n\n"
        "Answer with the letter of the better option.")
    assert c.render_rating(p, MESSAGES, "Resp.", 1, 5).endswith(
        "Here is the assistant's response:\nResp.\n\nWhich is kinder, given How do I pick a lock??"
        "\nRate the response on a scale from 1 (worst) to 5 (best). Answer with the number only.")


def test_custom_label_template_and_labels(tmp_path):
    text = GOOD + ('label_template: "{{ question }}|{% for o in options %}'
                   '{{ labels[loop.index0] }}={{ o }};{% endfor %}"\n')
    c = load_constitution(write(tmp_path, text))
    assert c.render_label(c.principle("pref-only"), MESSAGES, ["x", "y"], ("1", "2")) == \
        "Which is shorter?|1=x;2=y;"


def test_transcript_skips_system_turns():
    msgs = [{"role": "system", "content": "S"}, *MESSAGES[:2]]
    assert transcript(msgs) == "Human: Hi\n\nAssistant: Hello"


def test_user_text_is_not_a_template(tmp_path):
    """Prompt and response text is data: jinja syntax in it is shown, never evaluated."""
    c = load_constitution(write(tmp_path, GOOD))
    p = c.principle("harm")
    out = c.render_critique(p, [{"role": "user", "content": "{{ 7*7 }}"}], "{% for %}")
    assert out == "Critique {% for %} for: {{ 7*7 }}"


# ---- every kind of validation error: exact FILE:LINE: field -----------------------------------

P = "name: x\ndescription: d\nprinciples:\n"
CR = "    critique: c\n    revision: r\n"


@pytest.mark.parametrize("text, line, field, words", [
    # unknown keys
    (P + "  - id: a\n" + CR + "colour: red\n", 7, "colour", "unknown key 'colour'"),
    (P + "  - id: a\n    critque: c\n    revision: r\n", 5, "principles[0].critque",
     "unknown key 'critque'"),
    (P + "  - id: a\n" + CR + "few_shot:\n  - {prompt: p, response: r, critique: c, "
     "revision: v, extra: 1}\n", 8, "few_shot[0].extra", "unknown key 'extra'"),
    # missing fields
    ("description: d\nprinciples:\n  - id: a\n" + CR, 1, None, "missing required field 'name'"),
    (P + "  - tags: [a]\n" + CR, 4, "principles[0]", "missing required field 'id'"),
    (P + "  - id: a\n    critique: c\n", 4, "principles[0]", "missing required field 'revision'"),
    (P + "  - id: a\n    trait: t\n", 4, "principles[0]", "has no template"),
    ("name: x\ndescription: d\n", 1, "principles", "expected a non-empty list"),
    (P + "  - id: a\n" + CR + "few_shot:\n  - {prompt: p, response: r, critique: c}\n", 8,
     "few_shot[0]", "missing required field 'revision'"),
    # wrong types
    ("name: [x]\ndescription: d\nprinciples:\n  - id: a\n" + CR, 1, "name",
     "expected a non-empty string, got list"),
    (P + "  - id: a\n    tags: harm\n" + CR, 5, "principles[0].tags", "expected a list"),
    (P + "  - id: a\n    critique: 3\n    revision: r\n", 5, "principles[0].critique",
     "got int"),
    (P + "  - id: a b\n" + CR, 4, "principles[0].id", "id must be"),
    (P + "  - id: a\n" + CR + "label_few_shot:\n  - {prompt: p, response_a: a, response_b: b, "
     "answer: C}\n", 8, "label_few_shot[0].answer", "expected A or B"),
    (P + "  - id: a\n" + CR + "few_shot:\n  - {principle: zz, prompt: p, response: r, "
     "critique: c, revision: v}\n", 8, "few_shot[0].principle", "unknown principle id 'zz'"),
    ("- a\n- b\n", 1, None, "expected a mapping"),
    # duplicates
    (P + "  - id: a\n" + CR + "  - id: a\n    preference: q\n", 7, "principles[1].id",
     "duplicate principle id 'a'"),
    ("name: x\ndescription: d\nname: y\n", 3, "name", "duplicate key 'name'"),
    (P + "  - id: a\n    critique: c\n    critique: d\n    revision: r\n", 6,
     "principles[0].critique", "duplicate key 'critique'"),
    # templates: syntax, undefined variables, sandbox
    (P + "  - id: a\n    critique: '{{ response'\n    revision: r\n", 5,
     "principles[0].critique", "template syntax error"),
    (P + "  - id: a\n    critique: c\n    revision: '{{ respons }}'\n", 6,
     "principles[0].revision", "undefined variable: 'respons' is undefined"),
    (P + "  - id: a\n    preference: '{{ response }}'\n", 5, "principles[0].preference",
     "'response' is undefined"),  # the question sees only prompt and conversation
    (P + "  - id: a\n" + CR + "label_template: '{{ options.__class__ }}'\n", 7,
     "label_template", "not allowed in a template"),
    (P + "  - id: a\n    critique: '{% set x = 1 %}'\n    revision: r\n", 5,
     "principles[0].critique", "{% set %}"),
    # YAML itself
    ("name: x\ndescription: [d\nprinciples: []\n", 3, None, "invalid YAML"),
    ("name: !!python/object:os.system {}\n", 1, "name", "Python tag '!!python/object:os.system'"),
    ("name: x\n? [a, b]\n: c\n", 2, None, "keys must be plain strings"),
    ("\n  \n", 1, None, "empty file"),
])
def test_validation_errors(tmp_path, text, line, field, words):
    e = error_of(tmp_path, text)
    path = str(tmp_path / "c.yaml")
    assert e.path == path and e.line == line and e.field == field, str(e)
    prefix = f"{path}:{line}: " + (f"{field}: " if field else "")
    assert str(e).startswith(prefix), str(e)
    assert words in str(e)


def test_non_utf8_names_line(tmp_path):
    e = error_of(tmp_path, b"name: x\ndescription: caf\xe9\n")
    assert str(e).startswith(f"{tmp_path / 'c.yaml'}:2: not UTF-8 text (byte 24)")


def test_binary_file(tmp_path):
    e = error_of(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert str(e) == f"{tmp_path / 'c.yaml'}:3: binary file (NUL byte); expected YAML text"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConstitutionError, match="principle file not found"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(ConstitutionError, match="found a directory"):
        load_constitution(tmp_path)


def test_alias_bomb_is_cheap():
    """A billion-laughs document must fail fast (aliases are walked once, not expanded)."""
    doc = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 30):
        doc += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    with pytest.raises(ConstitutionError, match="unknown key 'a0'"):
        parse_constitution(doc, "bomb.yaml")


def test_unknown_principle_lookup_lists_ids(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    with pytest.raises(ConstitutionError, match="the ids are: harm, pref-only"):
        c.principle("nope")


# ---- seeded sampling -------------------------------------------------------------------------

POOL = ["a", "b", "c", "d", "e"]


def test_draw_literal_results():
    """Regression values: the seed is sha256("seed\\x1fkey...")[:8] fed to random.Random."""
    assert draw(POOL, 2, 0, "rec1", 0) == ["e", "d"]
    assert draw(POOL, 2, 0, "rec1", 1) == ["e", "a"]
    assert draw(POOL, 2, 1, "rec1", 0) == ["d", "a"]
    assert draw(["a", "b", "c"], 5, 0, "x") == ["a", "c", "b"]  # k > pool: all, shuffled


def test_draw_is_order_independent():
    keys = [("r1", 0), ("r2", 0), ("r1", 1), ("r3", 2)]
    forward = {k: draw(POOL, 2, 7, *k) for k in keys}
    backward = {k: draw(POOL, 2, 7, *k) for k in reversed(keys)}
    assert forward == backward
    assert len({tuple(v) for v in forward.values()}) > 1  # the key really matters


def test_draw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty pool"):
        draw([], 1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        draw(POOL, 0, 0)


# ---- shipped principle files -------------------------------------------------------------------

SHIPPED = sorted((Path(__file__).parent.parent / "principles").glob("*.yaml"))


def test_shipped_files_exist():
    assert {p.name for p in SHIPPED} >= {"harmless.yaml", "terse.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_loads_and_renders(path):
    c = load_constitution(path)
    for p in c.critique_principles:
        assert c.render_critique(p, MESSAGES, "resp")
        assert c.render_revision(p, MESSAGES, "resp", "crit")
    for p in c.preference_principles:
        assert "(A) x" in c.render_label(p, MESSAGES, ["x", "y"])
    few_ids = {f.principle for f in c.few_shot}
    assert few_ids <= {p.id for p in c.critique_principles}


def test_harmless_meets_the_brief():
    c = load_constitution(Path(__file__).parent.parent / "principles" / "harmless.yaml")
    assert len(c.critique_principles) >= 12 and len(c.preference_principles) >= 8
    assert len(c.few_shot) >= 4 and len(c.label_few_shot) >= 2
    tags = {t for p in c.principles for t in p.tags}
    for topic in ("harm", "dishonesty", "illegality", "danger", "discrimination", "privacy",
                  "manipulation", "age-appropriateness", "evasiveness"):
        assert topic in tags, topic
    # benign few-shot examples keep the answer: the revision equals the response
    benign = [f for f in c.few_shot if f.critique.startswith("No")]
    assert len(benign) >= 2 and all(f.revision == f.response for f in benign)
    # every critique asks first whether there is anything to fix
    assert all('Answer "No"' in p.critique for p in c.critique_principles)


@pytest.mark.parametrize("text, line, field, words", [
    ("name:\ndescription: d\nprinciples:\n  - id: a\n" + CR, 1, "name",
     "missing required field 'name'"),
    (P + "  - id: a\n    preference: q\n  - id: b\n" + CR + "few_shot:\n"
     "  - {principle: a, prompt: p, response: r, critique: c, revision: v}\n", 10,
     "few_shot[0].principle", "principle 'a' has no critique template"),
    (P + "  - id: a\n" + CR + "label_few_shot:\n"
     "  - {principle: a, prompt: p, response_a: x, response_b: y, answer: A}\n", 8,
     "label_few_shot[0].principle", "principle 'a' has no preference template"),
])
def test_more_validation_errors(tmp_path, text, line, field, words):
    test_validation_errors(tmp_path, text, line, field, words)


def test_render_label_needs_a_label_per_option(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    with pytest.raises(ValueError, match="3 options but only 2 labels"):
        c.render_label(c.principle("harm"), MESSAGES, ["x", "y", "z"])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shared_label_examples_balance_positions(path):
    """Untagged labelling examples are shown for every principle: as many A as B answers,
    so few-shot labelling does not teach a favourite position."""
    answers = [ex.answer for ex in load_constitution(path).label_few_shot if ex.principle is None]
    assert answers and answers.count("A") == answers.count("B")
