"""Generation backends behind one protocol (see `base.py`). Heavy libraries load lazily."""

from __future__ import annotations

from critique.backends.base import Backend, Conversation, Sampling, Usage

BACKENDS = ("transformers", "vllm", "openai", "fake")


def load_backend(name: str, model: str | None = None, *, trust_remote_code: bool = False,
                 **options) -> Backend:
    """Build a backend by name. `model` is what `--model` gave (None: the embedded default).

    `trust_remote_code` (the `--trust-remote-code` flag) lets a local backend run Python code
    shipped in the model folder; it is off unless the user asks, and servers ignore it."""
    from charter.errors import CharterError

    if name == "fake":
        from critique.backends.fake import FakeBackend

        return FakeBackend(**options)
    if name == "transformers":
        from critique.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, trust_remote_code=trust_remote_code, **options)
    if name == "vllm":
        from critique.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, trust_remote_code=trust_remote_code, **options)
    if name == "openai":
        from critique.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model, **options)
    raise CharterError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}",
                       field="backend")


__all__ = ["Backend", "Conversation", "Sampling", "Usage", "load_backend", "BACKENDS"]
