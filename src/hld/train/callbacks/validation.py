"""Validation: the student's loss and perplexity on the validation windows (with the layer
diagnostics, `val/cka/*` and `val/r2/*`) every `train.eval_every_steps` steps and after the last."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hld.eval.cka import layer_diagnostics
from hld.eval.perplexity import perplexity_over_ranks
from hld.train.callbacks.base import Callback, Run, every

if TYPE_CHECKING:
    from hld.train.setup import Setup


def validate_now(s: Setup) -> dict:
    """Validation loss and perplexity; under torchrun the batches are dealt over the ranks and the
    result equals the single-process one."""
    r = perplexity_over_ranks(
        s.dist,
        s.student,
        s.val_windows,
        backbone=s.runner.backbone,
        chunk_tokens=max(512, s.cfg.train.loss_chunk_tokens),
        compute_dtype=s.compute_dtype,
    )
    return {"val/loss": r["loss"], "val/ppl": r["ppl"], **layer_diagnostics(s)}  # val/cka/..., val/r2/...


class Validation(Callback):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def on_step_end(self, run: Run, line: dict) -> None:
        if every(run.step, self.every_steps) or run.last:
            line.update(validate_now(run.s))
