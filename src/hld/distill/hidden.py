"""Hidden-state targets: what `HiddenObjective` matches a student layer to, and which positions count.
The losses themselves are in src/hld/distill/hidden_losses/ (one file each).

Targets (`objective.hidden.normalize_teacher`)
- `standardize`: (x - mean_d) / std_d per dimension d, with mean and std of the teacher layer
  estimated once (float64) on the run's first training windows and frozen. Gemma 3's residual
  stream has a massive activation (one dimension holds ~85% of ||x||^2); after a per-token RMS the
  best *constant* prediction already explains ~90-96% of the MSE, so the loss mostly rewards
  emitting one fixed direction. Standardising removes that constant share by construction: the
  best constant predictor of a standardised target is 0 and explains nothing on the windows the
  statistics came from.
- `rms`: x / rms(x) per token. `none`: raw states.
- Position 0 of every window (the BOS, an attention sink whose norm is ~15x the others' at
  Gemma 3 270M's layer 9) is left out of the loss and of the statistics (`skip_first_position`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from hld.atomic import check_recorded, torch_save, write_checked
from hld.errors import HldError
from hld.files import MAX_MANIFEST_BYTES, regular_file

STATS_FILE = "hidden_stats.pt"
NORMALIZATIONS = ("none", "rms", "standardize")


def hidden_mask(mask: torch.Tensor, *, skip_first: bool) -> torch.Tensor:
    """Positions the hidden loss reads: those with a next-token target, minus position 0 of every
    window when `skip_first` (the BOS / attention sink under the BOS-led window protocol). mask (B, T)."""
    if not skip_first:
        return mask
    out = mask.clone()
    out[:, 0] = False
    return out


# --------------------------------------------------------------------------- standardisation


@dataclass
class Moments:
    """Per-dimension mean and standard deviation of one layer (float32 tensors (d,))."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int


def standardize_stats(items: Iterable[tuple[torch.Tensor, torch.Tensor]], *, eps: float = 1e-6) -> Moments:
    """Mean and (population) std per dimension of hidden states `x (B, T, d)` at the positions where
    `mask (B, T)` holds, over every item; sums accumulated in float64. std is floored at `eps` times
    the largest std, so a dead dimension does not blow up its standardised target."""
    s1 = s2 = None
    n = 0
    for x, mask in items:
        v = x.detach().reshape(-1, x.shape[-1])[mask.reshape(-1).to(x.device)].double()  # (n, d)
        if s1 is None:
            s1 = torch.zeros(x.shape[-1], dtype=torch.float64, device=v.device)
            s2 = torch.zeros_like(s1)
        s1 += v.sum(0)
        s2 += v.pow(2).sum(0)
        n += v.shape[0]
    if not n:
        raise ValueError("no valid positions to estimate the statistics on")
    mean = s1 / n
    var = (s2 / n - mean.pow(2)).clamp_min(0.0)
    std = var.sqrt()
    std = std.clamp_min(eps * float(std.max()) + 1e-12)
    return Moments(mean=mean.float().cpu(), std=std.float().cpu(), count=n)


def normalize_target(x: torch.Tensor, mode: str, moments: Optional[Moments] = None, eps: float = 1e-6) -> torch.Tensor:
    """The target the projected student state is matched to. x (..., d)."""
    x = x.float()
    if mode == "none":
        return x
    if mode == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "standardize":
        if moments is None:
            raise RuntimeError("normalize_teacher=standardize before the teacher statistics were estimated")
        return (x - moments.mean.to(x.device)) / moments.std.to(x.device)
    raise ValueError(f"unknown normalisation {mode!r}")


@torch.no_grad()
def estimate_layer_stats(
    teacher, order, layers: tuple[int, ...], *, n_windows: int, skip_first: bool
) -> dict[int, Moments]:
    """Statistics of each teacher layer on the first `n_windows` training windows in batch order
    (the windows the run reads first), from whatever produces its signals (online or the cache)."""
    from hld.distill.signals import Needs

    per_layer: dict[int, list] = {t: [] for t in layers}
    seen, step = 0, 0
    while seen < n_windows:
        batch = order.batch(step)
        take = min(n_windows - seen, batch.input_ids.shape[0])
        if take < batch.input_ids.shape[0]:
            batch = batch.first(take)
        sig = teacher(batch, Needs(layers=tuple(layers)))
        # paired windows (a student with its own tokenizer): the teacher's own positions
        m = hidden_mask(batch.teacher_mask if batch.paired else batch.mask, skip_first=skip_first)
        for t in layers:
            per_layer[t].append((sig.hidden[t].float().cpu(), m))
        seen += take
        step += 1
    return {t: standardize_stats(items) for t, items in per_layer.items()}


def save_stats(stats: dict[int, Moments], path: Path) -> None:
    """Write the frozen statistics (renamed into place: a reader never sees half a file), their sha256
    recorded beside them (`hidden_stats.pt.sha256`)."""
    obj = {int(t): {"mean": m.mean, "std": m.std, "count": m.count} for t, m in stats.items()}
    write_checked(Path(path), lambda fh: torch_save(obj, fh))


def load_stats(path: Path) -> dict[int, Moments]:
    """The statistics a run froze, refused in one line when damaged (never trained on)."""
    path = Path(path)
    fix = f"restore {path.name}, or delete it and rerun with --resume (the statistics are measured again)"
    regular_file(path, "the hidden-target statistics", fix, max_bytes=MAX_MANIFEST_BYTES)
    check_recorded(path, fix, "the hidden-target statistics")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        stats = {int(t): Moments(mean=v["mean"], std=v["std"], count=int(v["count"])) for t, v in raw.items()}
    except Exception as exc:  # torch's own errors for a torn zip, a bad pickle, or keys missing
        raise HldError(f"{path} is damaged or unreadable ({type(exc).__name__})", fix) from exc
    if not all(isinstance(m.mean, torch.Tensor) and isinstance(m.std, torch.Tensor) for m in stats.values()):
        raise HldError(f"{path} is damaged (its statistics are not tensors)", fix)
    return stats
