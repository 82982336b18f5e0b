"""Rendering untrusted templates: a jinja2 sandbox with hard limits.

Principle files are written by other people, so their templates get:
- `SandboxedEnvironment` (no attribute access to dunders or internals) and `StrictUndefined`
  (a misspelt variable is an error, not an empty string);
- a small template language, checked on the parsed tree before compiling: output, `if`, `for`
  (not recursive), expressions and filters. No `set`, `macro`, `call`, `include`, `import`,
  `extends`, `block` or `with`: without assignment and recursion a value can only grow as far
  as the expression written in the template, so doubling bombs (`{% set b = a ~ a %}`...)
  cannot be written;
- only a short list of filters (`center`, `format`, `random`... are gone: they allocate on
  demand or are not deterministic) and of callables (`range`, `loop.cycle`, a few plain string
  and dict methods); `cycler`, `joiner`, `namespace`, `lipsum` and `dict` are removed;
- per render, at most 10,000 `range()` items and 10,000 loop iterations, over all loops;
- `*`, `**` and `%` intercepted so `"x" * 10**9`, `9**9**9` or `"%999999999d" % 1` cannot
  allocate or hang; `join`, `replace` and `indent` check the size of what they would build;
- every value a template builds (list, tuple and dict literals, `+`, `*`, `~`, each filter's
  input and result) is weighed deeply (items plus characters, shared sub-lists counted each
  time they appear), so `[[0] * 10**5] * 10**5` is refused before anything walks it: C code
  such as `sum(..., start=[])`, `==` or `sort` cannot be stopped by the deadline below, so
  nothing it is given may be large; `sum` itself concatenates in linear time;
- a cap on template size and on rendered size, and a wall-clock deadline per render (main
  thread only: it uses SIGALRM; elsewhere the budgets above still bound the work).
Every failure is a `TemplateProblem` with a one-line reason; the loader adds file and line.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SecurityError
from jinja2.visitor import NodeTransformer

from constitution.sandbox import (  # noqa: F401  (the limits are re-exported: documented here)
    MAX_BINOP_RESULT,
    MAX_FORMAT_WIDTH,
    MAX_LOOP_ITEMS,
    MAX_VALUE_WEIGHT,
    SAFE_FILTERS,
    SAFE_METHODS,
    TemplateProblem,
    _budget,
    make_environment,
)

MAX_TEMPLATE_CHARS = 20_000
MAX_OUTPUT_CHARS = 200_000
RENDER_SECONDS = 2.0

# The template language principle files may use (anything else is refused before compiling).
ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For, nodes.Name,
    nodes.Const, nodes.Getattr, nodes.Getitem, nodes.Slice, nodes.Filter, nodes.Test,
    nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos,
    nodes.CondExpr, nodes.Add, nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod,
    nodes.Pow, nodes.Concat, nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair, nodes.Call,
    nodes.Keyword,
)
STATEMENT_NAMES = {
    nodes.Assign: "{% set %}", nodes.AssignBlock: "{% set %}", nodes.Macro: "{% macro %}",
    nodes.CallBlock: "{% call %}", nodes.Include: "{% include %}",
    nodes.Import: "{% import %}", nodes.FromImport: "{% from ... import %}",
    nodes.Extends: "{% extends %}", nodes.Block: "{% block %}", nodes.With: "{% with %}",
    nodes.FilterBlock: "{% filter %}",
}
_ENV = make_environment()


def _call(name: str, args: list, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load", lineno=lineno), args, [], None, None,
                      lineno=lineno)


class _Weigh(NodeTransformer):
    """Route literals through `_sized` and `~` through `_concat` (see the module docstring)."""

    def visit_List(self, node: nodes.Node) -> nodes.Node:  # noqa: N802 (jinja2's visitor names)
        return _call("_sized", [self.generic_visit(node)], node.lineno)

    visit_Dict = visit_List  # noqa: N815

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:  # noqa: N802
        node = self.generic_visit(node)
        return node if node.ctx != "load" else _call("_sized", [node], node.lineno)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802
        node = self.generic_visit(node)
        return _call("_concat", list(node.nodes), node.lineno)


def _check_tree(tree: nodes.Template) -> None:
    """Refuse statements outside the small language; route every `for` through the budget."""
    for node in tree.find_all(nodes.Node):
        if isinstance(node, nodes.For):
            if node.recursive:
                raise TemplateProblem("not allowed in a template: recursive for-loops")
            node.iter = nodes.Call(nodes.Name("_budgeted", "load"), [node.iter], [], None, None,
                                   lineno=node.lineno)
        elif not isinstance(node, ALLOWED_NODES):
            what = STATEMENT_NAMES.get(type(node), type(node).__name__)
            raise TemplateProblem(f"not allowed in a template: {what} (templates may use "
                                  "{{ }} expressions, filters, if and for)")


def compile_template(source: str) -> jinja2.Template:
    """Check and compile a template (cached by source: the stages render the same few
    templates for every record)."""
    if not isinstance(source, str):
        raise TemplateProblem(f"expected a template string, got {type(source).__name__}")
    return _compile(source)


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"template too long ({len(source)} chars; at most "
                              f"{MAX_TEMPLATE_CHARS})")
    try:
        tree = _ENV.parse(source)
        _check_tree(tree)
        tree = _Weigh().visit(tree)
        return _ENV.from_string(tree)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateProblem(f"template syntax error on template line {e.lineno}: {e.message}"
                              ) from None
    # jinja2 folds constant expressions while compiling, so compiling can fail like rendering
    except jinja2.UndefinedError as e:
        raise TemplateProblem(f"undefined variable: {e.message}") from None
    except SecurityError as e:
        raise TemplateProblem(f"not allowed in a template: {e}") from None
    except (RecursionError, MemoryError):
        raise TemplateProblem("template too deeply nested") from None
    except Exception as e:  # Python's own compile() limits (SyntaxError...), folded errors
        raise TemplateProblem(f"template cannot be compiled: {type(e).__name__}: {e}") from None


@contextmanager
def _deadline(seconds: float):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _timeout(signum: int, frame: Any) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, _timeout)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:  # someone else's timer (e.g. a test timeout) was running: put it back
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def render(template: jinja2.Template | str, variables: dict[str, Any]) -> str:
    """Render with the sandbox limits; any failure becomes a `TemplateProblem`."""
    if isinstance(template, str):
        template = compile_template(template)
    _budget.range_items = _budget.iterations = MAX_LOOP_ITEMS
    out: list[str] = []
    size = 0
    try:
        with _deadline(RENDER_SECONDS):
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateProblem(f"rendered text too long (over {MAX_OUTPUT_CHARS} "
                                          "chars)")
                out.append(chunk)
    except TemplateProblem:
        raise
    except jinja2.UndefinedError as e:
        raise TemplateProblem(f"undefined variable: {e.message}") from None
    except SecurityError as e:
        raise TemplateProblem(f"not allowed in a template: {e}") from None
    except TimeoutError:
        raise TemplateProblem(f"rendering took over {RENDER_SECONDS:g}s") from None
    except (RecursionError, MemoryError):
        raise TemplateProblem("template recursion or memory limit hit") from None
    except Exception as e:  # a template can raise almost anything (TypeError, ZeroDivision…)
        raise TemplateProblem(f"render failed: {type(e).__name__}: {e}") from None
    return "".join(out).strip()
