"""The sampled teacher signal (Random-Sampling KD, distill/sampled.py): its estimator is unbiased
(value's cross-entropy part and gradient, over many draws, against float64 numpy), tends to the exact
KL with many draws, is computed by the fused chunked head as a direct float64 computation from the
stored (ids, weights) gives, and round-trips through the cache: the ids and weights the builder drew,
the same bytes on a rebuild, in parts, at another batch size; a top-k cache is refused where sampled is
configured, and a damaged sampled field at read."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from helpers import cache_arrays
from hld.cache.codec import Codec
from hld.cache.meta import cache_identity, signal_identity
from hld.cache.reader import CachedTeacher
from hld.cache.writer import build_cache
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.losses import kd_sum
from hld.distill.signals import Needs
from hld.distill.signals.online import OnlineTeacher
from hld.distill.signals.sampled import Sampled, draw, estimate_kl_rows, unique_counts, weights
from hld.errors import HldError

V = 40


def _problem(seed: int = 0):
    """Teacher logits z (V,), student logits (V,) as float64 numpy, p = softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, V)
    zs = rng.normal(0, 1.5, V)
    return z, zs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(z: np.ndarray, *, K: int, M: int, tau: float, normalise: bool = True, seed: int = 1):
    """M independent draws of K ids from softmax(z / tau): ids (M, K) and weights (M, K) float64."""
    u = np.random.default_rng(seed).random((M, K))
    zt = torch.from_numpy(np.tile(z, (M, 1)))
    uid, counts = unique_counts(draw(zt, u, tau=tau).numpy(), slots=K)
    lr = None
    if tau != 1:  # the exact log p/q (the unnormalised estimator needs it exact)
        logp = np.log(_softmax(z))
        logq = np.log(_softmax(z / tau))
        lr = (logp - logq)[uid]
    return uid, weights(counts, lr, normalise=normalise)


def _estimates(uid: np.ndarray, w: np.ndarray, zs: np.ndarray):
    """Per draw: the cross-entropy part -sum_i w_i log s_i (M,) and its gradient w.r.t. the student's
    logits (M, V), by autograd in float64."""
    M = len(uid)
    s = torch.from_numpy(np.tile(zs, (M, 1))).requires_grad_(True)
    logs = torch.log_softmax(s, -1)
    wt = torch.from_numpy(w)
    ce = -(wt * logs.gather(-1, torch.from_numpy(uid))).sum(-1)  # (M,)
    (grad,) = torch.autograd.grad(ce.sum(), s)
    return ce.detach().numpy(), grad.numpy()


def _assert_mean(samples: np.ndarray, target: np.ndarray, *, sigmas: float = 5.0) -> None:
    """The mean over axis 0 within `sigmas` standard errors of `target` (elementwise)."""
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    assert np.all(np.abs(mean - target) <= sigmas * se + 1e-12), np.max(np.abs(mean - target) / (se + 1e-300))


@pytest.mark.parametrize("K", [1, 4, 12])
def test_the_estimate_is_unbiased_at_tau_1(K):
    """E[-sum w log s] = H(p, s) and E[grad] = s - p (the full-distribution KD gradient), any K."""
    z, zs = _problem()
    p, s = _softmax(z), _softmax(zs)
    uid, w = _draws(z, K=K, M=20000, tau=1.0)
    assert np.allclose(w.sum(1), 1) and np.allclose(w * K, np.rint(w * K))  # weights = counts / K
    ce, grad = _estimates(uid, w, zs)
    _assert_mean(ce, -(p * np.log(s)).sum())
    _assert_mean(grad, s - p)


@pytest.mark.parametrize("tau", [1.5, 3.0])  # tau < 1: ids of the tail are almost never drawn (heavy-tailed weights)
def test_the_unnormalised_importance_weights_are_unbiased_at_another_tau(tau):
    """Drawn from q = softmax(z / tau), weighted (c_i / K) p_i / q_i: the same expectations."""
    z, zs = _problem(1)
    p, s = _softmax(z), _softmax(zs)
    uid, w = _draws(z, K=6, M=20000, tau=tau, normalise=False)
    ce, grad = _estimates(uid, w, zs)
    _assert_mean(ce, -(p * np.log(s)).sum())
    # the gradient of -sum w log s is (sum w) s - w; its mean is s - p
    _assert_mean(grad, s - p)


def test_the_stored_normalised_weights_at_another_tau_are_consistent():
    """Self-normalised (what the cache stores): a bias that shrinks as K grows (O(1/K))."""
    z, zs = _problem(2)
    p, s = _softmax(z), _softmax(zs)
    errs = []
    for K in (2, 64):
        uid, w = _draws(z, K=K, M=8000, tau=2.0)
        assert np.allclose(w.sum(1), 1)
        _, grad = _estimates(uid, w, zs)
        errs.append(np.abs(grad.mean(0) - (s - p)).max())
    assert errs[1] < errs[0] / 5 and errs[1] < 0.01


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_many_draws_tend_to_the_exact_kl(tau):
    z, zs = _problem(3)
    p, s = _softmax(z), _softmax(zs)
    exact = (p * (np.log(p) - np.log(s))).sum()
    uid, w = _draws(z, K=200_000, M=1, tau=tau)
    est = estimate_kl_rows(
        torch.log_softmax(torch.from_numpy(zs)[None], -1), torch.from_numpy(uid), torch.from_numpy(w)
    )
    assert abs(float(est[0]) - exact) < 5e-3


def _reference(h, W, y, m, ids, w, *, ce_weight, kd_weight, cap=None):
    """w_ce * CE + w_kd * sum_i w_i (log w_i - log s_i) over valid rows, in float64 with autograd."""
    h64 = h.double().requires_grad_(True)
    W64 = W.double().requires_grad_(True)
    z = h64 @ W64.T
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    logs = torch.log_softmax(z, -1)
    ce = -logs.gather(-1, y[:, None].clamp_min(0))[:, 0]
    w64 = w.double()
    kd = (torch.xlogy(w64, w64) - w64 * logs.gather(-1, ids.long())).sum(-1)
    total = (torch.where(m, ce_weight * ce + kd_weight * kd, 0.0)).sum()
    gh, gW = torch.autograd.grad(total, (h64, W64))
    return float(total.detach()), gh, gW


@pytest.mark.parametrize("cap", [None, 5.0])  # None: the hand-derived fast path; a softcap: autograd over kd_sum
def test_the_fused_head_loss_equals_a_direct_float64_computation(cap):
    from hld.distill.signals import TeacherSignals

    torch.manual_seed(0)
    N, d, K = 21, 16, 5
    h = torch.randn(N, d)
    W = torch.randn(V, d) * 0.5
    y = torch.randint(0, V, (N,))
    m = torch.rand(N) > 0.2
    z_t = torch.randn(N, V) * 2
    uid, counts = unique_counts(draw(z_t, np.random.default_rng(0).random((N, K)), tau=1.0).numpy(), slots=K)
    assert (counts == 0).any()  # padding slots (id 0, weight 0) are exercised
    ids = torch.from_numpy(uid).int()
    w = torch.from_numpy(weights(counts, None)).float()
    sig = TeacherSignals(source=Sampled(indices=ids, weights=w))  # int32 ids, as a cache reads them
    spec = HeadLossSpec(ce_weight=0.3, kd_weight=0.7, chunk_tokens=8, softcap=cap)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    total, stats = head_loss(hh, WW, y, m, spec, sig.logits)
    total.backward()
    ref, gh, gW = _reference(h, W, y, m, ids, w, ce_weight=0.3, kd_weight=0.7, cap=cap)
    assert float(total.detach()) == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(hh.grad.double(), gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(WW.grad.double(), gW, rtol=1e-4, atol=1e-5)
    # and the unfused kd_sum gives the same KD sum
    kd = kd_sum(h @ W.T if cap is None else cap * torch.tanh(h @ W.T / cap), Sampled(indices=ids.long(), weights=w), m)
    assert stats["kd"] == pytest.approx(float(kd), rel=1e-5)


# ------------------------------------------------------------------------------------ the cache

SAMPLED = {"cache_signal": "sampled", "cache_samples": 6, "cache_proposal_temperature": 1.0}


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    cfg, loaded, windows = tiny_teacher
    ids = np.arange(3, 23)  # 20 windows
    kw = dict(teacher=loaded.identity, tokenizer=loaded.tokenizer, seq_len=cfg.data.seq_len, train_windows=windows)
    return loaded.model, windows, ids, kw


def _build(setup, out, *, signal=SAMPLED, part=(0, 1), batch_size=8):
    lm, windows, ids, kw = setup
    sampled = signal.get("cache_signal") == "sampled"
    ident = cache_identity(**kw, layers=[], top_k=signal["cache_samples"] if sampled else 16, **signal)
    codec = Codec(logits="sampled" if sampled else "exact")
    build_cache(
        lm,
        windows,
        ids,
        out,
        identity=ident,
        codec=codec,
        part=part,
        shard_windows=3,
        batch_size=batch_size,
        quiet=True,
    )
    return ident


def test_a_sampled_cache_reads_back_what_the_builder_drew(tmp_path, setup):
    from hld.distill.signals.sampled import sampled_rows

    lm, windows, ids, kw = setup
    ident = _build(setup, tmp_path / "c")
    T = windows.shape[1]
    got = CachedTeacher(tmp_path / "c", expect=ident).read(ids, T, Needs(logits=True))
    x = torch.from_numpy(np.asarray(windows[ids])).long()
    sig = OnlineTeacher(lm).signals(x, Needs(logits=True))
    want_ids, want_w = sampled_rows(lambda r: sig.source.rows(r).logits, ids, T, samples=6, tau=1.0, slots=6)
    assert isinstance(got.source, Sampled)
    assert got.source.weights.element_size() + got.source.indices.element_size() == Sampled.decoded_entry_bytes(None)
    assert torch.equal(got.source.indices, want_ids)
    assert torch.equal(got.source.weights, want_w)
    w = got.source.weights.double()
    assert torch.allclose(w.sum(-1), torch.ones(()).double())
    assert ((w * 6 - (w * 6).round()).abs() < 1e-6).all()  # counts / K (float32)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["codec"]["logits"] == "sampled" and m["identity"]["cache_samples"] == 6
    assert set(m["shards"][0]["fields"]) == {"tokens", "sampled_ids", "sampled_weights"}


def test_a_sampled_cache_is_the_same_on_rebuild_in_parts_and_at_another_batch_size(tmp_path, setup):
    _build(setup, tmp_path / "a")
    _build(setup, tmp_path / "b", batch_size=3)
    for i in range(2):
        _build(setup, tmp_path / "parts", part=(i, 2))
    assert cache_arrays(tmp_path / "a") == cache_arrays(tmp_path / "b") == cache_arrays(tmp_path / "parts")
    tau = {**SAMPLED, "cache_proposal_temperature": 2.0}
    _build(setup, tmp_path / "tau", signal=tau)
    assert cache_arrays(tmp_path / "tau") != cache_arrays(tmp_path / "a")


def test_a_topk_cache_is_refused_where_sampled_is_configured(tmp_path, setup):
    lm, windows, ids, kw = setup
    topk = _build(setup, tmp_path / "topk", signal={})
    sampled = cache_identity(**kw, layers=[], top_k=0, **SAMPLED)
    with pytest.raises(HldError, match=r"another cache_signal \('topk', this run needs 'sampled'\)") as exc:
        CachedTeacher(tmp_path / "topk", expect=sampled)
    assert "\n" not in exc.value.line() and exc.value.fix
    _build(setup, tmp_path / "s")
    with pytest.raises(HldError, match=r"another cache_signal \('sampled', this run needs 'topk'\)"):
        CachedTeacher(tmp_path / "s", expect=topk)
    other = cache_identity(**kw, layers=[], top_k=0, **{**SAMPLED, "cache_samples": 12})
    with pytest.raises(HldError, match="another cache_samples"):
        CachedTeacher(tmp_path / "s", expect=other)


def test_signal_identity_of_a_config():
    from hld.config import load_config

    assert signal_identity(load_config("smoke").teacher) == {}
    t = load_config("smoke", ["teacher.cache_signal=sampled", "teacher.cache_samples=12"]).teacher
    assert signal_identity(t) == {"cache_signal": "sampled", "cache_samples": 12, "cache_proposal_temperature": 1.0}


def test_a_damaged_sampled_field_is_refused_at_read(tmp_path, setup):
    lm, windows, ids, kw = setup
    ident = _build(setup, tmp_path / "c")
    d = tmp_path / "c"
    m = json.loads((d / "manifest.json").read_text())
    f = m["shards"][1]["fields"]["sampled_weights"]
    path = d / "parts" / "p00000of00001.sampled_weights.bin"
    data = bytearray(path.read_bytes())
    data[f["offset"] + 1] ^= 0x01  # a weight a little off: only the checksum sees it
    path.write_bytes(bytes(data))
    t = CachedTeacher(d, expect=ident)
    t.read(ids[:3], 32, Needs(logits=True))  # shard 0 reads fine
    with pytest.raises(HldError, match=r"cache shard 1 \(sampled_weights.*corrupt"):
        t.read(ids[3:4], 32, Needs(logits=True))
    # weights that are no distribution, their checksum rewritten to match: the read's own check
    data[f["offset"] + 1] ^= 0x01
    data[f["offset"] + 3] = 0x7F  # the first weight's top byte: a huge (or nan) float32
    path.write_bytes(bytes(data))
    m["shards"][1]["fields"]["sampled_weights"]["sha256"] = hashlib.sha256(
        bytes(data[f["offset"] : f["offset"] + f["nbytes"]])
    ).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "verified.jsonl").unlink(missing_ok=True)
    with pytest.raises(HldError, match="sampled weights that are not a distribution") as exc:
        CachedTeacher(d, expect=ident).read(ids[3:4], 32, Needs(logits=True))
    assert "\n" not in exc.value.line()


def test_fidelity_measures_a_sampled_signal_as_kl_from_it_to_the_teacher():
    """KL(w || p) = sum_i w_i log(w_i / p_i), float64 numpy; it falls as the draws grow; named with its direction."""
    from hld.study.references import completion_kl, describe

    z, _ = _problem(4)
    p = _softmax(z)
    kls = []
    for K in (4, 64, 4096):
        uid, w = _draws(z, K=K, M=50, tau=1.0)
        sig = Sampled(indices=torch.from_numpy(uid), weights=torch.from_numpy(w).float())
        got = completion_kl(torch.from_numpy(np.tile(z, (50, 1))).float(), sig).numpy()
        w32 = w.astype(np.float32).astype(np.float64)
        want = np.where(w32 > 0, w32 * (np.log(np.where(w32 > 0, w32, 1)) - np.log(p[uid])), 0).sum(1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        kls.append(want.mean())
    assert kls[0] > kls[1] > kls[2] > 0
    key = {"cache_signal": "sampled", "cache_samples": 12, "cache_proposal_temperature": 1.0, "source": "cache"}
    assert describe(key) == "cache sampled, 12 draws/token (tau 1), KL(signal ‖ full)"


@pytest.mark.parametrize("V", [40, 3000, 2048])
def test_draws_are_the_inverse_cdf_of_q_in_float64(V):
    """The two-level search (block masses, then inside the block) against numpy's one-level inverse
    CDF of the same q: np.cumsum in float64 and searchsorted to the right of u * total. V below a
    block, not a multiple of it, and a multiple."""
    rng = np.random.default_rng(V)
    z = torch.from_numpy(rng.normal(0, 3.0, (64, V)))
    u = rng.random((64, 12))
    for tau in (1.0, 2.0):
        q = torch.softmax(z.float() / tau, dim=-1).double().numpy()
        cdf = np.cumsum(q, axis=1)
        want = np.stack([np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="right") for i in range(len(q))])
        np.testing.assert_array_equal(draw(z, u, tau=tau).numpy(), np.minimum(want, V - 1))


def test_an_id_of_zero_mass_is_never_drawn_even_at_the_ends_of_u():
    """Ids whose softmax underflows to 0 (in float32) lie at the start, the middle, a block's edge and
    the end; u = 0 and u just below 1 draw the first and the last id of non-zero mass."""
    V = 2500
    z = torch.full((3, V), -1.0e4)
    live = [5, 1023, 1024, 1500, 2400]
    z[:, live] = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    u = np.array([[0.0, 1 - 1e-16, 0.5, 0.25], [0.999, 0.001, 0.75, 0.6], [0.3, 0.31, 0.32, 0.9]])
    got = draw(z, u, tau=1.0)
    assert set(got.flatten().tolist()) <= set(live)
    assert got[0, 0] == live[0] and got[0, 1] == live[-1]


def test_a_draw_at_a_block_edge_stays_in_its_block_despite_rounding():
    """u just below a block's cumulative mass: the cumulative sum across blocks and the one inside the
    block round differently, and the search inside can run past the block's end. Each block's first id
    has zero mass here, so running into the next block would draw an id of zero mass."""
    from hld.distill.signals.sampled import BLOCK

    nb = 8
    z = torch.from_numpy(np.random.default_rng(0).normal(0, 4.0, (1, nb * BLOCK)))
    z[0, ::BLOCK] = -1.0e4
    q = torch.softmax(z.float(), dim=-1)
    bcdf = torch.cumsum(q.view(1, nb, BLOCK).sum(-1, dtype=torch.float64), dim=-1)[0].numpy()
    u = np.array([[np.nextafter(bcdf[j] / bcdf[-1], 0) - k * 1e-17 for j in range(nb - 1) for k in range(1, 40)]])
    got = draw(z, u, tau=1.0)[0]
    assert (q[0, got] > 0).all()


def test_a_uniform_exactly_at_a_block_edge_draws_the_next_blocks_first_id():
    """The first id whose cumulative mass exceeds u * total: with V = 2048 equal logits every cumulative mass
    (i + 1) / 2048 is exact in float64, and u = 1/2 lands exactly on the first block's end, so the id is 1024
    (the first of the second block), not 1023; u = 1/4 gives 512 inside the first block."""
    z = torch.zeros(1, 2048)
    assert draw(z, np.array([[0.5, 0.25, 0.0]]), tau=1.0).tolist() == [[1024, 512, 0]]


def test_importance_weights_survive_log_ratios_far_from_zero():
    """Normalised weights c_i exp(lr_i) / sum_j c_j exp(lr_j) over the drawn slots only (padding slots, count 0,
    may hold any log-ratio), computed here as a softmax of log c + lr in float64 per row: rows whose log-ratios
    are near +800 or -800 (exp over- or underflows without the row's max taken out), and a padding slot far
    above the drawn ones."""
    from scipy.special import softmax

    counts = np.array([[3, 1, 2, 0], [1, 1, 4, 0], [2, 2, 0, 0]])  # 3 rows, 4 slots
    lr = np.array([[800.0, 801.5, 799.0, 5000.0], [-800.0, -803.0, -799.5, 0.0], [0.3, -0.2, 9999.0, 9999.0]])
    got = weights(counts, lr)
    for r in range(3):
        drawn = counts[r] > 0
        want = np.zeros(4)
        want[drawn] = softmax(np.log(counts[r][drawn]) + lr[r][drawn])
        np.testing.assert_allclose(got[r], want, rtol=1e-12, atol=0)
    raw = weights(counts[2:], lr[2:], normalise=False)  # (c_i / K) exp(lr_i), 0 in padding whatever its lr
    np.testing.assert_allclose(raw[0], [0.5 * np.exp(0.3), 0.5 * np.exp(-0.2), 0.0, 0.0], rtol=1e-12)


def test_sampled_fidelity_at_a_temperature_and_its_cache_entry_size():
    """Sampled.fidelity(full, T) = sum_i w_i log(w_i / p_i) with p = softmax(full / T), float64 numpy; a cached
    token is k slots of an int32 id and a float32 weight: 8 k bytes, estimated and bounded alike."""
    rng = np.random.default_rng(7)
    full = rng.normal(0, 2.0, (3, 30))
    ids = np.array([[1, 4, 9], [0, 2, 29], [5, 6, 7]])
    w = np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    sig = Sampled(indices=torch.from_numpy(ids), weights=torch.from_numpy(w).float())
    for T in (1.0, 2.0):
        logp = full / T - np.log(np.exp(full / T).sum(1, keepdims=True))  # (3, 30) log-softmax of each row
        w32 = w.astype(np.float32).astype(np.float64)
        terms = np.where(w32 > 0, w32 * (np.log(np.where(w32 > 0, w32, 1)) - np.take_along_axis(logp, ids, 1)), 0.0)
        got = sig.fidelity(torch.from_numpy(full), T, "bucket").numpy()
        np.testing.assert_allclose(got, terms.sum(1), rtol=1e-9)
    assert Sampled.cache_logit_bytes(None, 5, 32, 1000) == (40.0, 40.0)


def test_weights_that_are_no_distribution_are_refused_and_other_divergences_too():
    """from_cache: finite, non-negative weights summing to 1.5 are no distribution; kd_rows: the sampled
    signal estimates forward KL only."""
    from hld.distill.divergences.registry import parse

    ids = np.array([[1, 2]], dtype=np.int32)
    with pytest.raises(ValueError, match="^holds sampled weights that are not a distribution per token$"):
        Sampled.from_cache(np.array([[1.0, 0.5]], dtype=np.float32), ids, None)
    Sampled.from_cache(np.array([[0.75, 0.25]], dtype=np.float32), ids, None)  # one that is
    sig = Sampled(indices=torch.tensor([[1, 2]]), weights=torch.tensor([[0.75, 0.25]]))
    logq = torch.log_softmax(torch.zeros(1, 4), -1)
    want = r"^a sampled teacher signal estimates forward_kl only, not 'jsd\(beta=0.5\)'$"
    with pytest.raises(ValueError, match=want):
        sig.kd_rows(logq, logq, 1.0, parse("jsd"), "bucket")


@pytest.mark.parametrize("V", [40, 3000])
def test_uniforms_a_hair_either_side_of_a_cumulative_mass_draw_as_the_float64_inverse_cdf(V):
    """u * total within 1e-10 (relative) below and above the cumulative mass of ids inside blocks and at
    blocks' ends: numpy's float64 inverse CDF of the same q decides. The block sums, the cumulative sums
    inside a block and u * total must all be float64 (in float32, or u / total, the edges move by ~1e-7)."""
    rng = np.random.default_rng(V + 1)
    z = torch.from_numpy(rng.normal(0, 3.0, (4, V)))
    q = torch.softmax(z.float(), dim=-1).double().numpy()
    cdf = np.cumsum(q, axis=1)
    ends = [j for j in (0, 7, 20, 1023, 1500, 2047) if j < V - 1]
    u = np.stack([[cdf[i, j] / cdf[i, -1] * f for j in ends for f in (1 - 1e-10, 1 + 1e-10)] for i in range(4)])
    want = np.stack([np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="right") for i in range(4)])
    np.testing.assert_array_equal(draw(z, u, tau=1.0).numpy(), np.minimum(want, V - 1))
    assert (want[:, 1::2] == want[:, ::2] + 1).all()  # each pair straddles its edge
