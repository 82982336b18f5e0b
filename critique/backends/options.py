"""Backend settings shared by every stage config, and the kwargs they turn into.

A stage config (critique, label, eval) that builds a backend either inherits `BackendFields`

    @dataclass(kw_only=True)
    class CritiqueConfig(BackendFields):
        out: str
        ...

or declares any subset of the same field names itself. `build_backend(cfg)` (or
`load_backend(cfg.backend, cfg.model, **backend_kwargs(cfg))`) then builds the backend, passing
each backend only the settings it understands:

    field                  transformers  vllm  openai   backend kwarg
    dtype                  x             x              dtype
    batch_size             x                            batch_size
    device                 x                            device
    tensor_parallel_size                 x              tensor_parallel_size
    max_model_len                        x              max_model_len
    gpu_memory_utilization               x              gpu_memory_utilization
    enable_prefix_caching                x              enable_prefix_caching
    seed                                 x              seed (engine seed)
    base_url                                   x        base_url (one URL or a list)
    api_key_env                                x        api_key_env (an env var NAME)
    concurrency                                x        concurrency
    request_timeout                            x        timeout
    max_retries                                x        max_retries
    tokenizer                                  x        tokenizer
    trust_remote_code      x             x              trust_remote_code (default off)
    backend_options        x             x     x        merged in as is (YAML mapping)

`base_url`, `api_key_env`, ... set away from their defaults with another backend is a
`CharterError` (the user evidently meant a server). A second backend in one config (labelling's
policy model) uses a prefix: `backend_kwargs(cfg, prefix="policy_")` reads `policy_backend`,
`policy_base_url`, ... The API key itself never appears in a config, only the variable's name.

CLI: list fields take several values after one flag (`--base-url URL1 URL2`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from charter.core.errors import CharterError

# config field -> (backends that take it, kwarg name)
FIELD_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "dtype": (("transformers", "vllm"), "dtype"),
    "batch_size": (("transformers",), "batch_size"),
    "device": (("transformers",), "device"),
    "tensor_parallel_size": (("vllm",), "tensor_parallel_size"),
    "max_model_len": (("vllm",), "max_model_len"),
    "gpu_memory_utilization": (("vllm",), "gpu_memory_utilization"),
    "enable_prefix_caching": (("vllm",), "enable_prefix_caching"),
    "seed": (("vllm",), "seed"),
    "base_url": (("openai",), "base_url"),
    "api_key_env": (("openai",), "api_key_env"),
    "concurrency": (("openai",), "concurrency"),
    "request_timeout": (("openai",), "timeout"),
    "max_retries": (("openai",), "max_retries"),
    "tokenizer": (("openai",), "tokenizer"),
    "trust_remote_code": (("transformers", "vllm"), "trust_remote_code"),
}
# Fields that only make sense for a server: setting them with a local backend is a mistake.
SERVER_ONLY = ("base_url", "api_key_env", "concurrency", "request_timeout", "max_retries")


@dataclass(kw_only=True)
class BackendFields:
    """Backend settings a stage config can inherit (see the module docstring)."""

    backend: str = "transformers"
    """Generation backend: transformers, vllm, openai or fake."""
    model: str | None = None
    """Model directory, run directory, hub id, or the served model name (openai); None: the
    embedded SmolLM2."""
    dtype: str = "auto"
    """Weights dtype for local backends (auto, float32, bfloat16, float16)."""
    batch_size: int = 32
    """Sequences per forward pass (transformers backend)."""
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


def _defaults(cfg: Any) -> dict[str, Any]:
    out = {}
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def backend_kwargs(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Keyword arguments for `load_backend(backend, model, **kw)` from `cfg`'s fields."""
    backend = getattr(cfg, prefix + "backend", "transformers")
    defaults = _defaults(cfg)
    kw: dict[str, Any] = {}
    for name, (takers, kwarg) in FIELD_MAP.items():
        attr = prefix + name
        if not hasattr(cfg, attr):
            continue
        value = getattr(cfg, attr)
        if backend in takers:
            if name == "trust_remote_code" and not value:
                continue  # passed only when asked for; every loader's default is off
            if value is not None and value != []:
                kw[kwarg] = list(value) if isinstance(value, (list, tuple)) else value
        elif (name in SERVER_ONLY and attr in defaults and value != defaults[attr]
              and backend != "fake"):
            raise CharterError(f"{attr} applies to --{prefix.replace('_', '-')}backend openai "
                               f"only (backend is {backend!r})", field=attr)
    extra = getattr(cfg, prefix + "backend_options", None) or {}
    if not isinstance(extra, dict):
        raise CharterError("expected a mapping of backend keyword arguments",
                           field=prefix + "backend_options")
    kw.update(extra)
    if backend == "openai" and not kw.get("base_url"):
        raise CharterError(f"--{prefix.replace('_', '-')}backend openai needs "
                           f"--{prefix.replace('_', '-')}base-url URL (e.g. "
                           "http://127.0.0.1:8000/v1)", field=prefix + "base_url")
    return kw


def build_backend(cfg: Any, prefix: str = ""):
    """The backend `cfg` describes (its `backend`, `model` and the fields above)."""
    from critique.backends import load_backend

    return load_backend(getattr(cfg, prefix + "backend", "transformers"),
                        getattr(cfg, prefix + "model", None), **backend_kwargs(cfg, prefix))
