"""The scores a study measures: each finished cell's student on the study's tasks (downstream.json),
and the teacher's validation loss and task scores on the same windows (study.json's
teacher_reference), each kept once done so a resumed study does not redo it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hld.config import RunConfig
from hld.study.spec import Study


def _scored(scores: dict, study: Study) -> bool:
    """`scores` (downstream.json or a reference's tasks) holds every task of the study at its limit."""
    return all(t in scores and scores[t].get("limit") == study.task_limit for t in study.tasks)


def _score(lm, tokenizer, study: Study, quiet: bool, *, rolling_len: int) -> dict:
    """Task scores; rolling log-likelihoods over windows of the cells' `data.seq_len`, for teacher and
    students alike."""
    from hld.eval.harness import evaluate_tasks

    rows = evaluate_tasks(
        lm, tokenizer, list(study.tasks), limit=study.task_limit, quiet=quiet, rolling_len=rolling_len
    )
    return {t: {**r, "limit": study.task_limit} for t, r in rows.items()}


def downstream(study: Study, cfg: RunConfig, run_dir: Path, resources, quiet: bool) -> dict:
    """Score a finished cell's student on the study's tasks into run_dir/downstream.json (kept when
    it already holds them, so a resumed study does not score a cell twice)."""
    if not study.tasks or not study.score_students:
        return {}
    from hld.eval.downstream import read_downstream, write_downstream

    have = read_downstream(run_dir)
    if _scored(have, study):
        return {t: have[t] for t in study.tasks}
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32)
    have.update(_score(lm, resources.tokenizer(cfg.teacher.model), study, quiet, rolling_len=cfg.data.seq_len))
    write_downstream(run_dir, have)
    return {t: have[t] for t in study.tasks}


def _reference_key(cfg: RunConfig) -> dict:
    d = cfg.data
    return {
        "model": cfg.teacher.model,
        "dtype": cfg.teacher.dtype,
        "validation": d.validation,
        "seq_len": d.seq_len,
        "val_tokens": d.val_tokens,
        "text_field": d.text_field,
    }


def teacher_references(study: Study, planned: list, done: list[dict], resources, quiet: bool) -> list[dict]:
    """The teacher's validation loss on the very windows each cell is validated on (one entry per
    distinct teacher and validation set; usually one), and its scores on the study's tasks: the
    reference the report measures students against. What study.json already holds is kept, so a
    resumed study does not redo it."""
    from hld.eval.perplexity import perplexity
    from hld.precision import resolve_dtype

    out = []
    for cfg in [cfg for _, cfg, _ in planned]:
        key = _reference_key(cfg)
        if any({k: e.get(k) for k in key} == key for e in out):
            continue
        have = next((e for e in done if {k: e.get(k) for k in key} == key), None)
        if have is None:
            t0 = time.time()
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            tok = loaded.tokenizer
            val = resources.validation_windows(cfg.data, tok)
            r = perplexity(
                loaded.model,
                val,
                compute_dtype=resolve_dtype(cfg.teacher.dtype),
                progress=None if quiet else "teacher validation",
            )
            have = {
                **key,
                "val_loss": r["loss"],
                "val_ppl": r["ppl"],
                "predictions": r["tokens"],
                "seconds": time.time() - t0,
            }
        if study.tasks and not _scored(have.get("tasks") or {}, study):
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            have = {
                **have,
                "tasks": {
                    **(have.get("tasks") or {}),
                    **_score(loaded.model, loaded.tokenizer, study, quiet, rolling_len=cfg.data.seq_len),
                },
            }
        out.append(have)
    return out
