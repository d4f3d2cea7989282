"""What the objectives see of each model, whatever produced it.

`StudentOutputs`: the final hidden states (after the final norm), the captured layers, and the head.
`TeacherSignals`: per batch, logits (from an online teacher's final hidden states and head, chunk by
chunk; or top-k values + indices from a cache, or sampled ids + weights) and a dict `layer -> hidden states`. An online
teacher and the offline cache both produce this type; the objectives cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from hld.distill.chunked import WORKSPACE, logits_into
from hld.distill.losses import TeacherLogits, softcap
from hld.models.hooks import CausalLM, LayerCapture, StopForward, decoder_of


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


@dataclass
class TeacherSignals:
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d_t)
    final_hidden: Optional[torch.Tensor] = None  # (B, T, d_t), online teacher
    head_weight: Optional[torch.Tensor] = None  # (V, d_t), online teacher
    softcap: Optional[float] = None
    topk_values: Optional[torch.Tensor] = None  # (B, T, k), cache
    topk_indices: Optional[torch.Tensor] = None  # (B, T, k), cache
    topk_rest: Optional[torch.Tensor] = None  # (B, T) float32, cache: log of the teacher's mass off the top k
    sampled_ids: Optional[torch.Tensor] = None  # (B, T, slots) int32, a sampled cache: distinct ids drawn
    sampled_weights: Optional[torch.Tensor] = None  # (B, T, slots) float32: their importance weights (sum 1)

    def logits(self, rows: slice) -> Optional[TeacherLogits]:
        """Teacher logits for rows `rows` of the flattened (B*T) positions."""
        if self.final_hidden is not None:
            h = self.final_hidden.reshape(-1, self.final_hidden.shape[-1])[rows]
            buf = WORKSPACE.get("zt", h.shape[0], self.head_weight.shape[0], h.device)
            return TeacherLogits(dense=softcap(logits_into(h, self.head_weight, buf), self.softcap))
        if self.sampled_ids is not None:
            n = self.sampled_ids.shape[-1]
            return TeacherLogits(
                indices=self.sampled_ids.reshape(-1, n)[rows].long(),
                weights=self.sampled_weights.reshape(-1, n)[rows],
            )
        if self.topk_values is not None:
            k = self.topk_values.shape[-1]
            rest = self.topk_rest.reshape(-1)[rows] if self.topk_rest is not None else None
            return TeacherLogits(
                values=self.topk_values.reshape(-1, k)[rows],
                indices=self.topk_indices.reshape(-1, k)[rows].long(),
                rest=rest,
            )
        return None


class Backbone(nn.Module):
    """The causal LM without its head: input ids -> final hidden states. (What DDP/FSDP wrap.)"""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return decoder_of(self.lm)(input_ids=input_ids, use_cache=False).last_hidden_state


def head_of(lm: CausalLM) -> tuple[torch.Tensor, Optional[float]]:
    return lm.get_output_embeddings().weight, getattr(lm.config, "final_logit_softcapping", None)


class StudentRunner:
    def __init__(self, lm: nn.Module, layers: tuple[int, ...] = ()) -> None:
        self.lm = lm
        self.backbone: nn.Module = Backbone(lm)
        self.capture = LayerCapture(lm, layers) if layers else None

    def __call__(self, input_ids: torch.Tensor) -> StudentOutputs:
        final = self.backbone(input_ids)
        hidden = self.capture.pop() if self.capture else {}
        weight, cap = head_of(self.lm)
        return StudentOutputs(final_hidden=final, hidden=hidden, head_weight=weight, softcap=cap)


class OnlineTeacher:
    """A frozen teacher run on each batch; computes only what the objective needs (no logits head
    when only hidden layers are needed, and no blocks past the deepest needed layer)."""

    def __init__(self, lm: nn.Module, layers: tuple[int, ...] = ()) -> None:
        self.lm = lm.eval().requires_grad_(False)
        self.backbone = Backbone(self.lm)
        self.capture = LayerCapture(self.lm, layers) if layers else None

    def __call__(self, batch, needs: Needs) -> Optional[TeacherSignals]:
        """Signals for a `Batch` (the interface shared with the offline cache)."""
        return self.signals(batch.input_ids, needs)

    @torch.no_grad()
    def signals(self, input_ids: torch.Tensor, needs: Needs) -> Optional[TeacherSignals]:
        if not needs.any:
            return None
        if self.capture is not None:
            self.capture.stop_after = None if needs.logits else max(needs.layers)
        final = None
        try:
            final = self.backbone(input_ids)
        except StopForward:
            pass
        finally:
            if self.capture is not None:  # disarm: the model may be shared (Resources) with later runs
                self.capture.stop_after = None
        captured = self.capture.pop() if self.capture else {}
        hidden = {i: captured[i] for i in needs.layers}
        if not needs.logits:
            return TeacherSignals(hidden=hidden)
        weight, cap = head_of(self.lm)
        return TeacherSignals(hidden=hidden, final_hidden=final, head_weight=weight, softcap=cap)
