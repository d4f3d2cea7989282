"""The peak accelerator memory of one training step, traced without an accelerator: `hld.train.loop.
train_step` itself (micro-batches: teacher signals, student forward under autocast, fused head + loss,
backward; gradient clipping, fused AdamW step, zero_grad) runs under torch's `FakeTensorMode`, where
every tensor has a shape, dtype and device but no memory, and a dispatch mode (`LiveBytes`) adds up the
bytes of every storage an op creates and takes them off when the storage dies. Its maximum is the
step's peak of live tensor bytes: what `torch.cuda.max_memory_allocated` would report on a GPU, less the
allocator's rounding and fragmentation, the kernels' own workspaces (cuBLAS, attention) and the CUDA
context, which are not tensors.

The run is built as `hld.train.loop.build` builds it (the same `assemble`, `StudentRunner`,
`OnlineTeacher`, `param_groups`, AdamW arguments, and `teacher_weights_needed` for whether a cached run
holds the teacher's weights), on the meta device, then given fake storage on a fake CPU device (autograd
needs a device this torch build has; fake CUDA tensors abort it). What differs between the CPU and the
GPU path of the step is set to the GPU's: `hld.distill.losses.row_block` (a whole chunk of rows, not
ROWS) and the fused head's separate (chunk, V) fp32 softmax buffer `p_rows`, which the CPU path does
without (its softmax runs in place) and which is allocated here, in the head's workspace, as the GPU
path allocates it. Autocast is CPU autocast (the same matmuls in bf16); attention is the CPU flash
kernel (like CUDA's flash / memory-efficient kernels it saves q, k, v, the output and a logsumexp, no
(T, T) scores).

A cached run's teacher signal is the cache reader's decoded arrays (`from_cache` of the signal's kind, at
their decoded dtypes), copied to the device as `CachedTeacher.__call__` does; nothing is read from disk.
The step's final host read-back (`.tolist()` of its sums) cannot be answered by fake tensors: the trace
ends there, after the optimiser step and zero_grad, when nothing more is allocated on the device.

A trace runs `steps` optimiser steps (2: the second is the steady state, with AdamW's moments and the
head's workspace already held) of `micro_batches` micro-batches each (2: from the second micro-batch on,
the gradients are held while the activations are; more micro-batches repeat the same pattern).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from collections import defaultdict
from contextlib import ExitStack
from typing import Any, Optional
from unittest import mock

import numpy as np
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hld.cache.build import cache_slots, codec_of
from hld.config import RunConfig
from hld.data.packing import IGNORE, Batch, make_batch
from hld.distill import chunked, losses
from hld.distill.signals import Needs, TeacherSignals
from hld.distill.signals.online import OnlineTeacher, StudentRunner
from hld.distill.signals.registry import CACHE_CODECS
from hld.distributed import Dist
from hld.models.hooks import CausalLM, text_config
from hld.plan import memory_estimate, teacher_shapes
from hld.precision import resolve_dtype
from hld.train.assembly import assemble, vocab_of
from hld.train.budget import phase_costs, run_length
from hld.train.loop import param_groups, teacher_weights_needed, train_step
from hld.train.setup import Setup

GPU = torch.device("cuda")  # what the step's dtypes resolve for (precision `auto`: bf16)
DEVICE = torch.device("cpu")  # the fake tensors' device (see the module docstring)


class LiveBytes(TorchDispatchMode):
    """Bytes of the live fake storages, by category (the phase of the step that made them, or a tag),
    and their peak: `peak`, `at_peak` (the categories then) and `peak_where`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # storage key -> [bytes, category]
        self.by: dict[str, int] = defaultdict(int)
        self.now = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.peak_where = ""
        self.phase = "setup"
        self.where = ""
        self.params: set[int] = set()  # storage keys of the trained weights (autocast casts them)
        self.detail = False  # also keep, at the peak, the live bytes by category and op (slower)
        self.ops_at_peak: dict[tuple[str, str], int] = {}
        self._op = ""

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def add(self, t: torch.Tensor, category: str) -> None:
        if not isinstance(t, FakeTensor):  # host tensors (the batch before `to`) are not device memory
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = [n, category, self._op]
        self.by[category] += n
        self.now += n
        weakref.finalize(st, self._free, key)

    def tag(self, t: Optional[torch.Tensor], category: str) -> None:
        """Count `t`'s storage under `category` from now on (a gradient, a workspace buffer)."""
        if t is None or not isinstance(t, FakeTensor):
            return
        entry = self.live.get(self._key(t))
        if entry is not None and entry[1] != category:
            self.by[entry[1]] -= entry[0]
            self.by[category] += entry[0]
            entry[1] = category

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.now -= entry[0]
            self.by[entry[1]] -= entry[0]

    def _mark(self, what: str) -> None:
        if self.now > self.peak:
            self.peak, self.peak_where = self.now, what
            self.at_peak = {k: v for k, v in self.by.items() if v}
            if self.detail:
                ops: dict[tuple[str, str], int] = defaultdict(int)
                for n, category, op in self.live.values():
                    ops[(category, op)] += n
                self.ops_at_peak = dict(ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        if self.detail and isinstance(out, torch.Tensor):
            self._op += f" {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')}"
        category = self.phase
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], FakeTensor):
            if self._key(args[0]) in self.params:
                category = "autocast weight casts"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, category)
        self._mark(f"{self.where}, {self.phase}: {func}")
        return out


def fake_copy(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Give `module`'s meta parameters and buffers fake storage on DEVICE, in place (tied weights stay
    tied: one storage per parameter object); floating ones in `dtype` if given. Under FakeTensorMode."""
    memo: dict[int, Any] = {}

    def new(t: torch.Tensor) -> Any:
        if id(t) not in memo:
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            e = torch.empty_like(t, device=DEVICE, dtype=dt)
            memo[id(t)] = torch.nn.Parameter(e, t.requires_grad) if isinstance(t, torch.nn.Parameter) else e
        return memo[id(t)]

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = new(p)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = new(b)


class _HostBatch(Batch):
    """A `Batch` whose host side stays real (its target counts are read, as the loop reads them) while
    its device copy (`to`) is fake: the loop's `mb.to(device)`."""

    @property
    def n_targets(self) -> int:
        if self.host_n_targets is None:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                self.host_n_targets = int((self.labels != IGNORE).sum())
        return self.host_n_targets

    def split(self, n: int) -> list[Batch]:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            parts = super().split(n)
        return [_HostBatch(p.input_ids, p.labels, p.window_ids) for p in parts]

    def to(self, device: torch.device) -> Batch:
        n = self.n_targets
        return Batch(
            torch.empty_like(self.input_ids), torch.empty_like(self.labels), self.window_ids, n, self.input_ids
        )


class _Order:
    """`BatchOrder`'s `batch(step)`: a batch of windows of one token id (the values are never read)."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.B, self.T = batch_size, seq_len

    def batch(self, step: int) -> Batch:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            b = make_batch(np.full((self.B, self.T), 2, np.int64), window_ids=np.arange(self.B) + step * self.B)
        return _HostBatch(b.input_ids, b.labels, b.window_ids)


# a cached signal's arrays as the reader decodes them: (values, ids, rest) dtypes by codec (hld.cache.codec)
DECODED: dict[str, tuple[type, type, Optional[type]]] = {
    "exact": (np.float16, np.int32, np.float32),  # the stored fields
    "compact": (np.float32, np.int64, np.float32),  # decode_window's
    "sampled": (np.float32, np.int32, None),  # weights, ids
}


def cached_signal(cfg: RunConfig, shape: tuple[int, int], needs: Needs, d_teacher: int, k: int) -> TeacherSignals:
    """A micro-batch's (B, T) signal as `CachedTeacher.read` decodes it (host arrays at the decoded dtypes,
    the kind's own `from_cache`), then on the device (fake copies: `TeacherSignals.to`)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    codec = codec_of(cfg)
    n = shape[0] * shape[1]
    source: Any = None
    if needs.logits:
        values, ids, rest = DECODED[codec.logits]
        with unset_fake_temporarily():
            host: tuple[Any, ...] = (
                np.full((n, k), 1 / k, values),  # (a sampled signal's weights must sum to 1)
                np.zeros((n, k), ids),
                np.zeros(n, rest) if rest is not None else None,
            )
            source = CACHE_CODECS[codec.logits].from_cache(*host)
        held = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
        source = dataclasses.replace(
            source, **{k_: torch.empty_like(v) for k_, v in held.items() if isinstance(v, torch.Tensor)}
        )
    hidden = {layer: torch.empty(*shape, d_teacher, dtype=torch.bfloat16, device=DEVICE) for layer in needs.layers}
    return TeacherSignals(hidden=hidden, source=source)


def trace_step(
    cfg: RunConfig,
    *,
    steps: int = 2,
    micro_batches: int = 2,
    teacher: Optional[tuple[CausalLM, Any]] = None,
    detail: bool = False,
) -> dict:
    """Trace `steps` optimiser steps of `cfg` on one process (module docstring). `micro_batches`: per
    step (the config's micro-batch size, its batch size set to this many of them). Returns the peak
    bytes, its categories, where it was reached, and the live bytes before the first step."""
    mb = cfg.train.micro_batch_size or cfg.train.batch_size
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=mb * micro_batches, compile=False))
    teacher_meta, ids = teacher or teacher_shapes(cfg.teacher.model)
    compute = resolve_dtype(cfg.train.precision, GPU)
    with torch.device("meta"):
        parts = assemble(
            cfg,
            tokenizer=ids,
            vocab_size=vocab_of(teacher_meta),
            teacher_lm=teacher_meta,
            matmul_dtype=None if compute == torch.float32 else compute,
        )
    plan = parts.plan
    costs = phase_costs(cfg, plan, student=parts.student, teacher=teacher_meta)
    length = run_length(cfg, plan, costs)
    needs_teacher = cfg.objective.method != "ce"
    dist = Dist(device=DEVICE)
    weights = needs_teacher and teacher_weights_needed(cfg, dist)
    t_dtype = resolve_dtype(cfg.teacher.dtype, GPU)
    T = cfg.data.seq_len
    tc = text_config(teacher_meta.config)
    V = parts.student.get_input_embeddings().weight.shape[0]
    k = cache_slots(cfg, vocab_of(teacher_meta)) if cfg.teacher.cache else 0

    teacher_copy = copy.deepcopy(teacher_meta) if weights else None  # the caller's meta teacher stays as it was
    saved_workspace = chunked.WORKSPACE.bufs
    chunked.WORKSPACE.bufs = {}
    tracker = LiveBytes()
    tracker.detail = detail
    state = {"step": 0, "micro": 0, "optimizer_steps": 0}
    gpu_rows = lambda n, device: n  # noqa: E731  (hld.distill.losses.row_block on a GPU)
    real_get = chunked.WORKSPACE.get

    def workspace_get(name, n, V_, device, dtype=torch.float32):
        buf = real_get(name, n, V_, device, dtype)
        tracker.tag(buf, "head workspace")
        return buf

    real_fast_chunk = chunked._fast_chunk

    def fast_chunk(zbuf, *a, **kw):
        # the GPU path's softmax buffer, which the CPU path does without: `_fast_chunk`'s own request
        chunked.WORKSPACE.get("p_rows", gpu_rows(zbuf.shape[0], zbuf.device), zbuf.shape[1], zbuf.device)
        return real_fast_chunk(zbuf, *a, **kw)

    real_backward = torch.Tensor.backward

    def backward(self, *a, **kw):
        tracker.phase = "backward"
        try:
            return real_backward(self, *a, **kw)
        finally:
            tracker.phase = "after backward"

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # data_ptr of a fake tensor (the head compares two)
            stack.enter_context(mock.patch.object(losses, "row_block", gpu_rows))
            stack.enter_context(mock.patch.object(chunked, "row_block", gpu_rows))
            stack.enter_context(mock.patch.object(chunked.WORKSPACE, "get", workspace_get))
            stack.enter_context(mock.patch.object(chunked, "_fast_chunk", fast_chunk))
            stack.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
            stack.enter_context(fake_mode)
            stack.enter_context(tracker)
            tracker.phase = "student weights"
            student = parts.student
            fake_copy(student)
            projectors = parts.projectors
            if projectors is not None:
                fake_copy(projectors)
            if cfg.train.freeze_embedding:
                student.get_input_embeddings().weight.requires_grad_(False)
            modules: list[torch.nn.Module] = [student] + ([projectors] if projectors is not None else [])
            for m in modules:
                for p in m.parameters():
                    tracker.params.add(tracker._key(p))
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(lambda p: tracker.tag(p.grad, "gradients"))
            runner = StudentRunner(student, plan.student_layers)
            signal: Any = None
            teacher_lm = None
            if weights:
                tracker.phase = "teacher weights"
                teacher_lm = teacher_copy
                fake_copy(teacher_lm, dtype=t_dtype)
            if needs_teacher and cfg.teacher.cache:

                def signal(batch: Batch, needs: Needs) -> Optional[TeacherSignals]:
                    shape = tuple(batch.input_ids.shape)
                    return cached_signal(cfg, shape, needs, tc.hidden_size, k) if needs.any else None  # type: ignore[arg-type]

            elif teacher_lm is not None:
                signal = OnlineTeacher(teacher_lm, plan.needs.layers)
            opt = torch.optim.AdamW(
                param_groups(modules, cfg.train.weight_decay),
                lr=cfg.train.lr,
                betas=tuple(cfg.train.betas),
                fused=True,  # loop.build's: fused on cuda and cpu
            )
            real_step = opt.step

            def opt_step(*a, **kw):
                tracker.phase = "optimizer step"
                out = real_step(*a, **kw)
                state["optimizer_steps"] += 1
                tracker.phase = "after optimizer step"
                return out

            opt.step = opt_step  # type: ignore[method-assign]

            def run_student(input_ids):
                state["micro"] += 1
                tracker.where = f"step {state['step']} micro-batch {state['micro']}"
                tracker.phase = "student forward"
                out = runner(input_ids)
                tracker.phase = "head + loss"
                return out

            def run_teacher(batch, needs):
                tracker.phase = "teacher signals"
                try:
                    return signal(batch, needs)
                finally:
                    tracker.phase = "batch"

            setup = Setup(
                cfg=cfg,
                student=student,
                runner=run_student,  # type: ignore[arg-type]
                teacher=run_teacher if signal is not None else None,  # type: ignore[arg-type]
                teacher_lm=teacher_lm,
                projectors=projectors,
                plan=plan,
                optimizer=opt,
                order=_Order(cfg.train.batch_size, T),  # type: ignore[arg-type]
                val_windows=np.zeros((0, T), np.int64),
                length=length,
                costs=costs,
                device=DEVICE,
                compute_dtype=compute,
                dist=dist,
            )
            before = tracker.now
            weights_at_start = dict(tracker.by)
            for step in range(steps):
                state["step"], state["micro"] = step, 0
                tracker.phase = "batch"
                done = state["optimizer_steps"]
                try:
                    train_step(setup, step)
                except DataDependentOutputException:
                    if state["optimizer_steps"] != done + 1:
                        raise  # a host read before the optimiser step: the trace would be cut short
    finally:
        chunked.WORKSPACE.bufs = saved_workspace
    return {
        "peak_bytes": tracker.peak,
        "at_peak": dict(sorted(tracker.at_peak.items(), key=lambda kv: -kv[1])),
        "peak_where": tracker.peak_where,
        "ops_at_peak": {f"{c}: {op}": n for (c, op), n in sorted(tracker.ops_at_peak.items(), key=lambda kv: -kv[1])},
        "start_bytes": before,
        "start": {k_: v for k_, v in weights_at_start.items() if v},
        "steps": steps,
        "micro_batches": micro_batches,
        "micro_batch_size": mb,
        "vocab": V,
        "d_teacher": tc.hidden_size,
    }


def estimate(cfg: RunConfig, teacher: Optional[tuple[CausalLM, Any]] = None) -> dict[str, float]:
    """`hld.plan.memory_estimate` of `cfg` for one process on a GPU."""
    teacher_meta, ids = teacher or teacher_shapes(cfg.teacher.model)
    with torch.device("meta"):
        parts = assemble(cfg, tokenizer=ids, vocab_size=vocab_of(teacher_meta), teacher_lm=teacher_meta)
    return memory_estimate(cfg, parts, teacher_meta, world_size=1, device=GPU)
