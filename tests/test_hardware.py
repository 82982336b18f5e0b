"""charter.core.hardware and what reads it: `precision: auto` and the warnings for bf16 on a CPU
that has no bf16 instructions (where bf16 matmuls are emulated, ~100x slower than fp32)."""

from __future__ import annotations

import json

import pytest

ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c
"""
SAPPHIRE = "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
ZEN4 = "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(ZEN2, False), (SAPPHIRE, True), (ZEN4, True),
                                          (NEOVERSE_V1, True), ("nothing here\n", False)])
def test_flags_say_whether_bf16_is_native(text, native, monkeypatch):
    from charter.core import hardware

    flags = hardware.cpu_flags(text)
    assert ("avx2" in flags) == ("avx2" in text)
    monkeypatch.setattr(hardware, "cpu_flags", lambda text=None: flags)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    hardware.cpu_bf16_native.cache_clear()
    try:
        assert hardware.cpu_bf16_native() is native
    finally:
        hardware.cpu_bf16_native.cache_clear()


@pytest.fixture
def native(monkeypatch):
    """Set whether this CPU has bf16 instructions, for the code under test."""
    from charter.core import hardware

    def set_(value: bool):
        monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: value)
    return set_


@pytest.mark.parametrize("has_bf16, want", [(False, "fp32"), (True, "bf16-mixed")])
def test_auto_precision_follows_the_cpu(native, has_bf16, want):
    from training.loop import precision_warning, resolve_precision
    from training.options import SFTConfig

    native(has_bf16)
    cfg = SFTConfig(data="d", out="o", precision="auto", cpu=True)
    cfg.validate()
    note = resolve_precision(cfg)
    assert cfg.precision == want and note.startswith(f"precision auto: {want}")
    assert precision_warning(cfg) is None
    assert resolve_precision(cfg) is None  # concrete now: nothing more to resolve


@pytest.mark.parametrize("precision, has_bf16, warns", [
    ("bf16-mixed", False, True), ("bf16", False, True), ("bf16-mixed", True, False),
    ("fp32", False, False)])
def test_bf16_on_a_cpu_without_it_warns(native, precision, has_bf16, warns):
    from training.loop import precision_warning, resolve_precision
    from training.options import DPOConfig

    native(has_bf16)
    cfg = DPOConfig(data="d", out="o", precision=precision, cpu=True)
    assert resolve_precision(cfg) is None and cfg.precision == precision  # explicit: kept
    note = precision_warning(cfg)
    assert (note is not None) == warns
    if warns:
        assert note.startswith(f"warning: precision {precision}: this CPU has no bf16")


def test_a_training_run_records_the_precision_it_chose(tmp_path, tiny_model_dir, native,
                                                       capsys):
    from training.options import SFTConfig
    from training.sft import train_sft

    native(False)
    rows = [{"messages": [{"role": "user", "content": f"Say {i}"},
                          {"role": "assistant", "content": f"{i}."}]} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(data=str(data), out=str(tmp_path / "out"), model=str(tiny_model_dir),
              max_steps=1, batch_size=2, save_every=None, precision="auto")
    train_sft(SFTConfig(**kw))
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["precision"] == "fp32"
    assert "precision auto: fp32 (this CPU has no native bf16 matmul)" in capsys.readouterr().err
    # the same settings again: the finished run is recognised, not refused as another run
    train_sft(SFTConfig(**kw))
    assert "already trained" in capsys.readouterr().err


def test_a_bf16_backend_on_such_a_cpu_warns(tiny_model_dir, native, capsys):
    from critique.backends.transformers_backend import TransformersBackend

    native(False)
    TransformersBackend(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert "warning: dtype bfloat16: this CPU has no bf16" in capsys.readouterr().err
    TransformersBackend(str(tiny_model_dir), device="cpu", dtype="auto")
    assert "warning" not in capsys.readouterr().err
