"""`Setup`: a built run's parts — the models, the teacher signal, the plan of objectives, the
optimiser, the data order and the step costs — as `hld.train.loop.build` assembles them. Its side
work (validation, logging, checkpoints, preemption) is not here: `hld.train.callbacks`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from hld.cache.reader import CachedTeacher
from hld.config import RunConfig
from hld.data.loader import BatchOrder
from hld.data.paired import PairedSample
from hld.distill.objectives import Plan
from hld.distill.projectors import Projectors
from hld.distill.signals.online import OnlineTeacher, StudentRunner
from hld.distributed import Dist
from hld.flops import StepCost
from hld.models.derive import Derivation
from hld.models.hooks import CausalLM
from hld.train.budget import Length


@dataclass
class Setup:
    """Everything a run is built from (also what tests and callbacks inspect)."""

    cfg: RunConfig
    student: CausalLM
    runner: StudentRunner
    teacher: Optional[OnlineTeacher | CachedTeacher]  # called as teacher(batch, needs) -> TeacherSignals
    teacher_lm: Optional[CausalLM]  # the teacher's weights; None when the run holds none (CE, most cached runs)
    projectors: Optional[Projectors]
    plan: Plan
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    val_windows: np.ndarray | PairedSample  # (n, seq_len) int64, or paired windows (a student with its own tokenizer)
    length: Length  # steps, and how much of its windows the last step reads
    costs: dict[str, StepCost]  # phase name -> (FLOPs per training token)
    device: torch.device
    compute_dtype: torch.dtype
    dist: Dist = field(default_factory=Dist)  # this process's rank and the parallel mode (world size 1: none)
    # the teacher's states for the layer diagnostics (`hld.eval.cka.TeacherStates`), made at their first use
    # through the process's shared resources (`hld run`: the teacher loaded and run once for all its cells);
    # None when the diagnostics are off
    diagnostics_states: Optional[Callable[[], Any]] = None
    # the run's identity (`hld.train.checkpoint.run_identity`: config hash, seed, data and teacher
    # fingerprints), kept in every checkpoint and checked on resume
    identity: dict = field(default_factory=dict)
    derivation: Optional[Derivation] = None  # a student made of the teacher's blocks: which, ranked how, at what cost
    # optimiser steps this process has taken (applied or skipped): what the layer diagnostics key the
    # student's states on (fused AdamW writes the weights without bumping their version counters)
    steps_taken: int = 0

    @property
    def fixed_flops(self) -> float:
        """FLOPs spent before step 0 and counted in the run's (a derived student's calibration)."""
        return self.derivation.calibration_flops if self.derivation is not None else 0.0

    @property
    def total_steps(self) -> int:
        return self.length.steps
