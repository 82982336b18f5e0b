"""Principle-file templates are untrusted: sandbox escapes and resource bombs are refused with a
one-line reason, and random or hostile input never gets past `ConstitutionError`."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constitution import ConstitutionError, parse_constitution
from constitution.render import TemplateProblem, render

VARS = {"prompt": "p", "conversation": "Human: p", "response": "hello", "critique": "c",
        "options": ["one", "two"], "labels": ["A", "B"]}


@pytest.mark.parametrize("source, reason", [
    ("{{ response.__class__.__mro__ }}", "access to attribute '__class__'"),
    ("{{ ''.__class__ }}", "access to attribute '__class__'"),
    ("{{ response.__class__.__mro__[1].__subclasses__() }}", "'__class__'"),
    ("{{ range.__globals__ }}", "'__globals__'"),
    ("{{ options.pop() }}", "calling 'pop' is not allowed"),
    ("{{ response.format_map({}) }}", "calling 'format_map' is not allowed"),
    ("{{ '{:>999999999}'.format(1) }}", "calling 'format' is not allowed"),
    ("{{ response.center(100000000) }}", "calling 'center' is not allowed"),
    ("{{ cycler('a', 'b') }}", "'cycler' is undefined"),
    ("{{ joiner() }}", "'joiner' is undefined"),
    ("{{ namespace(a=1) }}", "'namespace' is undefined"),
    ("{{ lipsum() }}", "'lipsum' is undefined"),
    ("{{ range(10**9)|list|length }}", "range() too large"),
    ("{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}",
     "range() too large"),
    ("{% for a in response * 1000 %}{% for b in response * 1000 %}{% endfor %}{% endfor %}",
     "too many loop iterations"),
    ("{{ 'x' * 10**9 }}", "repetition too large"),
    ("{{ [1] * 10**9 }}", "repetition too large"),
    ("{{ 9 ** 999 }}", "power too large"),
    ("{{ '%999999999d' % 1 }}", "format width too large"),
    ("{{ '%*d' % (999999999, 1) }}", "format width too large"),
    ("{{ ('x' * 100000)|replace('x', 'yy') }}", "replace result too large"),
    ("{{ ('x' * 1000).join(['y' * 100] * 1000) }}", "join result too large"),
    ("{{ response|indent(100000000) }}", "indent too wide"),
    ("{% set a = 'x' %}{{ a }}", "{% set %}"),
    ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}", "{% macro %}"),
    ("{% include 'secret.txt' %}", "{% include %}"),
    ("{% extends 'base' %}", "{% extends %}"),
    ("{% for x in options recursive %}{{ loop(x) }}{% endfor %}", "recursive for-loops"),
])
def test_sandbox_refuses(source, reason):
    with pytest.raises(TemplateProblem) as info:
        render(source, VARS)
    assert reason in str(info.value)


@pytest.mark.parametrize("source", [
    "{{ 'x'|center(10) }}",  # allocates on demand
    "{{ options|random }}",  # not deterministic
    "{{ '%s'|format(1) }}",
])
def test_removed_filters_are_syntax_errors(source):
    with pytest.raises(TemplateProblem, match="No filter named"):
        render(source, VARS)


def test_allowed_language_renders_literally():
    src = ("{{ response|upper }} {{ response.replace('l', 'L') }} {{ options|join(', ') }}\n"
           "{% for o in options %}({{ labels[loop.index0] }}) {{ o }}{{ loop.cycle(';', '.') }}"
           "{% endfor %}\n{% if critique %}[{{ critique|trim|length }}]{% endif %}"
           " {{ '%-4s|' % 'ab' }}{{ '=' * 3 }}")
    # trim_blocks: the newline after a block tag is dropped
    assert render(src, VARS) == "HELLO heLLo one, two\n(A) one;(B) two.[1] ab  |==="


def test_output_size_is_capped():
    src = "{% for i in range(9000) %}{{ response * 20000 }}{% endfor %}"
    with pytest.raises(TemplateProblem, match="rendered text too long"):
        render(src, VARS)


def test_budget_resets_between_renders():
    src = "{% for i in range(6000) %}{% endfor %}ok"
    assert render(src, VARS) == "ok" and render(src, VARS) == "ok"


def test_hostile_template_in_a_file_names_line_and_field():
    text = ("name: x\ndescription: d\nprinciples:\n  - id: a\n    critique: c\n"
            "    revision: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n")
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "evil.yaml")
    assert str(info.value).startswith("evil.yaml:6: principles[0].revision: principle 'a': "
                                      "not allowed")


# ---- property test: anything in, ConstitutionError or a Constitution out --------------------

JINJA_BITS = ["{{", "}}", "{%", "%}", "{#", "#}", "for x in", "endfor", "if", "endif", "set",
              "macro", "range(", ")", "response", "options", "__class__", "__mro__", ".", "*",
              "**", "%", "~", "|join", "|replace(", "'", '"', "9", "99999999", "loop", "cycler",
              "[", "]", "(", ",", " ", "\n", "critique", "prompt", "conversation", "self",
              "recursive", "include", "lipsum", "namespace"]
YAML_BITS = ["name:", "description:", "principles:", "- id:", "critique:", "revision:",
             "preference:", "few_shot:", "label_few_shot:", "tags:", "&a", "*a", "!!python/object",
             "!!binary", "<<:", "? ", ": ", "- ", "  ", "\n", "{", "}", "[", "]", "'", '"', "#",
             "---", "...", "%YAML 1.1", "\t", "x", "é", "\x00", "\ufeff", "1e9", "~", "null"]

ATOMS = ["response", "options", "prompt", "labels", "1", "99999", "'x'", "range(3)", "loop",
         "cycler", "''", "self", "critique", "[1, 2]", "{'a': 1}"]
ATTRS = ["__class__", "__mro__", "__subclasses__", "__globals__", "__init__", "upper", "center",
         "format", "join", "replace", "pop", "items", "mro", "func_globals", "gi_frame"]
expr = st.recursive(st.sampled_from(ATOMS), lambda e: st.one_of(
    st.tuples(e, st.sampled_from(["*", "**", "%", "~", "+", "-", "//"]), e).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"),
    st.tuples(e, st.sampled_from(ATTRS)).map(lambda t: f"{t[0]}.{t[1]}"),
    e.map(lambda x: f"{x}()"),
    st.tuples(e, e).map(lambda t: f"{t[0]}({t[1]})"),
    st.tuples(e, st.sampled_from(["|join(',')", "|length", "|list", "|upper", "|sort",
                                  "|replace('x', 'yy')", "|indent(999)", "|center(9)"])
              ).map("".join),
    st.tuples(e, e).map(lambda t: f"{t[0]}[{t[1]}]"),
), max_leaves=8)
jinja_text = st.one_of(
    st.lists(st.sampled_from(JINJA_BITS), max_size=25).map("".join),
    expr.map(lambda x: "{{ " + x + " }}"),
    st.tuples(expr, expr).map(lambda t: f"{{% for a in {t[0]} %}}{{% for b in {t[1]} %}}"
                              "{{ a ~ b }}{% endfor %}{% endfor %}"),
)
yaml_text = st.one_of(
    st.lists(st.sampled_from(YAML_BITS), max_size=40).map("".join),
    st.text(max_size=200),
)


def _doc(template: str, where: int) -> str:
    quoted = '"' + template.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    fields = {"critique": '"c"', "revision": '"r"', "preference": '"q"'}
    fields[("critique", "revision", "preference")[where]] = quoted
    body = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    return f"name: x\ndescription: d\nprinciples:\n  - id: a\n{body}"


def _must_load_or_refuse(text: str) -> None:
    start = time.monotonic()
    try:
        parse_constitution(text, "h.yaml")
    except ConstitutionError as e:
        assert str(e).startswith("h.yaml")
    assert time.monotonic() - start < 3.0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=jinja_text, where=st.integers(0, 2))
def test_random_templates_load_or_raise_constitution_error(template, where):
    _must_load_or_refuse(_doc(template, where))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_text)
def test_random_yaml_loads_or_raises_constitution_error(text):
    _must_load_or_refuse(text)


def test_wall_clock_deadline(monkeypatch):
    """Work that stays inside every budget but is slow still stops at the deadline."""
    import constitution.render as render_mod

    monkeypatch.setattr(render_mod, "RENDER_SECONDS", 0.05)
    big = {"response": "x" * 100_000}
    src = ("{% for i in range(10000) %}{% if (response ~ response ~ response ~ response)"
           "|length < 0 %}{% endif %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(TemplateProblem, match="rendering took over 0.05s"):
        render(src, big)
    assert time.monotonic() - start < 1.0


def test_python_compile_limits_are_template_problems():
    with pytest.raises(TemplateProblem, match="template"):
        render("{{ 1" + " + 1" * 3000 + " }}", VARS)


def test_docs_list_the_allowed_filters_and_limits():
    """docs/principles.md is the reference users read: it must match the sandbox."""
    from pathlib import Path

    import constitution.render as r

    doc = (Path(__file__).parent.parent / "docs" / "principles.md").read_text()
    section = doc.split("- filters:", 1)[1].split("- callable methods:", 1)[0]
    listed = set(section.replace("`", " ").replace("/", " ").replace(";", " ").split())
    assert listed == r.SAFE_FILTERS
    for n in (r.MAX_TEMPLATE_CHARS, r.MAX_OUTPUT_CHARS, r.MAX_LOOP_ITEMS, r.MAX_BINOP_RESULT,
              r.MAX_FORMAT_WIDTH):
        assert f"{n:,}" in doc, n


@pytest.mark.parametrize("source, reason", [
    # jinja2 folds constants while compiling: these fail at compile time, not render time
    ("{{ (1.__class__ ~ response) }}", "not allowed in a template: access to attribute"),
    ("{{ (1.__mro__ ~ response) }}", "undefined variable"),
    ("{{ (1 // 0) ~ response }}", "ZeroDivisionError"),
])
def test_errors_while_folding_constants(source, reason):
    with pytest.raises(TemplateProblem, match=reason):
        render(source, VARS)


def test_many_slow_templates_hit_the_load_budget(monkeypatch):
    import constitution.loader as loader_mod
    import constitution.render as render_mod

    monkeypatch.setattr(render_mod, "RENDER_SECONDS", 0.5)
    monkeypatch.setattr(loader_mod, "MAX_CHECK_SECONDS", 0.1)
    # a slow but legal template: every render stays under its own deadline
    slow = "{% for i in range(10000) %}{{ '' if (prompt * 4000)|length < 0 }}{% endfor %}"
    body = "".join(f"  - id: p{i}\n    preference: \"{slow} {i}\"\n" for i in range(50))
    start = time.monotonic()
    with pytest.raises(ConstitutionError, match="checking the templates took over 0.1s"):
        parse_constitution("name: x\ndescription: d\nprinciples:\n" + body, "slow.yaml")
    assert time.monotonic() - start < 5


def test_join_attribute_goes_through_the_sandbox():
    rows = {"rows": [{"name": "a"}, {"name": "b"}]}
    assert render("{{ rows|join(', ', attribute='name') }}", rows) == "a, b"
    with pytest.raises(TemplateProblem, match="__class__"):
        render("{{ options|join(',', attribute='__class__') }}", VARS)
