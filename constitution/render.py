"""Rendering untrusted templates: a jinja2 sandbox with hard limits.

Principle files are written by other people, so their templates get:
- `SandboxedEnvironment` (no attribute access to dunders or internals, no unsafe callables) and
  `StrictUndefined` (a misspelt variable is an error, not an empty string);
- no `cycler`, `joiner`, `namespace` or `lipsum` globals, and a `range` that shares a budget of
  iterations per render;
- `*` and `**` intercepted so `"x" * 10**9` or `9**9**9` cannot allocate or hang;
- a cap on template size and on rendered size, and a wall-clock deadline per render (main
  thread only: it uses SIGALRM).
Every failure is a `TemplateProblem` with a one-line reason; the loader adds file and line.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment, SecurityError

MAX_TEMPLATE_CHARS = 20_000
MAX_OUTPUT_CHARS = 200_000
MAX_RANGE_ITEMS = 10_000  # per render, all range() calls together
MAX_BINOP_RESULT = 100_000  # length of a repeated string/list, digits of a power
RENDER_SECONDS = 2.0


class TemplateProblem(Exception):
    """A template that does not compile, uses an unknown variable, or breaks the sandbox."""


class _Budget(threading.local):
    remaining = MAX_RANGE_ITEMS


_budget = _Budget()


def _limited_range(*args: int):
    r = range(*args)
    if len(r) > _budget.remaining:
        raise SecurityError(f"range() too large: at most {MAX_RANGE_ITEMS} items per render")
    _budget.remaining -= len(r)
    return r


class _Sandbox(SandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(right) > 64 or (abs(left) > 1 and abs(right) * max(1, len(str(left))) > 1000):
                    raise SecurityError("power too large")
            return left**right
        # operator == "*"
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                if len(seq) * max(n, 0) > MAX_BINOP_RESULT:
                    raise SecurityError("repetition too large")
        return left * right


def make_environment() -> SandboxedEnvironment:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False,
                   trim_blocks=True, lstrip_blocks=True)
    for name in ("cycler", "joiner", "namespace", "lipsum", "dict"):
        env.globals.pop(name, None)
    env.globals["range"] = _limited_range
    return env


_ENV = make_environment()


def compile_template(source: str) -> jinja2.Template:
    if not isinstance(source, str):
        raise TemplateProblem(f"expected a template string, got {type(source).__name__}")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"template too long ({len(source)} chars; at most "
                              f"{MAX_TEMPLATE_CHARS})")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateProblem(f"template syntax error on template line {e.lineno}: {e.message}"
                              ) from None
    except (RecursionError, MemoryError):
        raise TemplateProblem("template too deeply nested") from None


@contextmanager
def _deadline(seconds: float):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _timeout(signum: int, frame: Any) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def render(template: jinja2.Template | str, variables: dict[str, Any]) -> str:
    """Render with the sandbox limits; any failure becomes a `TemplateProblem`."""
    if isinstance(template, str):
        template = compile_template(template)
    _budget.remaining = MAX_RANGE_ITEMS
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
