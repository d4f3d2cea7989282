"""Precision choices: `auto` picks bf16 only where it is fast; bf16 head matmuls stay close to fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hld import precision
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.losses import ce_sum, kd_sum
from hld.distill.signals.online import Dense


def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert precision.resolve_dtype("float32", torch.device("cuda")) == torch.float32


def _native_bf16_by_cpuid() -> bool:
    """Whether this CPU has native bf16 instructions (AVX512-BF16, or AMX, whose tiles come with AMX-BF16),
    by torch's own CPUID probe (the cpuinfo library), not by reading /proc/cpuinfo as hld does."""
    probe = torch.cpu
    if not hasattr(probe, "_is_avx512_bf16_supported") or not hasattr(probe, "_is_amx_tile_supported"):
        pytest.skip("this torch has no CPUID probe for bf16")
    return bool(probe._is_avx512_bf16_supported() or probe._is_amx_tile_supported())


def test_auto_on_this_cpu_is_bf16_exactly_where_cpuid_reports_native_bf16():
    want = torch.bfloat16 if _native_bf16_by_cpuid() else torch.float32
    assert precision.resolve_dtype("auto", torch.device("cpu")) == want


def test_bf16_head_matmuls_match_fp32_reference():
    torch.manual_seed(0)
    n, d, v = 37, 16, 64
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    y, m, zt = torch.randint(0, v, (n,)), torch.rand(n) > 0.2, torch.randn(n, v)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=8, matmul_dtype=torch.bfloat16)
    got, _ = head_loss(h, w, y, m, spec, lambda sl: Dense(zt[sl]))
    g_got = torch.autograd.grad(got, (h, w))
    z = h @ w.T
    want = 0.5 * ce_sum(z, y, m) + 0.5 * kd_sum(z, Dense(zt), m)
    g_want = torch.autograd.grad(want, (h, w))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=2e-3)
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32  # gradients come back in the inputs' dtype
        assert float((a - b).abs().max() / b.abs().max()) < 2e-2


def test_kd_value_over_the_full_gemma_vocabulary_matches_float64():
    # the KL's dot products run over 262,144 terms: a single fp32 reduction lost ~5e-4 relative
    torch.manual_seed(0)
    n, d, v = 6, 8, 262144
    h, w = torch.randn(n, d), torch.randn(v, d) * 0.5
    y, m, zt = torch.randint(0, v, (n,)), torch.ones(n, dtype=torch.bool), torch.randn(n, v) * 3
    _, stats = head_loss(
        h, w, y, m, HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=4), lambda sl: Dense(zt[sl])
    )
    z = h.double() @ w.double().T  # reference by hand in float64 (kd_sum/ce_sum compute in fp32)
    logq, logp = torch.log_softmax(z, -1), torch.log_softmax(zt.double(), -1)
    want_kd = float((logp.exp() * (logp - logq)).sum())
    want_ce = float(-logq.gather(-1, y[:, None]).sum())
    assert stats["kd"] == pytest.approx(want_kd, rel=2e-5)
    assert stats["ce"] == pytest.approx(want_ce, rel=2e-5)


def test_a_second_backward_through_the_fused_loss_is_refused():
    # its saved gradients are scaled in place (one dL/dW copy), so reusing the graph would be wrong
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    loss, _ = head_loss(h, w, torch.randint(0, 16, (4,)), torch.ones(4, dtype=torch.bool), HeadLossSpec())
    (loss / 3).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        (loss / 3).backward()


def _cpuinfo_flags() -> set[str]:
    """The flags of /proc/cpuinfo, read here independently of hld.precision."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.parametrize(("method", "precision"), [("ce", "float32"), ("kd", "bfloat16")])
def test_summary_records_the_precision_and_machine_that_ran(tmp_path, overrides, method, precision):
    import transformers

    from hld.config import load_config
    from hld.train.loop import train

    cfg = load_config(
        "smoke",
        [
            *overrides,
            f"objective.method={method}",
            f"train.precision={precision}",
            "budget.tokens=512",
            "teacher.dtype=auto",
        ],
    )
    ran = train(cfg, tmp_path / "run", quiet=True)["ran"]
    flags = _cpuinfo_flags()
    assert ran["student_dtype"] == precision  # resolved: the names torch gives them
    auto = "bfloat16" if _native_bf16_by_cpuid() else "float32"  # what auto means on this CPU
    teacher = auto if cfg.teacher.dtype == "auto" else cfg.teacher.dtype
    assert ran["teacher_dtype"] == (None if method == "ce" else teacher)
    assert ran["device"] == "cpu" and ran["machine"]
    relevant = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}
    assert set(ran["cpu_flags"].split()) == flags & relevant
    assert ran["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert (ran["torch"], ran["transformers"]) == (torch.__version__, transformers.__version__)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ran"] == ran


def test_cpu_kernels_name_the_set_torch_dispatches_to_not_the_cpu_flags():
    """ATEN_CPU_CAPABILITY=default makes torch run its plain kernels on any CPU: the record follows
    what ran (a run forced to another kernel set sums differently on the same machine)."""
    code = "from hld.precision import cpu_kernels; print(cpu_kernels())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DEFAULT"
