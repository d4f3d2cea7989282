"""`hld inspect-teacher`: how much of a hidden-state target a constant predicts, per teacher layer.

For each layer, on held-out windows (positions left out as the hidden loss leaves them out):
- `top_dim_share`: the share of sum ||x||^2 held by the single largest dimension (a massive
  activation shows as a share near 1);
- `const_share[mode]`: the share of the target's mean square that the best *constant* predictor
  removes, ||mean(y)||^2 / mean(||y||^2), for y normalised by `mode` (none, rms, standardize — the
  standardisation statistics estimated on training windows, as a run does). What remains is the part
  of the hidden MSE that depends on the token.
"""

from __future__ import annotations

import torch

from hld.config import RunConfig
from hld.data.packing import make_batch
from hld.distill.hidden import NORMALIZATIONS, Moments, hidden_mask, normalize_target, standardize_stats
from hld.distill.signals import Needs
from hld.distill.signals.online import OnlineTeacher
from hld.models.hooks import n_blocks


def constant_share(y: torch.Tensor) -> float:
    """Share of mean ||y||^2 explained by the best constant (the mean). y (n, d)."""
    y = y.double()
    return float(y.mean(0).pow(2).sum() / y.pow(2).sum(-1).mean())


def top_dim_share(x: torch.Tensor) -> tuple[int, float]:
    """(dimension, its share of sum ||x||^2) for the dimension holding the most. x (n, d)."""
    per_dim = x.double().pow(2).sum(0)
    d = int(per_dim.argmax())
    return d, float(per_dim[d] / per_dim.sum())


@torch.no_grad()
def _layer_states(teacher: OnlineTeacher, windows, layers, *, skip_first: bool, batch_size: int = 8):
    out: dict[int, list] = {t: [] for t in layers}
    for i in range(0, len(windows), batch_size):
        batch = make_batch(windows[i : i + batch_size])
        sig = teacher(batch, Needs(layers=tuple(layers)))
        m = hidden_mask(batch.mask, skip_first=skip_first)
        for t in layers:
            out[t].append((sig.hidden[t].float(), m))
    return out


def inspect_teacher(cfg: RunConfig, resources, *, n_windows: int = 24) -> list[dict]:
    tok = resources.tokenizer(cfg.teacher.model)
    lm = resources.teacher(cfg.teacher.model, cfg.teacher.dtype).model
    layers = list(range(1, n_blocks(lm) + 1))
    teacher = OnlineTeacher(lm, tuple(layers))
    d, h = cfg.data, cfg.objective.hidden
    try:
        kw = dict(skip_first=h.skip_first_position)
        train_w = resources.train_windows(d, tok)
        val_w = resources.validation_windows(d, tok, n=n_windows)
        fit = _layer_states(teacher, train_w[: h.stats_windows], layers, **kw)
        held = _layer_states(teacher, val_w, layers, **kw)
    finally:
        teacher.capture.remove()
    rows = []
    for t in layers:
        moments: Moments = standardize_stats(fit[t])
        x = torch.cat([v.reshape(-1, v.shape[-1])[m.reshape(-1)] for v, m in held[t]])  # (n, d_t)
        dim, share = top_dim_share(x)
        const = {mode: constant_share(normalize_target(x, mode, moments)) for mode in NORMALIZATIONS}
        rows.append(
            {
                "layer": t,
                "top_dim": dim,
                "top_dim_share": share,
                "const_share": const,
                "norm_mean": float(x.norm(dim=-1).mean()),
            }
        )
    return rows
