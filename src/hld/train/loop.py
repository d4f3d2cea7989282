"""One training run: build, then step through the budget. The loop never branches on the method:
the plan gives the objective in force, the objective says which teacher signals it needs.

Run directory: config.yaml (resolved, commented) · metrics.jsonl · checkpoints/checkpoint.pt ·
student/ (the trained student as an ordinary HF checkpoint) · summary.json

Under torchrun (`hld.distributed`) every rank runs this same loop on its share of each global batch;
rank 0 alone writes the run directory's files (all ranks write their shards of an fsdp2 checkpoint).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from hld import atomic, distributed
from hld.config import RunConfig, dump_yaml, to_dict
from hld.data.loader import BatchOrder, rank_slice
from hld.distill.cache import CachedTeacher, cache_identity
from hld.distill.objectives import Plan, fit_targets, keep_targets
from hld.distill.projectors import Projectors
from hld.distill.signals import OnlineTeacher, StudentRunner
from hld.distributed import Dist
from hld.errors import HldError
from hld.eval.cka import layer_diagnostics, write_cka_matrix
from hld.fingerprint import file_sha256
from hld.flops import StepCost
from hld.models.hooks import CausalLM
from hld.models.student import count_params
from hld.precision import autocast, default_device, resolve_dtype
from hld.progress import Progress
from hld.train.assembly import assemble, vocab_of
from hld.train.budget import Length, phase_costs, run_length
from hld.train.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    load_reason,
    load_sharded,
    remove_torn,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from hld.train.loggers import RunLogger, read_metrics
from hld.train.resources import Resources
from hld.train.schedule import lr_factor


@dataclass
class Setup:
    """Everything a run is built from (also what tests inspect)."""

    cfg: RunConfig
    student: CausalLM
    runner: StudentRunner
    teacher: Optional[OnlineTeacher | CachedTeacher]  # called as teacher(batch, needs) -> TeacherSignals
    teacher_lm: Optional[CausalLM]
    projectors: Optional[Projectors]
    plan: Plan
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    val_windows: np.ndarray  # (n, seq_len) int64
    bos_id: int
    length: Length  # steps, and how much of its windows the last step reads
    costs: dict[str, StepCost]  # phase name -> (FLOPs per training token)
    device: torch.device
    compute_dtype: torch.dtype
    dist: Dist = field(default_factory=Dist)  # this process's rank and the parallel mode (world size 1: none)

    @property
    def total_steps(self) -> int:
        return self.length.steps


def check_vocab(tokenizer, teacher_lm: CausalLM, student_vocab: int) -> None:
    """Refuse a teacher whose embedding does not match the (shared) tokenizer and student."""
    t_vocab = teacher_lm.get_input_embeddings().weight.shape[0]
    if t_vocab != student_vocab:
        raise HldError(f"teacher vocabulary ({t_vocab}) and student vocabulary ({student_vocab}) disagree",
                       "build the student from the teacher's tokenizer (same teacher.model for both)")
    if len(tokenizer) > t_vocab:
        raise HldError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's embedding only {t_vocab}",
                       "use the tokenizer that ships with the teacher")


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices; never norms, biases or 1-D parameters. Tied weights appear once."""
    seen: set[int] = set()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: RunConfig, resources: Resources, device: Optional[torch.device] = None,
          dist: Optional[Dist] = None) -> Setup:
    dist = dist or Dist(device=device or default_device())
    device = dist.device
    tok = resources.tokenizer(cfg.teacher.model)
    # the plan's needs decide whether the teacher's weights are loaded at all (not for CE)
    needs_teacher = cfg.objective.method != "ce"
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype) if needs_teacher else None
    teacher_lm = loaded.model.to(device) if loaded is not None else None
    vocab = vocab_of(teacher_lm) if teacher_lm is not None else resources.teacher_config(cfg.teacher.model).vocab_size
    if teacher_lm is not None:
        check_vocab(tok, teacher_lm, vocab)
    elif len(tok) > vocab:  # ce: no teacher weights, but the student's embedding is sized from its config
        raise HldError(f"the tokenizer has {len(tok)} tokens but the teacher's config only vocab_size={vocab}",
                       "use the tokenizer that ships with the teacher")
    compute_dtype = resolve_dtype(cfg.train.precision, device)
    parts = assemble(cfg, tokenizer=tok, vocab_size=vocab, teacher_lm=teacher_lm,
                     matmul_dtype=None if compute_dtype == torch.float32 else compute_dtype)
    student, plan = parts.student.to(device), parts.plan
    projectors = parts.projectors.to(device) if parts.projectors is not None else None
    runner = StudentRunner(student, plan.student_layers)
    distributed.parallelize(dist, runner, projectors, compute_dtype=compute_dtype)  # before the optimiser
    if cfg.train.compile:
        runner.backbone = torch.compile(runner.backbone)  # type: ignore[assignment]
    d = cfg.data
    train_w = resources.windows(d.train, tok, seq_len=d.seq_len, text_field=d.text_field, max_docs=d.max_train_docs)
    teacher: Optional[OnlineTeacher | CachedTeacher] = None
    if teacher_lm is not None and cfg.teacher.cache:
        expect = cache_identity(teacher=loaded.identity, tokenizer=tok, seq_len=d.seq_len, train_windows=train_w,
                                layers=plan.needs.layers, top_k=cfg.objective.top_k or 0)
        teacher = CachedTeacher(Path(cfg.teacher.cache), expect=expect)
    elif teacher_lm is not None:
        teacher = OnlineTeacher(teacher_lm, plan.needs.layers)
    val_w = resources.validation_windows(d, tok)
    order = BatchOrder(train_w, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    costs = phase_costs(cfg, plan, student=student, teacher=teacher_lm)
    length = run_length(cfg, plan, costs)
    fit_targets(plan, teacher, order, cfg.objective,  # standardize: frozen teacher statistics, on
                max_windows=length.steps * cfg.train.batch_size)  # windows the run reads (and a cache holds)
    modules = [student] + ([projectors] if projectors is not None else [])
    opt = torch.optim.AdamW(param_groups(modules, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=tuple(cfg.train.betas), fused=device.type == "cuda")
    return Setup(cfg=cfg, student=student, runner=runner, teacher=teacher, teacher_lm=teacher_lm,
                 projectors=projectors, plan=plan, optimizer=opt, order=order, val_windows=val_w,
                 bos_id=tok.bos_token_id,
                 length=length, costs=costs, device=device,
                 compute_dtype=compute_dtype, dist=dist)


def train_step(s: Setup, step: int) -> dict:
    """One optimiser step over the global batch, split into micro-batches (and, under torchrun, over
    the ranks). Returns metrics, equal on every rank."""
    cfg, d = s.cfg, s.dist
    B, T = cfg.train.batch_size, cfg.data.seq_len
    phase, weights = s.plan.at_step(step, s.total_steps, tokens_before=step * B * T,  # a boundary inside
                                    tokens_in_step=s.length.tokens_at(step, B, T),  # a step: its blend
                                    tokens_total=(s.total_steps - 1) * B * T + B * s.length.last_len)
    objective = phase.objective
    batch = s.order.batch(step)
    if step == s.total_steps - 1 and s.length.last_len < batch.input_ids.shape[1]:
        batch = batch.truncate(s.length.last_len)  # the budget ends inside this step
    n_global = max(batch.n_targets, 1)  # every micro-batch loss is divided by the step's global count
    batch = rank_slice(batch, rank=d.rank, world_size=d.world_size)  # this rank's rows of the global batch
    local_size = cfg.train.batch_size // d.world_size
    n_micro = local_size // (cfg.train.micro_batch_size or local_size)
    sums: dict[str, float] = {}
    loss_total = 0.0
    for mb in batch.split(n_micro):
        mb = mb.to(s.device)
        teacher = s.teacher(mb, objective.needs) if s.teacher is not None else None
        with autocast(s.compute_dtype, s.device):
            out = s.runner(mb.input_ids)
        loss_sum, _, metrics = objective(mb, out, teacher)
        (loss_sum / n_global).backward()  # each backward() adds to .grad: sum / global count = mean
        loss_total += float(loss_sum.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        del out, teacher, loss_sum
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    distributed.sync_grads(d, params)  # ddp: sum over ranks = the single-process gradient
    if d.active:  # the global batch's sums, so every rank logs (and judges) the same numbers
        keys = sorted(sums)
        loss_total, *vals = distributed.all_sum(d, [loss_total, *(sums[k] for k in keys)])
        sums = dict(zip(keys, vals))
    norm = distributed.clip_grad_norm(d, params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
    lr = cfg.train.lr * lr_factor(step, s.total_steps, cfg.train)
    finite = not distributed.any_rank(d, not (math.isfinite(loss_total) and bool(torch.isfinite(norm))))
    if finite:
        for g in s.optimizer.param_groups:
            g["lr"] = lr
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    line: dict[str, Any] = {f"train/{k}": v / n_global for k, v in sums.items()}
    line.update(weights)  # scheduled alpha / beta
    line.update({"train/loss": loss_total / n_global, "lr": lr, "grad_norm": float(norm), "phase": phase.name,
                "skipped": not finite})
    return line


def _prepare_dir(cfg: RunConfig, out: Path, resume: bool, *, write: bool = True) -> None:
    """Check `out` for a new run or a resume; write config.yaml (`write`: rank 0 only)."""
    text = dump_yaml(cfg)
    cfg_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise HldError(f"--out {out} is an existing file, not a run directory", "give a directory for --out")
    if resume and not cfg_path.exists() and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise HldError(f"--resume: {out} holds a run's files but no config.yaml",
                       "check --out, or delete that directory and run again")
    if resume and cfg_path.exists():  # without config.yaml nothing ran: start (a requeued job that died early)
        if not same_config(cfg_path, cfg):
            raise HldError(f"--resume with a config that differs from {cfg_path}",
                           "resume with the same config and overrides, or start a new --out")
        return
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise HldError(f"{out} already holds a run", "pass --resume to continue it (from its last checkpoint, or "
                       "from step 0 if it has none), or choose another --out")
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cfg_path, text)
        except OSError as exc:
            raise HldError(f"cannot create the run directory {out}: {exc.strerror or exc}",
                           atomic.write_fix(exc)) from exc


def _last_validation(run_dir: Path) -> dict:
    vals = [r for r in read_metrics(run_dir) if "val/ppl" in r]
    return {k: v for k, v in vals[-1].items() if k.startswith("val/")} if vals else {}


def same_config(path: Path, cfg: RunConfig) -> bool:
    """Does the resolved config saved at `path` equal `cfg`? The `log` section (where metric lines
    also go) changes nothing a run computes, so it may differ, or be absent from older runs."""
    import yaml
    saved, now = yaml.safe_load(path.read_text()), to_dict(cfg)
    saved.pop("log", None)
    now.pop("log", None)
    return json.dumps(saved, sort_keys=True) == json.dumps(now, sort_keys=True)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))


def export_student(student: CausalLM, tokenizer, out: Path, state_dict: Optional[dict] = None) -> None:
    """The student alone (no projectors) as an ordinary HF checkpoint, written atomically.
    `state_dict`: its full weights when the module holds shards (fsdp2)."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        atomic.replace_dir(tmp, out)
    except OSError as exc:
        raise HldError(f"could not write {out}: {exc.strerror or exc}", atomic.write_fix(exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else a failed write's debris


def _warm(cfg: RunConfig, resources: Resources) -> None:
    """Load what build() loads through the on-disk caches, so the other ranks find them complete."""
    tok = resources.tokenizer(cfg.teacher.model)
    if cfg.objective.method != "ce":
        resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    for source, max_docs in ((cfg.data.train, cfg.data.max_train_docs), (cfg.data.validation, None)):
        resources.windows(source, tok, seq_len=cfg.data.seq_len, text_field=cfg.data.text_field, max_docs=max_docs)


def validate_now(s: Setup) -> dict:
    """Validation loss and perplexity; under torchrun the batches are dealt over the ranks and the
    result equals the single-process one."""
    r = distributed.perplexity(s.dist, s.student, s.val_windows, backbone=s.runner.backbone,
                               chunk_tokens=max(512, s.cfg.train.loss_chunk_tokens), compute_dtype=s.compute_dtype)
    return {"val/loss": r["loss"], "val/ppl": r["ppl"], **layer_diagnostics(s)}  # val/cka/..., val/r2/...


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def train(cfg: RunConfig, out: Path, *, resume: bool = False, resources: Optional[Resources] = None,
          quiet: bool = False) -> dict:
    """One run into `out` (under torchrun: this rank's part of it)."""
    d = distributed.setup(cfg.train)  # world size 1: no process group
    try:
        return _train(cfg, Path(out), d, resume=resume, resources=resources, quiet=quiet)
    except OSError as exc:  # a full disk or a read-only location under any write (metrics, export, summary)
        denied = exc.errno in (errno.EACCES, errno.EPERM)  # a write only if it names a path in the run
        if exc.errno not in _WRITE_ERRNOS or denied and not str(exc.filename or "").startswith(str(out)):
            raise
        raise HldError(f"could not write into {out}: {exc.strerror}", atomic.write_fix(exc)) from exc
    finally:
        distributed.close(d)


def _train(cfg: RunConfig, out: Path, d: Dist, *, resume: bool, resources: Optional[Resources],
           quiet: bool) -> dict:
    _prepare_dir(cfg, out, resume, write=d.is_main)
    resources = resources or Resources()
    if d.is_main and d.active:  # rank 0 first fills the shared caches (GGUF conversion, tokenised corpora)
        _warm(cfg, resources)
    distributed.barrier(d)  # no rank reads the run directory or the caches before rank 0 has set them up
    s = build(cfg, resources, dist=d)
    keep_targets(s.plan, out, write=d.is_main)  # hidden_stats.pt: written once, read back on resume
    costs = s.costs
    step, tokens, flops = 0, 0, 0.0
    if resume:
        if d.is_main:
            remove_torn(out)  # a write cut short by a kill: never read
        distributed.barrier(d)
        if not has_checkpoint(out):  # stopped or failed before its first checkpoint (or it was deleted)
            if (out / "summary.json").exists():
                raise HldError(f"no checkpoint in {out}, and its run has finished (summary.json)",
                               "export it with `hld export`, or start a new run in another --out")
            if d.is_main:
                _say(f"hld: no checkpoint in {out} yet: starting its run from step 0")
        elif d.mode == "fsdp2":  # a DCP directory, resharded to this world size
            ck = load_sharded(out, modules=_state_modules(s), optimizer=s.optimizer)
            set_rng_state(ck["rng"])
            step, tokens, flops = ck["step"], ck["tokens"], ck["flops"]
        else:
            ck = load_checkpoint(out)
            _restore(s, ck)
            step, tokens, flops = ck["step"], ck["tokens"], ck["flops"]
        if d.is_main:
            _truncate_metrics(out, step)
    logger = RunLogger(out, cfg, enabled=d.is_main, resume_step=step if resume else None)  # rank 0 logs
    prog = Progress(s.total_steps, desc=cfg.name, quiet=quiet or not d.is_main, initial=step)
    t0, tok0, skipped_in_row, t_train, line = time.time(), tokens, 0, 0.0, {}
    sigterm = _SigtermFlag()
    try:
        while step < s.total_steps:
            ts = time.time()
            m = train_step(s, step)
            t_train += time.time() - ts
            step += 1
            n_tok = s.length.tokens_at(step - 1, cfg.train.batch_size, cfg.data.seq_len)
            tokens += n_tok
            flops += costs[m["phase"]].total * n_tok
            skipped_in_row = skipped_in_row + 1 if m["skipped"] else 0
            rate = (tokens - tok0) / max(time.time() - t0, 1e-9)
            line = {"step": step, "tokens": tokens, "flops": flops, **m, "tokens_per_s": rate}
            last = step == s.total_steps
            if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 or last:
                line.update(validate_now(s))
            if step % cfg.train.log_every_steps == 0 or last or "val/ppl" in line or m["skipped"]:
                logger.log(line)
            if skipped_in_row >= 5:
                raise HldError(f"the loss or gradient was non-finite for {skipped_in_row} steps in a row (step {step})",
                               "lower train.lr, or check the data; the last good checkpoint is kept")
            if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0 and not last:
                _save(s, out, step, tokens, flops)
            prog.update(step, tokens_per_s=rate, loss=m["train/loss"])
            if not last and distributed.any_rank(d, sigterm.raised):  # preempted: all ranks stop here
                _save(s, out, step, tokens, flops)
                raise Preempted(out, step, s.total_steps)
    finally:
        sigterm.restore()
        logger.close()
        prog.close()
        release_hooks(s)  # the teacher module may be shared with the next run (hld run)
    _save(s, out, step, tokens, flops)
    tok = resources.tokenizer(cfg.teacher.model)
    full = distributed.full_state_dict(d, s.student)  # fsdp2: gathered on rank 0 (a collective)
    distributed.main_only(d, lambda: export_student(s.student, tok, out / "student", state_dict=full))
    distributed.main_only(d, lambda: write_cka_matrix(s, out))  # cka.json: student x teacher layers
    if "val/ppl" not in line:  # resumed from a checkpoint at the final step: its validation is logged
        line = _last_validation(out) or validate_now(s)
    counts = count_params(s.student)
    summary = {"name": cfg.name, "arm": cfg.objective.method, "student": cfg.student.preset,
               "student_params": counts["total"], "student_params_non_embedding": counts["non_embedding"],
               "steps": step, "tokens": tokens, "flops": flops,
               "flops_per_token": {k: v.total for k, v in costs.items()},
               "train_seconds": t_train, **{k: v for k, v in line.items() if k.startswith("val/")}}
    if d.is_main:  # what `hld export` checks the weights against
        summary["student_sha256"] = {p.name: file_sha256(p) for p in sorted((out / "student").glob("*.safetensors"))}
    distributed.main_only(d, lambda: atomic.write_json(out / "summary.json", summary))
    return summary


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Preempted(Exception):
    """SIGTERM arrived: the step in flight finished, a checkpoint was written, the run can resume."""

    def __init__(self, run_dir: Path, step: int, total: int) -> None:
        super().__init__(f"preempted at step {step}/{total}; checkpoint saved in {run_dir}")
        self.run_dir, self.step, self.total = run_dir, step, total


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def train_or_resume(cfg: RunConfig, run_dir: Path, *, resources: Optional[Resources] = None,
                    quiet: bool = False) -> dict:
    """A finished run's summary; else resume it from its checkpoint; else (re)start it."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        if not same_config(run_dir / "config.yaml", cfg):
            raise HldError(f"{run_dir} holds a finished run of another config",
                           "choose another --out, or delete that directory")
        return atomic.read_json_object(run_dir / "summary.json", "run summary",
                                       f"delete {run_dir} to train it again")
    if has_checkpoint(run_dir):
        return train(cfg, run_dir, resume=True, resources=resources, quiet=quiet)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # started, never checkpointed: nothing to keep
    return train(cfg, run_dir, resources=resources, quiet=quiet)


def release_hooks(s: Setup) -> None:
    for capture in (getattr(s.teacher, "capture", None), s.runner.capture):
        if capture is not None:
            capture.remove()


def _save(s: Setup, out: Path, step: int, tokens: int, flops: float) -> None:
    if s.dist.mode == "fsdp2":  # every rank writes its shards
        save_sharded(out, s.dist, step=step, tokens=tokens, modules=_state_modules(s), optimizer=s.optimizer,
                     extra={"flops": flops})
        return
    distributed.main_only(s.dist, lambda: save_checkpoint(out, step=step, tokens=tokens, student=s.student,
                                                          projectors=s.projectors, optimizer=s.optimizer,
                                                          extra={"flops": flops}))


def _state_modules(s: Setup) -> dict[str, torch.nn.Module]:
    """What a DCP checkpoint holds, by name (the optimiser's state is keyed by these names)."""
    return {"student": s.student, **({"projectors": s.projectors} if s.projectors is not None else {})}


def _restore(s: Setup, ck: dict) -> None:
    try:
        s.student.load_state_dict(ck["student"])
        if s.projectors is not None:
            s.projectors.load_state_dict(ck["projectors"])
        s.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise HldError(f"the checkpoint does not fit this run ({load_reason(exc)})",
                       "resume with the config the run was started with") from exc
    set_rng_state(ck["rng"])
