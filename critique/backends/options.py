"""One backend description (`BackendSpec`) and the one function that builds a backend from it.

Every command that talks to a model takes the same backend flags: its config inherits
`BackendSettings` (how to run or reach a model: `--backend`, `--dtype`, `--base-url`, ...) and
names its own models (`--model`; label's `--policy`/`--labeler`; eval's `--model`,
`--baseline`, `--judge`). `spec_of(cfg, model)` turns a config and one of its models into a
`BackendSpec`; `build_backend(spec)` builds it. Pipeline roles go through `backend_spec`: a
string is a model on the top-level backend, a mapping a full description:

    labeler: runs/sft                                   # a model on the pipeline's backend
    labeler: {model: Qwen/Qwen2.5-7B-Instruct, backend: openai,
              base_url: http://gpu1:8000/v1, api_key_env: GPU1_KEY}

What each backend takes (`backend_kwargs`; a server-only setting given with a local backend is
a `CharterError`, the user evidently meant a server):

    field                  transformers  vllm  openai   backend kwarg
    dtype                  x             x              dtype
    batch_size             x                            batch_size
    score_batch_size       x                            score_batch_size
    tensor_parallel_size                 x              tensor_parallel_size
    max_model_len                        x              max_model_len
    seed                                 x              seed (engine seed)
    base_url                                   x        base_url (one URL or a list)
    api_key_env                                x        api_key_env (an env var NAME)
    concurrency                                x        concurrency
    request_timeout                            x        timeout
    max_retries                                x        max_retries
    tokenizer                                  x        tokenizer
    trust_remote_code      x             x              trust_remote_code (default off)
    backend_options        x             x     x        merged in as is (YAML mapping)

The API key itself never appears in a config, only the variable's name. CLI: list fields take
several values after one flag (`--base-url URL1 URL2`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from charter.core.config import field_defaults
from charter.core.errors import CharterError

# setting -> (backends that take it, kwarg name)
FIELD_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "dtype": (("transformers", "vllm"), "dtype"),
    "batch_size": (("transformers",), "batch_size"),
    "score_batch_size": (("transformers",), "score_batch_size"),
    "tensor_parallel_size": (("vllm",), "tensor_parallel_size"),
    "max_model_len": (("vllm",), "max_model_len"),
    "seed": (("vllm",), "seed"),
    "base_url": (("openai",), "base_url"),
    "api_key_env": (("openai",), "api_key_env"),
    "concurrency": (("openai",), "concurrency"),
    "request_timeout": (("openai",), "timeout"),
    "max_retries": (("openai",), "max_retries"),
    "tokenizer": (("openai",), "tokenizer"),
    "trust_remote_code": (("transformers", "vllm"), "trust_remote_code"),
}
# Settings that only make sense for a server: setting them with a local backend is a mistake.
SERVER_ONLY = ("base_url", "api_key_env", "concurrency", "request_timeout", "max_retries")
# Settings that change how a model is reached or batched, not what it answers: a stage that
# resumes a folder need not be given the same (label's and eval's run-folder guards skip them).
HOW_ONLY = ("batch_size", "score_batch_size", "trust_remote_code", *SERVER_ONLY)


@dataclass(kw_only=True)
class BackendSettings:
    """How to run or reach a model: the backend flags every model-using command shares."""

    flag_group: ClassVar[str] = "backend (the same flags on every command that runs a model)"

    backend: str = "transformers"
    """Generation backend (its kind): transformers, vllm, openai or fake."""
    dtype: str = "auto"
    """Weights dtype for local backends (auto, float32, bfloat16, float16)."""
    batch_size: int = 32
    """Sequences per forward pass (transformers backend)."""
    score_batch_size: int | None = None
    """Sequences per scoring forward (transformers backend; None: batch_size). Decoding reads
    every weight once per step for the whole batch, so it gains from a large batch_size, while a
    scoring forward's memory grows with rows x tokens: a long labelling or judge prompt may need
    fewer rows."""
    tensor_parallel_size: int = 1
    """GPUs one vLLM engine shards the model over."""
    max_model_len: int | None = None
    """vLLM context length cap (None: the model's)."""
    base_url: list[str] = field(default_factory=list)
    """OpenAI-compatible server URL(s), e.g. http://host:8000/v1; requests spread across them."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (the key is never stored)."""
    concurrency: int = 8
    """Requests in flight at once (openai backend), over all base URLs."""
    request_timeout: float = 60.0
    """Seconds before one HTTP request counts as timed out and is retried."""
    max_retries: int = 5
    """Retries per request on 429/5xx/timeouts/connection errors before giving up."""
    tokenizer: str | None = None
    """Local tokenizer of the served model, for openai `score` (None: the model name)."""
    trust_remote_code: bool = False
    """Let transformers/vLLM run Python code shipped in the model folder (trusted models only)."""
    backend_options: dict = field(default_factory=dict)
    """Extra keyword arguments for the backend (YAML only), e.g. vLLM engine settings."""


@dataclass(kw_only=True)
class BackendSpec(BackendSettings):
    """One backend: the settings above and the model it runs."""

    model: str | None = None
    """Model directory, run directory, hub id, or the served model name (openai); None: the
    embedded SmolLM2."""
    seed: int | None = None
    """vLLM engine seed (a stage passes its own `seed`; None: vLLM's default)."""

    def key(self) -> str:
        """A stable text of every setting (backends with the same key are interchangeable)."""
        from charter.core.models import model_label

        d = dataclasses.asdict(self)
        d["model"] = model_label(self.model)  # None and "smollm2" are the same model
        return json.dumps(d, sort_keys=True, default=str)


SETTINGS = tuple(f.name for f in dataclasses.fields(BackendSettings))


def spec_of(cfg: Any, model: str | None = None, **changes: Any) -> BackendSpec:
    """The `BackendSpec` of a config that inherits `BackendSettings`, running `model`."""
    values = {name: getattr(cfg, name) for name in SETTINGS + ("seed",) if hasattr(cfg, name)}
    values.update(changes)
    return BackendSpec(model=model, **values)


def backend_spec(value: str | Mapping | BackendSpec | None, base: BackendSpec | None = None,
                 *, field: str = "backend") -> BackendSpec:
    """A backend description from a pipeline role's value.

    - None: `base` (the top-level backend and model);
    - a string: that model on `base`'s backend, with `base`'s settings;
    - a mapping: a full description, keys as `BackendSpec`'s fields ({model, backend,
      base_url, api_key_env, dtype, ...}); keys it leaves out take `BackendSpec`'s defaults,
      not `base`'s. Unknown keys and wrong types are a `CharterError` naming `field.key`.
    """
    from charter.core.config import config_from_dict

    base = base if base is not None else BackendSpec()
    if value is None:
        return base
    if isinstance(value, BackendSpec):
        return value
    if isinstance(value, str):
        return dataclasses.replace(base, model=value)
    if isinstance(value, Mapping):
        try:
            spec = config_from_dict(BackendSpec, dict(value))
            backend_kwargs(spec)  # server settings with a local backend, ... (fail early)
        except CharterError as e:  # name the role: `labeler.base_url: ...`
            raise CharterError(e.detail, path=e.path, line=e.line,
                               field=f"{field}.{e.field}" if e.field else field) from None
        return spec
    raise CharterError(f"expected a model name or a mapping of backend settings, got "
                       f"{type(value).__name__}", field=field)


def backend_kwargs(cfg: Any, where: str = "") -> dict[str, Any]:
    """Keyword arguments for `load_backend(backend, model, **kw)` from the backend settings of
    `cfg` (a `BackendSpec` or a config that inherits `BackendSettings`); `where` (a role name)
    prefixes the field named in errors."""
    backend = getattr(cfg, "backend", "transformers")
    defaults = field_defaults(BackendSettings)
    prefix = f"{where}." if where else ""
    kw: dict[str, Any] = {}
    for name, (takers, kwarg) in FIELD_MAP.items():
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if name in ("batch_size", "score_batch_size") and value is not None and value < 1:
            raise CharterError(f"must be at least 1, got {value}", field=prefix + name)
        if backend in takers:
            if name == "trust_remote_code" and not value:
                continue  # passed only when asked for; every loader's default is off
            if value is not None and value != []:
                kw[kwarg] = list(value) if isinstance(value, (list, tuple)) else value
        elif name in SERVER_ONLY and value != defaults[name] and backend != "fake":
            raise CharterError(f"{name} applies to --backend openai only (backend is "
                               f"{backend!r})", field=prefix + name)
    extra = getattr(cfg, "backend_options", None) or {}
    if not isinstance(extra, dict):
        raise CharterError("expected a mapping of backend keyword arguments",
                           field=prefix + "backend_options")
    kw.update(extra)
    if backend == "openai" and not kw.get("base_url"):
        raise CharterError("--backend openai needs --base-url URL (e.g. "
                           "http://127.0.0.1:8000/v1)", field=prefix + "base_url")
    return kw


def build_backend(spec: BackendSpec):
    """The backend `spec` describes: the one way every command and pipeline role builds one."""
    from critique.backends import load_backend

    return load_backend(spec.backend, spec.model, **backend_kwargs(spec))
