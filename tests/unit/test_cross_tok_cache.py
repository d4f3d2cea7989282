"""Per-chunk teacher caches (hld.cache.chunks): what the cross-tokenizer objectives read of the teacher, stored
per predicted chunk, read back through the same objective as the online teacher. Each loss's value and
gradients from the cache against the online teacher on the same batch (fp32): alm exactly (its float32
log-likelihoods), uld within the bound of its float16 probabilities (derived below), gold against a float64
reference of its top-k coarsening written out by hand, and the online - cached gap of gold's exact part equal
to the chain rule of KL; the pooled hidden states exactly (bfloat16 both ways). The arrays go through the
cache's own shard writer and reader functions, in memory, with the windows read in another order than
written (the offsets)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cross_tok_objectives import (
    BOUNDS,
    D_S,
    D_T,
    PAIRS,
    hidden_states,
    objective,
    paired_batch,
    shared_vocab,
    states,
    uld_by_hand,
)

from hld.cache.chunks import ChunkShardWriter, chunk_values, gold_top_k, gold_width, read_chunks
from hld.distill.cross_tok.objectives import CrossTokHiddenObjective
from hld.distill.cross_tok.signal import ChunkSignals
from hld.distill.hidden import Moments
from hld.distill.projectors import Projectors
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals
from hld.distill.signals.online import OnlineLogits

K = 5  # uld_top_k: fewer than either vocabulary (50 / 30) and than gold's 19 shared outcomes
ARGS = {
    "uld": {"temperature": 1.7, "uld_top_k": K},
    "gold": {"temperature": 1.7, "uld_top_k": K, "uld_weight": 0.6},
    "alm": {"alm_temperature": 3.0},
}


def reorder(batch, order):
    """The batch with its windows in `order` (a cache reads its rows in any batch order)."""
    from hld.data.packing import make_paired_batch
    from hld.data.paired import PairedRows

    als = [batch.alignments[i] for i in order]
    rows = PairedRows(
        batch.teacher_ids.numpy()[order],
        batch.input_ids.numpy()[order],
        np.array([al.teacher_bounds[-1] for al in als]),
        np.array([al.student_bounds[-1] for al in als]),
        als,
    )
    return make_paired_batch(rows)


def memory_cache(batch, sig, obj, *, layers=(), pooling=None, d_model=D_T):
    """The batch's windows written by `ChunkShardWriter` (one shard, two `put`s of one window each) into
    memory, and a reader over it as `read_chunks` sees one (manifest, shard size, fields by key)."""
    spec = obj.spec if obj is not None else None
    identity = {"top_k": K, "chunks": {"loss": spec.loss if spec else ""}}
    if spec is not None and spec.loss == "gold":
        identity["chunks"] |= {"gold_top_k": gold_top_k(spec), "gold_width": gold_width(spec)}
    arrays: dict[str, list] = {}
    writer = ChunkShardWriter(
        lambda key, rows: arrays.setdefault(key, []).append(rows), identity=identity, layers=layers
    )
    for b in range(batch.input_ids.shape[0]):
        part = reorder(batch, [b])  # window b alone: its own forward's values
        sub = TeacherSignals(
            hidden={i: h[b : b + 1] for i, h in sig.hidden.items()},
            source=None
            if sig.source is None
            else OnlineLogits(sig.source.final_hidden[b : b + 1], sig.source.head_weight, sig.source.softcap),
        )
        vals = chunk_values(sub, part, spec or _no_loss(), list(layers), pooling=pooling)
        writer.put(b, alignments=part.alignments, values={k: v.cpu() for k, v in vals.items()})
    writer.finish()
    fields = {k: np.concatenate(v) for k, v in arrays.items()}
    parts = SimpleNamespace(field=lambda s, key: fields[key])
    manifest = {"identity": identity, "d_model": d_model}
    return SimpleNamespace(manifest=manifest, shard_windows=batch.input_ids.shape[0], parts=parts), fields


def _no_loss():
    from hld.distill.cross_tok.signal import ChunkLossSpec

    return ChunkLossSpec(loss="")


def fp32_states(seed=1):
    return tuple(x.float() for x in states(seed))


def run_fp32(obj, batch, h, W, teacher):
    h, W = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    loss, _, metrics = obj(batch, StudentOutputs(final_hidden=h, hidden={}, head_weight=W), teacher)
    loss.backward()
    return loss.detach(), metrics, h.grad, W.grad


def online_and_cached(loss, order=(1, 0), **kw):
    """(online result, cached result, the batch as read, the cached signal) for `loss`: the cache written in
    window order 0, 1 and read in `order`."""
    batch, (h, W, ht, Wt) = paired_batch(), fp32_states()
    obj = objective(loss, **{**ARGS[loss], **kw})
    sig = TeacherSignals(source=OnlineLogits(ht, Wt))
    reader, _ = memory_cache(batch, sig, obj)
    order = list(order)
    batch_r = reorder(batch, order)
    cached = read_chunks(reader, np.array(order), Needs(logits=True))
    online = run_fp32(obj, batch_r, h[order], W, TeacherSignals(source=OnlineLogits(ht[order], Wt)))
    got = run_fp32(obj, batch_r, h[order], W, ChunkSignals(chunks=cached.chunks))
    return online, got, batch_r, cached


def test_alm_from_the_cache_is_the_online_value_and_gradients():
    (v0, m0, gh0, gW0), (v1, m1, gh1, gW1), _, _ = online_and_cached("alm")
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1["kd"], m0["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh1, gh0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gW1, gW0, rtol=1e-5, atol=1e-6)
    assert float(m0["kd"]) > 0.05


def test_uld_from_the_cache_is_within_its_float16_bound_and_has_the_online_gradients():
    """ULD_k = sum_i |p_i - q_i| + |R_p - R_q|. The cache keeps p_i in float16 (|p16 - p| <= 2^-11 p for
    p >= 2^-14, <= 2^-25 below) and R_p = 1 - sum p in float32, so per chunk |ULD_cached - ULD| <=
    2^-11 (1 - R_p) + k 2^-25, and the gradient, sign(q_i - p_i) dq_i, is the same wherever no |q_i - p_i|
    is within that rounding (checked here)."""
    (v0, m0, gh0, gW0), (v1, m1, gh1, gW1), batch, cached = online_and_cached("uld")
    m = len(cached.chunks.uld_rest)
    assert m == sum(len(tb) - 2 for tb, _ in BOUNDS)
    bound = m * (2.0**-11 + K * 2.0**-25)
    assert abs(float(m1["kd"]) - float(m0["kd"])) <= bound
    assert abs(float(v1) - float(v0)) <= 0.3 * bound + 1e-6  # alpha = 0.3
    torch.testing.assert_close(gh1, gh0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gW1, gW0, rtol=1e-5, atol=1e-6)


def test_uld_values_in_the_cache_are_the_teachers_sorted_top_k_and_rest_by_hand():
    batch, (_, _, ht, Wt) = paired_batch(), fp32_states()
    obj = objective("uld", **ARGS["uld"])
    reader, fields = memory_cache(batch, TeacherSignals(source=OnlineLogits(ht, Wt)), obj)
    top = fields["chunk_top"].reshape(-1, K).astype(np.float64)
    rows = []
    for b, (tb, _) in enumerate(BOUNDS):
        for c in range(1, len(tb) - 1):
            p = torch.softmax(ht[b, tb[c] - 1].double() @ Wt.double().T / 1.7, -1)
            rows.append(torch.sort(p, descending=True).values[:K].numpy())
    want = np.stack(rows)
    np.testing.assert_allclose(top, want, rtol=2.0**-11, atol=2.0**-24)
    np.testing.assert_allclose(fields["chunk_rest"], 1 - want.sum(1), rtol=1e-5, atol=1e-6)
    assert list(fields["chunk_offsets"]) == [0, len(BOUNDS[0][0]) - 1, len(BOUNDS[0][0]) + len(BOUNDS[1][0]) - 2]


def gold_coarse_reference(batch, h, W, ht, Wt, *, vocab, T, k, alpha, uld_weight):
    """float64 by hand: CE + alpha * (T^2 * KL over the teacher's k most likely shared outcomes + one outcome
    for the rest, the student coarsened alike, at one-token chunks; uld_weight * ULD_k elsewhere); and the
    bound of the float16 probabilities' effect on the KL part (`test_gold_from_the_cache_...`)."""
    import torch.nn.functional as F

    zs = h @ W.T
    zt = ht @ Wt.T
    ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), batch.labels.reshape(-1), ignore_index=-100, reduction="sum")
    xt, kd_bound = zs.new_zeros(()), 0.0
    t_ids, s_ids = torch.as_tensor(vocab.teacher_ids), torch.as_tensor(vocab.student_ids)
    for b, al in enumerate(batch.alignments):
        tb, sb = al.teacher_bounds.tolist(), al.student_bounds.tolist()
        for c in range(1, len(tb) - 1):
            tr, sr = tb[c] - 1, sb[c] - 1
            if tb[c + 1] - tb[c] == 1 and sb[c + 1] - sb[c] == 1:
                p, q = torch.softmax(zt[b, tr] / T, -1), torch.softmax(zs[b, sr] / T, -1)
                P = torch.cat([p[t_ids], (1 - p[t_ids].sum())[None]])  # shared outcomes + the bucket off them
                Q = torch.cat([q[s_ids], (1 - q[s_ids].sum())[None]])
                top = torch.topk(P, k).indices
                Pk = torch.cat([P[top], (1 - P[top].sum())[None]])
                Qk = torch.cat([Q[top], (1 - Q[top].sum())[None]])
                xt = xt + T * T * (Pk * (Pk / Qk).log()).sum()
                top_terms = Pk[:-1] * ((Pk[:-1] / Qk[:-1]).log().abs() + 1)
                kd_bound += float(T * T * 2 * 2.0**-11 * top_terms.sum().detach())
            else:
                xt = xt + uld_weight * uld_by_hand(zt[b, tr], zs[b, sr], k, T)
    return (1 - alpha) * ce + alpha * xt, xt, kd_bound


def test_gold_from_the_cache_is_its_top_k_coarsening_by_hand():
    (v0, m0, _, _), (v1, m1, gh1, gW1), batch, cached = online_and_cached("gold")
    vocab = shared_vocab()
    _, (h, W, ht, Wt) = paired_batch(), states()
    order = [1, 0]
    h64 = h[order].detach().clone().requires_grad_(True)
    W64 = W.detach().clone().requires_grad_(True)
    want, xt, kd_bound = gold_coarse_reference(
        batch, h64, W64, ht[order], Wt, vocab=vocab, T=1.7, k=K, alpha=0.3, uld_weight=0.6
    )
    gh, gW = torch.autograd.grad(want, (h64, W64))
    n_uld = len(cached.chunks.uld_rest)
    # the float16 ULD part (as in the uld test) and the KD part's: p_i stored as p_i (1 + e_i), |e_i| <= 2^-11,
    # then renormalised with the exact rest (another 2^-11 at most): d[p log(p/q)] = (log(p/q) + 1) dp, so
    # |dKL| <= 2 * 2^-11 * sum_i p_i (|log(p_i/q_i)| + 1) over the k stored outcomes, times T^2
    bound = 0.6 * n_uld * (2.0**-11 + K * 2.0**-25) + kd_bound
    assert cached.chunks.gold_top is not None and len(cached.chunks.gold_top.values) > 0 and n_uld > 0
    assert abs(float(m1["kd"]) - float(xt.detach())) <= bound + 1e-6
    # the gradient's KD part, T (q_j - p_j) over the k outcomes: p_j within 2 * 2^-11 of its own
    torch.testing.assert_close(gh1.double(), gh, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(gW1.double(), gW, rtol=2e-3, atol=2e-4)
    # and the coarsening is a real cut here: online the exact part reads every shared outcome
    assert float(m0["kd"]) - float(m1["kd"]) > 1e-3


def test_gold_cache_gap_is_the_chain_rule_of_kl():
    """KL(P || Q) = KL(P_k || Q_k) + P_R KL(P|R || Q|R), R the outcomes off the teacher's top-k: the online
    exact part minus the cached one is the second term, summed over the one-token chunks (times T^2),
    computed here apart, in float64."""
    batch, (h, W, ht, Wt) = paired_batch(), states()
    vocab, T = shared_vocab(), 1.7
    zs, zt = h @ W.T, ht @ Wt.T
    t_ids, s_ids = torch.as_tensor(vocab.teacher_ids), torch.as_tensor(vocab.student_ids)
    gap = 0.0
    for b, al in enumerate(batch.alignments):
        tb, sb = al.teacher_bounds.tolist(), al.student_bounds.tolist()
        for c in range(1, len(tb) - 1):
            if tb[c + 1] - tb[c] == 1 and sb[c + 1] - sb[c] == 1:
                p, q = torch.softmax(zt[b, tb[c] - 1] / T, -1), torch.softmax(zs[b, sb[c] - 1] / T, -1)
                P = torch.cat([p[t_ids], (1 - p[t_ids].sum())[None]])
                Q = torch.cat([q[s_ids], (1 - q[s_ids].sum())[None]])
                off = torch.ones(len(P), dtype=torch.bool)
                off[torch.topk(P, K).indices] = False
                PR, QR = P[off].sum(), Q[off].sum()
                gap += float(T * T * PR * ((P[off] / PR) * ((P[off] / PR) / (Q[off] / QR)).log()).sum())
    (v0, m0, _, _), (v1, m1, _, _), _, cached = online_and_cached("gold", order=(0, 1), uld_weight=0.0)
    assert gap > 1e-3
    assert float(m0["kd"]) - float(m1["kd"]) == pytest.approx(gap, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("how", ["last", "mean"])
def test_pooled_hidden_states_from_the_cache_are_the_online_ones(how):
    batch = paired_batch()
    s_states, t_states = hidden_states()
    t_bf16 = {i: v.to(torch.bfloat16) for i, v in t_states.items()}  # as a bf16 teacher gives them
    proj = Projectors(PAIRS, d_student=D_S, d_teacher=D_T, seed=3)
    obj = CrossTokHiddenObjective(
        proj, pooling=how, loss="mse", normalize_teacher="standardize", beta=0.7, skip_first_position=True
    )
    obj.stats = {t: Moments(mean=torch.linspace(-1, 1, D_T), std=torch.linspace(0.5, 2, D_T), count=9) for t in (2, 3)}
    reader, _ = memory_cache(batch, TeacherSignals(hidden=t_bf16), None, layers=(2, 3), pooling=how)
    order = [1, 0]
    batch_r = reorder(batch, order)
    cached = read_chunks(reader, np.array(order), Needs(layers=(2, 3)))

    def run(teacher):
        s = {i: v[order].float().detach().clone().requires_grad_(True) for i, v in s_states.items()}
        student = StudentOutputs(final_hidden=torch.zeros(2, 10, D_S), hidden=s, head_weight=torch.zeros(1, 1))
        loss, _, _ = obj(batch_r, student, teacher)
        loss.backward()
        return loss.detach(), {i: v.grad for i, v in s.items()}

    v0, g0 = run(TeacherSignals(hidden={i: v[order] for i, v in t_bf16.items()}))
    v1, g1 = run(ChunkSignals(chunks=cached.chunks))
    assert float(v0) > 0.1
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    for i in g0:
        torch.testing.assert_close(g1[i], g0[i], rtol=1e-6, atol=1e-7)


def test_a_teacher_cache_with_a_student_tokenizer_is_a_valid_config():
    from hld.config import load_config

    for loss in ("uld", "alm", "gold"):
        over = ["student.tokenizer=sample-bpe-8k", "teacher.cache=/tmp/x", f"objective.cross_tokenizer.loss={loss}"]
        cfg = load_config("demo", over)
        assert cfg.teacher.cache == "/tmp/x" and cfg.student.tokenizer == "sample-bpe-8k"


def test_a_windows_digest_changes_with_its_ids_and_with_either_sides_chunk_bounds():
    """A per-chunk cache checks each batch window against the digest it was built on: the same ids cut into
    other chunks (another student tokenizer's alignment of the same text) must not pass."""
    from dataclasses import replace

    from hld.cache.chunks import window_digest

    al = paired_batch().alignments[1]
    base = window_digest(al)
    assert base.shape == (32,) and base.dtype == np.uint8
    for field in ("teacher_ids", "student_ids", "teacher_bounds", "student_bounds"):
        x = getattr(al, field).copy()
        x[2] += 1  # an id, or a chunk boundary moved by one token
        assert not np.array_equal(window_digest(replace(al, **{field: x})), base), field
    assert np.array_equal(window_digest(replace(al)), base)
