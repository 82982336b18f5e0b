"""Typed configs: one `@dataclass` per stage, set from a YAML file, overridden by CLI flags.

- Every field has a default (or none, which makes it required) and a one-line docstring (a
  string literal right under the field), which becomes the `--flag` help.
- `add_config_args(parser, Cfg)` adds one flag per field (`max_new_tokens` → `--max-new-tokens`;
  bools get `--x/--no-x`); flags that are not given do not override the YAML.
- `build_config(Cfg, args, yaml_path)` reads the YAML (unknown keys and wrong types are errors
  naming the file and line), applies the flags, and fails on missing required values.
A leaf module: imports no stage.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import operator
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError

_DOC_CACHE: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each annotated field)."""
    if cls in _DOC_CACHE:
        return _DOC_CACHE[cls]
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    _DOC_CACHE[cls] = docs
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        all_args = typing.get_args(tp)
        args = [a for a in all_args if a is not type(None)]
        optional = len(args) < len(all_args)
        if len(args) == 1:
            return args[0], optional
        if optional:  # `str | dict | None`: optional, and still a union of the rest
            return functools.reduce(operator.or_, args), True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or CLI value to the field's type; raise ValueError with a reason."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError("must not be empty")
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return [_coerce(v, inner, where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if base in _NUMBERS:
        accepted, what = _NUMBERS[base]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ValueError(f"expected {what}, got {value!r}")
        try:
            return base(value)
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)
    if base is dict or typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {type(value).__name__}")
        return value
    return value


# number types: what a value may be before conversion (a bool never), and its name in errors
_NUMBERS: dict[type, tuple[tuple[type, ...], str]] = {
    int: ((int, str), "an integer"), float: ((int, float, str), "a number")}


def field_defaults(cls: Any) -> dict[str, Any]:
    """Each field of dataclass `cls` (or of an instance's class) that has a default: its
    default value (a factory's is called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
                    ) -> None:
    """One flag per config field; defaults are SUPPRESSed so only given flags override.

    Fields first declared by a base class that names a `flag_group` (the backend settings every
    model-using command shares) are listed under that heading in --help."""
    docs = field_docs(cls)
    hints = _field_types(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        owner = next(k for k in reversed(cls.__mro__)
                     if f.name in vars(k).get("__annotations__", {}))
        title = vars(owner).get("flag_group")
        target = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        flag = "--" + f.name.replace("_", "-")
        base, _ = _unwrap_optional(hints[f.name])
        help_text = docs.get(f.name, "")
        if not _is_required(f):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text += f" (default: {default})"
        else:
            help_text += " (required)"
        # argparse %-formats help text ("%(default)s"): a literal "%" in a docstring or a
        # default ("~30% slower") would garble or break --help, so every "%" is escaped
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": help_text.replace("%", "%%")}
        if base is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base) in (list, tuple):
            # `--base-url A B` and `--base-url A --base-url B` both give [A, B]
            target.add_argument(flag, nargs="+", action="extend", **kw)
        elif typing.get_origin(base) is typing.Literal:
            target.add_argument(flag, choices=typing.get_args(base), **kw)
        elif typing.get_origin(base) is dict or base is dict:
            continue  # mappings come from the YAML file only
        else:
            target.add_argument(flag, metavar=f.name.upper(), **kw)


def read_yaml_config(path: str | os.PathLike) -> tuple[dict, dict[str, int]]:
    """The mapping in a YAML config file and the line of each top-level key. Read like a
    principle file (size cap, UTF-8, safe loader, duplicate keys and Python tags refused with
    their line); an empty file sets nothing."""
    from charter.core.reader import read_bytes
    from charter.core.yamlsource import MAX_FILE_BYTES, read_yaml

    path = Path(path)
    if not path.exists():
        raise CharterError("config file not found", path=path)
    raw = read_bytes(path, "YAML file", cap=MAX_FILE_BYTES)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CharterError("config file is not UTF-8 text", path=path,
                           line=raw[: e.start].count(b"\n") + 1) from None
    if not text.strip():
        return {}, {}
    data, lines = read_yaml(text, str(path))
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise CharterError("expected a mapping of config keys", path=path, line=1)
    return data, {k: lines.line((k, "<key>")) or 1 for k in data}


def config_from_dict(cls: type, values: dict, *, source: str | None = None,
                     lines: dict[str, int] | None = None) -> Any:
    """Build `cls` from a mapping: unknown keys, wrong types and missing values are errors."""
    lines = lines or {}
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    translate = getattr(cls, "translate_keys", None)  # e.g. TRL's key names in training configs
    if translate is not None:
        values, lines = translate(values, set(names), source, lines)
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = getattr(cls, "nearest_key", None)
            near = near(str(key), set(names)) if near else (difflib.get_close_matches(
                str(key), sorted(names), n=1) or [None])[0]
            hint = f" (did you mean {near!r}?)" if near else ""
            raise CharterError(
                f"unknown config key {key!r}{hint}; expected one of {', '.join(sorted(names))}",
                path=source, line=lines.get(key), field=str(key))
        try:
            kwargs[key] = _coerce(value, hints[key], key)
        except ValueError as e:
            raise CharterError(str(e), path=source, line=lines.get(key), field=key) from None
    missing = [n for n, f in names.items() if _is_required(f) and n not in kwargs]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise CharterError(f"missing required setting(s): {flags}", path=source)
    cfg = cls(**kwargs)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def build_config(cls: type, args: argparse.Namespace | dict | None = None,
                 config_path: str | os.PathLike | None = None) -> Any:
    """YAML file values, overridden by the flags present in `args`."""
    values: dict = {}
    lines: dict[str, int] = {}
    if config_path:
        values, lines = read_yaml_config(config_path)
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    names = {f.name for f in dataclasses.fields(cls)}
    cli = {k: v for k, v in given.items() if k in names}
    hints = _field_types(cls)
    for k, v in cli.items():  # a bad flag value is the flag's fault, not the YAML file's
        try:
            cli[k] = _coerce(v, hints[k], k)
        except ValueError as e:
            raise CharterError(str(e), field="--" + k.replace("_", "-")) from None
    src = str(config_path) if config_path else None
    translate = getattr(cls, "translate_keys", None)
    if translate is not None and values:  # the file's TRL key names first, so flags win
        values, lines = translate(values, {f.name for f in dataclasses.fields(cls) if f.init},
                                  src, lines)
    merged = {**values, **cli}
    return config_from_dict(cls, merged, source=src,
                            lines={k: v for k, v in lines.items() if k not in cli})


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
