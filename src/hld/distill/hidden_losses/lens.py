"""`lens`: z_s = head(norm(P s)), z_t = head(norm(t)) with the teacher's own final norm and frozen head
(and soft-cap); the loss is T^2 KL(softmax(z_t/T) || softmax(z_s/T)) per token, computed by the
fused chunked head (`chunked.head_loss`, CE weight 0, KD weight 1): no (B, T, V) tensor. The target
is the teacher layer's *raw* state (its logit lens), whatever `normalize_teacher` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from hld.distill.chunked import WORKSPACE, HeadLossSpec, head_loss, logits_into
from hld.distill.hidden_losses.base import Dims, HiddenLoss
from hld.distill.losses import softcap
from hld.distill.signals.online import Dense


@dataclass
class Lens:
    """The teacher's final norm and frozen head: what its logit lens reads a layer through."""

    norm: torch.nn.Module
    head_weight: torch.Tensor  # (V, d_t)
    softcap: Optional[float] = None

    @classmethod
    def of(cls, lm: Any) -> Lens:  # a causal LM (models.hooks.CausalLM)
        from hld.distill.signals.online import head_of
        from hld.models.hooks import decoder_of

        weight, cap = head_of(lm)
        return cls(norm=decoder_of(lm).norm, head_weight=weight.detach(), softcap=cap)


def lens_sum(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lens: Lens, spec: HeadLossSpec
) -> torch.Tensor:
    """T^2 KL(teacher lens || student lens) summed over valid rows, chunk by chunk.
    pred (n, d_t) projected student states (with grad); target (n, d_t) raw teacher states."""
    W = lens.head_weight
    h = lens.norm(pred)  # (n, d_t), the norm's weights are frozen
    with torch.no_grad():
        ht = lens.norm(target.to(h.dtype))  # (n, d_t)

    def teacher_chunk(rows: slice) -> Dense:
        buf = WORKSPACE.get("zlens", rows.stop - rows.start, W.shape[0], W.device)
        return Dense(softcap(logits_into(ht[rows].to(W.dtype), W, buf), lens.softcap))

    labels = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)  # CE weight 0: never read
    loss, _ = head_loss(h, W, labels, mask, spec, teacher_chunk)
    return loss


def lens_spec(
    *, temperature: float, chunk_tokens: int, softcap: Optional[float], matmul_dtype: Optional[torch.dtype] = None
) -> HeadLossSpec:
    return HeadLossSpec(
        ce_weight=0.0,
        kd_weight=1.0,
        temperature=temperature,
        softcap=softcap,
        chunk_tokens=chunk_tokens,
        matmul_dtype=matmul_dtype,
    )


class LensLoss(HiddenLoss):
    name = "lens"
    normalized_target = False
    teacher_head = True

    def __init__(self, lens: Lens, spec: HeadLossSpec) -> None:
        self.lens, self.spec = lens, spec

    @classmethod
    def build(cls, *, lens: Any = None, lens_spec: Any = None) -> HiddenLoss:
        if lens is None or lens_spec is None:
            raise ValueError("loss=lens needs the teacher's final norm and head (lens=Lens.of(teacher))")
        return cls(lens, lens_spec)

    def cost_dims(self, *, d_student: int, d_teacher: int, seq_len: int) -> Dims:
        """The student's lens head forward + input gradient (4*d_t*V) and the teacher's lens logits (2*d_t*V)."""
        return ((d_teacher, self.lens.head_weight.shape[0]),)

    def pair_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        flat = pred.reshape(-1, pred.shape[-1])
        return lens_sum(flat, target.reshape(-1, target.shape[-1]), mask.reshape(-1), self.lens, self.spec)
