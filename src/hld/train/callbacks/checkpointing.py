"""Checkpoints every `train.checkpoint_every_steps` steps (the final one is written by the loop, after
the last step), and preemption: SIGTERM (SLURM's warning, `scancel`, a spot reclaim) sets a flag the
loop reads after each step; then every rank saves and the run stops with `Preempted`, resumable."""

from __future__ import annotations

from typing import Optional

from hld import distributed
from hld.train.callbacks.base import Callback, Run, every
from hld.train.checkpoint import save_run
from hld.train.rundir import Preempted, SigtermFlag


class Checkpointing(Callback):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def on_step_end(self, run: Run, line: dict) -> None:
        if every(run.step, self.every_steps) and not run.last:
            save_run(run.s, run.out, run.state)


class Preemption(Callback):
    def __init__(self) -> None:
        self.flag: Optional[SigtermFlag] = None

    def on_start(self, run: Run) -> None:
        self.flag = SigtermFlag()

    def on_step_end(self, run: Run, line: dict) -> None:
        assert self.flag is not None
        if not run.last and distributed.any_rank(run.s.dist, self.flag.raised):  # all ranks stop here
            save_run(run.s, run.out, run.state)
            raise Preempted(run.out, run.step, run.s.total_steps)

    def close(self) -> None:
        if self.flag is not None:
            self.flag.restore()
