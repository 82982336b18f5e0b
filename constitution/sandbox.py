"""The sandbox that runs principle-file templates: the jinja2 environment, its allowed filters
and methods, and the budgets every value and loop is weighed against (see
`constitution/render.py` for the whole set of limits and why). A library module: `render.py`
compiles and renders through `make_environment()`.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jinja2
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext
from jinja2.sandbox import SandboxedEnvironment, SecurityError

MAX_LOOP_ITEMS = 10_000  # per render: range() items, and for-loop iterations (each budget)
MAX_BINOP_RESULT = 100_000  # length of a repeated/joined/replaced string or list
MAX_VALUE_WEIGHT = 1_000_000  # deep size (items + chars) of any value a template handles
MAX_FORMAT_WIDTH = 1_000  # width/precision in `%` formatting and `indent`
SAFE_FILTERS = {
    "abs", "capitalize", "count", "d", "default", "first", "float", "int", "join", "last",
    "length", "list", "lower", "max", "min", "replace", "reverse", "round", "sort", "string",
    "sum", "title", "trim", "truncate", "unique", "upper", "wordcount", "indent", "e", "escape",
}
SAFE_METHODS = {
    str: {"lower", "upper", "strip", "lstrip", "rstrip", "title", "capitalize", "startswith",
          "endswith", "split", "splitlines", "count", "find", "rfind", "isdigit", "isalpha",
          "isspace", "replace", "join"},
    dict: {"items", "keys", "values", "get"},
    list: {"count", "index"},
}
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateProblem(Exception):
    """A template that does not compile, uses an unknown variable, or breaks the sandbox."""


class _Budget(threading.local):
    """What is left of this render's allowance (reset by `render`)."""

    range_items = MAX_LOOP_ITEMS
    iterations = MAX_LOOP_ITEMS


_budget = _Budget()


def _limited_range(*args: int) -> range:
    r = range(*args)
    if len(r) > _budget.range_items:
        raise SecurityError(f"range() too large: at most {MAX_LOOP_ITEMS} items per render")
    _budget.range_items -= len(r)
    return r


def _budgeted(items: Iterable[Any]) -> Iterator[Any]:
    """Wraps every `for` loop's iterable (inserted by `_check_tree`): one unit per iteration."""
    for item in items:
        if _budget.iterations <= 0:
            raise SecurityError(f"too many loop iterations: at most {MAX_LOOP_ITEMS} per render")
        _budget.iterations -= 1
        yield item


def _weight(value: Any, limit: int = MAX_VALUE_WEIGHT) -> int:
    """Items plus characters in `value`, walked deeply; stops counting past `limit` (so the
    walk itself is bounded even for a list that holds itself or one list many times)."""
    total, stack = 0, [value]
    while stack:
        x = stack.pop()
        total += 1
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, range):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset, dict)):
            if total + len(x) > limit:
                return total + len(x)
            stack.extend(x.items() if isinstance(x, dict) else x)
        if total > limit:
            break
    return total


def _sized(value: Any) -> Any:
    """`value`, or a SecurityError when it is too large to handle safely."""
    if _weight(value) > MAX_VALUE_WEIGHT:
        raise SecurityError(f"value too large (over {MAX_VALUE_WEIGHT} items and characters)")
    return value


def _concat(*parts: Any) -> str:
    """The `~` operator, with a size check before the strings are built."""
    strs = [str(_sized(p)) for p in parts]
    _check_size(sum(map(len, strs)) // 10, "concatenation")  # up to 10x a repetition
    return "".join(strs)


def _safe_sum(env: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    """jinja2's `sum` filter, but lists and tuples are concatenated in linear time (the
    built-in sum copies the growing list at every step: quadratic, in C, unstoppable)."""
    if attribute is not None:
        iterable = map(make_attrgetter(env, attribute), iterable)
    items = list(iterable)
    if isinstance(start, (list, tuple)) and all(isinstance(i, type(start)) for i in items):
        out = list(start)
        for i in items:
            out.extend(i)
        return _sized(out if isinstance(start, list) else tuple(out))
    return sum(items, start)


def _guarded_filter(f: Any) -> Any:
    """Weigh a filter's input and arguments before it runs, and its result after."""

    @functools.wraps(f)  # keeps jinja2's pass_environment/pass_context marker
    def run(*args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, (str, list, tuple, dict, set, range)):
                _sized(a)
        return _sized(f(*args, **kwargs))

    return run


def _check_size(n: int, what: str) -> None:
    if n > MAX_BINOP_RESULT:
        raise SecurityError(f"{what} too large (over {MAX_BINOP_RESULT} items)")


def _safe_join(env: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    if attribute is not None:  # through the sandbox's getattr, like jinja2's own join
        value = map(make_attrgetter(env, attribute), value)
    items = [str(v) for v in value]
    _check_size(sum(map(len, items)) + len(str(d)) * max(len(items) - 1, 0), "join result")
    return str(d).join(items)


def _safe_replace(env: Any, s: Any, old: str, new: str, count: int | None = None) -> str:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    _check_size(len(s) + hits * len(new), "replace result")
    return s.replace(old, new, -1 if count is None else count)


def _safe_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    pad = width if isinstance(width, str) else " " * min(int(width), MAX_FORMAT_WIDTH + 1)
    if len(pad) > MAX_FORMAT_WIDTH:
        raise SecurityError("indent too wide")
    s = str(s)
    _check_size(len(s) + len(pad) * (s.count("\n") + 1), "indent result")
    lines = s.split("\n")
    out = [(pad + ln if (blank or ln.strip()) else ln) for ln in lines[1:]]
    head = pad + lines[0] if first else lines[0]
    return "\n".join([head, *out])


class _Sandbox(SandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(right) > 64 or (abs(left) > 1 and abs(right) * max(1, len(str(left))) > 1000):
                    raise SecurityError("power too large")
            return left**right
        if operator == "%":
            if isinstance(left, str):
                for width, precision in _PERCENT_SPEC.findall(left):
                    for n in (width, precision):
                        if n == "*" or (n and int(n) > MAX_FORMAT_WIDTH):
                            raise SecurityError("format width too large")
            return left % right
        if operator == "+":
            if not isinstance(left, (int, float)) or not isinstance(right, (int, float)):
                _sized(left)
                _sized(right)
                return _sized(left + right)
            return left + right
        # operator == "*": weighed deeply, so [[0] * 10**5] * 10**5 is refused too
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _check_size(len(seq) * max(n, 0), "repetition")
                if _weight(seq) * max(n, 0) > MAX_VALUE_WEIGHT:
                    raise SecurityError(f"repetition too large (over {MAX_VALUE_WEIGHT} items "
                                        "and characters)")
        return left * right

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if isinstance(__obj, jinja2.Undefined):
            __obj._fail_with_undefined_error()
        if __obj not in _HELPERS and not _safe_method(__obj):
            name = getattr(__obj, "__name__", type(__obj).__name__)
            raise SecurityError(f"calling {name!r} is not allowed")
        if getattr(__obj, "__name__", "") in ("join", "replace") and isinstance(
                getattr(__obj, "__self__", None), str):
            return _safe_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _safe_method(obj: Any) -> bool:
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, LoopContext):
        return name in ("cycle", "changed")
    return any(type(owner) is t and name in names for t, names in SAFE_METHODS.items())


def _safe_str_method(method: Any, args: tuple, kwargs: dict) -> str:
    if kwargs:
        raise SecurityError(f"str.{method.__name__}() takes no keyword arguments here")
    if method.__name__ == "join":
        if len(args) != 1:
            raise SecurityError("str.join() takes one argument")
        return _safe_join(None, args[0], method.__self__)
    if len(args) not in (2, 3):
        raise SecurityError("str.replace() takes two or three arguments")
    return _safe_replace(None, method.__self__, *args)


def make_environment() -> SandboxedEnvironment:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False,
                   trim_blocks=True, lstrip_blocks=True)
    env.globals = {"range": _limited_range, "_budgeted": _budgeted, "_sized": _sized,
                   "_concat": _concat}
    filters = {k: v for k, v in env.filters.items() if k in SAFE_FILTERS}
    filters.update(join=jinja2.pass_environment(_safe_join),
                   replace=jinja2.pass_environment(_safe_replace), indent=_safe_indent,
                   sum=jinja2.pass_environment(_safe_sum))
    env.filters = {k: _guarded_filter(v) for k, v in filters.items()}
    return env


_HELPERS = (_limited_range, _budgeted, _sized, _concat)

