"""The callbacks every run has, in the order the loop calls them after a step: validate, log what the
step and its validation gave, stop on non-finite steps, checkpoint, show progress, then honour a
SIGTERM (after the step's checkpoint and log, so a preempted run loses nothing it did)."""

from __future__ import annotations

from hld.config import RunConfig
from hld.progress import Progress
from hld.train.callbacks.base import Callback
from hld.train.callbacks.checkpointing import Checkpointing, Preemption
from hld.train.callbacks.diagnostics import LayerDiagnostics
from hld.train.callbacks.guards import NonFiniteStop
from hld.train.callbacks.logging import MetricLog, ProgressLine
from hld.train.callbacks.validation import Validation
from hld.train.loggers import RunLogger


def default_callbacks(cfg: RunConfig, logger: RunLogger, prog: Progress) -> list[Callback]:
    t = cfg.train
    return [
        Validation(t.eval_every_steps),
        MetricLog(logger, t.log_every_steps),
        NonFiniteStop(),
        Checkpointing(t.checkpoint_every_steps),
        ProgressLine(prog),
        Preemption(),
        LayerDiagnostics(),
    ]
