"""hld.distill.cross_tok.objectives against float64 computations written out from the definitions with full
logits (torch.nn.functional, a loop over windows and chunks): CE over the mask plus alpha times ULD (sorted
probabilities), ALM (summed token log-probabilities, then the binary KL) or GOLD (exact KD over the shared
ids at one-token chunks); gradients by torch.autograd on that reference; the row blocks (1, 3 and more than
the batch) and padding; a wrong pairing of rows shown to change the value. The hidden objective against
pooling, projecting, normalising and the loss by hand. Then the protocol's attributes and the plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hld.config import HiddenConfig, ObjectiveConfig, ScheduleConfig
from hld.data.align import Alignment
from hld.data.packing import make_paired_batch
from hld.data.paired import PairedRows
from hld.distill.cross_tok.objectives import (
    CrossTokHiddenObjective,
    CrossTokLogitObjective,
    build_cross_plan,
    row_blocks,
)
from hld.distill.cross_tok.vocab import SharedVocab
from hld.distill.hidden import Moments
from hld.distill.objectives import HiddenObjective, LogitObjective, SumObjective
from hld.distill.projectors import Projectors, pair_key
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals
from hld.distill.signals.online import OnlineLogits

V_T, V_S, D_T, D_S = 50, 30, 8, 6
T_T, T_S = 11, 10  # rows per window: both windows end before them (padding after)
# chunk bounds (teacher | student tokens a chunk): window 0: BOS, (2|1), (1|2), (2|1), (1|1);
# window 1: BOS, (1|1), (3|1), (1|3), (2|1), (1|1), (1|1)
BOUNDS = [
    ([0, 1, 3, 4, 6, 7], [0, 1, 2, 4, 5, 6]),
    ([0, 1, 2, 5, 6, 8, 9, 10], [0, 1, 2, 3, 6, 7, 8, 9]),
]


def paired_batch(seed: int = 0):
    """Two paired windows (BOS id 1 first, pad id 0 after), made by make_paired_batch from PairedRows."""
    g = np.random.default_rng(seed)
    t_ids, s_ids = np.zeros((2, T_T), np.int64), np.zeros((2, T_S), np.int64)
    als = []
    for b, (tb, sb) in enumerate(BOUNDS):
        nt, ns = tb[-1], sb[-1]
        t_ids[b, :nt] = [1, *g.integers(2, V_T, nt - 1)]
        s_ids[b, :ns] = [1, *g.integers(2, V_S, ns - 1)]
        als.append(
            Alignment(
                t_ids[b, :nt].astype(np.int32),
                s_ids[b, :ns].astype(np.int32),
                np.asarray(tb, np.int32),
                np.asarray(sb, np.int32),
                char_bounds=np.arange(len(tb), dtype=np.int32),
            )
        )
    rows = PairedRows(
        teacher_ids=t_ids,
        student_ids=s_ids,
        teacher_lengths=np.array([b[0][-1] for b in BOUNDS]),
        student_lengths=np.array([b[1][-1] for b in BOUNDS]),
        alignments=als,
    )
    return make_paired_batch(rows)


def states(seed: int = 1):
    """Student (h, W) and teacher (h_t, W_t) in float64, logits of sd ~2.5."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, T_S, D_S, generator=g, dtype=torch.float64)
    W = torch.randn(V_S, D_S, generator=g, dtype=torch.float64)
    ht = torch.randn(2, T_T, D_T, generator=g, dtype=torch.float64)
    Wt = torch.randn(V_T, D_T, generator=g, dtype=torch.float64) * 0.9
    return h, W, ht, Wt


def shared_vocab(seed: int = 2, n: int = 18) -> SharedVocab:
    g = np.random.default_rng(seed)
    t = np.sort(g.choice(V_T, n, replace=False)).astype(np.int64)
    s = g.choice(V_S, n, replace=False).astype(np.int64)
    return SharedVocab(t, s, teacher_vocab_size=V_T, student_vocab_size=V_S)


def capped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


# --------------------------------------------------------------------------- the reference


def uld_by_hand(zt, zs, k, T):
    """sum over ranks i <= k of |p_(i) - q_(i)| (descending, the shorter padded with 0) + |p's mass past
    rank k - q's mass past rank k|."""
    p = torch.sort(torch.softmax(zt / T, -1), descending=True).values
    q = torch.sort(torch.softmax(zs / T, -1), descending=True).values
    width = max(len(p), len(q))
    p, q = F.pad(p, (0, width - len(p))), F.pad(q, (0, width - len(q)))
    kk = width if k is None else min(k, width)
    return (p[:kk] - q[:kk]).abs().sum() + (p[kk:].sum() - q[kk:].sum()).abs()


def gold_exact_by_hand(zt, zs, vocab, T, divergence):
    """T^2 * D over the shared ids + one outcome for each side's mass off them."""
    p = torch.softmax(zt / T, -1)
    q = torch.softmax(zs / T, -1)
    P = torch.cat([p[torch.as_tensor(vocab.teacher_ids)], (1 - p[torch.as_tensor(vocab.teacher_ids)].sum())[None]])
    Q = torch.cat([q[torch.as_tensor(vocab.student_ids)], (1 - q[torch.as_tensor(vocab.student_ids)].sum())[None]])
    if divergence == "forward_kl":
        d = (P * (P / Q).log()).sum()
    else:  # reverse_kl
        d = (Q * (Q / P).log()).sum()
    return T * T * d


def binary_divergence(p, q, divergence):
    if divergence == "forward_kl":
        return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    return q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))


def reference(
    batch,
    h,
    W,
    ht,
    Wt,
    *,
    loss,
    alpha,
    T=1.0,
    k=64,
    tau=100.0,
    divergence="forward_kl",
    vocab=None,
    uld_weight=1.0,
    cap_s=None,
    cap_t=None,
    pairing="chunk",
):
    """(loss, CE sum, XT sum) in float64 from full logits. `pairing`: `chunk` pairs the rows tb[c]-1 and
    sb[c]-1 (the definition); `start` the chunks' first rows, `index` the c-th row of each side (wrong
    pairings, for the test that they change the value)."""
    zs = capped(h @ W.T, cap_s)  # (B, T_s, V_s)
    zt = capped(ht @ Wt.T, cap_t)  # (B, T_t, V_t)
    ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), batch.labels.reshape(-1), ignore_index=-100, reduction="sum")
    xt = zs.new_zeros(())
    for b, al in enumerate(batch.alignments):
        tb, sb = al.teacher_bounds.tolist(), al.student_bounds.tolist()
        for c in range(1, len(tb) - 1):
            tr, sr = {"chunk": (tb[c] - 1, sb[c] - 1), "start": (tb[c], sb[c]), "index": (c - 1, c - 1)}[pairing]
            if loss == "alm":
                lt = sum(torch.log_softmax(zt[b, j - 1], -1)[batch.teacher_ids[b, j]] for j in range(tb[c], tb[c + 1]))
                ls = sum(torch.log_softmax(zs[b, j - 1], -1)[batch.input_ids[b, j]] for j in range(sb[c], sb[c + 1]))
                p = torch.exp(lt.clamp_max(0) / tau - 1e-6)
                q = torch.exp(ls.clamp_max(0) / tau - 1e-6)
                xt = xt + tau * binary_divergence(p, q, divergence)
            elif loss == "gold" and tb[c + 1] - tb[c] == 1 and sb[c + 1] - sb[c] == 1:
                xt = xt + gold_exact_by_hand(zt[b, tr], zs[b, sr], vocab, T, divergence)
            else:
                w = uld_weight if loss == "gold" else 1.0
                xt = xt + w * uld_by_hand(zt[b, tr], zs[b, sr], k, T)
    return (1 - alpha) * ce + alpha * xt, ce, xt


def run(obj, batch, h, W, ht, Wt, *, cap_s=None, cap_t=None):
    """The objective's (loss, count, metrics) and its gradients w.r.t. h and W."""
    h, W = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    student = StudentOutputs(final_hidden=h, hidden={}, head_weight=W, softcap=cap_s)
    teacher = TeacherSignals(source=OnlineLogits(ht, Wt, cap_t))
    loss, n, metrics = obj(batch, student, teacher)
    loss.backward()
    return loss.detach(), n, metrics, h.grad, W.grad


CASES = {  # loss -> (objective arguments, reference arguments)
    "uld": ({"temperature": 1.7, "uld_top_k": 5}, {"T": 1.7, "k": 5}),
    "gold": ({"temperature": 1.7, "uld_top_k": None, "uld_weight": 0.6}, {"T": 1.7, "k": None, "uld_weight": 0.6}),
    "alm": ({"alm_temperature": 3.0}, {"tau": 3.0}),
}


def objective(loss: str, *, alpha: float = 0.3, block_rows: int = 4, **kw) -> CrossTokLogitObjective:
    args = {**CASES[loss][0], **kw}
    if loss == "gold":
        args.setdefault("vocab", shared_vocab())
    return CrossTokLogitObjective(loss=loss, alpha=alpha, block_rows=block_rows, **args)


def reference_of(loss, batch, h, W, ht, Wt, *, alpha=0.3, **kw):
    args = {**CASES[loss][1], **kw}
    if loss == "gold":
        args.setdefault("vocab", shared_vocab())
    h, W = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    value, ce, xt = reference(batch, h, W, ht, Wt, loss=loss, alpha=alpha, **args)
    grads = torch.autograd.grad(value, (h, W))
    return value.detach(), ce.detach(), xt.detach(), grads


# --------------------------------------------------------------------------- the logit objective


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_value_metrics_and_gradients_equal_the_full_logit_reference(loss, block_rows):
    batch, (h, W, ht, Wt) = paired_batch(), states()
    got, n, metrics, gh, gW = run(objective(loss, block_rows=block_rows), batch, h, W, ht, Wt)
    want, ce, xt, (wh, wW) = reference_of(loss, batch, h, W, ht, Wt)
    assert n == batch.n_targets == 5 + 8
    assert float(xt) > 0.05 and float(ce) > 1.0  # neither part vanishes on this problem
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["ce"], ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["kd"], xt.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, wh, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(gW, wW, rtol=1e-8, atol=1e-11)
    assert float(gh.abs().max()) > 1e-3


@pytest.fixture(scope="module")
def real_pair():
    """Two windows of C4 text through two real tokenizers (SentencePiece-style teacher, GPT-2-style student)
    aligned by `Aligner`, padded into a paired batch, and the tokenizers' shared vocabulary."""
    from helpers import corpus, gpt2_bpe, sentencepiece_bpe
    from hld.data.align import Aligner
    from hld.distill.cross_tok.vocab import shared_vocab as shared_of

    teacher, student = sentencepiece_bpe(vocab_size=1500, n_docs=80), gpt2_bpe(vocab_size=350, n_docs=80)
    als = Aligner(teacher, student).batch([d[:150] for d in corpus(2)])
    nt = np.array([len(a.teacher_ids) for a in als])
    ns = np.array([len(a.student_ids) for a in als])
    t_ids, s_ids = np.zeros((2, nt.max() + 2), np.int64), np.zeros((2, ns.max() + 1), np.int64)
    for b, a in enumerate(als):
        t_ids[b, : nt[b]], s_ids[b, : ns[b]] = a.teacher_ids, a.student_ids
    batch = make_paired_batch(PairedRows(t_ids, s_ids, nt, ns, als))
    return batch, shared_of(teacher, student)


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_on_two_real_tokenizers(real_pair, loss):
    batch, vocab = real_pair
    g = torch.Generator().manual_seed(7)
    B, T_s = batch.input_ids.shape
    T_t = batch.teacher_ids.shape[1]
    h = torch.randn(B, T_s, D_S, generator=g, dtype=torch.float64)
    W = torch.randn(vocab.student_vocab_size, D_S, generator=g, dtype=torch.float64)
    ht = torch.randn(B, T_t, D_T, generator=g, dtype=torch.float64)
    Wt = torch.randn(vocab.teacher_vocab_size, D_T, generator=g, dtype=torch.float64)
    assert len(vocab) > 100 and sum(a.n_chunks for a in batch.alignments) > 40
    got, _, _, gh, gW = run(objective(loss, block_rows=7, vocab=vocab), batch, h, W, ht, Wt)
    want, _, _, (wh, wW) = reference_of(loss, batch, h, W, ht, Wt, vocab=vocab)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, wh, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(gW, wW, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_softcap_on_both_sides_and_reverse_kl(loss):
    batch, (h, W, ht, Wt) = paired_batch(3), states(4)
    caps = {"cap_s": 2.0, "cap_t": 3.0}
    obj = objective(loss, block_rows=3, divergence="reverse_kl", alpha=0.7)
    got, _, metrics, gh, gW = run(obj, batch, h, W, ht, Wt, **caps)
    want, _, xt, (wh, wW) = reference_of(loss, batch, h, W, ht, Wt, divergence="reverse_kl", alpha=0.7, **caps)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["kd"], xt.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, wh, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(gW, wW, rtol=1e-8, atol=1e-11)
    # and the caps matter: without them the value is another
    plain, *_ = reference_of(loss, batch, h, W, ht, Wt, divergence="reverse_kl", alpha=0.7)
    assert abs(float(plain) - float(got)) > 1e-3


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_padding_rows_change_nothing_and_get_no_gradient(loss):
    batch, (h, W, ht, Wt) = paired_batch(), states()
    base, _, _, gh, gW = run(objective(loss), batch, h, W, ht, Wt)
    h2, ht2 = h.clone(), ht.clone()
    for b, (tb, sb) in enumerate(BOUNDS):
        h2[b, sb[-1] :] = 50.0 * torch.randn_like(h2[b, sb[-1] :])  # the student's padding after its window
        ht2[b, tb[-1] :] = 50.0 * torch.randn_like(ht2[b, tb[-1] :])  # and the teacher's
    got, _, _, gh2, gW2 = run(objective(loss), batch, h2, W, ht2, Wt)
    torch.testing.assert_close(got, base, rtol=1e-12, atol=0)
    torch.testing.assert_close(gW2, gW, rtol=1e-10, atol=1e-13)
    for b, (_, sb) in enumerate(BOUNDS):
        assert float(gh2[b, sb[-1] :].abs().max()) == 0.0
        assert float(gh[b, : sb[-1] - 1].abs().min()) > 0.0  # every row with a target has one
    # the window's last token predicts nothing and, in no chunk's predicting rows, gets no gradient either
    assert float(gh[0, BOUNDS[0][1][-1] - 1].abs().max()) == 0.0


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_alpha_weighs_ce_against_the_cross_tokenizer_loss(loss):
    batch, (h, W, ht, Wt) = paired_batch(), states()
    _, ce, xt, _ = reference_of(loss, batch, h, W, ht, Wt)
    for alpha in (0.0, 1.0, 0.25):
        got, _, metrics, *_ = run(objective(loss, alpha=alpha), batch, h, W, ht, Wt)
        torch.testing.assert_close(got, ((1 - alpha) * ce + alpha * xt).detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(metrics["ce"], ce.detach(), rtol=1e-10, atol=1e-12)  # metrics: unweighted
        torch.testing.assert_close(metrics["kd"], xt.detach(), rtol=1e-10, atol=1e-12)
    assert abs(float(ce) - float(xt)) > 1.0  # so a swapped or missing weight shows


def test_an_alpha_schedule_sets_the_weight_in_force():
    batch, (h, W, ht, Wt) = paired_batch(), states()
    obj = objective("uld", alpha=0.8, schedule=ScheduleConfig(kind="linear", final=0.2))
    assert obj.set_progress(0.5) == {"alpha": pytest.approx(0.5)}
    got, *_ = run(obj, batch, h, W, ht, Wt)
    want, *_ = reference_of("uld", batch, h, W, ht, Wt, alpha=0.5)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert objective("uld").set_progress(0.5) == {}


@pytest.mark.parametrize(
    "loss,pairing", [("uld", "start"), ("uld", "index"), ("gold", "start"), ("gold", "index"), ("alm", "start")]
)
def test_another_pairing_of_rows_gives_another_value(loss, pairing):
    """The alignment splits words on both sides (chunks of 2 and 3 tokens): pairing the chunk's first rows, or
    the c-th rows of each side, instead of the rows before the chunk changes the value, so the tests above
    would see it. (ALM reads each chunk's own tokens, no pair of rows: `start` reads token k's
    log-probability at row k instead of k-1 on both sides.)"""
    batch, (h, W, ht, Wt) = paired_batch(), states()
    got, *_ = run(objective(loss, alpha=1.0), batch, h, W, ht, Wt)
    if loss == "alm":  # ALM with each side's token k read at row k (not k-1): a student shifted by one row
        h_shift = torch.roll(h, -1, dims=1)
        ht_shift = torch.roll(ht, -1, dims=1)
        wrong, *_ = reference_of(loss, batch, h_shift, W, ht_shift, Wt, alpha=1.0)
    else:
        wrong, *_ = reference_of(loss, batch, h, W, ht, Wt, alpha=1.0, pairing=pairing)
    assert abs(float(wrong) - float(got)) > 1e-2 * float(got)


def test_backward_scales_the_gradients_by_the_incoming_one():
    """The loop backpropagates loss / (the step's target count): both gradients scale with it, once."""
    batch, (h, W, ht, Wt) = paired_batch(), states()
    _, _, _, gh, gW = run(objective("uld"), batch, h, W, ht, Wt)
    hg, Wg = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    student = StudentOutputs(final_hidden=hg, hidden={}, head_weight=Wg)
    loss, _, _ = objective("uld")(batch, student, TeacherSignals(source=OnlineLogits(ht, Wt)))
    (loss / 13).backward()
    torch.testing.assert_close(hg.grad, gh / 13, rtol=1e-12, atol=0)
    torch.testing.assert_close(Wg.grad, gW / 13, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="one backward"):
        loss2, _, _ = objective("uld")(batch, student, TeacherSignals(source=OnlineLogits(ht, Wt)))
        loss2.backward(retain_graph=True)
        loss2.backward()


def test_no_grad_gives_the_value_and_builds_no_gradient():
    batch, (h, W, ht, Wt) = paired_batch(), states()
    want, *_ = reference_of("alm", batch, h, W, ht, Wt)
    hg = h.clone().requires_grad_(True)
    student = StudentOutputs(final_hidden=hg, hidden={}, head_weight=W, softcap=None)
    with torch.no_grad():
        got, _, _ = objective("alm")(batch, student, TeacherSignals(source=OnlineLogits(ht, Wt)))
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert not got.requires_grad and hg.grad is None


def test_a_frozen_head_gets_no_gradient_and_h_the_same():
    batch, (h, W, ht, Wt) = paired_batch(), states()
    _, _, _, gh, _ = run(objective("gold"), batch, h, W, ht, Wt)
    hg = h.clone().requires_grad_(True)
    student = StudentOutputs(final_hidden=hg, hidden={}, head_weight=W, softcap=None)  # W: no requires_grad
    loss, _, _ = objective("gold")(batch, student, TeacherSignals(source=OnlineLogits(ht, Wt)))
    loss.backward()
    torch.testing.assert_close(hg.grad, gh, rtol=1e-12, atol=0)


def test_a_low_precision_head_matmul_stays_close():
    batch, (h, W, ht, Wt) = paired_batch(), states()
    h32, W32, ht32, Wt32 = (x.float() for x in (h, W, ht, Wt))
    exact, *_ = run(objective("uld"), batch, h32, W32, ht32, Wt32)
    low, _, _, gh, _ = run(objective("uld", matmul_dtype=torch.bfloat16), batch, h32, W32, ht32, Wt32)
    assert low.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=0)


def test_at_rows_is_the_full_logits_at_those_rows():
    _, _, ht, Wt = states()
    rows = torch.tensor([5, 0, 21, 12, 5])
    for cap in (None, 2.5):
        got = OnlineLogits(ht, Wt, cap).at_rows(rows)
        want = capped(ht.reshape(-1, D_T) @ Wt.T, cap)[rows]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert OnlineLogits(ht.float(), Wt.float()).at_rows(rows).dtype == torch.float32


def test_row_blocks_cover_the_rows_and_never_cut_a_span():
    g = np.random.default_rng(0)
    for _ in range(30):
        lengths = g.integers(1, 5, 12)
        gaps = g.integers(0, 3, 12)
        start = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
        end = start + lengths
        n_rows = int(end[-1] + g.integers(0, 4))
        for block in (1, 2, 3, 7, 1000):
            blocks = row_blocks(start, end, n_rows=n_rows, block_rows=block)
            assert blocks[0].rows.start == 0 and blocks[-1].rows.stop == n_rows
            assert all(a.rows.stop == b.rows.start for a, b in zip(blocks, blocks[1:]))
            assert all(b.rows.stop - b.rows.start >= min(block, n_rows - b.rows.start) for b in blocks)
            seen = []
            for blk in blocks:
                for c in range(blk.chunks.start, blk.chunks.stop):  # its spans lie inside it
                    assert blk.rows.start <= start[c] and end[c] <= blk.rows.stop
                    seen.append(c)
            assert seen == list(range(12))


def test_gold_refuses_a_missing_or_empty_shared_vocabulary():
    empty = SharedVocab(np.zeros(0, np.int64), np.zeros(0, np.int64), teacher_vocab_size=V_T, student_vocab_size=V_S)
    with pytest.raises(ValueError, match="SharedVocab.*empty"):
        CrossTokLogitObjective(loss="gold", alpha=0.5, vocab=empty)
    with pytest.raises(ValueError, match="SharedVocab.*missing"):
        CrossTokLogitObjective(loss="gold", alpha=0.5)
    with pytest.raises(ValueError, match="not one of"):
        CrossTokLogitObjective(loss="sinkhorn", alpha=0.5)


def test_a_batch_without_pairs_or_an_offline_teacher_is_refused():
    batch, (h, W, ht, Wt) = paired_batch(), states()
    student = StudentOutputs(final_hidden=h, hidden={}, head_weight=W)
    with pytest.raises(ValueError, match="OnlineLogits"):
        objective("uld")(batch, student, TeacherSignals())
    from hld.data.packing import Batch

    with pytest.raises(ValueError, match="paired windows"):
        objective("uld")(Batch(batch.input_ids, batch.labels), student, TeacherSignals(source=OnlineLogits(ht, Wt)))


# --------------------------------------------------------------------------- the hidden objective

PAIRS = [(1, 2), (2, 3)]


def hidden_states(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    s = {i: torch.randn(2, T_S, D_S, generator=g, dtype=torch.float64) for i in (1, 2)}
    t = {i: torch.randn(2, T_T, D_T, generator=g, dtype=torch.float64) * 2 + 0.5 for i in (2, 3)}
    return s, t


def pooled_by_hand(x, bounds, how):
    """(per window, a list of pooled vectors, one per chunk) by a loop over the window's chunk bounds."""
    out = []
    for b, bd in enumerate(bounds):
        rows = [x[b, bd[c] : bd[c + 1]] for c in range(len(bd) - 1)]
        out.append([r[-1] if how == "last" else r.mean(0) for r in rows])
    return out


def hidden_run(obj, batch, s_states, t_states):
    s_states = {i: v.detach().clone().requires_grad_(True) for i, v in s_states.items()}
    student = StudentOutputs(final_hidden=torch.zeros(2, T_S, D_S), hidden=s_states, head_weight=torch.zeros(1, 1))
    loss, n, metrics = obj(batch, student, TeacherSignals(hidden=t_states))
    loss.backward()
    return loss.detach(), n, metrics, {i: v.grad for i, v in s_states.items()}


@pytest.mark.parametrize("how", ["last", "mean"])
@pytest.mark.parametrize("skip_first", [True, False])
def test_hidden_objective_is_pooling_projecting_and_mse_by_hand(how, skip_first):
    batch = paired_batch()
    s_states, t_states = hidden_states()
    proj = Projectors(PAIRS, d_student=D_S, d_teacher=D_T, seed=3).double()
    obj = CrossTokHiddenObjective(
        proj, pooling=how, loss="mse", normalize_teacher="rms", beta=0.7, skip_first_position=skip_first
    )
    got, n, metrics, grads = hidden_run(obj, batch, s_states, t_states)
    s_ref = {i: v.detach().clone().requires_grad_(True) for i, v in s_states.items()}
    total = torch.zeros((), dtype=torch.float64)
    for s, t in PAIRS:
        P = proj.proj[pair_key((s, t))].weight.detach()  # (d_t, d_s)
        ps = pooled_by_hand(s_ref[s], [b[1] for b in BOUNDS], how)
        pt = pooled_by_hand(t_states[t], [b[0] for b in BOUNDS], how)
        for b in range(2):
            for c in range(1 if skip_first else 0, len(ps[b])):
                y = pt[b][c]
                y = y / torch.sqrt((y * y).mean() + 1e-6)
                total = total + ((P @ ps[b][c] - y) ** 2).mean()
    want = 0.7 * total / 2
    want.backward()
    assert n == batch.n_targets
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["hidden"].double(), (total / 2).detach(), rtol=1e-5, atol=1e-7)
    for i in (1, 2):
        torch.testing.assert_close(grads[i], s_ref[i].grad, rtol=1e-4, atol=1e-7)
    # padding rows and, with skip_first, the BOS rows get no gradient
    for b, (_, sb) in enumerate(BOUNDS):
        assert float(grads[1][b, sb[-1] :].abs().max()) == 0.0
        assert (float(grads[1][b, 0].abs().max()) == 0.0) == skip_first


def test_skipping_the_first_chunk_drops_exactly_the_bos_pairs():
    batch = paired_batch()
    s_states, t_states = hidden_states()
    proj = Projectors(PAIRS, d_student=D_S, d_teacher=D_T, seed=3).double()

    def value(skip):
        obj = CrossTokHiddenObjective(proj, loss="mse", normalize_teacher="none", beta=1.0, skip_first_position=skip)
        return float(hidden_run(obj, batch, s_states, t_states)[0])

    bos = 0.0  # the BOS pairs' own terms, by hand
    for s, t in PAIRS:
        P = proj.proj[pair_key((s, t))].weight.detach()
        for b in range(2):
            bos += float(((P @ s_states[s][b, 0] - t_states[t][b, 0].float().double()) ** 2).mean())
    assert value(False) - value(True) == pytest.approx(bos / 2, rel=1e-5)
    assert bos > 0.1


def test_standardize_applies_the_layer_statistics_to_the_pooled_states():
    batch = paired_batch()
    s_states, t_states = hidden_states()
    proj = Projectors(PAIRS[:1], d_student=D_S, d_teacher=D_T, seed=3).double()
    obj = CrossTokHiddenObjective(
        proj, pooling="mean", loss="mse", normalize_teacher="standardize", beta=1.0, skip_first_position=True
    )
    mean, std = torch.linspace(-1, 1, D_T), torch.linspace(0.5, 2.0, D_T)
    obj.stats = {2: Moments(mean=mean, std=std, count=100)}
    got = hidden_run(obj, batch, s_states, t_states)[0]
    P = proj.proj[pair_key((1, 2))].weight.detach()
    ps = pooled_by_hand(s_states[1], [b[1] for b in BOUNDS], "mean")
    pt = pooled_by_hand(t_states[2], [b[0] for b in BOUNDS], "mean")
    want = sum(
        float(((P @ ps[b][c] - (pt[b][c] - mean.double()) / std.double()) ** 2).mean())
        for b in range(2)
        for c in range(1, len(ps[b]))
    )
    assert float(got) == pytest.approx(want, rel=1e-5)


def relation_by_hand(xs: list, ys: list) -> float:
    """One window's chunks: sum over queries i of mean over keys j <= i of (cos_s(i, j) - cos_t(i, j))^2."""
    total = 0.0
    for i in range(len(xs)):
        terms = [
            (float(F.cosine_similarity(xs[i], xs[j], 0)) - float(F.cosine_similarity(ys[i], ys[j], 0))) ** 2
            for j in range(i + 1)
        ]
        total += sum(terms) / len(terms)
    return total


def test_relation_relates_the_chunks_of_one_window_only():
    """The (B, C) layout: a loss over positions of a window sees each window's chunks, never another's."""
    batch = paired_batch()
    s_states, t_states = hidden_states()
    proj = Projectors(PAIRS[:1], d_student=D_S, d_teacher=D_T, linear=False)
    obj = CrossTokHiddenObjective(
        proj, pooling="last", loss="relation", normalize_teacher="none", beta=1.0, skip_first_position=True
    )
    got = float(hidden_run(obj, batch, s_states, t_states)[0])
    ps = pooled_by_hand(s_states[1], [b[1] for b in BOUNDS], "last")
    pt = pooled_by_hand(t_states[2], [b[0] for b in BOUNDS], "last")
    per_window = sum(relation_by_hand(ps[b][1:], pt[b][1:]) for b in range(2))
    one_row = relation_by_hand(ps[0][1:] + ps[1][1:], pt[0][1:] + pt[1][1:])  # the windows run together
    assert got == pytest.approx(per_window, rel=1e-5)
    assert abs(one_row - per_window) > 0.05


# --------------------------------------------------------------------------- protocol and plans


def test_protocol_attributes():
    obj = objective("alm")
    assert obj.needs == Needs(logits=True) and obj.uses_head and obj.student_layers == () and obj.n_pairs == 0
    assert obj.cost_dims(128) == ()
    proj = Projectors(PAIRS, d_student=D_S, d_teacher=D_T)
    hid = CrossTokHiddenObjective(proj, loss="mse", normalize_teacher="rms", beta=1.0)
    same = HiddenObjective(proj, loss="mse", normalize_teacher="rms", beta=1.0)
    assert hid.needs == Needs(layers=(2, 3)) and hid.student_layers == (1, 2) and hid.n_pairs == 2
    assert not hid.uses_head and hid.cost_dims(128) == same.cost_dims(128) == ((D_S, D_T),) * 2
    with pytest.raises(ValueError, match="pooling"):
        CrossTokHiddenObjective(proj, pooling="max", loss="mse", normalize_teacher="rms", beta=1.0)


@pytest.mark.parametrize("method", ["ce", "kd", "hld-joint", "hld-first"])
def test_build_cross_plan_per_method(method):
    cfg = ObjectiveConfig(method=method, alpha=0.4, temperature=2.0, divergence="reverse_kl", hidden=HiddenConfig())
    proj = Projectors(PAIRS, d_student=D_S, d_teacher=D_T)
    plan = build_cross_plan(
        cfg, projectors=proj, vocab=shared_vocab(), loss="gold", uld_top_k=7, pooling="mean", chunk_tokens=5
    )
    names = [ph.name for ph in plan.phases]
    objs = [ph.objective for ph in plan.phases]
    if method == "ce":
        assert names == ["ce"] and isinstance(objs[0], LogitObjective) and not plan.needs.any
        return
    kd = objs[-1] if method != "hld-joint" else objs[0].parts[0]
    assert isinstance(kd, CrossTokLogitObjective)
    assert (kd.loss, kd.alpha, kd.temperature, kd.divergence.name, kd.uld_top_k, kd.block_rows) == (
        "gold",
        0.4,
        2.0,
        "reverse_kl",
        7,
        5,
    )
    if method == "kd":
        assert names == ["kd"] and plan.needs == Needs(logits=True)
        return
    hidden = objs[0] if method == "hld-first" else objs[0].parts[1]
    assert isinstance(hidden, CrossTokHiddenObjective) and hidden.pooling == "mean"
    assert hidden.skip_first == cfg.hidden.skip_first_position
    if method == "hld-joint":
        assert names == ["hld-joint"] and isinstance(objs[0], SumObjective)
    else:
        assert names == ["hidden", "kd"] and plan.phases[0].until_share == cfg.hidden.first_share
    assert plan.needs == Needs(logits=True, layers=(2, 3))
