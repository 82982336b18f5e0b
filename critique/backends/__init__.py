"""Generation backends behind one protocol (see `base.py`). Heavy libraries load lazily."""

from __future__ import annotations

from critique.backends.base import Backend, Conversation, Sampling, Usage

BACKENDS = ("transformers", "vllm", "openai", "fake")


def load_backend(name: str, model: str | None = None, **options) -> Backend:
    """Build a backend by name. `model` is what `--model` gave (None: the embedded default)."""
    from charter.errors import CharterError

    if name == "fake":
        from critique.backends.fake import FakeBackend

        return FakeBackend(**options)
    if name == "transformers":
        from critique.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, **options)
    if name == "vllm":
        from critique.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, **options)
    if name == "openai":
        from critique.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model, **options)
    raise CharterError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}",
                       field="backend")


__all__ = ["Backend", "Conversation", "Sampling", "Usage", "load_backend", "BACKENDS"]
