"""The fused, chunked head loss against an unchunked float64 reference built with plain autograd from
the definitions, `w_ce * CE(h @ W.T) + w_kd * T^2 D(p_T, q_T)` (torch's cross_entropy; forward KL,
reverse KL and JSD written out over the outcomes hld.distill.losses states: the vocabulary, or a top-k
teacher's k ids and its rest), sharing no code with hld's losses. Values, stats and gradients w.r.t.
h and W."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.signals import TeacherLogits, TeacherSignals
from hld.distill.signals.online import Dense, OnlineLogits
from hld.distill.signals.topk import TopK

B, T_SEQ, D, D_T, V = 2, 5, 8, 12, 23
N = B * T_SEQ


def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(True)
    W = (torch.randn(V, D, generator=g, dtype=dtype) * 0.7).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.25
    mask[0] = True
    y = torch.where(mask, y, torch.full_like(y, -100))
    return h, W, y, mask


def _online_teacher(seed: int, dtype=torch.float64, cap: Optional[float] = None) -> TeacherSignals:
    g = torch.Generator().manual_seed(seed + 1000)
    return TeacherSignals(
        source=OnlineLogits(
            final_hidden=torch.randn(B, T_SEQ, D_T, generator=g, dtype=dtype),
            head_weight=torch.randn(V, D_T, generator=g, dtype=dtype),
            softcap=cap,
        )
    )


def _cached_teacher(seed: int, k: int, rest: bool = True) -> TeacherSignals:
    """What a cache gives per batch: top-k values, int32 indices and the log-mass of the rest."""
    g = torch.Generator().manual_seed(seed + 2000)
    full = (torch.randn(B, T_SEQ, V, generator=g) * 3).sort(dim=-1, descending=True).values
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T_SEQ)]).reshape(B, T_SEQ, V)
    r = full[..., k:].logsumexp(-1) if k < V else torch.full((B, T_SEQ), float("-inf"))
    top = TopK(full[..., :k].reshape(N, k), perm[..., :k].int().reshape(N, k), r.reshape(N) if rest else None)
    return TeacherSignals(source=top)  # a cache may store int32


def _softcap(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _reference_teacher(ts, top_k: Optional[int]) -> Optional[TeacherLogits]:
    """All N rows of teacher logits, built directly from the signal's tensors."""
    if ts is None:
        return None
    src = ts.source
    if isinstance(src, OnlineLogits):
        z = _softcap(src.final_hidden.reshape(N, D_T) @ src.head_weight.T, src.softcap)
        if top_k is not None and top_k < V:
            srt = z.sort(dim=-1, descending=True)
            return TopK(
                values=srt.values[:, :top_k],
                indices=srt.indices[:, :top_k],
                rest=srt.values[:, top_k:].logsumexp(-1).float(),
            )
        return Dense(z)
    k = src.values.shape[-1]
    v, i, r = src.values, src.indices.long(), src.rest
    if top_k is not None and top_k < k:
        rest = None if r is None else torch.logaddexp(r, v[:, top_k:].logsumexp(-1))
        return TopK(values=v[:, :top_k], indices=i[:, :top_k], rest=rest)
    return TopK(values=v, indices=i, rest=r)


def _softmax64(x: torch.Tensor) -> torch.Tensor:
    e = (x.double() - x.double().amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def _sum_a_log_a_over_b(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i a_i log(a_i / b_i) per row, 0 log 0 = 0 (the masked entries get a zero gradient, not nan)."""
    pos = a > 0
    return torch.where(pos, a * (torch.where(pos, a, 1.0).log() - torch.where(pos, b, 1.0).log()), 0.0).sum(-1)


def _outcomes(z: torch.Tensor, teacher: TeacherLogits, T: float, top_k_rest: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_teacher, q_student) in float64 over the outcomes the loss compares (hld.distill.losses): the
    vocabulary for a dense teacher; for a top-k teacher with `bucket`, its k ids and the rest, the
    teacher being softmax([v_1..v_k, rest] / T) and the student's rest the sum of its probabilities off
    the k ids; with `renormalize`, the vocabulary, the teacher softmax(v / T) on its k ids and 0 elsewhere."""
    q = _softmax64(z / T)  # (N, V)
    if isinstance(teacher, Dense):
        return _softmax64(teacher.logits / T), q
    assert isinstance(teacher, TopK)
    v, idx = teacher.values.double(), teacher.indices.long()
    if top_k_rest == "renormalize":
        return torch.zeros_like(q).scatter(-1, idx, _softmax64(v / T)), q
    assert teacher.rest is not None
    p = _softmax64(torch.cat([v, teacher.rest.double()[:, None]], -1) / T)  # (N, k+1)
    off = torch.ones_like(q).scatter(-1, idx, 0.0)  # 1 on the ids off the top k
    return p, torch.cat([q.gather(-1, idx), (q * off).sum(-1, keepdim=True)], -1)


def _kd_reference(z: torch.Tensor, teacher: TeacherLogits, mask: torch.Tensor, spec: HeadLossSpec) -> torch.Tensor:
    """T^2 * D(p, q) summed over the valid rows, in float64 from the definitions: forward KL = sum p log(p/q),
    reverse KL = sum q log(q/p), JSD(beta) = beta KL(p||m) + (1-beta) KL(q||m) with m = beta p + (1-beta) q
    (the beta the spec parsed: test_divergence_* check the parsing)."""
    T = spec.temperature
    p, q = _outcomes(z, teacher, T, spec.top_k_rest)
    name = spec.divergence.name
    if name == "forward_kl":
        per = _sum_a_log_a_over_b(p, q)
    elif name == "reverse_kl":
        per = _sum_a_log_a_over_b(q, p)
    elif name == "jsd":
        beta = spec.divergence.beta
        m = beta * p + (1 - beta) * q
        per = beta * _sum_a_log_a_over_b(p, m) + (1 - beta) * _sum_a_log_a_over_b(q, m)
    else:
        raise AssertionError(f"no reference for {spec.divergence}")
    return torch.where(mask, per, 0.0).sum() * T * T


def _ce_reference(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z.double(), y, ignore_index=-100, reduction="sum")


def _reference(h, W, y, mask, spec: HeadLossSpec, ts: Optional[TeacherSignals]):
    """The whole loss at once in float64, from the definitions (no hld loss function)."""
    z = _softcap(h.double() @ W.double().T, spec.softcap)  # (N, V)
    ce = _ce_reference(z, y)
    kd = torch.zeros((), dtype=torch.float64)
    teacher = _reference_teacher(ts, spec.top_k)
    if spec.kd_weight and teacher is not None:
        kd = _kd_reference(z, teacher, mask, spec)
    return spec.ce_weight * ce + spec.kd_weight * kd, ce, kd


def _check(
    spec: HeadLossSpec,
    ts: Optional[TeacherSignals],
    *,
    seed: int = 0,
    dtype=torch.float64,
    mask_override: Optional[torch.Tensor] = None,
    rtol: float = 1e-5,
) -> None:
    h, W, y, mask = _inputs(seed, dtype)
    if mask_override is not None:
        mask = mask_override
        y = torch.where(mask, y.clamp_min(0), torch.full_like(y, -100))
    ref, ce, kd = _reference(h, W, y, mask, spec, ts)
    ours, stats = head_loss(h, W, y, mask, spec, ts.logits if ts is not None else None)
    atol = rtol * max(1.0, float(ref.detach().abs()))
    torch.testing.assert_close(ours.double(), ref.detach().double(), rtol=rtol, atol=atol)
    assert stats["ce"] == pytest.approx(float(ce.detach()), rel=rtol, abs=atol)
    assert stats["kd"] == pytest.approx(float(kd.detach()), rel=rtol, abs=atol)
    g_ours = torch.autograd.grad(ours, (h, W))
    g_ref = torch.autograd.grad(ref, (h, W))
    for name, a, b in zip("hW", g_ours, g_ref):
        assert a.dtype == b.dtype == dtype, name
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m, name=name: f"grad {name}: {m}")
    # rows without a target get no gradient at all (every case has some: the precondition is asserted)
    assert (~mask).any() and mask.any(), "a _check case needs masked and unmasked rows"
    assert g_ours[0][~mask].abs().max() == 0


CHUNKS = [1, 3, 7, 4096]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ce_only(chunk):
    _check(HeadLossSpec(ce_weight=1.0, kd_weight=0.0, chunk_tokens=chunk), None)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_online_teacher(chunk, temperature):
    spec = HeadLossSpec(ce_weight=0.3, kd_weight=0.7, temperature=temperature, chunk_tokens=chunk)
    _check(spec, _online_teacher(1), seed=1)


@pytest.mark.parametrize("chunk", [3, 4096])
@pytest.mark.parametrize("ce_weight,kd_weight", [(1.0, 0.5), (0.2, 0.3), (1.5, 0.5)])
def test_forward_kl_online_teacher_at_t1_with_weights_not_summing_to_one(chunk, ce_weight, kd_weight):
    """At T = 1 the fused gradient is (w_ce + w_kd) softmax(z) - w_kd p_t - w_ce onehot: the scaling it
    skips when the weights sum to 1 must happen when they do not (an auxiliary KD weight on full CE)."""
    spec = HeadLossSpec(ce_weight=ce_weight, kd_weight=kd_weight, temperature=1.0, chunk_tokens=chunk)
    _check(spec, _online_teacher(16), seed=16)


def test_dense_kd_at_a_large_vocabulary_is_normalised_by_the_teachers_float64_mass():
    """At V = 262,144 (Gemma 3's) torch's fp32 softmax of the teacher sums to 1 + ~1e-5 on a CPU; the fused
    Dense KL, sum p_t (z_t - z) / mass - (lse(z_t) + log mass) + lse(z), divides the first term by that float64
    mass. The KD sum of 8 rows (~180 nats) must match float64 to 5e-6 relative (it does to ~7e-7 here; the
    rest of the error is the fp32 log-sum-exps'); multiplied by the mass instead, it is off by ~3e-5."""
    n, vocab = 8, 262_144
    g = torch.Generator().manual_seed(17)
    zt, zs = torch.randn(n, vocab, generator=g) * 5, torch.randn(n, vocab, generator=g) * 5
    h, W = torch.eye(n), zs.T.contiguous()  # the student's logits h @ W.T are zs
    spec = HeadLossSpec(ce_weight=0.0, kd_weight=1.0, temperature=1.0, chunk_tokens=4096)
    y, m = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    _, stats = head_loss(h, W, y, m, spec, lambda sl: Dense(zt[sl]))
    logp = torch.log_softmax(zt.double(), -1)
    want = (logp.exp() * (logp - torch.log_softmax(zs.double(), -1))).sum()
    assert float(stats["kd"]) == pytest.approx(float(want), rel=5e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_kd_only_forward_kl(chunk):
    """alpha = 1: no CE term at all (the gradient comes from the KD term alone)."""
    spec = HeadLossSpec(ce_weight=0.0, kd_weight=1.0, temperature=2.0, chunk_tokens=chunk)
    _check(spec, _online_teacher(2), seed=2)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_topk_cached_teacher(chunk, temperature):
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, temperature=temperature, chunk_tokens=chunk)
    _check(spec, _cached_teacher(3, k=5), seed=3)


@pytest.mark.parametrize("chunk", [3, 4096])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_cached_teacher_truncated_by_spec_top_k(chunk, divergence):
    """A cache of the top 8 used by a run with top_k=5 equals a cache of the top 5."""
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, top_k=5, divergence=divergence, chunk_tokens=chunk)
    h, W, y, mask = _inputs(15)
    wide, narrow = _cached_teacher(15, k=8), _cached_teacher(15, k=5)
    assert torch.equal(wide.source.indices[:, :5], narrow.source.indices)
    a, _ = head_loss(h, W, y, mask, spec, wide.logits)
    b, _ = head_loss(h, W, y, mask, replace(spec, top_k=None), narrow.logits)
    c, _ = head_loss(h, W, y, mask, replace(spec, top_k=None), wide.logits)
    torch.testing.assert_close(a, b)
    assert abs(float(a.detach()) - float(c.detach())) > 1e-4  # the truncation changed the loss
    ga, gb = torch.autograd.grad(a, (h, W)), torch.autograd.grad(b, (h, W))
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_forward_kl_online_teacher_truncated_by_spec_top_k(chunk):
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, top_k=4, chunk_tokens=chunk)
    _check(spec, _online_teacher(4), seed=4)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("divergence,args", [("reverse_kl", ""), ("jsd", ""), ("jsd", "(beta=0.2)")])
def test_other_divergences_autograd_path(chunk, divergence, args):
    spec = HeadLossSpec(
        ce_weight=0.4, kd_weight=0.6, temperature=1.5, divergence=f"{divergence}{args}", chunk_tokens=chunk
    )
    _check(spec, _online_teacher(5), seed=5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_jsd_topk_cached_teacher(chunk):
    spec = HeadLossSpec(ce_weight=0.4, kd_weight=0.6, divergence="jsd", chunk_tokens=chunk)
    _check(spec, _cached_teacher(6, k=4), seed=6)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_softcapped_heads(chunk, divergence):
    """Student and teacher heads soft-capped (Gemma 2 style): the autograd path, cap inside."""
    spec = HeadLossSpec(
        ce_weight=0.5, kd_weight=0.5, temperature=2.0, divergence=divergence, softcap=3.0, chunk_tokens=chunk
    )
    _check(spec, _online_teacher(7, cap=2.5), seed=7)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_fully_masked_chunks(chunk, divergence):
    mask = torch.zeros(N, dtype=torch.bool)
    mask[7:] = True  # chunks covering rows 0..6 have no target at all
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, divergence=divergence, chunk_tokens=chunk)
    _check(spec, _online_teacher(8), seed=8, mask_override=mask)


def test_no_valid_row_gives_zero_loss_and_zero_grads():
    h, W, y, _ = _inputs(9)
    mask = torch.zeros(N, dtype=torch.bool)
    loss, stats = head_loss(h, W, y, mask, HeadLossSpec(chunk_tokens=3))
    assert float(loss.detach()) == 0.0 and stats["ce"] == 0.0
    gh, gW = torch.autograd.grad(loss, (h, W))
    assert gh.abs().max() == 0 and gW.abs().max() == 0


@pytest.mark.parametrize("chunk", [3, 4096])
def test_float32_inputs(chunk):
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, temperature=2.0, chunk_tokens=chunk)
    _check(spec, _online_teacher(10, dtype=torch.float32), seed=10, dtype=torch.float32, rtol=1e-4)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_gradient_scales_with_upstream_gradient(divergence):
    h, W, y, mask = _inputs(11)
    ts = _online_teacher(11)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, divergence=divergence, chunk_tokens=3)
    loss1, _ = head_loss(h, W, y, mask, spec, ts.logits)
    g1 = torch.autograd.grad(loss1, (h, W))
    loss3, _ = head_loss(h, W, y, mask, spec, ts.logits)
    g3 = torch.autograd.grad(loss3 * 3, (h, W))
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, 3 * b)
    # and composed with other terms (a sum of two uses of the same W)
    loss_a, _ = head_loss(h, W, y, mask, spec, ts.logits)
    extra = (W**2).sum()
    gW = torch.autograd.grad(-2 * loss_a + extra, W)[0]
    torch.testing.assert_close(gW, -2 * g1[1] + 2 * W.detach())


def test_no_grad_forward_matches_and_builds_no_graph():
    h, W, y, mask = _inputs(12)
    ts = _online_teacher(12)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=4)
    with torch.no_grad():
        a, _ = head_loss(h, W, y, mask, spec, ts.logits)
    b, _ = head_loss(h.detach(), W.detach(), y, mask, spec, ts.logits)
    ref, _, _ = _reference(h, W, y, mask, spec, ts)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a.double(), ref.detach().double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, a)


def test_teacher_chunk_receives_each_row_range_once():
    h, W, y, mask = _inputs(13)
    ts = _online_teacher(13)
    seen: list[slice] = []

    def spy(rows: slice):
        seen.append(rows)
        return ts.logits(rows)

    head_loss(h, W, y, mask, HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=4), spy)
    covered = [r for sl in seen for r in range(sl.start, sl.stop)]
    assert covered == sorted(set(covered))  # no row twice
    assert set(covered) >= set(torch.nonzero(mask).flatten().tolist())  # every valid row


def test_bfloat16_weights_and_hidden_states():
    """A bf16 student: logits in bf16 matmul, softmax in fp32, dW accumulated in fp32 across chunks.
    Loose tolerance against the fp32 reference on the same (bf16-rounded) values."""
    h, W, y, mask = _inputs(14, torch.float32)
    hb = h.detach().bfloat16().requires_grad_(True)
    Wb = W.detach().bfloat16().requires_grad_(True)
    h32 = hb.detach().float().requires_grad_(True)
    W32 = Wb.detach().float().requires_grad_(True)
    ts = _online_teacher(14, dtype=torch.float32)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, temperature=2.0, chunk_tokens=3)
    ours, _ = head_loss(hb, Wb, y, mask, spec, ts.logits)
    ref, _, _ = _reference(h32, W32, y, mask, spec, ts)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    g_ours = torch.autograd.grad(ours, (hb, Wb))
    g_ref = torch.autograd.grad(ref, (h32, W32))
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=2e-2 * float(b.abs().max()))


# --------------------------------------------------------------------------- top-k teachers with their rest


@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k_rest", ["bucket", "renormalize"])
def test_topk_teacher_with_rest_fused_equals_autograd_reference(chunk, divergence, temperature, top_k_rest):
    """forward_kl runs the hand-derived fast path, the others autograd; both against the unfused reference."""
    if divergence == "reverse_kl" and top_k_rest == "renormalize":
        pytest.skip("infinite by construction (tested in test_losses)")
    spec = HeadLossSpec(
        ce_weight=0.4,
        kd_weight=0.6,
        temperature=temperature,
        divergence=divergence,
        top_k_rest=top_k_rest,
        chunk_tokens=chunk,
    )
    _check(spec, _cached_teacher(20, k=4), seed=20)


@pytest.mark.parametrize("chunk", [3, 4096])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_online_teacher_top_k_carries_its_rest(chunk, divergence):
    """objective.top_k on an online teacher: TeacherLogits.top_k fills the rest from the dense logits."""
    spec = HeadLossSpec(
        ce_weight=0.5, kd_weight=0.5, temperature=2.0, top_k=4, divergence=divergence, chunk_tokens=chunk
    )
    _check(spec, _online_teacher(21), seed=21)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_teacher_covering_the_vocabulary_is_the_dense_loss(divergence, temperature):
    """k = V with rest = -inf, through the fused head, equals the dense teacher's loss and gradients."""
    h, W, y, mask = _inputs(22)
    g = torch.Generator().manual_seed(22)
    zt = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    v, i = zt.topk(V, dim=-1)
    full = TopK(values=v, indices=i, rest=torch.full((N,), float("-inf")))
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, temperature=temperature, divergence=divergence, chunk_tokens=3)
    a, _ = head_loss(h, W, y, mask, spec, lambda sl: TopK(values=v[sl], indices=i[sl], rest=full.rest[sl]))
    b, _ = head_loss(h, W, y, mask, spec, lambda sl: Dense(zt[sl]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, z in zip(torch.autograd.grad(a, (h, W)), torch.autograd.grad(b, (h, W))):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-5 * float(z.abs().max()))


def test_bucket_and_renormalize_differ_in_the_fused_head():
    h, W, y, mask = _inputs(23)
    ts = _cached_teacher(23, k=3)
    spec = HeadLossSpec(ce_weight=0.0, kd_weight=1.0, chunk_tokens=4)
    a, sa = head_loss(h, W, y, mask, spec, ts.logits)
    b, sb = head_loss(h, W, y, mask, replace(spec, top_k_rest="renormalize"), ts.logits)
    assert abs(sa["kd"] - sb["kd"]) > 1e-3 * abs(sb["kd"])


def test_bucket_without_rest_is_an_error():
    h, W, y, mask = _inputs(24)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=4)
    for divergence in ("forward_kl", "jsd"):  # the fast path and the autograd path
        with pytest.raises(ValueError, match="rest"):
            head_loss(h, W, y, mask, replace(spec, divergence=divergence), _cached_teacher(24, k=3, rest=False).logits)
    head_loss(h, W, y, mask, replace(spec, top_k_rest="renormalize"), _cached_teacher(24, k=3, rest=False).logits)


# --------------------------------------------------------------------------- the low-precision fast path


@pytest.mark.parametrize("chunk", [3, 7, 4096])
@pytest.mark.parametrize("case", ["ce", "dense", "dense-T2", "bucket", "bucket-T2", "renormalize"])
def test_bf16_matmuls_keep_the_loss_exact_on_the_rounded_logits(chunk, case):
    """matmul_dtype=bf16: the logits come out of a bf16 matmul and the gradient goes back in bf16 (written
    over the logits), row block by row block. The loss must equal the float64 loss of those bf16 logits
    (softmax and sums stay fp32, no further rounding); the gradients match the fp32 reference within bf16's
    resolution. Chunks of 7 and all rows span several row blocks with a remainder."""
    h, W, y, mask = _inputs(31, torch.float32)
    T = 2.0 if case.endswith("T2") else 1.0
    ts = (
        None
        if case == "ce"
        else _online_teacher(31, dtype=torch.float32)
        if case.startswith("dense")
        else _cached_teacher(31, k=5)
    )
    spec = HeadLossSpec(
        ce_weight=1.0 if case == "ce" else 0.4,
        kd_weight=0.0 if case == "ce" else 0.6,
        temperature=T,
        chunk_tokens=chunk,
        matmul_dtype=torch.bfloat16,
        top_k_rest="renormalize" if case == "renormalize" else "bucket",
    )
    ours, stats = head_loss(h, W, y, mask, spec, ts.logits if ts is not None else None)
    z = torch.mm(h.detach().bfloat16(), W.detach().bfloat16().T).double()  # the rounded logits, (N, V)
    teacher = _reference_teacher(ts, None)
    ce = _ce_reference(z, y)
    kd = _kd_reference(z, teacher, mask, spec) if teacher is not None else torch.zeros(())
    assert stats["ce"] == pytest.approx(float(ce), rel=2e-6)
    assert stats["kd"] == pytest.approx(float(kd), rel=2e-5, abs=1e-6)
    ref, _, _ = _reference(h, W, y, mask, spec, ts)
    g_ours = torch.autograd.grad(ours, (h, W))
    g_ref = torch.autograd.grad(ref, (h, W))
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=3e-2 * float(b.abs().max()))
    assert g_ours[0][~mask].abs().max() == 0


def test_a_frozen_head_gets_no_gradient_and_the_same_input_gradient():
    """train.freeze_embedding: with W not requiring a gradient the fused head returns none for it (and
    builds no (V, d) buffer) while dL/dh is the one it returns for a trained head."""
    from hld.distill.chunked import HeadLossSpec, head_loss

    g = torch.Generator().manual_seed(3)
    h0, W0 = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    y, m = torch.randint(0, 300, (40,), generator=g), torch.ones(40, dtype=torch.bool)
    spec = HeadLossSpec(chunk_tokens=16)
    grads = []
    for frozen in (False, True):
        h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(not frozen)
        loss, _ = head_loss(h, W, y, m, spec)
        loss.backward()
        grads.append((h.grad, W.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert grads[0][1] is not None and grads[1][1] is None


# --------------------------------------------------------------------------- paths the cases above do not reach


@pytest.mark.parametrize("chunk", [3, 7, 4096])
def test_forward_kl_online_teacher_at_a_temperature_below_one(chunk):
    """T = 0.5: both softmaxes are of z / T = 2 z (the scale 1 / T is 2, not 1)."""
    spec = HeadLossSpec(ce_weight=0.3, kd_weight=0.7, temperature=0.5, chunk_tokens=chunk)
    _check(spec, _online_teacher(18), seed=18)


@pytest.mark.parametrize("chunk", [3, 7, 4096])
@pytest.mark.parametrize("extra", [{}, {"softcap": 3.0}, {"divergence": "jsd"}])
def test_a_kd_spec_without_a_teacher_is_its_weighted_ce(chunk, extra):
    """No teacher signal for a batch (head_loss without `teacher_chunk`): the KD term is 0 and the loss is
    w_ce * CE, gradient included, on the fast path and on the autograd path (soft-capped, or another
    divergence). Also CE alone at weights other than 1."""
    spec = HeadLossSpec(ce_weight=0.4, kd_weight=0.6, chunk_tokens=chunk, **extra)
    _check(spec, None, seed=19)
    for w in (0.7, 2.0):
        _check(HeadLossSpec(ce_weight=w, chunk_tokens=chunk, **extra), None, seed=19)


@pytest.mark.parametrize("extra", [{"softcap": 3.0}, {"divergence": "jsd"}])
def test_no_grad_forward_on_the_autograd_path(extra):
    """Under torch.no_grad the autograd path computes the loss and no gradient (validation)."""
    h, W, y, mask = _inputs(20)
    ts = _online_teacher(20)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=4, **extra)
    with torch.no_grad():
        got, _ = head_loss(h, W, y, mask, spec, ts.logits)
    assert not got.requires_grad
    ref, _, _ = _reference(h, W, y, mask, spec, ts)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_bf16_head_gradient_over_a_vocabulary_of_several_blocks():
    """matmul_dtype=bf16 folds dL/dW in vocabulary blocks of 16,384 rows: at V = 16,484 (a whole block and
    a partial one) and 3 chunks (the first writes dL/dW, the others add to it) the gradients match the
    float64 gradient on the bf16-rounded weights within bf16's resolution (the loss: that of the rounded logits)."""
    g = torch.Generator().manual_seed(21)
    n, d, vocab = 10, 8, 16_384 + 100
    h, W = torch.randn(n, d, generator=g).requires_grad_(True), torch.randn(vocab, d, generator=g).requires_grad_(True)
    y, mask = torch.randint(0, vocab, (n,), generator=g), torch.ones(n, dtype=torch.bool)
    spec = HeadLossSpec(chunk_tokens=4, matmul_dtype=torch.bfloat16)
    with warnings.catch_warnings():  # and no `out=` buffer is resized (a deprecation warning, an error here)
        warnings.simplefilter("error")
        got, _ = head_loss(h, W, y, mask, spec)
        gh, gW = torch.autograd.grad(got, (h, W))
    z = torch.mm(h.detach().bfloat16(), W.detach().bfloat16().T).double()  # the logits as the bf16 matmul rounds them
    assert float(got) == pytest.approx(float(_ce_reference(z, y)), rel=2e-6)
    hb = h.detach().bfloat16().double().requires_grad_(True)
    Wb = W.detach().bfloat16().double().requires_grad_(True)
    rh, rW = torch.autograd.grad(_ce_reference(hb @ Wb.T, y), (hb, Wb))
    torch.testing.assert_close(gh.double(), rh, rtol=5e-2, atol=3e-2 * float(rh.abs().max()))
    torch.testing.assert_close(gW.double(), rW, rtol=5e-2, atol=3e-2 * float(rW.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [{}, {"temperature": 2.0}, {"softcap": 3.0}, {"matmul_dtype": torch.bfloat16}])
def test_the_fused_head_writes_its_buffers_without_resizing_them(dtype, extra):
    """Every (rows, V) buffer the head writes with `out=` has the rows it is given (row blocks of 4 with a
    remainder of 3, chunks of 7 with one of 3): torch resizes a mis-shaped `out=` with a deprecation warning,
    made an error here."""
    h, W, y, mask = _inputs(22, torch.float32)
    h, W = h.detach().to(dtype).requires_grad_(True), W.detach().to(dtype).requires_grad_(True)
    ts = _online_teacher(22, dtype=dtype)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=7, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = head_loss(h, W, y, mask, spec, ts.logits)
        loss.backward()


def test_workspace_keeps_one_growing_buffer_per_name_width_device_and_dtype():
    """WORKSPACE.get(name, n, V): an (n, V) view of a kept buffer, reused while it has n rows, replaced by a
    larger one when it has fewer, one per (name, V, device, dtype)."""
    from hld.distill.chunked import _Workspace

    cpu = torch.device("cpu")
    ws = _Workspace()
    a = ws.get("z", 3, 5, cpu)
    assert a.shape == (3, 5) and a.dtype == torch.float32 and a.device == cpu
    assert ws.get("z", 2, 5, cpu).data_ptr() == a.data_ptr()  # fewer rows: a view of the same buffer
    assert ws.get("z", 3, 5, cpu).data_ptr() == a.data_ptr()  # as many: the same
    b = ws.get("z", 4, 5, cpu)  # more: a new buffer, kept from now on
    assert b.shape == (4, 5) and ws.get("z", 1, 5, cpu).data_ptr() == b.data_ptr()
    low = ws.get("z", 2, 5, cpu, torch.bfloat16)
    assert low.shape == (2, 5) and low.dtype == torch.bfloat16 and low.data_ptr() != b.data_ptr()
    assert ws.get("q", 2, 5, cpu).data_ptr() != b.data_ptr()  # another name, another buffer
    assert ws.get("z", 2, 7, cpu).shape == (2, 7)  # another width, another buffer
    ws.clear()
    assert ws.bufs == {}


def test_a_head_trained_on_fixed_hidden_states_gets_its_gradient():
    """Only W requires a gradient (h fixed): dL/dW is still computed, against the float64 reference."""
    h, W, y, mask = _inputs(23)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=3)
    ts = _online_teacher(23)
    got, _ = head_loss(h.detach(), W, y, mask, spec, ts.logits)
    (gW,) = torch.autograd.grad(got, W)
    ref, _, _ = _reference(h.detach(), W, y, mask, spec, ts)
    (rW,) = torch.autograd.grad(ref, W)
    torch.testing.assert_close(gW, rW, rtol=1e-5, atol=1e-5 * float(rW.abs().max()))


def test_a_ce_only_spec_never_asks_for_the_teachers_rows():
    """KD weight 0: the teacher's rows (an online teacher's head matmul) are not computed at all."""
    h, W, y, mask = _inputs(24)
    asked: list[slice] = []
    head_loss(h, W, y, mask, HeadLossSpec(chunk_tokens=3), lambda sl: asked.append(sl))
    assert asked == []


def test_a_second_backward_through_the_fused_head_is_refused():
    """The saved gradients are scaled in place by the first backward: a second (retain_graph) would be wrong."""
    h, W, y, mask = _inputs(25)
    loss, _ = head_loss(h, W, y, mask, HeadLossSpec(chunk_tokens=3))
    loss.backward(retain_graph=True)
    with pytest.raises(
        RuntimeError, match=r"^the fused head loss supports one backward pass \(no retain_graph reuse\)$"
    ):
        loss.backward()


def test_dense_kd_at_a_vocabulary_of_1025():
    """V = 1025 (not a multiple of 1024): the teacher's row sums are plain float64 sums, not 1024-wide partials."""
    g = torch.Generator().manual_seed(26)
    n, vocab = 6, 1025
    zt, zs = torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3
    spec = HeadLossSpec(ce_weight=0.0, kd_weight=1.0, chunk_tokens=4096)
    y, m = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    _, stats = head_loss(torch.eye(n), zs.T.contiguous(), y, m, spec, lambda sl: Dense(zt[sl]))
    logp = torch.log_softmax(zt.double(), -1)
    want = (logp.exp() * (logp - torch.log_softmax(zs.double(), -1))).sum()
    assert float(stats["kd"]) == pytest.approx(float(want), rel=1e-6)
