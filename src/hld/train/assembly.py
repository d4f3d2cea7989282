"""One assembly of what a run trains — the student, its projectors and the plan of objectives — for
training (`loop.build`, on the run's device), for planning (`budget.planned_steps`) and for the
teacher cache (`hld.cache.build`), both on the meta device where nothing is allocated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hld.config import RunConfig
from hld.config_checks import derived_depth
from hld.distill.hidden_losses.registry import hidden_loss
from hld.distill.mapping import layer_pairs
from hld.distill.objectives import Plan, build_plan
from hld.distill.projectors import Projectors
from hld.models.derive import (
    Derivation,
    derived_student,
    planned_d_model,
    planned_kept,
    planned_widths,
    prune_depth,
)
from hld.models.hooks import CausalLM, n_blocks, text_config
from hld.models.student import build_student

HLD_METHODS = ("hld-joint", "hld-first")  # the methods that match hidden layers (and train projectors)


@dataclass
class Assembly:
    student: CausalLM
    projectors: Optional[Projectors]  # None unless the method matches hidden layers
    plan: Plan


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) of the student's config: the tokenizer's, pad falling back to EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos, eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def assemble(
    cfg: RunConfig,
    *,
    tokenizer,
    vocab_size: int,
    teacher_lm: Optional[CausalLM],
    matmul_dtype: Optional[torch.dtype] = None,
    derivation: Optional[Derivation] = None,
    source_lm: Optional[CausalLM] = None,
) -> Assembly:
    """Build the student (seeded by train.seed), then its projectors (same seed), then the plan, on the
    current default device (`with torch.device("meta"):` to size a run without allocating it).
    `teacher_lm`: needed by the HLD methods (its depth and width) and by loss=lens; else may be None.
    A derived student (`depth-N`): the kept blocks of `source_lm` (the teacher's weights) as `derivation`
    chose them; without a derivation its structure alone, from `teacher_lm`'s shapes (meta device). With
    `mapping: kept`, a student whose residual was narrowed or projected is mapped to the teacher's space by its
    fixed basis P (`hld.distill.projectors`)."""
    bos, eos, pad = special_ids(tokenizer)
    kept: Optional[tuple[int, ...]] = None
    basis: Optional[torch.Tensor] = None  # a narrowed or projected residual: P (d_teacher, d_student)
    if derived_depth(cfg.student.preset) is None:
        student = build_student(
            cfg.student, vocab_size=vocab_size, bos_id=bos, eos_id=eos, pad_id=pad, seed=cfg.train.seed
        )
    elif derivation is not None and source_lm is not None:
        kept = derivation.kept
        student = derived_student(source_lm, derivation)
        basis = derivation.residual.basis if derivation.residual is not None else None
    else:
        kept = planned_kept(cfg.student, teacher_lm)
        d_model = planned_d_model(cfg.student, teacher_lm)
        widths = planned_widths(cfg.student, teacher_lm)
        student = prune_depth(teacher_lm, kept, weights=False, widths=widths, d_model=d_model)
        if d_model is not None:  # its shape only (planning: the meta device)
            basis = torch.empty(text_config(teacher_lm.config).hidden_size, d_model)
    projectors = None
    if cfg.objective.method in HLD_METHODS:
        hidden = cfg.objective.hidden
        pairs = layer_pairs(hidden, n_student=n_blocks(student), n_teacher=n_blocks(teacher_lm), kept=kept)
        d_s, d_t = text_config(student.config).hidden_size, text_config(teacher_lm.config).hidden_size
        identity = hidden.mapping == "kept" and hidden_loss(hidden.loss).projector
        projectors = Projectors(
            pairs,
            d_student=d_s,
            d_teacher=d_t,
            seed=cfg.train.seed,
            linear=hidden_loss(hidden.loss).projector,
            identity=identity,
            basis=basis if identity else None,
        )
    plan = build_plan(
        cfg.objective,
        projectors=projectors,
        chunk_tokens=cfg.train.loss_chunk_tokens,
        matmul_dtype=matmul_dtype,
        teacher_lm=teacher_lm,
    )
    return Assembly(student=student, projectors=projectors, plan=plan)


def vocab_of(teacher_lm: Optional[CausalLM]) -> int:
    """The teacher's embedding rows, which the student gets (Gemma 3 4B: 262,208 for a 262,144-token
    tokenizer)."""
    return teacher_lm.get_input_embeddings().weight.shape[0]
