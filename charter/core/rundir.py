"""The run-folder guard: one way for every stage and `charter run` to resume or refuse a folder.

A stage writes into a folder (`--out`) and a killed stage resumes there. Resuming is only sound
when the settings that change the outputs are the same as those the folder was made with, so
each stage records those settings in the folder and, on the next run, compares:

    guard = RunFolder(out, state="config.json", key="settings", what="labels")
    guard.claim()                   # writable, with free space; the one-writer lock
    guard.check(settings)           # same settings as recorded (or none recorded): resume
    guard.record({"settings": settings, ...})

A mismatch is one `CharterError` naming the folder to delete and each setting that differs:

    runs/labels: out: this folder holds labels made with other settings (few_shot: 1 → 0);
    delete runs/labels to start over, or use a new --out

A state file that cannot be read (torn by a kill, edited, not JSON) is a clear error naming the
file, or (`on_damage="ignore"`) read as "nothing recorded" where the stage can safely run again.
Nested settings are compared key by key (`sampling.max_new_tokens: 256 → 10`); a setting the
record lacks is no difference while its current value is the default (a setting added to
Charter later changes nothing already done). A leaf module (`charter.core`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from charter.core.errors import CharterError
from charter.core.jsonl import write_json_atomic
from charter.core.writable import check_output

_MISSING = object()


def fingerprint(settings: Any) -> str:
    """A short stable hash of JSON-able `settings` (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differences(old: Mapping, new: Mapping, *, ignore: set[str] | frozenset = frozenset(),
                defaults: Mapping | None = None, same: Callable[[str, Any, Any], bool] | None
                = None, current_only: bool = False, at: str = "") -> list[str]:
    """`key: old → new` for each setting that differs, nested keys dotted (`a.b`).

    `ignore`: keys never compared; `defaults`: a key `old` lacks is no difference while its new
    value equals the default there; `same(key, old, new)`: True when two different values are
    the same setting (a moved folder holding the same data); `current_only`: keys only `old`
    has are not compared."""
    diffs = []
    keys = set(new) if current_only else set(old) | set(new)
    for key in sorted(keys, key=str):
        name = f"{at}.{key}" if at else str(key)
        if key in ignore:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING and defaults is not None and key in defaults and b == defaults[key]:
            continue
        a, b = (None if a is _MISSING else a), (None if b is _MISSING else b)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += differences(a, b, at=name)
        elif a != b and not (same is not None and same(key, a, b)):
            diffs.append(f"{name}: {a!r} → {b!r}")
    return diffs


def same_place(old_folder: str | os.PathLike | None, new_folder: str | os.PathLike,
               keys: tuple[str, ...] | frozenset | set) -> Callable[[str, Any, Any], bool]:
    """A `same` rule for `differences`: path settings (`keys`: a path or a list of paths) recorded
    for `old_folder` name the same place as those given for `new_folder` when they are the same
    absolute path, or the same path relative to the folder: a run folder moved or copied
    together with what it points into (`mv runs/a runs/b`: `runs/a/dpo` then, `runs/b/dpo`
    now) resumes, and a path outside it (a model elsewhere) still counts as written."""
    new = os.path.abspath(new_folder)
    old = None if old_folder is None else os.path.abspath(old_folder)

    def same(key: str, a: Any, b: Any) -> bool:
        if key not in keys:
            return False
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(x == y or same(key, x, y) for x, y in zip(a, b))
        if not (isinstance(a, str) and isinstance(b, str) and a and b):
            return False
        a_abs, b_abs = os.path.abspath(a), os.path.abspath(b)
        return a_abs == b_abs or (old is not None and os.path.relpath(a_abs, old)
                                  == os.path.relpath(b_abs, new))
    return same


def read_state(path: str | os.PathLike, what: str = "run settings",
               on_damage: Literal["raise", "ignore"] = "raise") -> dict | None:
    """The JSON object in state file `path`; None when it does not exist. A file that cannot be
    read as a JSON object is a `CharterError` naming it (or None with `on_damage="ignore"`)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(obj, dict) else f"expected a JSON object, got " \
                                                     f"{type(obj).__name__}"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        problem = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if problem is None:
        return obj
    if on_damage == "ignore":
        return None
    raise CharterError(f"{what} is damaged or empty ({problem}); restore it, or delete "
                       f"{path.parent} to start over", path=path)


@dataclass
class RunFolder:
    """The guard of one run folder: where its settings are recorded and how a mismatch reads.

    `state`: the file in the folder that records the settings; `key`: where in that file (None:
    the whole file); `what`: what the folder holds, for messages ("labels", "a sft run");
    `advice`: what to do about a mismatch (default: delete the folder or use a new --out);
    `on_damage`: "raise" (an unreadable state file is an error) or "ignore" (run again);
    `output`: the output file this guards, when the output is one file (`charter generate`'s
    JSONL, its state file beside it) rather than the folder."""

    folder: Path
    state: str = "config.json"
    key: str | None = "settings"
    what: str = "a run"
    advice: str | None = None
    field: str | None = "out"
    on_damage: Literal["raise", "ignore"] = "raise"
    output: Path | None = None

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.target = self.folder if self.output is None else Path(self.output)

    @property
    def state_path(self) -> Path:
        return self.folder / self.state

    def read(self) -> dict | None:
        """The whole state file (None: none, or damaged with `on_damage="ignore"`)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise CharterError("output must be a directory, found a file", path=self.folder,
                               field=self.field)
        return read_state(self.state_path, f"{self.state} (this folder's settings)",
                          self.on_damage)

    def stored(self) -> dict | None:
        """The settings recorded in the folder, or None when none are."""
        state = self.read()
        if state is None or self.key is None:
            return state
        value = state.get(self.key)
        if value is not None and not isinstance(value, dict):
            raise CharterError(f"{self.state} (this folder's settings) is damaged: `{self.key}`"
                               f" is not a mapping; restore it, or delete {self.folder} to "
                               "start over", path=self.state_path)
        return value

    def refusal(self, diffs: list[str], limit: int = 8) -> CharterError:
        """The error for a folder made with other settings, naming it and what differs."""
        shown = "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more"
                                            if len(diffs) > limit else "")
        advice = self.advice or f"delete {self.target} to start over, or use a new --out"
        what = self.what if self.what.startswith("this ") else \
            f"this {'folder' if self.output is None else 'file'} holds {self.what} made"
        return CharterError(f"{what} with other settings ({shown}); {advice}",
                            path=self.target, field=self.field)

    def check(self, settings: Mapping, *, stored: Mapping | None | object = _MISSING,
              **compare) -> None:
        """Resume when `settings` match what the folder recorded (or it recorded nothing);
        raise `refusal` otherwise. `stored` overrides what is read from the state file;
        `compare` goes to `differences` (ignore, defaults, same, current_only)."""
        old = self.stored() if stored is _MISSING else stored
        if old is None:
            return
        diffs = differences(old, settings, **compare)
        if diffs:
            raise self.refusal(diffs)

    def record(self, state: Mapping) -> None:
        """Write the state file (atomically: a kill leaves the old one or the new one)."""
        write_json_atomic(self.state_path, dict(state))

    def claim(self) -> Path:
        """Prove the folder writable (with free space) and take its one-writer lock
        (`charter.core.writable.check_output`); before any model loads."""
        return check_output(self.target, is_dir=self.output is None)
