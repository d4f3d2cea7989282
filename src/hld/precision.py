"""Which floating-point type to compute in. `auto` picks bf16 only where it is fast: on CUDA, or on
CPUs with native bf16 instructions (AVX512-BF16 / AMX). On an AVX2-only CPU, bf16 matmuls run
hundreds of times slower than fp32 (measured: 0.3 vs 179 GFLOP/s on an AVX2-only 2-core AMD EPYC),
so auto means fp32 there. `ran_on` records what was resolved, and on which machine."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from hld.errors import HldError

# the CPU flags that decide which floating-point path a matmul takes (recorded in every summary.json)
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    """The RELEVANT_FLAGS this CPU has (from /proc/cpuinfo; none where it cannot be read)."""
    have = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            have.update(line.split(":", 1)[-1].split())
    return [f for f in RELEVANT_FLAGS if f in have]


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[-1].strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_fast_bf16() -> bool:
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if name == "auto":
        fast = device.type == "cuda" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise HldError(f"unknown precision {name!r}", "use auto, float32 or bfloat16")
    return table[name]


def autocast(dtype: torch.dtype, device: torch.device):
    """bf16 autocast for the student's compute, or nothing in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_kernels() -> str:
    """The instruction set of the CPU kernels torch dispatches to ("AVX512", "AVX2", "DEFAULT", ...): the
    CPU's best unless ATEN_CPU_CAPABILITY lowers it. Two machines with one kernel set sum alike in
    torch's own vectorised ops; the flags alone do not say which set ran."""
    return str(torch.backends.cpu.get_cpu_capability())


def ran_on(device: torch.device, *, student_dtype: torch.dtype, teacher_dtype: Optional[torch.dtype]) -> dict:
    """What ran, for summary.json and the report: the resolved dtypes (not `auto`), the device, the CPU
    model, its RELEVANT_FLAGS and torch's kernel set, or the GPU's name, and the library versions. On a
    CUDA run `machine` is the GPU; the CPU's flags and kernels are still listed (they decide nothing there)."""
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "student_dtype": dtype_name(student_dtype),
        "teacher_dtype": dtype_name(teacher_dtype) if teacher_dtype is not None else None,
        "device": device.type,
        "machine": gpu or cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "cpu_kernels": cpu_kernels(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
