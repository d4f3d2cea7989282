"""A derived student narrower than its teacher in the residual stream (`student.d_model` under `depth-N`):
every weight that reads or writes the residual is mapped through one orthonormal basis P (d_teacher x
d_student), so that the student's residual state is s = P^T h, the teacher's state h in P's coordinates.

- `prune` (Minitron, arXiv 2407.14679): P is d_student columns of the identity, the residual channels with
  the largest activation importance: channel c scores the sum over the norms that feed a linear layer (each
  kept block's `input_layernorm` and `pre_feedforward_layernorm`, and the final norm) of the mean |y_c| of
  the norm's output y over the calibration positions.
- `project` (PCA, as a Low-Rank Clone style projected init, arXiv 2505.12781): P is the top d_student
  eigenvectors of M = sum over those same norms' inputs of mean x x^T / |x|^2 (each residual state as a unit
  vector), the subspace that keeps the largest mean share of the energy of the states the kept blocks and
  the head read.

Position 0 (the BOS sink) is left out, as in the other rankings. The weights (Gemma 3; src/hld/models/derive.py
applies this after the depth and head/channel slicing):

- embedding: E P * sqrt(d_t / d_s). Gemma 3 multiplies it by sqrt(hidden_size) inside the model, so a
  narrower config would scale the stream by sqrt(d_s) instead of sqrt(d_t); the factor makes the student's
  layer-0 state exactly P^T h_0. The head is tied to it.
- a linear reading the residual (q, k, v after `input_layernorm`; gate, up after `pre_feedforward_layernorm`):
  W P; a linear writing it (o, down): P^T W.
- RMSNorm is x / rms(x) * v with v = 1 + w per channel, and rms averages over the channels. For a state in
  span(P), rms(P^T x) = rms(x) * sqrt(d_t / d_s) * rho with rho = |P^T x| / |x|, so every norm's weight is
  multiplied by g = sqrt(d_t / d_s) * rho_n, rho_n^2 = tr(P^T C_n P) its calibration mean (C_n = mean x x^T /
  |x|^2 of that norm's input; rho = 1 for all channels kept). A per-channel v is diagonal in the teacher's
  basis and not, in general, in P's: for a norm that feeds a linear, `project` folds v into the linear
  (W diag(v) P; the norm keeps the scalar g), exact for states in span(P); the post-attention and
  post-feedforward norms (which write the residual) and the final norm (whose tied head cannot hold v)
  keep a diagonal weight, the least-squares fit u_j = (P^T diag(v) C_n P)_jj / (P^T C_n P)_jj of
  P^T diag(v) P on the calibration states. (`fold` may also name the writing norms: their v then goes into
  o and down, P^T diag(v) W, the direction of the norm's output exact and its size the calibration mean
  of |P^T diag(v) o| / |o|; and eps, no longer beside the same mean square, changes weight. Measured on
  Gemma 3 270M: better at full width, worse at 256, so not the default; docs/decisions.md.)
  `prune` keeps every norm's own v[kept] (P is a selection: exact).
  The final norm's g also undoes the embedding factor (the head is E P sqrt(d_t / d_s)): g = rho.
- q_norm and k_norm act on the head width, which does not change.

Whatever is kept, d_student = d_teacher with P the identity (prune) gives the teacher's logits, and so does a
full-rank orthogonal P (project) when the post and final norms' v are uniform (tested). HLD with
`mapping: kept` maps the student's state to the teacher's space by P (`hld.distill.projectors`, fixed).
Cost: one teacher forward without its head over the calibration windows; `project` also accumulates each
norm's C_n (2 d_t^2 FLOPs per position per norm) and one symmetric eigendecomposition
(`hld.flops.residual_flops`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from hld.errors import HldError
from hld.models.hooks import CausalLM, decoder_of, forward_windows, text_config

FAMILIES = ("gemma3_text",)  # the RMSNorm x * (1 + w) and the sqrt(d) embedding scale handled here
READS = ("input_layernorm", "pre_feedforward_layernorm")  # block norms whose output a linear layer reads
WRITES = ("post_attention_layernorm", "post_feedforward_layernorm")  # block norms whose output joins the residual
FINAL = "final"


@dataclass(frozen=True)
class Residual:
    """How the student's residual stream is made from the teacher's: the basis and each norm's new weight."""

    how: str  # prune | project
    d_model: int
    basis: torch.Tensor = field(repr=False)  # P (d_teacher, d_student), orthonormal columns, float64
    # (teacher block, norm name) or (-1, "final") -> the student norm's scale v_s = 1 + w_s (d_student,)
    scales: dict = field(repr=False)
    fold: tuple[str, ...]  # the norms whose v is folded into the linear layers that read (or write) them
    channels: Optional[list[int]] = None  # prune: the kept channels, increasing
    captured: float = 1.0  # mean share of the read residual states' energy inside span(P) (tr P^T M P / tr M)

    def to_json(self) -> dict:
        rho = {f"{b}.{n}": float(v.mean()) for (b, n), v in self.scales.items()}
        return {
            "how": self.how,
            "d_model": self.d_model,
            "fold": list(self.fold),
            "channels": self.channels,
            "captured": self.captured,
            "mean_norm_scale": rho,
        }


def check_residual(teacher: CausalLM, d_model: int) -> int:
    """The teacher's residual width, refused in one line when `d_model` is wider or the family unsupported."""
    c = text_config(teacher.config)
    kind = getattr(c, "model_type", "?")
    if kind not in FAMILIES:
        raise HldError(
            f"student.d_model={d_model}: the residual width of a {kind} teacher cannot be narrowed by hld",
            f"drop student.d_model (keep the teacher's {c.hidden_size}), or use a teacher of family "
            + ", ".join(FAMILIES),
        )
    if d_model > c.hidden_size:
        raise HldError(
            f"student.d_model={d_model} is wider than the teacher's {c.hidden_size}: a derived student only narrows",
            f"set student.d_model to at most {c.hidden_size}",
        )
    return int(c.hidden_size)


def _norms(teacher: CausalLM, kept: tuple[int, ...]) -> dict[tuple[int, str], Any]:
    dec = decoder_of(teacher)
    out = {(b, n): getattr(dec.layers[b], n) for b in kept for n in READS + WRITES}
    out[(-1, FINAL)] = dec.norm
    return out


def reads(key: tuple[int, str]) -> bool:
    """A norm whose input is the residual stream itself (the basis is fitted to these states)."""
    return key[1] in READS or key[1] == FINAL


@torch.no_grad()
def moments(teacher: CausalLM, windows: np.ndarray, kept: tuple[int, ...], *, full: bool) -> dict:
    """Per norm of the kept blocks and the final norm, over positions 1.. of every window: `importance`
    (d,) mean |y_c| of its output, `C` (d, d) mean x x^T / |x|^2 of its input (`full`), else `diag` (d,) its
    diagonal; float64 on the CPU."""
    norms = _norms(teacher, kept)
    sums: dict[tuple[int, str], dict[str, torch.Tensor]] = {k: {} for k in norms}

    def add(acc: dict, name: str, value: torch.Tensor) -> None:
        acc[name] = acc[name] + value if name in acc else value

    def hook(key):
        def fn(module, args):
            x = args[0][0, 1:].double()  # (T-1, d): one window, position 0 left out
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * (1 + module.weight.double())
            unit = x / x.norm(dim=-1, keepdim=True)
            add(sums[key], "importance", y.abs().sum(0).cpu())
            if full:  # float32 products summed into float64: 2 d^2 FLOPs per position
                add(sums[key], "C", (unit.float().T @ unit.float()).double().cpu())
            else:
                add(sums[key], "diag", unit.pow(2).sum(0).cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in norms.items()]
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long, device=next(teacher.parameters()).device)
    try:
        for _ in forward_windows(teacher, ids):
            pass
    finally:
        for h in handles:
            h.remove()
    count = ids.shape[0] * (ids.shape[1] - 1)
    return {k: {n: v / count for n, v in s.items()} for k, s in sums.items()}


def channel_ranking(stats: dict) -> torch.Tensor:
    """Minitron's embedding-channel importance: the sum over the reading norms of mean |y_c| (d,)."""
    return torch.stack([s["importance"] for k, s in stats.items() if reads(k)]).sum(0)


def pca_basis(stats: dict, d_model: int) -> tuple[torch.Tensor, float]:
    """(P, captured): the top `d_model` eigenvectors of M = sum of the reading norms' C (columns, by
    decreasing eigenvalue), and tr(P^T M P) / tr M."""
    m = sum(s["C"] for k, s in stats.items() if reads(k))
    vals, vecs = torch.linalg.eigh(m)  # ascending
    order = torch.argsort(vals, descending=True)[:d_model]
    return vecs[:, order].contiguous(), float(vals[order].sum() / vals.sum())


def _selection(channels: list[int], d: int) -> torch.Tensor:
    p = torch.zeros(d, len(channels), dtype=torch.float64)
    p[channels, torch.arange(len(channels))] = 1.0
    return p


def _quadratic_diag(p: torch.Tensor, s: dict, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag(P^T C P), diag(P^T diag(v) C P)) from C, or from its diagonal when P is a selection."""
    if "C" in s:
        cp = s["C"] @ p
        return (p * cp).sum(0), (p * (v[:, None] * cp)).sum(0)
    d = s["diag"] @ p.pow(2)  # P a selection: (P^T C P)_jj = C_cc
    return d, (v * s["diag"]) @ p.pow(2)


def norm_scales(teacher: CausalLM, stats: dict, p: torch.Tensor, *, fold: tuple[str, ...]) -> dict:
    """Each student norm's v_s = 1 + w_s (d_student,), float64 (the module docstring's rules). A norm named
    in `fold` keeps a scalar: its v goes into the linear layers that read it (READS) or write its input
    (WRITES: then its scale is the calibration mean of |P^T diag(v) o| / |o| instead of rho)."""
    d_t, d_s = p.shape
    norms = _norms(teacher, tuple(sorted({b for b, _ in stats if b >= 0})))
    out = {}
    for key, module in norms.items():
        v = 1 + module.weight.detach().double().cpu()
        kept_energy, weighted = _quadratic_diag(p, stats[key], v)
        rho = math.sqrt(float(kept_energy.sum()))
        g = rho if key[1] == FINAL else math.sqrt(d_t / d_s) * rho  # the final norm also undoes sqrt(d_t/d_s)
        if key[1] in fold and key[1] in READS:
            out[key] = torch.full((d_s,), g, dtype=torch.float64)
            continue
        if key[1] in fold:  # WRITES: o -> P^T diag(v) o before the norm
            vp = v[:, None] * p
            c = stats[key]["C"] if "C" in stats[key] else torch.diag(stats[key]["diag"])
            out[key] = torch.full((d_s,), math.sqrt(d_t / d_s * float((vp * (c @ vp)).sum())), dtype=torch.float64)
            continue
        fallback = p.pow(2).T @ v  # diag(P^T diag(v) P): for a direction the calibration never reached
        u = torch.where(kept_energy > 1e-12, weighted / kept_energy.clamp_min(1e-12), fallback)
        out[key] = g * u
    return out


def narrow(
    teacher: CausalLM,
    windows: np.ndarray,
    kept: tuple[int, ...],
    *,
    how: str,
    d_model: int,
    fold: Optional[tuple[str, ...]] = None,
) -> Residual:
    """Measure the calibration windows (`moments`) and choose the basis and norm scales (`residual_of`)."""
    check_residual(teacher, d_model)
    stats = moments(teacher, windows, kept, full=how == "project")
    return residual_of(teacher, stats, how=how, d_model=d_model, fold=fold)


def residual_of(
    teacher: CausalLM, stats: dict, *, how: str, d_model: int, fold: Optional[tuple[str, ...]] = None
) -> Residual:
    """The basis and the norm scales of a `d_model`-wide student from the kept blocks' `moments` (`full` for
    `project`). `fold`: fold the reading norms' v into their linear layers (default: for `project` only;
    `prune` is exact either way)."""
    d_t = check_residual(teacher, d_model)
    fold = (READS if how == "project" else ()) if fold is None else tuple(fold)
    if how == "prune":
        channels = sorted(torch.argsort(-channel_ranking(stats), stable=True)[:d_model].tolist())
        p = _selection(channels, d_t)
        diag = {k: s["diag"] if "diag" in s else torch.diagonal(s["C"]) for k, s in stats.items() if reads(k)}
        captured = sum(float(x[channels].sum()) for x in diag.values()) / sum(float(x.sum()) for x in diag.values())
    else:
        channels = None
        p, captured = pca_basis(stats, d_model)
    scales = norm_scales(teacher, stats, p, fold=fold)
    return Residual(how, d_model, p, scales, fold, channels, captured)


def narrow_state(state: dict[str, torch.Tensor], residual: Residual, kept: tuple[int, ...], *, prefix: str) -> None:
    """Map a depth- (and head-/channel-) sliced teacher state dict onto the student's residual basis, in place.
    `prefix`: the decoder's key prefix ("model.")."""
    p = residual.basis
    d_t, d_s = p.shape

    def mapped(key: str, fn) -> None:
        state[key] = fn(state[key].double()).float()

    mapped(f"{prefix}embed_tokens.weight", lambda e: e @ p * math.sqrt(d_t / d_s))
    if "lm_head.weight" in state:  # tied: the same tensor
        state["lm_head.weight"] = state[f"{prefix}embed_tokens.weight"]
    state[f"{prefix}norm.weight"] = (residual.scales[(-1, FINAL)] - 1).float()
    linears = {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # read it
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        "post_attention_layernorm": ("self_attn.o_proj",),  # write its input
        "post_feedforward_layernorm": ("mlp.down_proj",),
    }
    for k, b in enumerate(kept):
        block = f"{prefix}layers.{k}."
        for norm, names in linears.items():
            v = 1 + state[f"{block}{norm}.weight"].double()
            a = v if norm in residual.fold else torch.ones_like(v)  # the norm's v, when folded into them
            for lin in names:
                if norm in READS:  # W (out, d_t) -> W diag(a) P
                    mapped(f"{block}{lin}.weight", lambda w, a=a: (w * a) @ p)
                else:  # W (d_t, in) -> P^T diag(a) W
                    mapped(f"{block}{lin}.weight", lambda w, a=a: p.T @ (a[:, None] * w))
        for norm in READS + WRITES:
            state[f"{block}{norm}.weight"] = (residual.scales[(b, norm)] - 1).float()
