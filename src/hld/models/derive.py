"""Students made from their teacher: depth pruning (`student.preset=depth-N`).

A depth-N student is the teacher with N of its decoder blocks kept, in their order, and its embedding,
final norm and head: an ordinary model of the teacher's family (same class, its config with
`num_hidden_layers = N` and the kept blocks' `layer_types`), so it trains, exports and reloads like
any student. Which blocks are kept is `student.init.blocks`, or a ranking on calibration windows (the
first `student.init.calibration_windows` windows of the training store, the same for every seed and arm):

- `block_influence` (ShortGPT, arXiv 2403.03853): BI_i = 1 - mean over positions of cos(x_i, x_{i+1}),
  x_i the input of block i and x_{i+1} its output; the N blocks with the largest BI are kept.
- `angular` (Gromov et al., arXiv 2403.17887): for n = L - N, the run of n consecutive blocks l..l+n-1
  whose input x_l and output x_{l+n} are closest, d = mean arccos(cos(x_l, x_{l+n})) / pi, is dropped.
- `loss_drop`: the teacher's mean next-token loss on the windows with block i replaced by the identity,
  minus its loss with every block; the N blocks whose removal costs most are kept.

Heads and MLP channels are narrowed by `hld.models.prune_width` (`student.n_heads`, `n_kv_heads`, `d_ff`), the
residual stream by `hld.models.residual_width` (`student.d_model`, `student.init.residual`: prune or project).
Position 0 of each window (the BOS, an attention sink) is left out of the two similarity rankings, as it
is of the hidden loss. Their cost is counted into the run's FLOPs in both accountings
(`hld.flops.calibration_flops`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hld.config import StudentConfig
from hld.config_checks import derived_depth, derived_residual
from hld.errors import HldError
from hld.models.hooks import CausalLM, LayerCapture, decoder_of, forward_windows, n_blocks, text_config
from hld.models.prune_width import Widths, choose, importance, slice_block, target_widths, teacher_widths
from hld.models.residual_width import Residual, check_residual, narrow, narrow_state

# the families whose decoder is `embed_tokens`, `layers`, a final norm and a head, with per-block state
# only in `layers` and `layer_types` (tested: Gemma 3, Llama, Qwen 2/3, Mistral)
PRUNABLE = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")
RANKINGS = ("block_influence", "angular", "loss_drop")
DERIVATION_FILE = "derivation.json"


@dataclass(frozen=True)
class Derivation:
    """How a derived student was made: written into its run directory (`derivation.json`)."""

    teacher: str
    n_teacher_blocks: int
    kept: tuple[int, ...]  # 0-based teacher block indices, in order: student block k is teacher block kept[k]
    rank: str  # "explicit" or one of RANKINGS
    scores: Optional[tuple[float, ...]]  # per teacher block (block_influence, loss_drop) or per run start (angular)
    calibration_windows: int  # 0 when the blocks were given
    calibration_tokens: int
    seconds: float
    calibration_flops: float = 0.0  # `hld.flops.calibration_flops`, set by who counts (`Resources.derivation`)
    # width pruning (hld.models.prune_width): n_heads, n_kv_heads, d_ff and, per kept block, its kept
    # query heads, key/value groups and MLP channels; None when the blocks keep the teacher's widths
    widths: Optional[dict] = None
    # a narrower residual stream (hld.models.residual_width): its basis and norm scales; None: the teacher's
    residual: Optional[Residual] = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(dataclasses.replace(self, residual=None))
        out["kept"], out["origin"] = list(self.kept), origin_text(self)
        out["scores"] = list(self.scores) if self.scores is not None else None
        out["residual"] = self.residual.to_json() if self.residual is not None else None
        return out


def origin_text(d: Derivation) -> str:
    how = "given" if d.rank == "explicit" else f"ranked by {d.rank} on {d.calibration_windows} windows"
    out = f"{len(d.kept)} of {d.n_teacher_blocks} blocks of {d.teacher} ({how}): {list(d.kept)}"
    if d.widths is not None:
        w = d.widths
        out += f"; narrowed to {w['n_heads']} heads ({w['n_kv_heads']} kv), d_ff {w['d_ff']} by activation importance"
    if d.residual is not None:
        out += f"; {residual_text(d.residual.how, d.residual.d_model)} ({d.residual.captured:.1%} of the energy kept)"
    return out


def residual_text(how: str, d_model: int) -> str:
    by = "activation importance" if how == "prune" else "PCA of the residual states"
    return f"residual d_model {d_model} by {how} ({by})"


# --------------------------------------------------------------------------- the student's structure


def check_prunable(teacher: CausalLM, preset: str) -> None:
    kind = getattr(text_config(teacher.config), "model_type", "?")
    if kind not in PRUNABLE:
        raise HldError(
            f"student.preset={preset}: a {kind} teacher cannot be depth-pruned by hld",
            f"use a scratch preset (tiny-2l, ...), or a teacher of family {', '.join(PRUNABLE)}",
        )


def check_blocks(student: StudentConfig, n_teacher: int) -> int:
    """N of `depth-N`, refused in one line when the teacher has fewer blocks or a listed block is beyond it."""
    n = derived_depth(student.preset)
    assert n is not None
    if n > n_teacher:
        raise HldError(
            f"student.preset={student.preset} keeps {n} blocks but the teacher has {n_teacher}",
            f"keep at most {n_teacher} blocks (depth-{n_teacher} is the teacher itself)",
        )
    if student.init.blocks and max(student.init.blocks) >= n_teacher:
        raise HldError(
            f"student.init.blocks={student.init.blocks} names block {max(student.init.blocks)}, "
            f"but the teacher's blocks are 0..{n_teacher - 1}",
            f"list 0-based indices below {n_teacher}",
        )
    return n


def planned_kept(student: StudentConfig, teacher: CausalLM) -> tuple[int, ...]:
    """The kept blocks as far as they are known without running the teacher: the listed ones, else the
    first N (what `hld plan` and the meta-device assembly size; every block of the families in
    PRUNABLE has the same parameters, so only attention spans can differ)."""
    check_prunable(teacher, student.preset)
    n = check_blocks(student, n_blocks(teacher))
    return tuple(student.init.blocks) if student.init.blocks else tuple(range(n))


def planned_widths(student: StudentConfig, teacher: CausalLM) -> Optional[Widths]:
    """The widths `student.n_heads`, `n_kv_heads`, `d_ff` narrow a derived student to (None: the teacher's)."""
    return target_widths(teacher, n_heads=student.n_heads, n_kv_heads=student.n_kv_heads, d_ff=student.d_ff)


def planned_d_model(student: StudentConfig, teacher: CausalLM) -> Optional[int]:
    """The residual width a derived student is narrowed (or projected) to, checked against the teacher's;
    None when the residual is the teacher's, untouched (`hld.models.residual_width`)."""
    if derived_residual(student) is None:
        return None
    d = student.d_model if student.d_model is not None else text_config(teacher.config).hidden_size
    check_residual(teacher, d)
    return d


def pruned_config(
    teacher: CausalLM, kept: tuple[int, ...], widths: Optional[Widths] = None, d_model: Optional[int] = None
):
    """The teacher's (text) config with only the kept blocks (and the narrower widths and residual)."""
    cfg = copy.deepcopy(text_config(teacher.config))
    if d_model is not None:
        cfg.hidden_size = d_model  # Gemma 3's head_dim is its own key: the heads keep their width
    if widths is not None:
        cfg.num_attention_heads, cfg.num_key_value_heads = widths.n_heads, widths.n_kv_heads
        cfg.intermediate_size = widths.d_ff
    types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(kept)
    if types is not None:
        cfg.layer_types = [types[i] for i in kept]
    cfg.use_cache = False
    return cfg


_BLOCK_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def prune_depth(
    teacher: CausalLM,
    kept: tuple[int, ...],
    *,
    weights: bool = True,
    widths: Optional[Widths] = None,
    per_block: Optional[list[dict]] = None,
    residual: Optional[Residual] = None,
    d_model: Optional[int] = None,
) -> CausalLM:
    """A model of the teacher's class with only the kept blocks, their weights copied (fp32, trainable,
    on the teacher's device), each block cut to its `per_block` heads, groups and channels when `widths`
    narrows it (`hld.models.prune_width`), then mapped onto `residual`'s basis when it narrows or projects
    the residual stream (`hld.models.residual_width`); `weights=False`: its structure only (`d_model` its
    residual width), on the current default device (`with torch.device("meta")`)."""
    if residual is not None:
        d_model = residual.d_model
    cfg = pruned_config(teacher, kept, widths, d_model)
    if not weights:
        return type(teacher)(cfg)
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _BLOCK_KEY.search(key)
        if m is not None:
            old = int(m.group(2))
            if old not in new_index:
                continue
            key = key[: m.start(2)] + str(new_index[old]) + key[m.end(2) :]
        state[key] = value.detach().float()
    if widths is not None:
        assert per_block is not None and len(per_block) == len(kept)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // text_config(teacher.config).num_attention_heads
        prefix = next(k for k in state if _BLOCK_KEY.search(k)).split("layers.")[0] + "layers."
        for k, chosen in enumerate(per_block):
            slice_block(state, f"{prefix}{k}.", chosen, head_dim)
    if residual is not None:
        embed = next(k for k in state if k.endswith("embed_tokens.weight"))
        narrow_state(state, residual, kept, prefix=embed[: -len("embed_tokens.weight")])
    device = next(teacher.parameters()).device
    with torch.device(device):
        student = uninitialised(type(teacher), cfg)  # every parameter is loaded below (checked)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _tied(student, k)]
    if missing or unexpected:
        raise RuntimeError(f"pruned state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.float().train().requires_grad_(True)
    return student


def uninitialised(cls: type, cfg) -> CausalLM:
    """A model of `cls` with its parameters allocated but not initialised, its weights tied as construction
    ties them: for a model whose every parameter is loaded next. A random init of Gemma 3's 262k x 640
    embedding, drawn twice (torch's module init, then transformers'), cost 2.4 s of each derived student's
    2.9 s on a 2-core CPU. transformers' `no_init_weights` (what `from_pretrained` uses) skips both, and
    its tying, which `tie_weights` then does. Buffers computed from the config (RoPE frequencies, the
    embedding scale) are made as always."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
        except ImportError:  # neither: initialised as constructed (slower, the same weights once loaded)
            no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    with no_init_weights():
        model = cls(cfg)
    model.tie_weights()
    return model


def derived_student(teacher: CausalLM, d: Derivation) -> CausalLM:
    """The student `d` describes, its weights from `teacher`: the kept blocks, narrowed as `d` chose."""
    w = d.widths
    widths = Widths(w["n_heads"], w["n_kv_heads"], w["d_ff"]) if w is not None else None
    per_block = w["per_block"] if w is not None else None
    return prune_depth(teacher, d.kept, widths=widths, per_block=per_block, residual=d.residual)


def _tied(model: CausalLM, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(text_config(model.config), "tie_word_embeddings", False))


# --------------------------------------------------------------------------- rankings


def _windows_tensor(windows: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(windows), dtype=torch.long, device=device)


@torch.no_grad()
def layer_states(teacher: CausalLM, windows: np.ndarray) -> list[torch.Tensor]:
    """x_0 .. x_L of every calibration window (x_0 the embedding output, x_i block i's output), float32
    on the CPU, each (n, T, d); the head is not run."""
    L = n_blocks(teacher)
    cap = LayerCapture(teacher, range(L + 1))
    cap.stop_after = L
    ids = _windows_tensor(windows, next(teacher.parameters()).device)
    per: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    try:
        for _ in forward_windows(teacher, ids):
            got = cap.pop()
            for i in range(L + 1):
                per[i].append(got[i].float().cpu())
    finally:
        cap.remove()
    return [torch.cat(x) for x in per]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) per position, positions 1.. of each window (position 0, the BOS sink, left out). (n, T-1)."""
    return F.cosine_similarity(a[:, 1:].double(), b[:, 1:].double(), dim=-1)


def block_influence(states: list[torch.Tensor]) -> list[float]:
    """BI_i = 1 - mean cos(x_i, x_{i+1}) for each block i (0-based)."""
    return [float(1 - _cos(states[i], states[i + 1]).mean()) for i in range(len(states) - 1)]


def angular_distances(states: list[torch.Tensor], n_drop: int) -> list[float]:
    """d(l) = mean arccos(cos(x_l, x_{l+n_drop})) / pi for every run start l = 0..L - n_drop."""
    L = len(states) - 1
    return [
        float(torch.arccos(_cos(states[a], states[a + n_drop]).clamp(-1, 1)).mean() / math.pi)
        for a in range(L - n_drop + 1)
    ]


@torch.no_grad()
def mean_loss(model: CausalLM, windows: np.ndarray) -> float:
    """Mean next-token NLL over every target of the windows (each position predicts the next)."""
    ids = _windows_tensor(windows, next(model.parameters()).device)
    total, n = 0.0, 0
    for w in range(ids.shape[0]):
        logits = model(input_ids=ids[w : w + 1], use_cache=False).logits[0, :-1].float()  # (T-1, V)
        total += float(F.cross_entropy(logits, ids[w, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return total / n


@torch.no_grad()
def loss_drop(teacher: CausalLM, windows: np.ndarray) -> list[float]:
    """The teacher's mean loss with block i replaced by the identity, minus its loss with all blocks."""
    base = mean_loss(teacher, windows)
    out = []
    for block in decoder_of(teacher).layers:
        handle = block.register_forward_hook(_identity, with_kwargs=True)
        try:
            out.append(mean_loss(teacher, windows) - base)
        finally:
            handle.remove()
    return out


def _identity(module, args, kwargs, output):
    """Forward hook (with_kwargs): the block's output replaced by its input hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def top_blocks(scores: list[float], n: int) -> tuple[int, ...]:
    """The n blocks with the highest scores (ties: the earlier block), in increasing order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:n]))


def rank_scores(rank: str, teacher: CausalLM, windows: np.ndarray, *, n_drop: int) -> list[float]:
    """A ranking's scores on the calibration windows (`kept_by` turns them into kept blocks)."""
    if rank == "loss_drop":
        return loss_drop(teacher, windows)
    states = layer_states(teacher, windows)
    if rank == "block_influence":
        return block_influence(states)
    return angular_distances(states, n_drop) if n_drop else [0.0]


def kept_by(rank: str, scores: list[float], *, n: int, n_teacher: int) -> tuple[int, ...]:
    """The kept blocks: the n top-scored (block_influence, loss_drop), or all but the contiguous run of
    n_teacher - n blocks that starts where the angular distance is smallest."""
    if rank != "angular":
        return top_blocks(scores, n)
    start = min(range(len(scores)), key=lambda s: (scores[s], s))
    return tuple(i for i in range(n_teacher) if not start <= i < start + (n_teacher - n))


def derive(student: StudentConfig, *, teacher: CausalLM, teacher_name: str, train_windows: Any) -> Derivation:
    """Choose the kept blocks (given, or ranked on the first calibration windows of the training store)."""
    check_prunable(teacher, student.preset)
    L = n_blocks(teacher)
    n = check_blocks(student, L)
    t0 = time.time()
    seq_len = int(train_windows[:1].shape[1])
    target = planned_widths(student, teacher)
    d_model = planned_d_model(student, teacher)  # refused before any forward when wider than the teacher
    if student.init.blocks:
        kept, rank, scores, w = tuple(student.init.blocks), "explicit", None, 0
    else:
        rank, w = student.init.rank, min(student.init.calibration_windows, len(train_windows))
        windows = np.asarray(train_windows[:w])
        scores = rank_scores(rank, teacher, windows, n_drop=L - n)
        kept = kept_by(rank, scores, n=n, n_teacher=L)
    widths = None
    if target is not None:  # one more pass over the calibration windows: each kept block's activations
        w = min(student.init.calibration_windows, len(train_windows))
        scores_w = importance(teacher, np.asarray(train_windows[:w]))
        per_block = [choose(scores_w[b], teacher_widths(teacher), target) for b in kept]
        widths = {
            "n_heads": target.n_heads,
            "n_kv_heads": target.n_kv_heads,
            "d_ff": target.d_ff,
            "per_block": per_block,
        }
    residual = None
    if d_model is not None:  # one more pass: the residual channels' importance or principal directions
        w = min(student.init.calibration_windows, len(train_windows))
        residual = narrow(teacher, np.asarray(train_windows[:w]), kept, how=student.init.residual, d_model=d_model)
    return Derivation(
        residual=residual,
        teacher=teacher_name,
        widths=widths,
        n_teacher_blocks=L,
        kept=kept,
        rank=rank,
        scores=tuple(float(s) for s in scores) if scores is not None else None,
        calibration_windows=w,
        calibration_tokens=w * seq_len,
        seconds=time.time() - t0,
    )
