"""One training run: build, then step through the budget. The loop never branches on the method:
the plan gives the objective in force, the objective says which teacher signals it needs.

Run directory: config.yaml (resolved, commented) · metrics.jsonl · checkpoints/checkpoint.pt ·
student/ (the trained student as an ordinary HF checkpoint) · summary.json

Under torchrun (`hld.distributed`) every rank runs this same loop on its share of each global batch;
rank 0 alone writes the run directory's files (all ranks write their shards of an fsdp2 checkpoint).
"""

from __future__ import annotations

import errno
import gc
import json
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from hld import atomic, distributed, files
from hld.cache.meta import cache_identity, paired_identity, signal_identity
from hld.cache.reader import CachedTeacher
from hld.config import RunConfig
from hld.config_checks import derived_depth
from hld.data.loader import BatchOrder, PairedOrder, rank_slice
from hld.data.paired import PairedSample, PairedWindows
from hld.data.store import Windows
from hld.data.tokenize import require_stores
from hld.distill.hidden_losses.registry import hidden_loss
from hld.distill.objectives import fit_targets, keep_targets
from hld.distill.signals.online import OnlineTeacher, StudentRunner
from hld.distributed import Dist
from hld.errors import HldError
from hld.fingerprint import file_sha256, windows_fingerprint
from hld.models.derive import DERIVATION_FILE
from hld.models.hooks import CausalLM
from hld.models.loading import (
    check_tokenizer_size,
    config_from_dict,
    meta_causal_lm,
    model_config,
    resolve_model_dir,
)
from hld.models.student import count_params
from hld.precision import autocast, default_device, ran_on, resolve_dtype
from hld.progress import Progress
from hld.train.assembly import HLD_METHODS, assemble, vocab_of
from hld.train.budget import phase_costs, run_length
from hld.train.callbacks import Callback, Preemption, Run, default_callbacks, validate_now
from hld.train.checkpoint import run_identity, save_run, state_modules
from hld.train.loggers import RunLogger
from hld.train.resources import Resources
from hld.train.rundir import prepare_dir, resume_state, run_lock
from hld.train.schedule import lr_factor
from hld.train.setup import Setup
from hld.train.state import RunState


def check_vocab(tokenizer, teacher_lm: CausalLM, student_vocab: int) -> None:
    """Refuse a teacher whose embedding does not match the (shared) tokenizer and student."""
    t_vocab = teacher_lm.get_input_embeddings().weight.shape[0]
    if t_vocab != student_vocab:
        raise HldError(
            f"teacher vocabulary ({t_vocab}) and student vocabulary ({student_vocab}) disagree",
            "build the student from the teacher's tokenizer (same teacher.model for both)",
        )
    if len(tokenizer) > t_vocab:
        raise HldError(
            f"the tokenizer has {len(tokenizer)} tokens but the teacher's embedding only {t_vocab}",
            "use the tokenizer that ships with the teacher",
        )


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


def build(
    cfg: RunConfig, resources: Resources, device: Optional[torch.device] = None, dist: Optional[Dist] = None
) -> Setup:
    dist = dist or Dist(device=device or default_device())
    device = dist.device
    tok = resources.tokenizer(cfg.teacher.model)
    # a student with its own tokenizer reads paired windows: its tokens and the teacher's of the same text
    student_tok = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer") if cfg.student.tokenizer else None
    # CE loads no teacher; a cached run only its shapes (meta device), unless something reads its weights
    needs_teacher = cfg.objective.method != "ce"
    weights = needs_teacher and teacher_weights_needed(cfg, dist)
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype) if weights else None
    teacher_lm = loaded.model.to(device) if loaded is not None else None
    shapes = teacher_lm if teacher_lm is not None else cached_teacher_shapes(cfg) if needs_teacher else None
    vocab = vocab_of(shapes) if shapes is not None else resources.teacher_config(cfg.teacher.model).vocab_size
    check_tokenizer_size(tok, vocab, cfg.teacher.model)
    if shapes is not None:
        check_vocab(tok, shapes, vocab)
    elif len(tok) > vocab:  # ce: no teacher weights, but the student's embedding is sized from its config
        raise HldError(
            f"the tokenizer has {len(tok)} tokens but the teacher's config only vocab_size={vocab}",
            "use the tokenizer that ships with the teacher",
        )
    compute_dtype = resolve_dtype(cfg.train.precision, device)
    d = cfg.data
    # (a derived student and the layer diagnostics read `windows`: refused or off when paired; a cache is per chunk)
    paired_w: Optional[PairedWindows] = None
    val_w: np.ndarray | PairedSample
    windows: Optional[Windows] = None
    if student_tok is not None:
        paired_w = resources.paired_windows(d, tok, student_tok)
        val_w = resources.paired_validation(d, tok, student_tok)
        order: BatchOrder = PairedOrder(paired_w, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    else:
        windows = resources.train_windows(d, tok)
        val_w = resources.validation_windows(d, tok)
        order = BatchOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    train_w = paired_w if paired_w is not None else windows
    derivation, source = None, None
    if derived_depth(cfg.student.preset) is not None:  # a student made of the teacher's blocks (any arm)
        assert windows is not None
        derivation = resources.derivation(cfg.student, cfg.teacher.model, cfg.teacher.dtype, windows, device=device)
        source = resources.teacher(cfg.teacher.model, cfg.teacher.dtype).model.to(device)
    parts = assemble(
        cfg,
        tokenizer=student_tok if student_tok is not None else tok,
        vocab_size=len(student_tok) if student_tok is not None else vocab,
        teacher_lm=shapes if shapes is not None else source,
        matmul_dtype=None if compute_dtype == torch.float32 else compute_dtype,
        derivation=derivation,
        source_lm=source,
        teacher_tokenizer=tok if student_tok is not None else None,
    )
    student, plan = parts.student.to(device), parts.plan
    if cfg.train.freeze_embedding:  # the tied head with it: the optimiser never sees it
        student.get_input_embeddings().weight.requires_grad_(False)
    projectors = parts.projectors.to(device) if parts.projectors is not None else None
    runner = StudentRunner(student, plan.student_layers)
    distributed.parallelize(dist, runner, projectors, compute_dtype=compute_dtype)  # before the optimiser
    if cfg.train.compile:
        # a process that trains several runs (hld run, the tests): dynamo does not guard on module hooks, so
        # a graph compiled for an earlier run without the HLD layer hooks would be reused and skip them
        torch._dynamo.reset()
        runner.backbone = torch.compile(runner.backbone)  # type: ignore[assignment]
    teacher: Optional[OnlineTeacher | CachedTeacher] = None
    teacher_id = resolve_model_dir(cfg.teacher.model)[1] if needs_teacher else ""  # from its files alone
    if shapes is not None and cfg.teacher.cache and paired_w is not None:  # a per-chunk cache (hld.cache.chunks)
        ident = paired_identity(
            [plan], teacher=teacher_id, tokenizer=tok, student_tokenizer=student_tok, windows=paired_w
        )
        teacher = CachedTeacher(Path(cfg.teacher.cache), expect=ident)
    elif shapes is not None and cfg.teacher.cache:
        assert windows is not None
        expect = cache_identity(
            teacher=teacher_id,
            tokenizer=tok,
            seq_len=d.seq_len,
            train_windows=windows,
            layers=plan.needs.layers,
            top_k=cfg.objective.top_k or 0,
            **signal_identity(cfg.teacher),
        )
        teacher = CachedTeacher(Path(cfg.teacher.cache), expect=expect)
    elif teacher_lm is not None:
        teacher = OnlineTeacher(teacher_lm, plan.needs.layers)
    t_len = paired_w.teacher_seq_len if paired_w is not None else None
    costs = phase_costs(cfg, plan, student=student, teacher=shapes, teacher_seq_len=t_len)
    fixed = derivation.calibration_flops if derivation is not None else 0.0
    length = run_length(cfg, plan, costs, fixed_flops=fixed, whole_steps=paired_w is not None)
    fit_targets(
        plan,
        teacher,
        order,
        cfg.objective,  # standardize: frozen teacher statistics, on
        max_windows=length.steps * cfg.train.batch_size,
    )  # windows the run reads (and a cache holds)
    modules = [student] + ([projectors] if projectors is not None else [])
    opt = torch.optim.AdamW(
        param_groups(modules, cfg.train.weight_decay),
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),  # fused: one kernel per tensor, also on CPU (the
        fused=device.type in ("cuda", "cpu"),
    )  # 262k-row embedding's step 63 -> 7 ms here)
    diag = None  # (a CE run trains without a teacher; its diagnostics load the process's shared one)
    # the layer diagnostics read the teacher on the student's own windows: not with another tokenizer
    if cfg.objective.hidden.diagnostics and not dist.active and isinstance(val_w, np.ndarray):
        win = val_w[: cfg.objective.hidden.diagnostics_windows]
        diag = lambda: resources.teacher_states(
            cfg.teacher.model,
            cfg.teacher.dtype,
            win,  # noqa: E731
            skip_first=cfg.objective.hidden.skip_first_position,
            device=device,
        )
    return Setup(
        cfg=cfg,
        student=student,
        runner=runner,
        teacher=teacher,
        teacher_lm=teacher_lm,
        projectors=projectors,
        plan=plan,
        optimizer=opt,
        order=order,
        val_windows=val_w,
        diagnostics_states=diag,
        length=length,
        costs=costs,
        device=device,
        compute_dtype=compute_dtype,
        dist=dist,
        identity=run_identity(cfg, data=windows_fingerprint(train_w), teacher=teacher_id),
        derivation=derivation,
    )


def teacher_weights_needed(cfg: RunConfig, dist: Dist) -> bool:
    """Does a KD/HLD run read the teacher's weights? An online run does; a cached run only for a
    hidden loss that reads the teacher's head (`lens`) or the layer diagnostics (the teacher's states on
    validation windows, which the cache does not hold; they run on one process only, and not across tokenizers,
    whose states share no positions). docs/decisions.md."""
    head = cfg.objective.method in HLD_METHODS and hidden_loss(cfg.objective.hidden.loss).teacher_head
    diagnostics = cfg.objective.hidden.diagnostics and not dist.active and cfg.student.tokenizer is None
    return not cfg.teacher.cache or head or diagnostics


def cached_teacher_shapes(cfg: RunConfig) -> CausalLM:
    """The teacher of a cached run on the meta device (its sizes, FLOPs and depth, no weights): from the
    text config its cache's manifest records, else from its config.json."""
    try:
        f = Path(str(cfg.teacher.cache)) / "manifest.json"
        manifest = json.loads(files.read_text(f, "cache manifest", "", max_bytes=files.MAX_MANIFEST_BYTES))
    except (HldError, OSError, ValueError):
        manifest = {}  # CachedTeacher refuses a missing or corrupt manifest with its own message
    saved = manifest.get("teacher_config") if isinstance(manifest, dict) else None
    config = config_from_dict(saved) if saved else model_config(resolve_model_dir(cfg.teacher.model)[0])
    return meta_causal_lm(config)


@dataclass
class PendingStep:
    """A finished optimiser step whose metrics are still on the device: the step's sums (float64), its
    counted targets, gradient norm and skip flag in one vector, read back to the host later
    (`read_back`) together with other steps' — so a step itself makes no host sync (a GPU keeps queueing
    work), and the loop reads back only where something on the host needs the numbers (a logged,
    validated or checkpointed step, the progress line, the last step; `hld.train.callbacks`)."""

    values: torch.Tensor  # [*sums in `keys` order, targets counted, grad norm, skipped]
    keys: list[str]
    n_global: int  # the targets the loop divided by
    lr: float  # what the host already knows: the step's learning rate, phase and scheduled loss weights
    phase: str
    weights: dict

    def line(self, vals: list[float]) -> dict:
        *sums, n_all, norm_value, skipped = vals
        if max(round(n_all), 1) != self.n_global:  # the objective normalised by another count than the loop
            raise RuntimeError(f"the objective counted {round(n_all)} targets in a step of {self.n_global}")
        sums_f = dict(zip(self.keys, sums))
        loss_total = sums_f.pop("loss")
        line: dict[str, Any] = {f"train/{k}": v / self.n_global for k, v in sums_f.items()}
        line.update(self.weights)  # scheduled alpha / beta
        line.update(
            {
                "train/loss": loss_total / self.n_global,
                "lr": self.lr,
                "grad_norm": norm_value,
                "phase": self.phase,
                "skipped": bool(skipped),
            }
        )
        return line


def read_back(steps: list[PendingStep]) -> list[dict]:
    """The metric lines of `steps`, in order, with one host sync for all of them (one `.tolist()`)."""
    if not steps:
        return []
    flat = torch.cat([p.values for p in steps]).tolist()  # the sync
    lines, at = [], 0
    for p in steps:
        n = p.values.numel()
        lines.append(p.line(flat[at : at + n]))
        at += n
    return lines


def train_step(s: Setup, step: int) -> dict:
    """One optimiser step and its metric line, read back at once (one host sync): `launch_step` +
    `read_back`, for a caller that wants the numbers now."""
    return read_back([launch_step(s, step)])[0]


def launch_step(s: Setup, step: int) -> PendingStep:
    """One optimiser step over the global batch, split into micro-batches (and, under torchrun, over
    the ranks), with no host sync on one process: its metrics stay on the device (`PendingStep`), equal
    on every rank."""
    cfg, d = s.cfg, s.dist
    B, T = cfg.train.batch_size, cfg.data.seq_len
    phase, weights = s.plan.at_step(
        step,
        s.total_steps,
        tokens_before=step * B * T,  # a boundary inside
        tokens_in_step=s.length.tokens_at(step, B, T),  # a step: its blend
        tokens_total=(s.total_steps - 1) * B * T + B * s.length.last_len,
    )
    objective = phase.objective
    batch = s.order.batch(step)
    if step == s.total_steps - 1 and s.length.last_len < batch.input_ids.shape[1]:
        batch = batch.truncate(s.length.last_len)  # the budget ends inside this step
    n_global = max(batch.n_targets, 1)  # every micro-batch loss is divided by the step's global count
    batch = rank_slice(batch, rank=d.rank, world_size=d.world_size)  # this rank's rows of the global batch
    local_size = cfg.train.batch_size // d.world_size
    n_micro = local_size // (cfg.train.micro_batch_size or local_size)
    if isinstance(s.teacher, CachedTeacher):  # decode the next step's signals while this one computes
        _prefetch_cached(s, step, objective.needs, n_micro=n_micro, T=batch.input_ids.shape[1])
    # the step's sums stay on the device (float64), with the gradient norm and the skip flag: no host sync
    # per micro-batch or metric on a GPU (read_back brings them back when the loop needs them)
    sums: dict[str, torch.Tensor] = {}
    n_counted = 0
    for mb in batch.split(n_micro):
        mb = mb.to(s.device)
        teacher = s.teacher(mb, objective.needs) if s.teacher is not None else None
        with autocast(s.compute_dtype, s.device):
            out = s.runner(mb.input_ids)
        loss_sum, n, metrics = objective(mb, out, teacher)
        (loss_sum / n_global).backward()  # each backward() adds to .grad: sum / global count = mean
        n_counted += n
        for k, v in {"loss": loss_sum.detach(), **metrics}.items():
            sums[k] = sums[k] + v.double() if k in sums else v.double()
        del out, teacher, loss_sum
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    distributed.sync_grads(d, params)  # ddp: sum over ranks = the single-process gradient
    if not d.active and max(n_counted, 1) != n_global:  # under torchrun: checked on the summed counts below
        raise RuntimeError(f"the objective counted {n_counted} targets in a step of {n_global}")
    norm = distributed.clip_grad_norm(d, params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
    lr = cfg.train.lr * lr_factor(step, s.total_steps, cfg.train)
    keys = sorted(sums)
    # the global batch's sums, so every rank logs (and judges) the same numbers; the count rides along
    count = torch.full((), float(n_counted), dtype=torch.float64, device=sums["loss"].device)  # a fill, no copy
    totals = distributed.all_sum_tensor(d, torch.stack([*(sums[k] for k in keys), count]))
    skip = ~(torch.isfinite(totals[keys.index("loss")]) & torch.isfinite(norm))  # every rank: the same sums
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    _step_unless(s.optimizer, skip)
    s.steps_taken += 1
    s.optimizer.zero_grad(set_to_none=True)
    values = torch.cat([totals, norm.detach().double().reshape(1), skip.double().reshape(1)])
    return PendingStep(values, keys, n_global, lr=lr, phase=phase.name, weights=weights)


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """The optimiser step, skipped where `skip` (a 0-dim bool on the device: a non-finite loss or gradient
    norm) holds. Fused AdamW takes the flag on the device (`found_inf`, as torch's GradScaler hands it):
    it leaves the weights, moments and step count as they were, with no host sync. Other optimisers
    read the flag back first."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(skip):
        optimizer.step()


def _prefetch_cached(s: Setup, step: int, needs, *, n_micro: int, T: int) -> None:
    """Ask the cache for this step's and the next step's micro-batches (this step's were asked for a
    step ago and are decoded or under way): the reader's threads decode while the step trains."""
    d = s.dist
    mbs: list[np.ndarray] = []
    for k in (step, step + 1):
        if k < s.total_steps:  # rank_slice's rows, then Batch.split's micro-batches
            mbs += np.split(np.split(s.order.indices(k), d.world_size)[d.rank], n_micro)
    assert isinstance(s.teacher, CachedTeacher)
    s.teacher.prefetch(mbs, T, needs)


def export_student(student: CausalLM, tokenizer, out: Path, state_dict: Optional[dict] = None) -> None:
    """The student alone (no projectors) as an ordinary HF checkpoint, written atomically.
    `state_dict`: its full weights when the module holds shards (fsdp2)."""
    try:
        with atomic.new_dir(out) as tmp:
            student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            for name, data in _tokenizer_files(tokenizer).items():
                (tmp / name).write_bytes(data)
    except OSError as exc:
        raise HldError(f"could not write {out}: {exc.strerror or exc}", atomic.write_fix(exc)) from exc


_TOKENIZER_FILES: dict[int, tuple[object, dict[str, bytes]]] = {}  # id -> (the tokenizer, its saved files)


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """What `save_pretrained` writes for `tokenizer`, serialised once per process: a 262k-token
    tokenizer takes ~0.6 s to save, which every cell of `hld run` paid for the same files."""
    got = _TOKENIZER_FILES.get(id(tokenizer))
    if got is None or got[0] is not tokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            got = (tokenizer, {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
        _TOKENIZER_FILES.clear()  # only the latest tokenizer's files are kept
        _TOKENIZER_FILES[id(tokenizer)] = got
    return got[1]


def _warm(cfg: RunConfig, resources: Resources, d: Dist) -> None:
    """Load what build() loads through the on-disk caches, so the other ranks find them complete."""
    tok = resources.tokenizer(cfg.teacher.model)
    if cfg.objective.method != "ce" and teacher_weights_needed(cfg, d):
        resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    if cfg.student.tokenizer:  # paired stores, aligned once, here
        student_tok = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer")
        resources.paired_windows(cfg.data, tok, student_tok)
        resources.paired_validation(cfg.data, tok, student_tok)
        return
    resources.train_windows(cfg.data, tok)  # token stores: tokenised once, here, if they are not yet
    resources.validation_windows(cfg.data, tok)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def train(
    cfg: RunConfig, out: Path, *, resume: bool = False, resources: Optional[Resources] = None, quiet: bool = False
) -> dict:
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
        # a finished run's Setup (student, optimiser state, gradients, diagnostics) is held in reference
        # cycles that only the cyclic collector frees, and it rarely runs (few, large objects): a process
        # running cell after cell (`hld run`, a study) held every cell's until then (10 GiB over 12 cells)
        gc.collect()


def _train(cfg: RunConfig, out: Path, d: Dist, *, resume: bool, resources: Optional[Resources], quiet: bool) -> dict:
    require_stores(cfg.data, cfg.name)  # a hub corpus: tokenised beforehand, refused in seconds if it was not
    prepare_dir(cfg, out, resume, write=False)  # refused before anything is written into `out` (the lock file)
    with run_lock(out, d):  # one hld train per run directory
        return _locked_train(cfg, out, d, resume=resume, resources=resources, quiet=quiet)


def _locked_train(
    cfg: RunConfig, out: Path, d: Dist, *, resume: bool, resources: Optional[Resources], quiet: bool
) -> dict:
    prepare_dir(cfg, out, resume, write=d.is_main)  # again: the lock's holder may have changed it
    resources = resources or Resources()
    if d.is_main and d.active:  # rank 0 first fills the shared caches (GGUF conversion, token stores)
        _warm(cfg, resources, d)
    resources.build_stores = d.is_main  # the other ranks memory-map what rank 0 wrote; they never tokenise
    distributed.barrier(d)  # no rank reads the run directory or the caches before rank 0 has set them up
    s = build(cfg, resources, dist=d)
    keep_targets(s.plan, out, write=d.is_main)  # hidden_stats.pt: written once, read back on resume
    if s.derivation is not None and d.is_main:  # how the student was made, and what that cost
        atomic.write_json(out / DERIVATION_FILE, s.derivation.to_json())
    state = (
        resume_state(out, d, modules=state_modules(s), optimizer=s.optimizer, identity=s.identity)
        if resume
        else RunState(flops=s.fixed_flops)  # a derived student's calibration, spent before step 0
    )
    logger = RunLogger(out, cfg, enabled=d.is_main, resume_step=state.step if resume else None)  # rank 0 logs
    prog = Progress(s.total_steps, desc=cfg.name, quiet=quiet or not d.is_main, initial=state.step)
    callbacks = default_callbacks(cfg, logger, prog)
    try:
        line = _steps(s, out, state, callbacks)
    finally:
        for cb in reversed(callbacks):
            cb.close()
        release_hooks(s)  # the teacher module may be shared with the next run (hld run)
    if distributed.any_rank(d, any(cb.pending() for cb in callbacks if isinstance(cb, Preemption))):
        signal.raise_signal(signal.SIGTERM)  # every rank stops, none waits in a collective of _finish
    if cfg.train.keep_final_checkpoint:
        save_run(s, out, state)
    own = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer") if cfg.student.tokenizer else None
    student_tok = own if own is not None else resources.tokenizer(cfg.teacher.model)
    summary = _finish(s, out, state, line, student_tok, callbacks)  # the student exported with its own tokenizer
    if not cfg.train.keep_final_checkpoint and d.is_main:  # finished and exported: nothing resumes from it
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def _steps(s: Setup, out: Path, state: RunState, callbacks: list[Callback]) -> dict:
    """Step from `state` to the end of the budget (`state` advances in place), calling the callbacks
    (`hld.train.callbacks`) at their points; the last metric line.

    A step's metrics stay on the device (`launch_step`) until a callback needs them on the host at that
    step (`Callback.needs_metrics`: a logged, validated or checkpointed step, the progress line when it
    redraws, the last step); then every step not yet read back comes back in one sync, and each one's
    `on_step_end` runs in step order (`run.step` is that step's)."""
    cfg, run = s.cfg, Run(s, out, state)
    t0, tok0, line = time.time(), state.tokens, {}
    pending: list[tuple[dict, PendingStep]] = []  # (step, tokens, flops, tokens/s; the metrics on the device)
    for cb in callbacks:
        cb.on_start(run)
    while state.step < s.total_steps:
        ts = time.time()
        p = launch_step(s, state.step)
        state.advance(
            tokens=s.length.tokens_at(state.step, cfg.train.batch_size, cfg.data.seq_len),
            flops_per_token=s.costs[p.phase].total,
            seconds=time.time() - ts,
        )
        rate = (state.tokens - tok0) / max(time.time() - t0, 1e-9)
        pending.append(({"step": state.step, "tokens": state.tokens, "flops": state.flops, "tokens_per_s": rate}, p))
        wants = [cb.needs_metrics(run) for cb in callbacks]  # every callback asked (preemption: a collective)
        if not (any(wants) or s.dist.active):  # under torchrun every step: ranks judge the same steps together
            continue
        for (head, _), m in zip(pending, read_back([p for _, p in pending])):
            state.count_skipped(m["skipped"])
            line = {"step": head["step"], "tokens": head["tokens"], "flops": head["flops"], **m}
            line["tokens_per_s"] = head["tokens_per_s"]
            at = Run(s, out, state, at=head["step"])
            for cb in callbacks:
                cb.on_step_end(at, line)
        pending.clear()
    for cb in callbacks:
        cb.on_train_end(run)
    return line


def _finish(s: Setup, out: Path, state: RunState, line: dict, tokenizer, callbacks: list[Callback]) -> dict:
    """Export the student, call the callbacks' `on_finish` (rank 0), write summary.json; the summary."""
    cfg, d = s.cfg, s.dist
    full = distributed.full_state_dict(d, s.student)  # fsdp2: gathered on rank 0 (a collective)
    student_dir = out / "student"

    def export() -> dict[str, str]:  # the student's files and their sha256 (what `hld export` checks them against)
        export_student(s.student, tokenizer, student_dir, state_dict=full)
        return {p.name: file_sha256(p) for p in sorted(student_dir.iterdir()) if p.is_file()}

    run = Run(s, out, state)
    student_sha: dict[str, str] = {}
    if d.active:  # main_only's error check is a collective: in the same order on every rank
        distributed.main_only(d, lambda: student_sha.update(export()))
        for cb in callbacks:
            distributed.main_only(d, lambda cb=cb: cb.on_finish(run))  # e.g. cka.json
    else:  # one process: the export (~1 GB written and hashed for a derived demo student) beside cka.json's matrices
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(export)
            try:
                for cb in callbacks:
                    if not cb.after_export:
                        cb.on_finish(run)
            finally:
                student_sha.update(written.result())  # its error, if it failed, after the callbacks'
        for cb in callbacks:
            if cb.after_export:
                cb.on_finish(run)
    if "val/ppl" not in line:  # resumed from a checkpoint at the final step: validated again, never read
        line = validate_now(s)  # back from metrics.jsonl (another run's, copied in, would be reported)
    counts = count_params(s.student)
    summary = {
        "name": cfg.name,
        "arm": cfg.objective.method,
        "student": cfg.student.preset,
        "student_params": counts["total"],
        "student_params_non_embedding": counts["non_embedding"],
        "steps": state.step,
        "tokens": state.tokens,
        "flops": state.flops,
        "flops_per_token": {k: v.total for k, v in s.costs.items()},
        "calibration_flops": s.fixed_flops,
        "train_seconds": state.train_seconds,
        **{k: v for k, v in line.items() if k.startswith("val/")},
        # the resolved precision and machine (`auto` says nothing); no teacher dtype for ce, which reads none
        "ran": ran_on(
            s.device,
            student_dtype=s.compute_dtype,
            teacher_dtype=resolve_dtype(cfg.teacher.dtype, s.device) if cfg.objective.method != "ce" else None,
        ),
    }
    if s.derivation is not None:
        summary["student_origin"] = s.derivation.to_json()["origin"]
    if d.is_main:  # what `hld export` and a run loaded as a model check the student's files against
        summary["student_sha256"] = student_sha
    distributed.main_only(d, lambda: atomic.write_json(out / "summary.json", summary))
    return summary


def release_hooks(s: Setup) -> None:
    for capture in (getattr(s.teacher, "capture", None), s.runner.capture):
        if capture is not None:
            capture.remove()
