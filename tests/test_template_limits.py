"""Template bombs: every one ends, in lint and at run time, in one error naming the principle,
the file and the line, within a few seconds (the C-level ones cannot be stopped by a timer, so
their inputs are weighed before they run)."""

from __future__ import annotations

import time

import pytest

from charter.cli import main
from constitution import load_constitution

BOMBS = {
    "sum-start-list": "{{ ([[0]] * 100000)|sum(start=[])|length }}{{ ([[0] * 1000] * 1000)|sum(start=[]) }}",
    "nested-repetition": "{{ [[0] * 100000] * 100000 }}",
    "nested-compare": "{{ [[0] * 100000] * 100000 == [[0] * 100000] * 100000 }}",
    "nested-sort": "{{ ([['x'] * 100000] * 1000)|sort|length }}",
    "nested-join": "{{ ([[0] * 100000] * 100000)|join }}",
    "string-multiplication": "{{ 'x' * 10 ** 9 }}",
    "string-doubling": "{{ ('x' * 100000 + 'x' * 100000) * 100 }}",
    "concat-chain": "{{ ('x' * 90000) ~ ('x' * 90000) ~ ('x' * 90000) ~ response }}",
    "huge-range": "{% for i in range(10 ** 12) %}{{ i }}{% endfor %}",
    "nested-loops": "{% for i in range(5000) %}{% for j in range(5000) %}{{ j }}{% endfor %}"
                    "{% endfor %}",
    "list-literal": "{{ [response * 1000, response * 1000, response * 1000] * 1000 }}",
    "macro-recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "recursive-loop": "{% for x in [[1]] recursive %}{{ loop(x) }}{% endfor %}",
    "deep-nesting": "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
    "power": "{{ 10 ** 100000 }}",
    "format-width": "{{ '%999999999d' % 1 }}",
    "empty-output": "{% if false %}x{% endif %}",
}


def _file(tmp_path, template: str):
    f = tmp_path / "bomb.yaml"
    f.write_text("name: bombs\ndescription: d\nprinciples:\n  - id: fine\n"
                 "    preference: Which is kinder?\n  - id: bomb\n"
                 f"    preference: {template!r}\n")
    return f


@pytest.mark.parametrize("name", list(BOMBS))
def test_lint_refuses_a_bomb_quickly_naming_principle_and_line(name, tmp_path, capsys):
    f = _file(tmp_path, BOMBS[name])
    t = time.monotonic()
    rc = main(["principles", "lint", str(f)])
    took = time.monotonic() - t
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 1, text
    assert took < 5, f"lint took {took:.1f}s"
    assert "Traceback" not in text and "internal error" not in text, text
    assert f"{f}:7: principles[1].preference" in text, text
    if name not in ("macro-recursion", "recursive-loop", "deep-nesting"):  # refused when parsed
        assert "principle 'bomb'" in text, text


def test_limits_apply_at_run_time_too(tmp_path):
    """A template that lints (the sample response is short) but grows with the real input: the
    render at run time stops with the principle, file and line."""
    f = tmp_path / "grow.yaml"
    f.write_text("name: g\ndescription: d\nprinciples:\n  - id: grow\n"
                 "    critique: '{{ response * 2000 }}'\n    revision: 'Rewrite {{ response }}'\n"
                 "  - id: vanish\n"
                 "    critique: '{% if response|length < 100 %}Find the harm.{% endif %}'\n"
                 "    revision: 'Rewrite {{ response }}'\n")
    c = load_constitution(f)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match=rf"{f}:5: grow.critique: principle 'grow': .*too large"):
        c.render_critique(c.principle("grow"), msgs, "y" * 1000)
    with pytest.raises(Exception, match=rf"{f}:8: vanish.critique: principle 'vanish': "
                                        "the template rendered to an empty string"):
        c.render_critique(c.principle("vanish"), msgs, "y" * 1000)
