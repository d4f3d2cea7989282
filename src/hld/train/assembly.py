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
from hld.errors import HldError
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
    teacher_tokenizer=None,
) -> Assembly:
    """Build the student (seeded by train.seed), then its projectors (same seed), then the plan, on the
    current default device (`with torch.device("meta"):` to size a run without allocating it).
    `teacher_lm`: needed by the HLD methods (its depth and width) and by loss=lens; else may be None.
    A derived student (`depth-N`): the kept blocks of `source_lm` (the teacher's weights) as `derivation`
    chose them; without a derivation its structure alone, from `teacher_lm`'s shapes (meta device). With
    `mapping: kept`, a student whose residual was narrowed or projected is mapped to the teacher's space by its
    fixed basis P (`hld.distill.projectors`). `teacher_tokenizer`: the teacher's, when the student has its own
    (`tokenizer`, `student.tokenizer`): the plan is then the cross-tokenizer one (hld.distill.cross_tok)."""
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
    if teacher_tokenizer is not None:
        plan = cross_plan(cfg, projectors, teacher_tokenizer, tokenizer, matmul_dtype)
    else:
        plan = build_plan(
            cfg.objective,
            projectors=projectors,
            chunk_tokens=cfg.train.loss_chunk_tokens,
            matmul_dtype=matmul_dtype,
            teacher_lm=teacher_lm,
        )
    return Assembly(student=student, projectors=projectors, plan=plan)


def meta_assembly(cfg: RunConfig, teacher_lm, tokenizer, student_tokenizer=None) -> Assembly:
    """The run's `Assembly` on the meta device (shapes, no memory: for sizing a run before it is built). A
    student with its own tokenizer (`student_tokenizer`) at its own vocabulary, the teacher's `tokenizer` the
    other side of its cross-tokenizer plan; else at the teacher's vocabulary with `tokenizer`'s special ids."""
    paired = student_tokenizer is not None
    with torch.device("meta"):
        return assemble(
            cfg,
            tokenizer=student_tokenizer if paired else tokenizer,
            vocab_size=len(student_tokenizer) if paired else vocab_of(teacher_lm),
            teacher_lm=teacher_lm,
            teacher_tokenizer=tokenizer if paired else None,
        )


_SHARED: dict[tuple[int, int], tuple] = {}  # (teacher, student) tokenizer ids -> (both, their shared vocabulary)


def cross_plan(cfg: RunConfig, projectors, teacher_tokenizer, student_tokenizer, matmul_dtype) -> Plan:
    """The plan of a student with its own tokenizer: its CE on its own tokens, and for kd / hld-* the
    cross-tokenizer losses of `objective.cross_tokenizer` over the aligned chunks."""
    from hld.distill.cross_tok.objectives import build_cross_plan
    from hld.distill.cross_tok.vocab import shared_vocab

    x = cfg.objective.cross_tokenizer
    vocab = None
    if x.loss == "gold" and cfg.objective.method != "ce":
        key = (id(teacher_tokenizer), id(student_tokenizer))
        if key not in _SHARED or _SHARED[key][0] is not teacher_tokenizer or _SHARED[key][1] is not student_tokenizer:
            _SHARED.clear()  # the latest pair only (`hld run`'s cells share it)
            _SHARED[key] = (teacher_tokenizer, student_tokenizer, shared_vocab(teacher_tokenizer, student_tokenizer))
        vocab = _SHARED[key][2]
        if not len(vocab):
            raise HldError(
                "objective.cross_tokenizer.loss=gold needs tokens both tokenizers spell alike; these two share none",
                "use objective.cross_tokenizer.loss=uld or alm (no shared vocabulary needed)",
            )
    return build_cross_plan(
        cfg.objective,
        projectors=projectors,
        vocab=vocab,
        loss=x.loss,
        pooling=x.pooling,
        uld_top_k=x.uld_top_k,
        alm_temperature=x.alm_temperature,
        uld_weight=x.gold_uld_weight,
        chunk_tokens=cfg.train.loss_chunk_tokens,
        matmul_dtype=matmul_dtype,
    )


def vocab_of(teacher_lm: Optional[CausalLM]) -> int:
    """The teacher's embedding rows, which the student gets (Gemma 3 4B: 262,208 for a 262,144-token
    tokenizer)."""
    return teacher_lm.get_input_embeddings().weight.shape[0]
