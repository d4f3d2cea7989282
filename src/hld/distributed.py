"""Data parallelism under `torchrun`, layered on: model code never mentions ranks.

`torchrun --nproc-per-node N -m hld train ...` starts N processes (ranks); each reads the same
config and trains one student together with the others (`train.parallel`):
- `ddp`: every rank holds the whole student and projectors; after the step's micro-batches their
  gradients are summed over the ranks (bucketed all-reduce), so every replica takes the same step.
  This is DDP's arithmetic without torch's DDP wrapper, whose reducer requires every parameter in
  the forward's graph to get a gradient in every backward: hld-first's hidden phase leaves the final
  norm without one (see docs/decisions.md).
- `fsdp2`: `fully_shard` per decoder block, then the root (the embedding, the tied head, the final
  norm) and each projector; gradients are reduce-scattered as sums. Checkpoints are DCP directories.
World size 1 (no torchrun, or torchrun with one process) is the single-process code path: no process
group, nothing wrapped, no communication (each function below then does what one process did before).

Data: the global batch of step k is `BatchOrder.batch(k)` for every world size; rank r computes its
contiguous share (rows r·B/W … (r+1)·B/W − 1). Every rank divides its loss sum by the *global* batch's
target count, so the sum over ranks of their gradients is the single-process gradient.

The teacher is inference-only and replicated on every rank (sharding it with FSDP2 would save memory
for a large teacher; not implemented: its forward stops early at the deepest needed layer, and its head
is read outside the forward, chunk by chunk).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist

from hld.errors import HldError

BUCKET_ELEMS = 1 << 23  # gradient elements per all-reduce (32 MB in fp32; DDP's default bucket is 25 MB)


@dataclass
class Dist:
    """This process's place in the job. `mode` is the resolved `train.parallel`; it also picks the
    checkpoint format (fsdp2: DCP directory, at any world size)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process group was created by setup() (and is destroyed by close())

    @property
    def active(self) -> bool:
        """More than one process: gradients, metrics and flags are communicated."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory's files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.active and self.mode == "fsdp2"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HldError(
            f"environment variable {name}={raw!r} is not an integer", "launch with torchrun, which sets it, or unset it"
        ) from None


def launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) without torchrun."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def resolve_mode(parallel: str, world_size: int) -> str:
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise HldError(
            f"train.parallel=none but torchrun started {world_size} processes",
            "set train.parallel to auto, ddp or fsdp2, or run without torchrun",
        )
    return parallel


def check_batch(train, world_size: int) -> None:
    """The global batch must split evenly over the ranks, and each rank's share into micro-batches."""
    b, m = train.batch_size, train.micro_batch_size
    if b % world_size:
        raise HldError(
            f"train.batch_size={b} is not a multiple of the world size {world_size}",
            f"set train.batch_size to a multiple of {world_size} (each process takes an equal "
            "share of the global batch)",
        )
    local = b // world_size
    if m is not None and local % m:
        raise HldError(
            f"train.micro_batch_size={m} does not divide the per-process batch {local} "
            f"(train.batch_size={b} over {world_size} processes)",
            f"pick a micro batch size that divides {local}",
        )


def setup(train, device: Optional[torch.device] = None) -> Dist:
    """Read torchrun's environment, check the batch split, and join the process group (world size > 1)."""
    from hld.precision import default_device

    world, rank, local = launch_env()
    mode = resolve_mode(train.parallel, world)
    check_batch(train, world)
    if world == 1:
        return Dist(mode=mode, device=device or default_device())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    owns = not tdist.is_initialized()
    if owns:  # env:// rendezvous: MASTER_ADDR/PORT (or torchrun's c10d store), RANK, WORLD_SIZE
        # an explicit timeout: the default (NCCL 10 min) would end the job while rank 0 tokenises a corpus
        timeout = datetime.timedelta(minutes=train.dist_timeout_minutes)
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Dist(rank=rank, world_size=world, local_rank=local, mode=mode, device=dev, owns_group=owns)


def close(d: Dist) -> None:
    if d.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        tdist.barrier()


# --------------------------------------------------------------------------- wrapping


def parallelize(d: Dist, runner, projectors, *, compute_dtype: torch.dtype) -> None:
    """Make the replicas start equal (ddp) or shard the student and projectors (fsdp2). Call before
    the optimiser is built: under fsdp2 it must hold the sharded parameters."""
    if not d.active:
        return
    if d.mode == "ddp":
        for module in [runner.lm] + ([projectors] if projectors is not None else []):
            for t in [*module.parameters(), *module.buffers()]:  # as DDP's constructor does
                tdist.broadcast(t.data, src=0)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from hld.models.hooks import decoder_of

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    # params all-gathered in the compute dtype (bf16 on GPUs), gradients reduced in fp32
    mp = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32
    )
    blocks = list(decoder_of(runner.lm).layers)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # the root is the backbone the training step calls; it holds the embedding (tied with the head,
    # which the fused loss reads after the forward: the root stays unsharded until the backward)
    fully_shard(runner.backbone, mesh=mesh, mp_policy=mp)
    units = [runner.backbone, *blocks]
    if projectors is not None:  # called one by one by the hidden objective: each is its own unit
        for proj in projectors.proj.values():
            fully_shard(proj, mesh=mesh, mp_policy=mp)
            units.append(proj)
    gloo = tdist.get_backend() == "gloo"
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum, not mean: losses are already divided by the global count
        if gloo:  # gloo has no pre-multiplied sum (NCCL's PREMUL_SUM): plain sums (the factor is 1)
            unit.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def unsharded(d: Dist, root):
    """fsdp2: hold the root's parameters (embedding and head) gathered, for code that reads the head
    before running the backbone (validation)."""
    if not d.sharded:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


# --------------------------------------------------------------------------- communication


def sync_grads(d: Dist, params: list[torch.Tensor]) -> None:
    """ddp: sum each gradient over the ranks. Each rank's loss was divided by the global target count,
    so the sum is the single-process gradient. (fsdp2's hooks have already reduce-scattered; a
    parameter without a gradient has none on every rank: the phase is a function of the step.)"""
    if not d.active or d.mode != "ddp":
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        tdist.all_reduce(flat)
        for g, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(summed)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            if bucket and size + t.numel() > BUCKET_ELEMS:
                out.append(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            out.append(bucket)
    return out


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a list of floats over the ranks (loss and metric sums), in float64."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    tdist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """`t` (on the device) summed over the ranks, in place and without reading it back; `t` at world size 1."""
    if d.active:
        tdist.all_reduce(t)
    return t


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if it is true on one (SIGTERM, a non-finite step): ranks never diverge."""
    if not d.active:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def main_only(d: Dist, write) -> None:
    """Run `write()` on rank 0 only. If it fails with a user-level error (an HldError, or an OSError
    such as a full disk), every rank raises: no rank is left waiting on a rank 0 that gave up."""
    error: Optional[BaseException] = None
    if d.is_main:
        try:
            write()
        except (HldError, OSError) as exc:
            error = exc
    if any_rank(d, error is not None):
        raise error or HldError("rank 0 could not write the run directory", "see rank 0's error line")


def clip_grad_norm(d: Dist, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm (after clipping to `max_norm`). Under fsdp2 each rank holds shards of
    the gradients: their squared norms are summed over the ranks."""
    if not d.sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# --------------------------------------------------------------------------- export


def full_state_dict(d: Dist, module: torch.nn.Module) -> Optional[dict]:
    """fsdp2: the module's whole weights as CPU tensors on rank 0 (None elsewhere); a collective.
    Otherwise None: the module itself holds them."""
    if not d.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter once, under its first name (the tied head would otherwise be written twice)
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {k: v for k, v in sd.items() if k in names} if d.is_main else None
