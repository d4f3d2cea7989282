"""What a person watching sees: the metric log (metrics.jsonl, TensorBoard, W&B: `RunLogger`) every
`train.log_every_steps` steps, at each validation, at a skipped step and at the last; and the
progress line (step, tokens/s, loss, ETA) after every step."""

from __future__ import annotations

from hld.progress import Progress
from hld.train.callbacks.base import Callback, Run, every
from hld.train.loggers import RunLogger


class MetricLog(Callback):
    def __init__(self, logger: RunLogger, every_steps: int) -> None:
        self.logger, self.every_steps = logger, every_steps

    def on_step_end(self, run: Run, line: dict) -> None:
        if every(run.step, self.every_steps) or run.last or "val/ppl" in line or line["skipped"]:
            self.logger.log(line)

    def close(self) -> None:
        self.logger.close()


class ProgressLine(Callback):
    def __init__(self, prog: Progress) -> None:
        self.prog = prog

    def on_step_end(self, run: Run, line: dict) -> None:
        self.prog.update(run.step, tokens_per_s=line["tokens_per_s"], loss=line["train/loss"])

    def close(self) -> None:
        self.prog.close()
