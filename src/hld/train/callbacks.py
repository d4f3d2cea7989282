"""What the loop calls, and when. A run's side work (validation, logging, progress, checkpoints,
preemption, the non-finite guard, the layer diagnostics' files) is a list of `Callback`s; the loop
(`hld.train.loop._steps`) only steps and calls them, in list order, at these points:

- `on_start(run)`: before the first step of this process (a resumed run: its first step after the
  checkpoint);
- `needs_metrics(run)`: after each optimiser step, on every callback: does it need this step's metrics on
  the host now? A step's metrics stay on the device (no host sync, so a GPU keeps queueing work) until
  one says yes; the default is yes (a callback written without this in mind sees every step at once);
- `on_step_end(run, line)`: for each step, once its metrics are on the host — at that step, or in step
  order at the next step some callback needs them (`run.step` is the line's step; `run.latest` says
  whether it is the step just taken, the only one whose model and state a callback may act on). `line`
  is the step's metric line, which a callback may extend (validation adds `val/*`) for the callbacks
  after it; `run.last` says whether it is the budget's final step. A callback may raise to stop the
  run (HldError, Preempted);
- `on_train_end(run)`: after the final step, before the checkpoint and the student are written;
- `on_finish(run)`: once the student is exported, on rank 0 only (files that sit beside it); a callback
  that reads nothing of the export says so (`after_export = False`) and runs while it is written;
- `close()`: always, when the loop leaves (finished, failed or preempted).

The kinds of side work, in this file's order:

- Validation: the student's loss and perplexity on the validation windows (with the layer
  diagnostics, `val/cka/*` and `val/r2/*`) every `train.eval_every_steps` steps and after the last.
- What a person watching sees: the metric log (metrics.jsonl, TensorBoard, W&B: `RunLogger`) every
  `train.log_every_steps` steps, at each validation, at a skipped step and at the last; and the
  progress line (step, tokens/s, loss, ETA) after every step.
- The non-finite guard: a step whose loss or gradient is non-finite is skipped by `train_step`; five
  in a row stop the run, and a run that applied no step at all fails instead of exporting its init.
- Checkpoints every `train.checkpoint_every_steps` steps (the final one is written by the loop, after
  the last step), and preemption: SIGTERM (SLURM's warning, `scancel`, a spot reclaim) sets a flag the
  loop reads after each step; then every rank saves and the run stops with `Preempted`, resumable.
- The layer diagnostics' file: cka.json (student x teacher layers' linear CKA) beside the exported
  student. Their per-validation values (`val/cka/*`, `val/r2/*`) come with the validation line.
- The callbacks every run has, in the order the loop calls them after a step: validate, log what the
  step and its validation gave, stop on non-finite steps, checkpoint, show progress, then honour a
  SIGTERM (after the step's checkpoint and log, so a preempted run loses nothing it did).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from hld import distributed
from hld.config import RunConfig
from hld.errors import HldError
from hld.eval.cka import diagnostics_of, layer_diagnostics, write_cka_matrix
from hld.eval.perplexity import perplexity_over_ranks
from hld.progress import Progress
from hld.train.checkpoint import save_run
from hld.train.loggers import RunLogger
from hld.train.rundir import Preempted, SigtermFlag

if TYPE_CHECKING:
    from hld.train.setup import Setup
    from hld.train.state import RunState

# --------------------------------------------------------------------------- the points


@dataclass
class Run:
    """What a callback sees: the run's parts, its directory and its advancing state; `at`: the step of
    the metric line at hand, when it is behind the state's (read back late)."""

    s: Setup
    out: Path
    state: RunState
    at: Optional[int] = None

    @property
    def step(self) -> int:
        return self.state.step if self.at is None else self.at

    @property
    def latest(self) -> bool:
        """Is this the step just taken (the model and state are this step's)?"""
        return self.step == self.state.step

    @property
    def last(self) -> bool:
        return self.step == self.s.total_steps


class Callback:
    """Does nothing at every point; a callback overrides the points it needs."""

    after_export = True  # on_finish reads the exported student (False: it may run while it is written)

    def on_start(self, run: Run) -> None:
        pass

    def needs_metrics(self, run: Run) -> bool:
        return True

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


# --------------------------------------------------------------------------- validation


def validate_now(s: Setup) -> dict:
    """Validation loss and perplexity; under torchrun the batches are dealt over the ranks and the
    result equals the single-process one."""
    diag = diagnostics_of(s)
    with diag.from_validation() if diag is not None else contextlib.nullcontext() as keep_states:
        r = perplexity_over_ranks(
            s.dist,
            s.student,
            s.val_windows,
            backbone=s.runner.backbone,
            chunk_tokens=max(512, s.cfg.train.loss_chunk_tokens),
            compute_dtype=s.compute_dtype,
            after_forward=keep_states,  # the layer diagnostics' student states, from this forward
        )
    # bits per character where the windows know their text (paired windows: comparable across tokenizers)
    bpc = {"val/bpc": r["bpc"]} if "bpc" in r else {}
    return {"val/loss": r["loss"], "val/ppl": r["ppl"], **bpc, **layer_diagnostics(s)}  # val/cka/..., val/r2/...


class Validation(Callback):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def needs_metrics(self, run: Run) -> bool:
        return every(run.step, self.every_steps) or run.last

    def on_step_end(self, run: Run, line: dict) -> None:
        if run.latest and self.needs_metrics(run):
            line.update(validate_now(run.s))


# --------------------------------------------------------------------------- logging and progress


class MetricLog(Callback):
    def __init__(self, logger: RunLogger, every_steps: int) -> None:
        self.logger, self.every_steps = logger, every_steps

    def needs_metrics(self, run: Run) -> bool:
        return every(run.step, self.every_steps) or run.last  # a skipped step: logged when read back

    def on_step_end(self, run: Run, line: dict) -> None:
        if every(run.step, self.every_steps) or run.last or "val/ppl" in line or line["skipped"]:
            self.logger.log(line)

    def close(self) -> None:
        self.logger.close()


class ProgressLine(Callback):
    def __init__(self, prog: Progress) -> None:
        self.prog = prog

    def needs_metrics(self, run: Run) -> bool:
        return self.prog.due(run.step)

    def on_step_end(self, run: Run, line: dict) -> None:
        if run.latest:  # a step read back late was overtaken: the line shows the newest
            self.prog.update(run.step, tokens_per_s=line["tokens_per_s"], loss=line["train/loss"])

    def close(self) -> None:
        self.prog.close()


# --------------------------------------------------------------------------- the non-finite guard

IN_A_ROW = 5


class NonFiniteStop(Callback):
    """Judged as each step is read back (a few steps late at most between logged steps: the skipped ones
    changed no weight, so the run stops where it would have, at the cost of the steps in between)."""

    def needs_metrics(self, run: Run) -> bool:
        return False

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


# --------------------------------------------------------------------------- checkpoints and preemption


class Checkpointing(Callback):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def needs_metrics(self, run: Run) -> bool:
        return every(run.step, self.every_steps) and not run.last  # the state saved counts every skip

    def on_step_end(self, run: Run, line: dict) -> None:
        if run.latest and self.needs_metrics(run):
            save_run(run.s, run.out, run.state)


class Preemption(Callback):
    def __init__(self) -> None:
        self.flag: Optional[SigtermFlag] = None
        self.stop = False

    def on_start(self, run: Run) -> None:
        self.flag = SigtermFlag()

    def needs_metrics(self, run: Run) -> bool:
        assert self.flag is not None  # asked after every step on every rank: under torchrun, a collective
        self.stop = not run.last and distributed.any_rank(run.s.dist, self.flag.raised)  # all ranks stop here
        return self.stop

    def on_step_end(self, run: Run, line: dict) -> None:
        if run.latest and self.stop:
            save_run(run.s, run.out, run.state)
            raise Preempted(run.out, run.step, run.s.total_steps)

    def close(self) -> None:
        if self.flag is not None:
            self.flag.restore()

    def pending(self) -> bool:
        """Was a SIGTERM flagged during the last step (which does not preempt: the run was about to
        finish)? The loop sends it again once every callback is closed, to the handler in place then (the
        CLI's: one line, exit 2); it used to be dropped, the run finished and a study went on."""
        return self.flag is not None and self.flag.raised


# --------------------------------------------------------------------------- layer diagnostics


class LayerDiagnostics(Callback):
    after_export = False  # cka.json: states the validation kept, nothing of the exported files

    def needs_metrics(self, run: Run) -> bool:
        return False

    def on_finish(self, run: Run) -> None:
        write_cka_matrix(run.s, run.out)


# --------------------------------------------------------------------------- the default list


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
