"""Where a run stands between two steps: saved whole in every checkpoint, restored whole on resume.

The model, projector and optimiser tensors and the RNG states travel beside it in the same file
(`hld.train.checkpoint`); everything else a resumed run needs to continue as if never stopped is here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hld.errors import HldError

# fields a checkpoint written before RunState existed lacks (it held step, tokens and flops): their defaults
_ADDED_LATER = ("train_seconds", "skipped_in_row")


@dataclass
class RunState:
    step: int = 0  # optimiser steps done; also the data position (the batch order is a pure function of the step)
    tokens: int = 0  # training tokens read (the last step of a budget may read only part of its windows)
    flops: float = 0.0  # training FLOPs spent: each step's tokens times its phase's FLOPs per token
    train_seconds: float = 0.0  # wall time inside train steps, summed over every process the run took
    skipped_in_row: int = 0  # optimiser steps skipped in a row for a non-finite loss or gradient (5 stop the run)

    def advance(self, *, tokens: int, flops_per_token: float, seconds: float) -> None:
        """Count one optimiser step that read `tokens` training tokens."""
        self.step += 1
        self.tokens += tokens
        self.flops += flops_per_token * tokens
        self.train_seconds += seconds

    def count_skipped(self, skipped: bool) -> None:
        """Count whether the next step read back (in step order; it may be a few steps behind `step`, whose
        metrics stay on the device until the loop needs them) was skipped."""
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0

    def to_dict(self) -> dict:
        """Plain ints and floats (loadable with weights_only=True)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, path: Path) -> RunState:
        """The state saved in checkpoint `path` (other keys ignored). A checkpoint from before RunState
        holds step, tokens and flops only: the fields added later start from their defaults."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in saved and n not in _ADDED_LATER]
        if missing:
            raise HldError(
                f"checkpoint {path} holds no run state ({', '.join(missing)} missing)",
                "delete it and rerun with --resume (a run without a checkpoint starts from step 0)",
            )
        return cls(**{n: type(getattr(cls(), n))(saved[n]) for n in names if n in saved})
