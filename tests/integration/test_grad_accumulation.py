"""Gradient accumulation: one optimiser step over a global batch of 8 sequences gives the same
gradients (and the same logged loss) whether it runs as 1x8, 2x4 or 8x1 micro-batches, and both
equal the mean loss of the unsplit batch. Checked on gradients after the backward, not on a loss
curve (under Adam a constant gradient scale error is invisible in the loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import named_params, tiny_overrides
from hld.config import load_config
from hld.data.packing import IGNORE
from hld.train.loop import build, train_step
from hld.train.setup import Setup

MICRO_SIZES = (8, 4, 1)


def _overrides(method: str, micro: int) -> list[str]:
    """The fixtures' run (helpers.tiny_overrides, fp32: the comparison is at fp32 rounding level) for
    8 steps of 8 windows, each step in micro-batches of `micro`."""
    return [
        *tiny_overrides(),
        "train.batch_size=8",
        "budget.tokens=2048",
        f"objective.method={method}",  # 8 steps
        f"train.micro_batch_size={micro}",
        "train.grad_clip=0",  # capture the raw accumulated gradient (clipping would rescale it)
        "train.loss_chunk_tokens=40",  # several head chunks per micro-batch, not aligned to rows
        "objective.hidden.first_share=0.5",
    ]


def _step_grads(s: Setup, step: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run the real train_step, capturing every gradient at the moment the optimiser would step."""
    captured: dict[str, torch.Tensor] = {}
    params = named_params(s)

    def capture(*args, **kwargs):
        for k, p in params.items():
            captured[k] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)

    s.optimizer.step = capture  # instance attribute: the update itself is not needed
    metrics = train_step(s, step)
    assert captured, "optimizer.step was not reached"
    return metrics, captured


def _uneven_targets(s: Setup) -> None:
    """Every window of the BOS-led protocol has seq_len-1 targets, so micro-batches always hold equal
    counts and dividing by a micro-batch's own count would go unseen; mask the first 3r labels of row
    r (as a data source with masked positions would) so that the counts differ."""
    real = s.order.batch

    def batch(step: int):
        b = real(step)
        for r in range(b.labels.shape[0]):
            b.labels[r, : 3 * r] = IGNORE
        return b

    s.order.batch = batch


def _assert_grads_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-12)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * scale, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.mark.parametrize("method,step", [("kd", 1), ("hld-joint", 1), ("hld-first", 1), ("hld-first", 7)])
def test_micro_batch_split_gives_same_gradients_and_loss(resources, method, step):
    setups = {
        mb: build(load_config("smoke", _overrides(method, mb)), resources, device=torch.device("cpu"))
        for mb in MICRO_SIZES
    }
    s8 = setups[8]
    for s in setups.values():
        _uneven_targets(s)
    for s in setups.values():  # identical initial weights: the comparison is meaningful
        for (k, p), q in zip(named_params(s).items(), named_params(s8).values()):
            assert torch.equal(p, q), k

    # the unsplit batch's mean loss and its gradient, by autograd on the whole batch at once
    B, T = s8.cfg.train.batch_size, s8.cfg.data.seq_len
    phase, _ = s8.plan.at_step(
        step,
        s8.total_steps,
        tokens_before=step * B * T,  # the loop's own rule
        tokens_in_step=s8.length.tokens_at(step, B, T),
        tokens_total=(s8.total_steps - 1) * B * T + B * s8.length.last_len,
    )
    batch = s8.order.batch(step)
    teacher = s8.teacher(batch, phase.objective.needs)
    loss_sum, n, _ = phase.objective(batch, s8.runner(batch.input_ids), teacher)
    params = named_params(s8)
    g = torch.autograd.grad(loss_sum / n, list(params.values()), allow_unused=True)
    reference = {k: gi if gi is not None else torch.zeros_like(p) for (k, p), gi in zip(params.items(), g)}
    ref_loss = float(loss_sum.detach()) / n

    # the split must not be trivially uniform: micro-batches hold different numbers of targets,
    # so dividing by a micro-batch's own count (a classic bug) would change the gradient
    counts = [mb.n_targets for mb in batch.split(8)]
    assert len(set(counts)) > 1, counts

    results = {mb: _step_grads(s, step) for mb, s in setups.items()}
    for mb, (metrics, grads) in results.items():
        assert metrics["phase"] == phase.name
        assert metrics["train/loss"] == pytest.approx(ref_loss, rel=1e-5), mb
        _assert_grads_equal(grads, reference, f"{method} micro={mb} vs unsplit")
        for key in metrics:
            if key.startswith("train/"):
                assert metrics[key] == pytest.approx(results[8][0][key], rel=1e-5), (mb, key)
    if phase.objective.student_layers:  # the projectors are part of this phase's loss
        assert all(float(g.abs().max()) > 0 for k, g in reference.items() if k.startswith("projectors."))


def test_kd_step_gradient_matches_independent_hf_computation(resources):
    """The kd arm's accumulated gradient (8x1 micro-batches) against a computation that shares no
    code with the trainer: HF logits of both models, F.cross_entropy and F.kl_div, mean over targets."""
    s = build(load_config("smoke", _overrides("kd", 1)), resources, device=torch.device("cpu"))
    batch = s.order.batch(0)
    alpha, T = s.cfg.objective.alpha, s.cfg.objective.temperature
    mask = batch.mask
    with torch.no_grad():
        t_logits = s.teacher_lm(input_ids=batch.input_ids).logits[mask]  # (n, V)
    s_logits = s.student(input_ids=batch.input_ids).logits[mask]
    ce = F.cross_entropy(s_logits.float(), batch.labels[mask], reduction="sum")
    kl = (
        F.kl_div(
            torch.log_softmax(s_logits.float() / T, -1),
            torch.log_softmax(t_logits.float() / T, -1),
            log_target=True,
            reduction="sum",
        )
        * T
        * T
    )
    ref_loss = ((1 - alpha) * ce + alpha * kl) / int(mask.sum())
    params = named_params(s)
    ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))

    metrics, grads = _step_grads(s, 0)
    assert metrics["train/loss"] == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert metrics["train/ce"] == pytest.approx(float(ce.detach()) / int(mask.sum()), rel=1e-5)
    assert metrics["train/kd"] == pytest.approx(float(kl.detach()) / int(mask.sum()), rel=1e-5)
    _assert_grads_equal(grads, ref, "kd 8x1 vs HF reference")
