"""Compute, counted in one place. All figures are FLOPs **per input token** (a multiply-add = 2).

Forward of a decoder-only LM, per token, at sequence length T:
  2 * N_matmul                       every Linear weight inside the blocks (q, k, v, o, MLP)
+ 2 * V * d                          the LM head (only when logits are computed)
+ 4 * sum_layers n_heads * head_dim * ctx_l      QK^T and AV, ctx_l = mean attended keys
where ctx_l = (T + 1) / 2 for full causal attention and, for a sliding window w,
the mean of min(t, w) over positions t = 1..T. Embedding lookups, norms, activations and softmax
are not counted (they are O(d) per token, well under 1% at these sizes).
Training = 3 x forward (backward costs two forwards). The teacher runs forward only (x1).
A projector pair d_s -> d_t costs 2*d_s*d_t forward, x3 when trained.
See docs/compute.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from hld.config import StudentConfig
from hld.config_checks import derived_depth, derived_residual
from hld.models.hooks import CausalLM, decoder_of, text_config


def _mean_context(T: int, window: Optional[int]) -> float:
    if window is None or window >= T:
        return (T + 1) / 2
    w = window
    # positions 1..w attend to t keys, positions w+1..T attend to w keys
    return (w * (w + 1) / 2 + (T - w) * w) / T


def forward_flops_per_token(
    lm: CausalLM, seq_len: int, *, logits: bool = True, upto_layer: Optional[int] = None
) -> float:
    """Forward FLOPs per token of a HF causal LM, blocks 1..upto_layer (all by default)."""
    cfg = text_config(lm.config)
    layers = decoder_of(lm).layers
    n = len(layers) if upto_layer is None else upto_layer
    matmul = sum(m.weight.numel() for layer in layers[:n] for m in layer.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    # layer_types names each block's attention (Gemma 3, Qwen 2/3); without it a set sliding_window
    # applies to every block (Mistral), else attention is full (Llama)
    default = "sliding_attention" if window else "full_attention"
    types = getattr(cfg, "layer_types", None) or [default] * len(layers)
    attn = sum(
        4
        * cfg.num_attention_heads
        * head_dim
        * _mean_context(seq_len, window if types[i] == "sliding_attention" else None)
        for i in range(n)
    )
    head = 2 * lm.get_output_embeddings().weight.numel() if logits else 0
    return 2 * matmul + attn + head


@dataclass(frozen=True)
class StepCost:
    """FLOPs per training token of one arm, split by where they are spent."""

    student: float  # 3 x student forward
    teacher: float  # teacher forward, when it runs online (0 with a cache or for CE)
    projectors: float  # 3 x projector forward

    @property
    def total(self) -> float:
        return self.student + self.teacher + self.projectors


def step_cost(
    student: CausalLM,
    seq_len: int,
    *,
    teacher: Optional[CausalLM] = None,
    teacher_logits: bool = True,
    teacher_upto: Optional[int] = None,
    projector_dims: tuple[tuple[float, float], ...] = (),
    student_logits: bool = True,
    frozen_head: bool = False,
    teacher_seq_len: Optional[int] = None,
) -> StepCost:
    """`frozen_head`: the (tied) head gets no gradient (`train.freeze_embedding`): its backward computes
    dL/dh only, so it costs 2x its forward instead of 3x. `teacher_seq_len`: a teacher that reads its own
    tokens of the student's text (another tokenizer, paired windows) runs windows of this length, padding
    included, per student window of `seq_len`: its FLOPs per student token are its own per token times
    teacher_seq_len / seq_len."""
    s = 3 * forward_flops_per_token(student, seq_len, logits=False)
    if student_logits:
        s += (2 if frozen_head else 3) * 2 * student.get_output_embeddings().weight.numel()
    t_len = teacher_seq_len or seq_len
    t = (
        0.0
        if teacher is None
        else forward_flops_per_token(teacher, t_len, logits=teacher_logits, upto_layer=teacher_upto) * t_len / seq_len
    )
    p = sum(3 * 2 * ds * dt for ds, dt in projector_dims)
    return StepCost(student=s, teacher=t, projectors=p)


def calibration_flops(
    teacher: CausalLM,
    rank: str,
    *,
    windows: int,
    seq_len: int,
    width: bool = False,
    residual: Optional[str] = None,
    kept_blocks: int = 0,
) -> float:
    """FLOPs of ranking a derived student's blocks (`hld.models.derive`) over `windows` windows of `seq_len`
    tokens: block_influence and angular one teacher forward without its head; loss_drop L + 1 whole forwards
    (the dropped block still runs under the identity hook, so its FLOPs are spent); explicit blocks nothing;
    `width` (heads and channels chosen by activation importance, `hld.models.prune_width`): one more forward
    without the head; `residual` (prune or project the residual stream of a student of `kept_blocks` blocks,
    `hld.models.residual_width`): `residual_flops`."""
    tokens = windows * seq_len
    no_head = forward_flops_per_token(teacher, seq_len, logits=False) * tokens
    extra = no_head if width else 0.0
    if residual is not None:
        extra += residual_flops(teacher, residual, windows=windows, seq_len=seq_len, kept_blocks=kept_blocks)
    if rank == "explicit":
        return extra
    if rank == "loss_drop":
        return (len(decoder_of(teacher).layers) + 1) * forward_flops_per_token(teacher, seq_len) * tokens + extra
    return no_head + extra


def residual_flops(teacher: CausalLM, how: str, *, windows: int, seq_len: int, kept_blocks: int) -> float:
    """The residual-width calibration (`hld.models.residual_width.moments`): one teacher forward without its
    head over the windows; `project` also sums x x^T over positions 1.. of each window for the 4 norms of each
    kept block and the final norm (2 d^2 FLOPs a position each) and eigendecomposes the d x d sum (9 d^3:
    the symmetric QR algorithm with eigenvectors, Golub & Van Loan, Matrix Computations, 8.3). `prune` reads
    elementwise statistics only (O(d) a position, not counted, as norms are not)."""
    out = forward_flops_per_token(teacher, seq_len, logits=False) * windows * seq_len
    if how == "project":
        d = text_config(teacher.config).hidden_size
        out += (4 * kept_blocks + 1) * 2 * d * d * windows * (seq_len - 1) + 9 * d**3
    return out


def planned_calibration(student: StudentConfig, teacher: CausalLM, seq_len: int) -> tuple[str, float]:
    """(rank, calibration FLOPs) of a derived student, known before any weight is read."""
    rank = "explicit" if student.init.blocks else student.init.rank
    width = any(getattr(student, k) is not None for k in ("n_heads", "n_kv_heads", "d_ff"))
    residual = derived_residual(student)
    w = 0 if rank == "explicit" and not width and residual is None else student.init.calibration_windows
    n = derived_depth(student.preset) or 0
    return rank, calibration_flops(
        teacher, rank, windows=w, seq_len=seq_len, width=width, residual=residual, kept_blocks=n
    )
