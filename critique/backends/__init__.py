"""Generation backends behind one protocol (see `base.py`). Heavy libraries load lazily."""

from __future__ import annotations

from critique.backends.base import Backend, Conversation, Sampling, Usage

BACKENDS = ("transformers", "vllm", "openai", "fake")


def load_backend(name: str, model: str | None = None, *, trust_remote_code: bool = False,
                 **options) -> Backend:
    """Build a backend by name. `model` is what `--model` gave (None: the embedded default).

    `trust_remote_code` (the `--trust-remote-code` flag) lets a local backend run Python code
    shipped in the model folder; it is off unless the user asks, and servers ignore it."""
    from charter.core.errors import CharterError

    if name == "fake":
        from critique.backends.fake import FakeBackend

        return FakeBackend(**options)
    if name == "transformers":
        from critique.backends.transformers_backend import TransformersBackend

        return _construct(TransformersBackend, name, model,
                          {**options, "trust_remote_code": trust_remote_code})
    if name == "vllm":
        from critique.backends.vllm_backend import VLLMBackend

        return _construct(VLLMBackend, name, model,
                          {**options, "trust_remote_code": trust_remote_code})
    if name == "openai":
        from critique.backends.openai_backend import OpenAIBackend

        return _construct(OpenAIBackend, name, model, options)
    raise CharterError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}",
                       field="backend")


def _construct(cls: type, name: str, model: str | None, options: dict) -> Backend:
    """`cls(model, **options)`, with options the backend does not take named in the error
    (they come from users' `backend_options` mappings) instead of a bare TypeError."""
    import inspect

    from charter.core.errors import CharterError

    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in options if k not in params or k in ("self", "model"))
        if unknown:
            known = sorted(k for k, p in params.items()
                           if k not in ("self", "model") and p.kind is p.KEYWORD_ONLY)
            raise CharterError(f"the {name} backend does not take {', '.join(unknown)}; "
                               f"it takes {', '.join(known)}", field="backend_options")
    return cls(model, **options)


__all__ = ["Backend", "Conversation", "Sampling", "Usage", "load_backend", "BACKENDS"]
