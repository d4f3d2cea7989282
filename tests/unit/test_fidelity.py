"""Signal fidelity: the KL from the teacher's full distribution to what a top-k signal states (its k
probabilities, the remaining mass spread evenly), against float64 numpy by hand; and measured end to
end through a cache of validation windows built and read as a study's cells build and read theirs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hld.distill.signals.online import Dense
from hld.distill.signals.topk import TopK
from hld.study.references import completion_kl, fidelity_rows, measure


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_by_hand(z: np.ndarray, values: np.ndarray, idx: np.ndarray, rest: np.ndarray, T: float) -> np.ndarray:
    """KL(softmax(z/T) || p̂) with p̂ = softmax([values, rest] / T) on the k ids + the rest spread evenly."""
    n, V = z.shape
    k = idx.shape[1]
    p = _softmax(z / T)
    q = _softmax(np.concatenate([values, rest[:, None]], 1) / T)
    out = np.zeros(n)
    for r in range(n):
        full = np.full(V, q[r, k] / (V - k))
        full[idx[r]] = q[r, :k]
        out[r] = np.sum(p[r] * (np.log(p[r]) - np.log(full)))
    return out


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_top_k_kl_matches_float64_by_hand(T):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 50)) * 3
    sig = Dense(torch.tensor(z, dtype=torch.float32)).top_k(8)
    values = sig.values.to(torch.float16).float()  # as the exact codec stores them
    sig = TopK(values=values, indices=sig.indices, rest=sig.rest)
    got = completion_kl(torch.tensor(z), sig, temperature=T).numpy()
    want = _kl_by_hand(z, values.double().numpy(), sig.indices.numpy(), sig.rest.double().numpy(), T)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (got > 0).all()
    # the measurement's convention is the loss's (the rest's log-mass tempered like a logit), in float64
    v, r = values.double().numpy(), sig.rest.double().numpy()
    for rest, x in (("bucket", np.concatenate([v, r[:, None]], 1)), ("renormalize", v)):
        want_logp = np.log(_softmax(x / T))
        assert sig.logprobs(T, rest, dtype=torch.float64).numpy() == pytest.approx(want_logp, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_dense_fidelity_at_a_temperature_is_the_kl_of_the_tempered_distributions(T):
    """Dense.fidelity(full, T): KL(softmax(full / T) || softmax(logits / T)), against float64 numpy."""
    rng = np.random.default_rng(2)
    z, y = rng.normal(size=(4, 30)) * 2, rng.normal(size=(4, 30)) * 2
    got = Dense(torch.tensor(y)).fidelity(torch.tensor(z), T, "bucket").numpy()
    p, q = _softmax(z / T), _softmax(y / T)
    assert got == pytest.approx((p * np.log(p / q)).sum(-1), rel=1e-10)


def test_a_dense_signal_and_a_renormalised_one():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    got = completion_kl(torch.tensor(z), Dense(torch.tensor(y))).numpy()
    p, q = _softmax(z), _softmax(y)
    assert got == pytest.approx((p * np.log(p / q)).sum(-1), rel=1e-10)
    assert completion_kl(torch.tensor(z), Dense(torch.tensor(z))).abs().max() < 1e-12
    top = Dense(torch.tensor(z)).top_k(5)
    assert torch.isinf(completion_kl(torch.tensor(z), top, top_k_rest="renormalize")).all()
    whole = Dense(torch.tensor(z)).top_k(19)  # 19 of 20 ids: the rest is one id, exact
    assert completion_kl(torch.tensor(z), whole).abs().max() < 1e-9


def test_cached_signal_fidelity_measured_on_validation_windows(tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    from helpers import TINY_TEACHER
    from hld.config import load_config
    from hld.train.resources import Resources

    k = 4
    cfg = load_config(
        "smoke",
        [
            *overrides,
            "objective.method=kd",
            f"teacher.cache={tmp_path / 'unused'}",
            f"teacher.cache_top_k={k}",
            "teacher.cache_codec=exact",
        ],
    )
    resources = Resources()
    got = measure(cfg, resources, tmp_path / "fidelity", windows=4)
    assert got["source"] == "cache" and got["signal"] == f"cache top-{k} + remaining mass (exact codec)"
    assert (tmp_path / "fidelity" / "manifest.json").exists()  # a cache, built as the study builds its caches
    # the reference: the teacher's logits on those validation windows, by hand in float64
    tok = resources.tokenizer(cfg.teacher.model)
    val = resources.windows(cfg.data.validation, tok, seq_len=cfg.data.seq_len, text_field=cfg.data.text_field)
    ids = np.asarray(got["window_ids"])
    assert len(ids) == 4 and len(set(ids.tolist())) == 4
    lm = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    with torch.no_grad():
        z = lm(torch.as_tensor(np.asarray(val[ids]), dtype=torch.long)).logits[:, :-1].double().numpy()
    z = z.reshape(-1, z.shape[-1])  # every position but the last predicts a token
    z32 = z.astype(np.float32)
    idx = np.argsort(-z32, 1, kind="stable")[:, :k]
    values = np.take_along_axis(z32, idx, 1).astype(np.float16).astype(np.float64)
    off = np.ones_like(z32, dtype=bool)
    np.put_along_axis(off, idx, False, 1)
    rest = np.log(np.where(off, np.exp(z - z.max(1, keepdims=True)), 0).sum(1)) + z.max(1)
    want = _kl_by_hand(z, values, idx, rest, 1.0)
    assert got["predictions"] == len(want)
    assert got["kl_per_token"] == pytest.approx(want.mean(), rel=1e-4)
    (row,) = [line for line in fidelity_rows([got]) if line.startswith("| cache")]
    assert f"{got['kl_per_token']:.4f} |" in row and f"| {len(want):,} |" in row
    # the compact codec rounds the values further: measured the same way, close to the exact one
    compact = measure(replace_codec(cfg, "compact"), resources, tmp_path / "compact", windows=4)
    assert compact["signal"] == f"cache top-{k} + remaining mass (compact codec)"
    assert compact["window_ids"] == got["window_ids"]
    assert compact["kl_per_token"] == pytest.approx(got["kl_per_token"], rel=0.05)


def replace_codec(cfg, codec: str):
    import dataclasses

    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_codec=codec))


def test_the_full_distribution_online_is_zero_without_running_the_teacher(tmp_path, overrides):
    from hld.config import load_config

    cfg = load_config("smoke", [*overrides, "objective.method=kd"])
    got = measure(cfg, resources=None, work_dir=tmp_path)
    assert got["signal"] == "online, full distribution" and got["kl_per_token"] == 0.0
    assert math.isfinite(got["kl_per_token"]) and not (tmp_path / "manifest.json").exists()


def test_top_k_kl_of_a_teacher_with_minus_inf_logits_is_finite():
    """Ids a teacher rules out (logit -inf: probability 0) add 0 to KL(p || p̂) (0 log 0 = 0): the KL by hand
    over the ids of positive probability; before, 0 * -inf made the row nan."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 40)) * 2
    z[:, -6:] = -np.inf  # off every row's top 8
    sig = Dense(torch.tensor(z, dtype=torch.float32)).top_k(8)
    got = completion_kl(torch.tensor(z), sig, temperature=1.0).numpy()
    assert np.isfinite(got).all() and (got > 0).all()
    n, V, k = 4, 40, 8
    p = _softmax(z)
    q = _softmax(np.concatenate([sig.values.double().numpy(), sig.rest.double().numpy()[:, None]], 1))
    for r in range(n):
        full = np.full(V, q[r, k] / (V - k))
        full[sig.indices.numpy()[r]] = q[r, :k]
        live = p[r] > 0
        assert got[r] == pytest.approx(np.sum(p[r, live] * (np.log(p[r, live]) - np.log(full[live]))), rel=1e-9)
