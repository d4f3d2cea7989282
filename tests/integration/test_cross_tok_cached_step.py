"""One training step of a student with its own tokenizer, its teacher online and read from a per-chunk cache on
disk (`ensure_cache`, then `build` with `teacher.cache`, which loads no teacher weights): the same batch, the
same student, and the loss and every parameter's gradient compared. alm: the same float32 numbers (rel 1e-5);
uld: the loss within its float16 bound (2^-11 + 64 * 2^-25 a chunk, times alpha) and the gradient within 1e-3
in norm (a stored p_(i) rounded past a student q_(i) flips one sign of d ULD / dq); hld-joint: the pooled states
and the statistics as the online run has them (the teacher in float32 here, its pooled states bfloat16 in the
cache: the hidden loss within 1e-3, the gradients within 2^-8).
gold's cached exact part is a top-k coarsening: its value against a float64 reference is
tests/unit/test_cross_tok_cache.py's; here the cached KD is below the online one (the chain rule) and CE is equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import hld.models.loading
import hld.train.resources
from hld.cache.build import ensure_cache
from hld.config import load_config
from hld.train.loop import build
from hld.train.resources import Resources


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory):
    from helpers import C4_TRAIN
    from hld.cli import main

    out = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["train-tokenizer", "--data", C4_TRAIN, "--vocab-size", "600", "--out", str(out), "--quiet"]) == 0
    return out


def _cfg(overrides, tok, arm, loss, *extra):
    keys = [f"student.tokenizer={tok}", f"objective.method={arm}", f"objective.cross_tokenizer.loss={loss}"]
    return load_config("smoke", [*overrides, *keys, "objective.hidden.diagnostics=false", *extra])


def _step(s):
    """Step 0's loss, metrics and every trained parameter's gradient (the loop's own pieces, one micro-batch)."""
    batch = s.order.batch(0)
    phase = s.plan.phase_for(0.0, 1e-9)
    obj = phase.objective
    student = s.runner(batch.input_ids)
    loss, n, metrics = obj(batch, student, s.teacher(batch, obj.needs) if s.teacher is not None else None)
    (loss / n).backward()
    params = dict(s.student.named_parameters())
    if s.projectors is not None:
        params |= {f"proj.{k}": p for k, p in s.projectors.named_parameters()}
    grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    return float(loss.detach()) / n, {k: float(v) / n for k, v in metrics.items()}, grads, batch


@pytest.mark.parametrize(
    "arm, loss", [("kd", "alm"), ("kd", "uld"), ("kd", "gold"), ("hld-joint", "uld"), ("hld-joint", "alm")]
)
def test_a_cached_step_is_the_online_step(tmp_path, overrides, student_tokenizer, monkeypatch, arm, loss):
    online_cfg = _cfg(overrides, student_tokenizer, arm, loss)
    cache = tmp_path / "cache"
    ensure_cache([online_cfg], cache, Resources(), quiet=True)
    v0, m0, g0, batch = _step(build(online_cfg, Resources()))

    def refuse(*a, **k):
        raise AssertionError("a cached run read the teacher's weights")

    for where, name in ((transformers.AutoModelForCausalLM, "from_pretrained"), (hld.models.loading, "load_causal_lm")):
        monkeypatch.setattr(where, name, refuse)
    monkeypatch.setattr(hld.train.resources, "load_causal_lm", refuse)
    s = build(_cfg(overrides, student_tokenizer, arm, loss, f"teacher.cache={cache}"), Resources())
    assert s.teacher_lm is None
    v1, m1, g1, batch1 = _step(s)
    assert torch.equal(batch1.input_ids, batch.input_ids) and m1["ce"] == m0["ce"]  # one batch, one student
    assert g0.keys() == g1.keys() and len(g0) > 3
    alpha = online_cfg.objective.alpha
    if loss == "gold":
        assert m1["kd"] < m0["kd"]
        return
    chunks = sum(len(al.teacher_bounds) - 2 for al in batch.alignments)
    bound = {"alm": 1e-5 * abs(m0["kd"]) + 1e-7, "uld": chunks * (2.0**-11 + 64 * 2.0**-25) / batch.n_targets}[loss]
    assert abs(m1["kd"] - m0["kd"]) <= bound
    if arm == "hld-joint":  # bfloat16 pooled states against the float32 teacher's
        assert m1["hidden"] == pytest.approx(m0["hidden"], rel=1e-3)
        assert abs(v1 - v0) <= alpha * bound + 1e-3 * abs(m0["hidden"])
    else:
        assert abs(v1 - v0) <= alpha * bound + 1e-7
    # alm: the same numbers; uld: the few flipped signs; hld-joint: targets rounded to bfloat16 (2^-9 relative),
    # which the hidden gradient (prediction - target) carries: 2^-8
    tol = {("kd", "alm"): 1e-5, ("kd", "uld"): 1e-3}.get((arm, loss), 2.0**-8)
    for k in g0:
        assert float((g1[k] - g0[k]).norm()) <= tol * float(g0[k].norm()) + 1e-9, k


def test_a_window_cut_otherwise_than_the_cache_holds_is_refused(tmp_path, overrides, student_tokenizer):
    """The cache checks each window's digest (ids and chunk bounds): the same ids with one chunk boundary moved
    (what another alignment of the same text gives) are refused in one line, not read as the cached chunks."""
    from dataclasses import replace

    from hld.errors import HldError

    cfg = _cfg(overrides, student_tokenizer, "kd", "uld")
    cache = tmp_path / "cache"
    ensure_cache([cfg], cache, Resources(), quiet=True)
    s = build(_cfg(overrides, student_tokenizer, "kd", "uld", f"teacher.cache={cache}"), Resources())
    obj = s.plan.phase_for(0.0, 1e-9).objective
    batch = s.order.batch(0)
    assert s.teacher(batch, obj.needs) is not None  # as built
    moves = [  # (window, side, bound, step): a chunk boundary that can move by one token and stay increasing
        (b, side, c, 1 if x[c + 1] - x[c] > 1 else -1)
        for b, al in enumerate(batch.alignments)
        for side in ("teacher_bounds", "student_bounds")
        for x in [getattr(al, side)]
        for c in range(2, len(x) - 1)
        if x[c + 1] - x[c - 1] >= 3
    ]
    b, side, c, step = moves[0]
    x = getattr(batch.alignments[b], side).copy()
    x[c] += step
    assert (np.diff(x) > 0).all()
    batch.alignments[b] = replace(batch.alignments[b], **{side: x})
    with pytest.raises(HldError, match="holds other tokens than this run's batch") as exc:
        s.teacher(batch, obj.needs)
    assert "\n" not in str(exc.value)
