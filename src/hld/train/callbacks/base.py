"""What the loop calls, and when. A run's side work (validation, logging, progress, checkpoints,
preemption, the non-finite guard, the layer diagnostics' files) is a list of `Callback`s; the loop
(`hld.train.loop._steps`) only steps and calls them, in list order, at these points:

- `on_start(run)`: before the first step of this process (a resumed run: its first step after the
  checkpoint);
- `on_step_end(run, line)`: after each optimiser step; `line` is the step's metric line, which a
  callback may extend (validation adds `val/*`) for the callbacks after it; `run.last` says whether
  this was the budget's final step. A callback may raise to stop the run (HldError, Preempted);
- `on_train_end(run)`: after the final step, before the checkpoint and the student are written;
- `on_finish(run)`: once the student is exported, on rank 0 only (files that sit beside it);
- `close()`: always, when the loop leaves (finished, failed or preempted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hld.train.setup import Setup
    from hld.train.state import RunState


@dataclass
class Run:
    """What a callback sees: the run's parts, its directory and its advancing state."""

    s: Setup
    out: Path
    state: RunState

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def last(self) -> bool:
        return self.state.step == self.s.total_steps


class Callback:
    """Does nothing at every point; a callback overrides the points it needs."""

    def on_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, line: dict) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass

    def on_finish(self, run: Run) -> None:
        pass

    def close(self) -> None:
        pass


def every(step: int, n: int) -> bool:
    """Is `step` a multiple of a period `n` (0: never)?"""
    return bool(n) and step % n == 0
