"""Which floating-point type to compute in. `auto` picks bf16 only where it is fast: on CUDA, or on
CPUs with native bf16 instructions (AVX512-BF16 / AMX). On an AVX2-only CPU, bf16 matmuls run
hundreds of times slower than fp32 (measured: 0.3 vs 179 GFLOP/s on a 2-core AMD EPYC), so auto
means fp32 there."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from hld.errors import HldError


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


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
