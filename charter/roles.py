"""Who gives the feedback: the roles of a pipeline file and the pool of loaded backends.

A run has up to five models, each any model on any backend (DESIGN.md, "Roles"):

    model / backend   the policy: the model trained (top-level `backend`)
    teacher           critiques and revises, or answers under the constitution (default: policy)
    labeler           labels the policy's sample pairs (default: start)
    second_labeler    relabels the low-margin pairs (`label.relabel_below`; default: none)
    judge             the eval judge (default: start; null: no judge)

A role's value is a string (`start`: the starting model, `policy`: the newest policy, or a
model on the top-level backend) or a mapping: a full backend description
`{model: NAME, backend: openai, base_url: URL, api_key_env: VAR, dtype: ..., ...}` whose other
keys are the backend settings of `critique.backends.options.BackendSpec`.

`RoleSpec` is the resolved description; `BackendPool` loads each distinct (backend, model,
options) once, hands it to every stage and role that needs it, and frees it when no later stage
does (or before a training stage, which needs the memory more than a local model that reloads
in seconds).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from charter.core.errors import CharterError

ROLES = ("teacher", "labeler", "second_labeler", "judge")
SYMBOLIC = ("start", "policy")
# Settings a backend reads per call, not at load time: backends differing only in these are one.
CALL_TIME = ("batch_size", "score_batch_size", "progress")
# Of those, the ones whose default is None ("as batch_size"): a stage that does not set one
# puts it back to None rather than inheriting the last stage's value on a shared backend.
UNSET_IS_NONE = ("score_batch_size",)


@dataclass(frozen=True)
class RoleSpec:
    """One model on one backend, with its load options (a resolved role value)."""

    model: str | None
    """Model directory, hub id, served model name, or start/policy (resolved by the planner)."""
    backend: str
    """transformers, vllm, openai or fake."""
    options: tuple = ()
    """Backend keyword arguments as sorted (key, json value) pairs (hashable)."""

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.options}

    def with_model(self, model: str | None) -> RoleSpec:
        return dataclasses.replace(self, model=model)

    def with_call_settings(self, settings: dict[str, Any]) -> RoleSpec:
        """This role with a stage's per-call settings (`CALL_TIME`: its batch sizes) that the
        role does not set itself: `labeler: start` decodes and scores in the label section's
        batches, while a role mapping's own `batch_size` wins."""
        own = dict(self.options)
        extra = {k: json.dumps(v, sort_keys=True) for k, v in settings.items()
                 if k in CALL_TIME and k not in own}
        if not extra:
            return self
        return dataclasses.replace(self, options=tuple(sorted({**own, **extra}.items())))

    def load_key(self) -> tuple:
        """What makes two roles one loaded backend: kind, model, load-time options."""
        from charter.core.models import model_label

        # dtype auto is every local backend's default: naming it loads nothing different
        opts = tuple((k, v) for k, v in self.options
                     if k not in CALL_TIME and (k, v) != ("dtype", '"auto"'))
        return (self.backend, model_label(self.model), opts)

    def describe(self) -> dict:
        """For summary.json, report.md and model cards (never an API key: only its variable)."""
        from charter.core.models import model_label

        return {"model": model_label(self.model), "backend": self.backend, **self.kwargs}


def make_spec(backend: str, model: str | None, kwargs: dict | None = None) -> RoleSpec:
    opts = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in (kwargs or {}).items()))
    return RoleSpec(model, backend, opts)


def parse_role(value: Any, *, backend: str, where: str, source: str | None = None,
               line: int | None = None, resolve=lambda m: m) -> RoleSpec | None:
    """A role value (string or mapping; see the module docstring) → RoleSpec; None stays None.

    `backend` is the top-level backend (for strings and mappings without one); `resolve` turns
    a model path relative to the pipeline file into an absolute one."""
    from charter.core.config import config_from_dict
    from critique.backends.options import FIELD_MAP, BackendSpec, backend_kwargs

    if value is None:
        return None
    if isinstance(value, str):
        model = value if value in SYMBOLIC else resolve(value)
        return make_spec(backend, model)
    if not isinstance(value, dict):
        raise CharterError(f"expected a model name or a backend mapping {{model: NAME, "
                           f"backend: openai, base_url: URL, ...}}, got {type(value).__name__}",
                           path=source, line=line, field=where)
    raw = dict(value)
    if not raw.get("model"):
        raise CharterError("a role mapping needs `model` (the model name, or start/policy)",
                           path=source, line=line, field=f"{where}.model")
    raw.setdefault("backend", backend)
    try:
        fields = config_from_dict(BackendSpec, raw, source=source)
        kw = backend_kwargs(fields)
    except CharterError as e:
        raise CharterError(e.detail, path=source, line=line,
                           field=f"{where}.{e.field}" if e.field else where) from None
    # only what the mapping sets: a role that names no option shares the default-loaded model
    given = {FIELD_MAP[k][1] for k in raw if k in FIELD_MAP} | set(fields.backend_options)
    model = fields.model if fields.model in SYMBOLIC else resolve(fields.model)
    return make_spec(fields.backend, model, {k: v for k, v in kw.items() if k in given})


class BackendPool:
    """Loaded backends by `RoleSpec.load_key()`: each distinct one is loaded once."""

    def __init__(self, loader=None) -> None:
        self._loaded: dict[tuple, Any] = {}
        self._loader = loader
        self.loads: list[tuple] = []  # every load, in order (tests and the report read it)

    def get(self, spec: RoleSpec):
        key = spec.load_key()
        if key not in self._loaded:
            if self._loader is not None:
                self._loaded[key] = self._loader(spec)
            else:
                from critique.backends import load_backend

                self._loaded[key] = load_backend(spec.backend, spec.model, **{
                    k: v for k, v in spec.kwargs.items() if k not in CALL_TIME})
            self.loads.append(key)
        be = self._loaded[key]
        for name in CALL_TIME:  # per-call settings of this stage
            if hasattr(be, name) and (name in spec.kwargs or name in UNSET_IS_NONE):
                setattr(be, name, spec.kwargs.get(name))
        return be

    def keys(self) -> list[tuple]:
        return list(self._loaded)

    def release(self, keep) -> None:
        """Close every loaded backend whose key is not in `keep`."""
        gone = [k for k in self._loaded if k not in keep]
        for key in gone:
            self._loaded.pop(key).close()
        if gone:  # collect the models now (reference cycles) and hand their pages back
            from charter.core import procmem

            procmem.collect()

    def drop_model(self, model: str) -> None:
        """Close the backends of `model` (a model about to be retrained)."""
        self.release({k for k in self._loaded if k[1] != model})

    def close(self) -> None:
        self.release(set())
