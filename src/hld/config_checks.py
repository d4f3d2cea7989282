"""What a loaded config must satisfy: every numeric key within its range (`RANGES`, the table the
error messages quote) and no contradictory values (`validate`). Run by `hld.config.load_config`
before anything trains; reads the config's fields only, so it imports nothing of `hld.config`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import choices as divergence_choices
from hld.distill.divergences.registry import parse as parse_divergence
from hld.errors import HldError

RunConfig = Any  # an hld.config.RunConfig (not imported: hld.config imports this module)
StudentConfig = Any  # an hld.config.StudentConfig


MAX_STEPS = 10_000_000  # a budget needing more optimiser steps than this is refused up front

# The hidden losses (`objective.hidden.loss`): name -> help. The names half of the registry in
# hld.distill.hidden_losses (its classes; it refuses on import a class without a row here or a row
# without a class): config reads the names and help here, since it ranks below distill
# (scripts/import_layers.py).
HIDDEN_LOSSES: dict[str, str] = {
    "mse": "MSE over dims of the projected student state",
    "nmse": "normalised MSE (||e||^2/||t||^2) of the projected student state",
    "cosine": "1 - cosine of the projected student state",
    "relation": "projector-free MSE between the student's and the teacher's causal token-token cosine-similarity rows",
    "lens": "KL(teacher layer's logit lens || projected student state through the teacher's final norm and frozen "
    "head), on the raw teacher state",
    "cka": "projector-free 1 - linear CKA between the student's states and the teacher target over the batch's valid "
    "positions (a batch statistic: depends on the micro-batch)",
    "huber": "Huber (smooth-L1, beta 1) error over dims of the projected student state: bounded gradients on massive "
    "activations",
}

# The valid range of every numeric config key: (low, high, low excluded, high excluded). Checked at
# load time, before anything trains; `None` passes where the field is Optional. Floats must be finite.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "data.seq_len": (2, 1 << 20, False, False),
    "data.max_train_docs": (1, 10**12, False, False),
    "train.dist_timeout_minutes": (1, 7 * 24 * 60, False, False),
    "data.val_tokens": (1, 10**12, False, False),
    "teacher.cache_top_k": (1, 1 << 20, False, False),
    "teacher.cache_value_bits": (2, 8, False, False),
    "teacher.cache_samples": (1, 1 << 20, False, False),
    "teacher.cache_proposal_temperature": (0, 100, True, False),
    "student.n_layers": (1, 1024, False, False),
    "student.d_model": (1, 1 << 16, False, False),
    "student.n_heads": (1, 1024, False, False),
    "student.n_kv_heads": (1, 1024, False, False),
    "student.head_dim": (1, 4096, False, False),
    "student.d_ff": (1, 1 << 18, False, False),
    "student.init.calibration_windows": (1, 1 << 20, False, False),
    "objective.alpha": (0, 1, False, False),
    "objective.temperature": (0, 100, True, False),
    "objective.top_k": (1, 1 << 20, False, False),
    "objective.hidden.n_pairs": (1, 1024, False, False),
    "objective.hidden.beta": (0, 1e6, False, False),
    "objective.hidden.first_share": (0, 1, False, False),
    "objective.hidden.stats_windows": (1, 1 << 24, False, False),
    "objective.hidden.diagnostics_windows": (1, 1 << 20, False, False),
    "objective.cross_tokenizer.uld_top_k": (1, 1 << 20, False, False),
    "objective.cross_tokenizer.alm_temperature": (0, 1e6, True, False),
    "objective.cross_tokenizer.gold_uld_weight": (0, 1e6, False, False),
    "objective.alpha_schedule.final": (0, 1, False, False),
    "objective.alpha_schedule.warmup_share": (0, 1, False, False),
    "objective.alpha_schedule.decay_share": (0, 1, False, False),
    "objective.hidden.beta_schedule.final": (0, 1e6, False, False),
    "objective.hidden.beta_schedule.warmup_share": (0, 1, False, False),
    "objective.hidden.beta_schedule.decay_share": (0, 1, False, False),
    "budget.tokens": (1, 10**18, False, False),
    "budget.flops": (0, 1e40, True, False),
    "train.seed": (0, 2**32 - 1, False, False),
    "train.batch_size": (1, 1 << 20, False, False),
    "train.micro_batch_size": (1, 1 << 20, False, False),
    "train.lr": (0, 1, True, False),
    "train.min_lr_ratio": (0, 1, False, False),
    "train.weight_decay": (0, 1, False, False),
    "train.warmup_share": (0, 1, False, True),
    "train.decay_share": (0, 1, False, False),
    "train.grad_clip": (0, 1e6, False, False),
    "train.loss_chunk_tokens": (1, 1 << 24, False, False),
    "train.eval_every_steps": (0, MAX_STEPS, False, False),
    "train.log_every_steps": (1, MAX_STEPS, False, False),
    "train.checkpoint_every_steps": (0, MAX_STEPS, False, False),
}


def range_text(key: str) -> str:
    lo, hi, lo_open, hi_open = RANGES[key]
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: RunConfig) -> None:
    """Every numeric key within its range (RANGES), with the key, the value and the range in the message."""
    defaults = type(cfg)()  # the defaults, for the fix
    for key, (lo, hi, lo_open, hi_open) in RANGES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        ok = (
            math.isfinite(value)
            and (lo < value if lo_open else lo <= value)
            and (value < hi if hi_open else value <= hi)
        )
        if not ok:
            example = f" (default {_get(defaults, key)})" if _get(defaults, key) is not None else ""
            raise HldError(
                f"config {key}={value!r} is outside {range_text(key)}, its valid range",
                f"set {key} to a value in {range_text(key)}{example}",
            )


def divergence(spec: str) -> Divergence:
    """`objective.divergence`'s object (hld.distill.divergences), or the one-line error naming what is wrong."""
    try:
        return parse_divergence(spec)
    except ValueError as exc:
        raise HldError(
            f"config objective.divergence={exc}",
            f"name one of {divergence_choices()}; a parameter left out takes its default",
        ) from None


def validate(cfg: RunConfig) -> None:
    """Contradictory or out-of-range values."""
    check_ranges(cfg)
    t, o, d = cfg.train, cfg.objective, cfg.data
    div = divergence(o.divergence)
    B, T = t.batch_size, d.seq_len
    checks = [
        (
            cfg.name not in ("", ".", "..") and "/" not in cfg.name and "\0" not in cfg.name,
            f"config name={cfg.name!r} is not a plain name (the run goes to runs/<name>)",
            "give a name without '/' (or pass --out to choose the run directory)",
        ),
        (
            t.micro_batch_size is None or (t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size == 0),
            f"train.micro_batch_size={t.micro_batch_size} does not divide train.batch_size={t.batch_size}",
            "pick a micro batch size that divides the batch size",
        ),
        (
            d.val_tokens >= d.seq_len,
            f"data.val_tokens={d.val_tokens} is less than one window (data.seq_len={d.seq_len})",
            f"set data.val_tokens to at least {d.seq_len}",
        ),
        (0 <= t.warmup_share < 1, "train.warmup_share must be in [0, 1)", "e.g. 0.05"),
        (
            0 <= t.decay_share <= 1 and t.warmup_share + (t.decay_share if t.schedule == "wsd" else 0) <= 1,
            "train.warmup_share + train.decay_share exceed 1",
            "shorten warmup or decay",
        ),
        (
            len(t.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas),
            "train.betas must be two numbers in [0, 1)",
            "e.g. [0.9, 0.95]",
        ),
        (
            o.top_k is None or not div.needs_teacher_support or o.top_k_rest == "bucket",
            f"objective.divergence={o.divergence} with objective.top_k and top_k_rest=renormalize is infinite: "
            "it needs teacher mass wherever the student has some, and a renormalised top-k teacher has none off "
            "its k tokens",
            "use objective.top_k_rest=bucket, forward_kl or jsd, or set objective.top_k=null",
        ),
        *sampled_checks(cfg),
        *[
            (
                0 <= sc.warmup_share and 0 <= sc.decay_share and sc.warmup_share + sc.decay_share <= 1,
                f"objective {name}: warmup_share + decay_share must lie in [0, 1]",
                "e.g. warmup 0.1, decay 0.2",
            )
            for name, sc in (("alpha_schedule", o.alpha_schedule), ("hidden.beta_schedule", o.hidden.beta_schedule))
        ],
        (
            o.method != "hld-first" or 0 < o.hidden.first_share < 1,
            f"hld-first needs 0 < objective.hidden.first_share < 1 (got {o.hidden.first_share})",
            "a zero-length (or whole-run) hidden phase is not hld-first; e.g. 0.2",
        ),
        (
            o.method != "hld-joint" or o.hidden.beta > 0,
            "hld-joint with objective.hidden.beta=0 is plain kd",
            "set objective.hidden.beta > 0 or use method kd",
        ),
        (
            o.hidden.mapping != "explicit" or len(o.hidden.pairs) > 0,
            "objective.hidden.mapping=explicit needs objective.hidden.pairs",
            "give [[student, teacher], ...]",
        ),
        (
            o.hidden.mapping == "explicit" or not o.hidden.pairs,
            f"objective.hidden.pairs is set but objective.hidden.mapping={o.hidden.mapping} ignores it",
            "add objective.hidden.mapping=explicit to use those pairs, or drop objective.hidden.pairs",
        ),
        (
            cfg.budget.tokens is None or cfg.budget.flops is None,
            "both budget.tokens and budget.flops are set",
            "give one of them (set the other to null)",
        ),
        (
            cfg.budget.tokens is None or cfg.budget.tokens >= T * B,
            f"budget.tokens={cfg.budget.tokens} is less than one step ({B}x{T} tokens)",
            "raise budget.tokens or lower batch_size/seq_len",
        ),
        (
            cfg.budget.tokens is None or -(-cfg.budget.tokens // (B * T)) <= MAX_STEPS,
            f"budget.tokens={cfg.budget.tokens} needs {-(-(cfg.budget.tokens or 0) // (B * T)):,} steps of "
            f"{B}x{T} tokens, more than the limit of {MAX_STEPS:,}",
            "lower budget.tokens, or raise train.batch_size or data.seq_len",
        ),
    ]
    for ok, problem, fix in checks + derived_checks(cfg) + cross_tokenizer_checks(cfg):
        if not ok:
            raise HldError(problem, fix)
    if derived_depth(cfg.student.preset) is None:
        resolve_shape(cfg.student)


DERIVED = re.compile(r"depth-(\d+)")  # student.preset=depth-N: N of the teacher's blocks (hld.models.derive)
HLD = ("hld-joint", "hld-first")
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def derived_depth(preset: str) -> int | None:
    """N of a `depth-N` preset (a student made of N of its teacher's blocks); None for a scratch preset."""
    m = DERIVED.fullmatch(preset)
    return int(m.group(1)) if m else None


def derived_residual(student) -> str | None:
    """How a derived student's residual stream is mapped onto a basis (`student.init.residual`, prune or
    project; hld.models.residual_width): when `student.d_model` narrows it, or to project it at the teacher's
    width; None: it is the teacher's, untouched."""
    if derived_depth(student.preset) is None:
        return None
    return student.init.residual if student.d_model is not None or student.init.residual == "project" else None


def derived_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """A student derived from its teacher takes every size from it; kept blocks are listed once each, in
    order, as many as the preset names; the `kept` map needs such a student. What needs the teacher's own
    depth (a block beyond it) is checked when the teacher is known (`hld.models.derive`)."""
    s, hidden = cfg.student, cfg.objective.hidden
    n = derived_depth(s.preset)
    blocks = s.init.blocks
    if n is None:
        return [
            (
                not blocks,
                f"student.init.blocks is set but student.preset={s.preset} is built from scratch",
                "use student.preset=depth-N (N kept teacher blocks) or drop student.init.blocks",
            ),
            (
                hidden.mapping != "kept",
                f"objective.hidden.mapping=kept needs a student made of its teacher's blocks (preset {s.preset})",
                "use student.preset=depth-N, or another mapping (uniform)",
            ),
            (
                s.init.residual == "prune",
                f"student.init.residual={s.init.residual} is set but student.preset={s.preset} is built from scratch",
                "use student.preset=depth-N (a student derived from its teacher), or drop student.init.residual",
            ),
        ]
    # n_heads, n_kv_heads and d_ff narrow a derived student (hld.models.prune_width), d_model its residual
    # stream (hld.models.residual_width); the head width and the depth (the preset's N) are the teacher's
    set_sizes = [f"student.{k}" for k in ("n_layers", "head_dim") if getattr(s, k) is not None]
    ints = all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
    return [
        (n >= 1, f"student.preset={s.preset} keeps no block", "keep at least one block: depth-1 or more"),
        (
            s.family == "gemma3",
            f"student.family={s.family} set for student.preset={s.preset}, whose family is its teacher's",
            "drop student.family (a derived student is built from its teacher's own config)",
        ),
        (
            not set_sizes,
            f"{', '.join(set_sizes)} set for student.preset={s.preset}, whose depth and head width are its teacher's",
            f"drop {', '.join(set_sizes)} (depth-N sets the depth; student.d_model, n_heads, n_kv_heads, d_ff "
            "narrow it)",
        ),
        (
            not blocks or (ints and len(blocks) == n),
            f"student.init.blocks={blocks} does not list {n} block indices for student.preset={s.preset}",
            f"list {n} 0-based teacher block indices, or leave blocks empty to rank them",
        ),
        (
            blocks or not cfg.teacher.cache or hidden.mapping != "kept" or cfg.objective.method not in HLD,
            f"objective.hidden.mapping=kept with a ranked student.preset={s.preset} and teacher.cache: the cache's "
            "layers are chosen before the ranking runs",
            "list the kept blocks in student.init.blocks (scripts/derive_depths.py prints them), or train online",
        ),
        (
            not blocks or not ints or (min(blocks) >= 0 and list(blocks) == sorted(set(blocks))),
            f"student.init.blocks={blocks} must be distinct 0-based indices in increasing order",
            "write them increasing, each once, e.g. [0, 1, 2, 15, 16, 17]",
        ),
    ]


# losses over states pooled per chunk (laid out by window, chunk by chunk): every one but `lens`, which reads
# the teacher's head at the student's positions
CROSS_HIDDEN_LOSSES = ("mse", "nmse", "cosine", "relation", "huber", "cka")


def cross_tokenizer_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """A student with its own tokenizer (`student.tokenizer`): a scratch student (a derived one's embedding is
    its teacher's), a teacher cache only of what the loss reads per chunk (hld.cache.chunks: a top-k, no
    sampled signal), and nothing that needs one vocabulary on both sides (a top-k of the teacher's ids, a hidden
    loss that reads the teacher's head)."""
    s, o = cfg.student, cfg.objective
    if s.tokenizer is None:
        return []
    if not str(s.tokenizer).strip():
        return [(False, "student.tokenizer is empty", "give an HF id or a directory with tokenizer.json, or null")]
    hld_arm = o.method in HLD
    logit_top = o.cross_tokenizer.loss in ("uld", "gold")  # the losses that read the teacher's top-k
    return [
        (
            derived_depth(s.preset) is None,
            f"student.tokenizer is set for student.preset={s.preset}, whose embedding and head are its teacher's",
            "use a scratch preset (e.g. tiny-2l) with its own tokenizer, or drop student.tokenizer",
        ),
        (
            not cfg.teacher.cache or o.method == "ce" or o.cross_tokenizer.uld_top_k is not None or not logit_top,
            f"teacher.cache with student.tokenizer and objective.cross_tokenizer.uld_top_k=null: a per-chunk "
            f"cache keeps the teacher's top-k probabilities at each chunk for {o.cross_tokenizer.loss}",
            "set objective.cross_tokenizer.uld_top_k (e.g. 64), or drop teacher.cache (the teacher runs online)",
        ),
        (
            not cfg.teacher.cache or o.method == "ce" or cfg.teacher.cache_signal == "topk",
            "teacher.cache_signal=sampled with student.tokenizer: a per-chunk cache stores what the "
            "cross-tokenizer loss reads at each chunk, not draws of the teacher's tokens",
            "set teacher.cache_signal=topk (the default), or drop teacher.cache",
        ),
        (
            o.top_k is None,
            f"objective.top_k={o.top_k} with student.tokenizer: the cross-tokenizer losses keep their own top-k",
            "drop objective.top_k (objective.cross_tokenizer.uld_top_k sets ULD's)",
        ),
        (
            not hld_arm or o.hidden.loss in CROSS_HIDDEN_LOSSES,
            f"objective.hidden.loss={o.hidden.loss} with student.tokenizer: the states are pooled per aligned chunk "
            "and the teacher's head reads its own vocabulary",
            f"use one of {', '.join(CROSS_HIDDEN_LOSSES)}",
        ),
    ]


def sampled_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """A sampled cache signal (teacher.cache_signal=sampled) states draws from the teacher's own
    distribution p: it estimates forward KL(p || s) at temperature 1 and nothing else (a tempered teacher
    p^(1/T) / Z cannot be formed from draws of p; reverse KL and JSD need p where it was not drawn)."""
    t, o = cfg.teacher, cfg.objective
    if t.cache_signal != "sampled" or o.method == "ce":
        return []
    return [
        (
            o.temperature == 1,
            f"teacher.cache_signal=sampled with objective.temperature={o.temperature:g}: draws from the "
            "teacher's distribution estimate KD at temperature 1 only",
            "set objective.temperature=1 (the draws' tau is teacher.cache_proposal_temperature), or cache_signal=topk",
        ),
        (
            divergence(o.divergence).from_samples,
            f"teacher.cache_signal=sampled with objective.divergence={o.divergence}: sampled ids estimate "
            "forward KL(teacher||student) only",
            "set objective.divergence=forward_kl, or use teacher.cache_signal=topk",
        ),
        (
            o.top_k is None,
            f"teacher.cache_signal=sampled with objective.top_k={o.top_k}: a sampled signal has no top-k to truncate",
            "set objective.top_k=null (the draws per token are teacher.cache_samples)",
        ),
    ]


# --------------------------------------------------------------------------- the student's sizes


@dataclass(frozen=True)
class StudentShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int


# student.family: the decoder families a student can be built as (hld.models.student.FAMILIES builds each)
STUDENT_FAMILIES: dict[str, str] = {
    "gemma3": "Gemma 3 text (sliding-window and global attention, tied head; the default)",
    "llama": "Llama (full attention, RMSNorm, SwiGLU)",
    "qwen3": "Qwen 3 (Llama-like with q/k norms)",
    "mistral": "Mistral (Llama-like, sliding-window attention of 4,096)",
}

PRESETS: dict[str, StudentShape] = {
    # tiny students that train in minutes on a 2-core CPU
    "tiny-1l": StudentShape(n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256),
    "tiny-2l": StudentShape(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256),
    "tiny-4l": StudentShape(n_layers=4, d_model=96, n_heads=3, n_kv_heads=1, head_dim=32, d_ff=384),
    "small-6l": StudentShape(n_layers=6, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024),
    # the paper's sizes (non-embedding parameters)
    "paper-123m": StudentShape(n_layers=14, d_model=768, n_heads=12, n_kv_heads=4, head_dim=64, d_ff=3072),
    "paper-735m": StudentShape(n_layers=21, d_model=1536, n_heads=24, n_kv_heads=8, head_dim=64, d_ff=6144),
}


def resolve_shape(cfg: StudentConfig) -> StudentShape:
    """The student's sizes: its preset's, with any `student.*` size set in the config in their place;
    refused when attention cannot be built from them. Kept with the config's checks (and re-exported by
    `hld.models.student`, which builds the student from them) so that checking a config imports no model code."""
    if cfg.preset not in PRESETS:
        raise HldError(f"unknown student preset {cfg.preset!r}", f"use one of {', '.join(PRESETS)}")
    shape = PRESETS[cfg.preset]
    over = {
        k: getattr(cfg, k)
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")
        if getattr(cfg, k) is not None
    }
    shape = replace(shape, **over)
    if shape.n_heads % shape.n_kv_heads:
        raise HldError(
            f"student n_heads={shape.n_heads} is not a multiple of n_kv_heads={shape.n_kv_heads}",
            "pick n_kv_heads dividing n_heads",
        )
    if shape.d_model % shape.n_heads:  # transformers' attention refuses it
        raise HldError(
            f"student d_model={shape.d_model} is not a multiple of n_heads={shape.n_heads}",
            "pick student.n_heads dividing student.d_model (or set student.d_model)",
        )
    if min(shape.n_layers, shape.d_model, shape.n_heads, shape.head_dim, shape.d_ff) < 1:
        raise HldError("student sizes must be positive", "check the student.* overrides")
    return shape
