"""The non-finite guard: a step whose loss or gradient is non-finite is skipped by `train_step`; five
in a row stop the run, and a run that applied no step at all fails instead of exporting its init."""

from __future__ import annotations

from hld.errors import HldError
from hld.train.callbacks.base import Callback, Run

IN_A_ROW = 5


class NonFiniteStop(Callback):
    def on_step_end(self, run: Run, line: dict) -> None:
        if run.state.skipped_in_row >= IN_A_ROW:
            raise HldError(
                f"the loss or gradient was non-finite for {run.state.skipped_in_row} steps in a row (step {run.step})",
                "lower train.lr, or check the data; the last good checkpoint is kept",
            )

    def on_train_end(self, run: Run) -> None:
        state = run.state
        if state.step and state.skipped_in_row >= state.step:  # fewer steps than the 5-in-a-row stop: none applied
            raise HldError(
                f"no step of the run was applied: the loss or gradient was non-finite at all {state.step} steps",
                "lower train.lr, or check the data and the teacher; nothing was exported",
            )
