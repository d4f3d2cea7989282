"""The types every teacher signal shares, and what the objectives see of each model.

`TeacherSignals`: per batch, the teacher's hidden states (`layer -> (B, T, d_t)`) and, when the objective
reads logits, one `LogitSource` of a registered kind (hld.distill.signals.registry). The loop, the
objectives and the cache reader hold a `TeacherSignals` and never ask which kind its logits are: they
ask the source for a block of rows (`TeacherLogits`), and the block does the kind-specific work itself
(its divergence against the student, its part of the fused head's gradient, its fidelity against the
teacher's full distribution, its size in a cache).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional, Protocol

import torch

if TYPE_CHECKING:
    from hld.distill.divergences.base import Divergence

# the student's softmaxes over one row block of the fused head: () -> (p = softmax(z), q = softmax(z / T),
# lse(z / T)); q is p and the lse is lse(z) when T = 1. Calling it destroys the block's logits z.
StudentSoftmax = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class HeadSpec(Protocol):
    """What a kind reads of the fused head's spec (hld.distill.chunked.HeadLossSpec, which imports this module)."""

    @property
    def ce_weight(self) -> float: ...

    @property
    def kd_weight(self) -> float: ...

    @property
    def temperature(self) -> float: ...

    @property
    def top_k_rest(self) -> str: ...


@dataclass(frozen=True)
class Needs:
    """The teacher signals an objective reads: logits, and hidden states of `layers`."""

    logits: bool = False
    layers: tuple[int, ...] = ()

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.logits or other.logits, tuple(sorted(set(self.layers) | set(other.layers))))

    @property
    def any(self) -> bool:
        return self.logits or bool(self.layers)


@dataclass
class StudentOutputs:
    final_hidden: torch.Tensor  # (B, T, d) after the final norm
    hidden: dict[int, torch.Tensor]  # layer -> (B, T, d)
    head_weight: torch.Tensor  # (V, d)
    softcap: Optional[float] = None


class TeacherLogits(ABC):
    """The teacher's logit signal for a block of token rows, of one kind. Subclasses register in
    hld.distill.signals.registry under `kind`."""

    kind: ClassVar[str]
    indices: Optional[torch.Tensor]  # (n, k) ids the signal states something about; None: every id

    @abstractmethod
    def rows(self, sl: slice) -> TeacherLogits:
        """The rows `sl` of this block (a view)."""

    @abstractmethod
    def to(self, device: torch.device) -> TeacherLogits: ...

    def top_k(self, k: Optional[int]) -> TeacherLogits:
        """The signal truncated to its k most likely ids (`objective.top_k`); unchanged where k does not cut it."""
        return self

    @abstractmethod
    def kd_rows(
        self, s: torch.Tensor, logq: torch.Tensor, temperature: float, div: Divergence, top_k_rest: str
    ) -> torch.Tensor:
        """D(teacher_T, student_T) per row (n,), before the T^2: `s` the student's logits / T (n, V),
        `logq` = log_softmax(s). By autograd where a gradient is wanted (losses.kd_sum)."""

    @abstractmethod
    def fused_rows(
        self,
        z: torch.Tensor,
        sl: slice,
        spec: HeadSpec,
        student: StudentSoftmax,
        kd_rows: torch.Tensor,
        want_grad: bool,
    ) -> torch.Tensor:
        """One row block of the fused head (hld.distill.chunked) for forward KL: kd_rows[sl] written (the
        KL per row before the T^2, float64), and, when `want_grad`, the block's gradient of
        w_ce * CE + w_kd * T^2 * KL (without CE's -w_ce at the targets) returned in p's buffer. z (r, V)
        fp32 is the student's logits of rows `sl` of this signal; `student()` gives its softmaxes."""

    @abstractmethod
    def fidelity(self, full: torch.Tensor, temperature: float, top_k_rest: str) -> torch.Tensor:
        """How far this signal is from the teacher's full distribution, per row (n,) float64, in nats:
        full (n, V) the teacher's logits (study/references.py states each kind's measure)."""


class LogitSource(Protocol):
    """A batch's logit signal: `rows(sl)` gives the flattened (B*T) rows `sl` as a `TeacherLogits`."""

    def rows(self, sl: slice) -> TeacherLogits: ...

    def to(self, device: torch.device) -> LogitSource: ...


@dataclass
class TeacherSignals:
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d_t)
    source: Optional[LogitSource] = None  # the logits, when the objective reads them

    def logits(self, rows: slice) -> Optional[TeacherLogits]:
        """Teacher logits for rows `rows` of the flattened (B*T) positions."""
        return None if self.source is None else self.source.rows(rows)

    def to(self, device: torch.device) -> TeacherSignals:
        return TeacherSignals(
            hidden={layer: h.to(device) for layer, h in self.hidden.items()},
            source=None if self.source is None else self.source.to(device),
        )
