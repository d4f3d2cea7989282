"""Width pruning of a derived student (Minitron, arXiv 2407.14679): attention heads and MLP channels of
each kept block, chosen by their activation importance on the calibration windows.

- MLP channel c of a block: mean over positions of |a_c|, a = act(gate(x)) * up(x), the input of
  `down_proj`; the `student.d_ff` channels with the largest mean are kept (gate and up rows, down columns).
- Query head h: mean over positions of ||o_h||, o_h its slice of the attention output (the input of
  `o_proj`). Grouped-query attention shares one key/value head among the H / KV query heads of a group
  (heads h*KV/H... contiguous, as `repeat_kv` expands them), so a group is kept or dropped whole: the
  `student.n_kv_heads` groups with the largest summed head importance, then in each kept group its
  `student.n_heads / student.n_kv_heads` most important query heads (q rows, o columns; k and v rows of
  the group). Each block keeps its own heads and channels; the sizes are the same in every block.

Position 0 (the BOS sink) is left out, as in the depth rankings. The residual width (d_model) is not
pruned: the student's layers stay in the teacher's space (identity HLD mapping). Cost: one teacher
forward without its head over the calibration tokens (`hld.flops.calibration_flops`, rank `width`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hld.errors import HldError
from hld.models.hooks import CausalLM, decoder_of, forward_windows, text_config


@dataclass(frozen=True)
class Widths:
    """Target sizes of a width-pruned student (None: the teacher's)."""

    n_heads: int
    n_kv_heads: int
    d_ff: int


def teacher_widths(teacher: CausalLM) -> Widths:
    c = text_config(teacher.config)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return Widths(n_heads=c.num_attention_heads, n_kv_heads=kv, d_ff=c.intermediate_size)


def target_widths(
    teacher: CausalLM, *, n_heads: Optional[int], n_kv_heads: Optional[int], d_ff: Optional[int]
) -> Optional[Widths]:
    """The student's widths from `student.n_heads`, `n_kv_heads`, `d_ff` (None: the teacher's), refused in
    one line when wider than the teacher or when the query heads do not split evenly over the kept groups;
    None when nothing is narrowed."""
    t = teacher_widths(teacher)
    if n_heads is None and n_kv_heads is None and d_ff is None:
        return None
    kv = n_kv_heads if n_kv_heads is not None else min(t.n_kv_heads, n_heads or t.n_kv_heads)
    heads = n_heads if n_heads is not None else kv * (t.n_heads // t.n_kv_heads)
    w = Widths(heads, kv, d_ff if d_ff is not None else t.d_ff)
    for name, mine, theirs in (
        ("n_heads", w.n_heads, t.n_heads),
        ("n_kv_heads", w.n_kv_heads, t.n_kv_heads),
        ("d_ff", w.d_ff, t.d_ff),
    ):
        if mine > theirs:
            raise HldError(
                f"student.{name}={mine} is wider than the teacher's {theirs}: pruning only narrows",
                f"set student.{name} to at most {theirs}",
            )
    if w.n_heads % w.n_kv_heads or w.n_heads // w.n_kv_heads > t.n_heads // t.n_kv_heads:
        raise HldError(
            f"student.n_heads={w.n_heads} does not split into student.n_kv_heads={w.n_kv_heads} groups of at "
            f"most the teacher's {t.n_heads // t.n_kv_heads} query heads each (a kept key/value group keeps its "
            "own query heads)",
            f"pick n_heads a multiple of n_kv_heads, at most {t.n_heads // t.n_kv_heads} x n_kv_heads",
        )
    return w


@torch.no_grad()
def importance(teacher: CausalLM, windows: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """Per teacher block: `heads` (H,) mean ||o_h|| and `channels` (d_ff,) mean |a_c| over the positions
    1.. of every window (float64)."""
    H = teacher_widths(teacher).n_heads
    layers = decoder_of(teacher).layers
    sums: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    count = 0

    def hook(i: int, name: str):
        def fn(module, args):
            x = args[0][:, 1:].double()  # (B, T-1, width)
            if name == "heads":
                x = x.reshape(*x.shape[:-1], H, -1).norm(dim=-1)  # (B, T-1, H)
            else:
                x = x.abs()
            s = x.reshape(-1, x.shape[-1]).sum(0).cpu()
            sums[i][name] = sums[i][name] + s if name in sums[i] else s

        return fn

    handles = []
    for i, block in enumerate(layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(hook(i, "heads")))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(hook(i, "channels")))
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long, device=next(teacher.parameters()).device)
    try:
        for _ in forward_windows(teacher, ids):
            count += ids.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
    return [{k: v / count for k, v in s.items()} for s in sums]


def choose(scores: dict[str, torch.Tensor], teacher: Widths, target: Widths) -> dict[str, list[int]]:
    """Kept `heads` (query heads, in order), `groups` (key/value heads) and `channels` of one block."""
    per = teacher.n_heads // teacher.n_kv_heads
    heads = scores["heads"].reshape(teacher.n_kv_heads, per)  # (KV, H/KV): group g holds heads g*per..
    groups = sorted(torch.argsort(-heads.sum(1), stable=True)[: target.n_kv_heads].tolist())
    keep_per = target.n_heads // target.n_kv_heads
    kept_heads = []
    for g in groups:
        kept_heads += sorted(g * per + j for j in torch.argsort(-heads[g], stable=True)[:keep_per].tolist())
    channels = sorted(torch.argsort(-scores["channels"], stable=True)[: target.d_ff].tolist())
    return {"heads": kept_heads, "groups": groups, "channels": channels}


def slice_block(state: dict[str, torch.Tensor], prefix: str, kept: dict[str, list[int]], head_dim: int) -> None:
    """Cut one block's attention and MLP weights (`prefix` = "model.layers.<i>.") to its kept heads,
    groups and channels, in place. Biases (Qwen 2) follow their rows."""

    def rows(idx: list[int], unit: int) -> torch.Tensor:
        return torch.tensor([i * unit + j for i in idx for j in range(unit)], dtype=torch.long)

    q, kv, ch = rows(kept["heads"], head_dim), rows(kept["groups"], head_dim), torch.tensor(kept["channels"])
    for name, idx in (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)):
        for part in ("weight", "bias"):
            key = f"{prefix}{name}.{part}"
            if key in state:
                state[key] = state[key].index_select(0, idx)
    state[f"{prefix}self_attn.o_proj.weight"] = state[f"{prefix}self_attn.o_proj.weight"].index_select(1, q)
    for name in ("mlp.gate_proj", "mlp.up_proj"):
        state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"].index_select(0, ch)
    state[f"{prefix}mlp.down_proj.weight"] = state[f"{prefix}mlp.down_proj.weight"].index_select(1, ch)
