"""The online teacher's signal: its full distribution, computed from its final hidden states and head
chunk by chunk (`OnlineLogits.rows` -> `Dense`); and the runners that produce what the objectives see of
each model (`StudentRunner` -> `StudentOutputs`, `OnlineTeacher` -> `TeacherSignals`).

`Dense` is the reference kind: every other kind stands for this distribution with less. Its fused-head
rows use KL = sum p_t (z_t - z) / T - lse(z_t / T) + lse(z / T) (hld.distill.chunked's derivation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn

from hld.distill.chunked import WORKSPACE, logits_into, softmax_into, sum64
from hld.distill.losses import logsumexp_outside, softcap
from hld.distill.signals.base import HeadSpec, Needs, StudentOutputs, StudentSoftmax, TeacherLogits, TeacherSignals
from hld.distill.signals.topk import TopK
from hld.models.hooks import CausalLM, LayerCapture, StopForward, decoder_of

if TYPE_CHECKING:
    from hld.distill.divergences.base import Divergence


@dataclass
class Dense(TeacherLogits):
    """The teacher's full logits for a block of rows, (n, V)."""

    kind: ClassVar[str] = "online"
    logits: torch.Tensor
    indices: Optional[torch.Tensor] = None

    def rows(self, sl: slice) -> Dense:
        return Dense(self.logits[sl])

    def to(self, device: torch.device) -> Dense:
        return Dense(self.logits.to(device))

    def top_k(self, k: Optional[int]) -> TeacherLogits:
        if k is None or k >= self.logits.shape[-1]:
            return self
        v, i = self.logits.topk(k, dim=-1)
        return TopK(values=v, indices=i, rest=logsumexp_outside(self.logits, i))

    def as_top_k(self, k: int) -> TopK:
        """The top-k signal of these logits whatever k: at k >= V every logit, sorted, nothing off them."""
        got = self.top_k(k)
        if isinstance(got, TopK):
            return got
        v, i = self.logits.float().sort(dim=-1, descending=True)
        return TopK(values=v, indices=i, rest=torch.full_like(v[:, 0], float("-inf")))

    def logprobs(
        self, temperature: float, top_k_rest: str = "bucket", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """log p_t over the vocabulary, (n, V)."""
        return torch.log_softmax(self.logits.to(dtype) / temperature, dim=-1)

    def kd_rows(
        self, s: torch.Tensor, logq: torch.Tensor, temperature: float, div: Divergence, top_k_rest: str
    ) -> torch.Tensor:
        return div.rows(self.logprobs(temperature), logq)

    def fused_rows(
        self,
        z: torch.Tensor,
        sl: slice,
        spec: HeadSpec,
        student: StudentSoftmax,
        kd_rows: torch.Tensor,
        want_grad: bool,
    ) -> torch.Tensor:
        T, (r, V) = spec.temperature, z.shape
        zt = self.logits[sl]
        pt = WORKSPACE.get("pt_rows", r, V, z.device)
        lset = softmax_into(zt.float(), pt, 1 / T)
        # the fp32 softmax's own sum drifts from 1 (by ~3e-5 on torch's AVX2 kernels for logits of sd 3,
        # 3e-4 nats of KL a row): normalise the value by its float64 mass
        mass = sum64(pt)  # (r,)
        d = WORKSPACE.get("dot_rows", r, V, z.device)
        kd = sum64(torch.sub(zt, z, out=d).mul_(pt)) / mass / T - (lset + mass.log())  # z read before student()
        p, q, lseT = student()
        kd_rows[sl] = kd + lseT
        if want_grad:  # d/dz: w_ce * (p - onehot) + w_kd * T * (q - p_t)
            wk = spec.kd_weight * T
            if T != 1:
                p.mul_(spec.ce_weight).add_(q, alpha=wk)
            elif spec.ce_weight + wk != 1:  # a pass saved when the weights sum to 1
                p.mul_(spec.ce_weight + wk)
            p.sub_(pt, alpha=wk)
        return p

    def fidelity(self, full: torch.Tensor, temperature: float, top_k_rest: str) -> torch.Tensor:
        """KL(p || p_signal) over the vocabulary (0 when the signal is the full distribution itself)."""
        logp = torch.log_softmax(full.double() / temperature, dim=-1)
        return (logp.exp() * (logp - self.logprobs(temperature, dtype=torch.float64))).sum(-1)


@dataclass
class OnlineLogits:
    """A batch's logits from an online teacher: its final hidden states and head, made `Dense` a block of
    rows at a time (never (B*T, V) at once). The rows share one buffer: a block is valid until the next."""

    final_hidden: torch.Tensor  # (B, T, d_t)
    head_weight: torch.Tensor  # (V, d_t)
    softcap: Optional[float] = None

    def rows(self, sl: slice) -> Dense:
        h = self.final_hidden.reshape(-1, self.final_hidden.shape[-1])[sl]
        buf = WORKSPACE.get("zt", h.shape[0], self.head_weight.shape[0], h.device)
        return Dense(softcap(logits_into(h, self.head_weight, buf), self.softcap))

    def at_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits of the flat rows `rows` (n,) int64 (any order), soft-capped, (n, V) fp32 (float64 kept):
        a fresh tensor, not the shared buffer of `rows`. For a loss that reads scattered rows only (the
        cross-tokenizer losses, hld.distill.cross_tok.objectives): the head runs at those rows alone."""
        h = self.final_hidden.reshape(-1, self.final_hidden.shape[-1])[rows]  # (n, d_t)
        z = torch.mm(h, self.head_weight.to(h.dtype).T)  # (n, V)
        return softcap(z if z.dtype == torch.float64 else z.float(), self.softcap)

    @property
    def n_rows(self) -> int:
        return self.final_hidden.shape[0] * self.final_hidden.shape[1]

    def to(self, device: torch.device) -> OnlineLogits:
        return OnlineLogits(self.final_hidden.to(device), self.head_weight.to(device), self.softcap)


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
        """Signals for a `Batch` (the interface shared with the offline cache): on the teacher's own rows of
        the batch's text when they differ from the student's (paired windows, `student.tokenizer`)."""
        return self.signals(batch.teacher_ids if batch.paired else batch.input_ids, needs)

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
        return TeacherSignals(hidden=hidden, source=OnlineLogits(final, weight, cap))
