"""What the machine multiplies fast: whether bf16 matmuls run natively on this CPU.

bf16 pays on a CPU only where it has bf16 instructions (x86: AVX512-BF16 or AMX; Arm: the BF16
extension). Elsewhere PyTorch converts every bf16 matmul in software: on a 2-core AMD EPYC with
AVX2 only, a 1024 x 1024 bf16 matmul ran at 0.6 GFLOP/s against 87 in fp32, so a bf16-mixed
SFT step took 270 s instead of ~7 (measured 2026-12-04). `precision: auto` and the warnings
on bf16 settings read this module. torch-free (reads /proc/cpuinfo or sysctl).
"""

from __future__ import annotations

import functools
import platform
import subprocess

X86_BF16 = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
ARM_BF16 = ("bf16",)  # /proc/cpuinfo "Features" of an Armv8.6 BF16 core


def cpu_flags(text: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`) or `text`;
    empty where there is no such file (macOS, Windows)."""
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _darwin_bf16() -> bool:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 matmul instructions (see the module's note)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & set(X86_BF16 + ARM_BF16))
    return platform.system() == "Darwin" and _darwin_bf16()


def slow_bf16_note(what: str, advice: str) -> str:
    """The warning for a bf16 setting on a CPU without bf16 instructions."""
    return (f"{what}: this CPU has no bf16 matmul instructions (x86: AVX512-BF16 or AMX; Arm: "
            "BF16), so every bf16 matmul is converted in software, ~100x slower than fp32 "
            f"(0.6 vs 87 GFLOP/s measured on an AVX2 CPU); {advice}")
