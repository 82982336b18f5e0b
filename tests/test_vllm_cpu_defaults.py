"""The vllm backend's CPU defaults (`cpu_engine_defaults`): pure rules, and their wiring into
the engine's arguments and environment with a stand-in `vllm` module (no engine started, so
these run without vLLM installed)."""

from __future__ import annotations

import sys
import types

import pytest

from critique.backends.vllm_backend import CPU_KV_CACHE_MAX, CPU_KV_CACHE_MIN, cpu_engine_defaults

GiB = 2**30


def test_nothing_set_reserves_no_core_and_a_quarter_of_free_memory_for_kv():
    env, kw = cpu_engine_defaults({}, {}, None, 8 * GiB)
    assert env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert kw == {"kv_cache_memory_bytes": 2 * GiB}


@pytest.mark.parametrize("available, expected", [
    (64 * GiB, 4 * GiB),          # capped
    (1 * GiB, GiB // 2),          # a quarter would be 0.25 GiB: the floor
    (None, 4 * GiB),              # unknown: the cap
    (6 * GiB, 6 * GiB // 4),
])
def test_kv_cache_bounds(available, expected):
    assert CPU_KV_CACHE_MIN == GiB // 2 and CPU_KV_CACHE_MAX == 4 * GiB
    assert cpu_engine_defaults({}, {}, None, available)[1]["kv_cache_memory_bytes"] == expected


@pytest.mark.parametrize("environ, kwargs, util", [
    ({"VLLM_CPU_KVCACHE_SPACE": "2"}, {}, None),
    ({}, {"kv_cache_memory_bytes": 123}, None),
    ({}, {}, 0.5),
])
def test_a_user_kv_setting_wins(environ, kwargs, util):
    assert "kv_cache_memory_bytes" not in cpu_engine_defaults(environ, kwargs, util, 8 * GiB)[1]


@pytest.mark.parametrize("environ", [{"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
                                     {"VLLM_CPU_OMP_THREADS_BIND": "0-3"},
                                     {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}])
def test_a_user_thread_setting_wins(environ):
    assert cpu_engine_defaults(environ, {}, None, 8 * GiB)[0] == {}
    # "auto" is vLLM's own default: still no core reserved
    assert cpu_engine_defaults({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, {}, None, None)[0] == {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _fake_vllm(monkeypatch, on_cpu: bool, bf16: bool = True) -> dict:
    seen: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            import os

            seen["kwargs"] = kwargs
            seen["reserved"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=2048))

        def get_tokenizer(self):
            return types.SimpleNamespace(chat_template="{{ messages }}")

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: on_cpu)
    monkeypatch.setattr("charter.core.hardware.cpu_bf16_native", lambda: bf16)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    for var in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(var, "")  # recorded, so what the backend sets is undone after
        monkeypatch.delenv(var)
    return seen


def test_backend_passes_the_cpu_defaults_to_the_engine(monkeypatch):
    from critique.backends.vllm_backend import VLLMBackend

    seen = _fake_vllm(monkeypatch, on_cpu=True)
    VLLMBackend(None, dtype="float32")
    kv = seen["kwargs"]["kv_cache_memory_bytes"]
    assert CPU_KV_CACHE_MIN <= kv <= CPU_KV_CACHE_MAX
    assert seen["reserved"] == "0"
    # the user's own choice reaches the engine untouched
    seen = _fake_vllm(monkeypatch, on_cpu=True)
    VLLMBackend(None, dtype="float32", gpu_memory_utilization=0.3)
    assert "kv_cache_memory_bytes" not in seen["kwargs"]
    assert seen["kwargs"]["gpu_memory_utilization"] == 0.3


def test_backend_leaves_gpu_engines_alone(monkeypatch):
    from critique.backends.vllm_backend import VLLMBackend

    seen = _fake_vllm(monkeypatch, on_cpu=False)
    VLLMBackend(None, dtype="float32")
    assert "kv_cache_memory_bytes" not in seen["kwargs"]
    assert seen["reserved"] is None


@pytest.mark.parametrize("bf16, asked, runs", [
    (True, "auto", "auto"),          # vLLM picks bf16 where it is native
    (False, "auto", "float32"),      # emulated bf16 was 4x slower: fp32
    (False, "bfloat16", "bfloat16"),  # as asked, with a warning
    (False, "float32", "float32"),
])
def test_cpu_dtype_follows_the_hardware(monkeypatch, capsys, bf16, asked, runs):
    from critique.backends.vllm_backend import VLLMBackend

    seen = _fake_vllm(monkeypatch, on_cpu=True, bf16=bf16)
    VLLMBackend(None, dtype=asked)
    assert seen["kwargs"]["dtype"] == runs
    assert ("no bf16 matmul instructions" in capsys.readouterr().err) == (asked == "bfloat16")


def test_gpu_dtype_is_left_to_vllm(monkeypatch):
    from critique.backends.vllm_backend import VLLMBackend

    seen = _fake_vllm(monkeypatch, on_cpu=False, bf16=False)
    VLLMBackend(None, dtype="auto")
    assert seen["kwargs"]["dtype"] == "auto"
