"""Checkpoints: written atomically (a temporary file, then a rename), read with weights_only=True.

A checkpoint holds the student, the projectors, the optimiser, the run state (`RunState`: the step,
which is the data position, tokens, FLOPs, train seconds) and the RNG states. Two formats:
- `checkpoints/checkpoint.pt`, one file (single process, and `ddp`, written by rank 0);
- `checkpoints/step-NNNNNNNN.dcp/`, a `torch.distributed.checkpoint` directory (`train.parallel=fsdp2`):
  every rank writes its shards into `.step-NNNNNNNN.dcp.tmp/`, rank 0 adds `trainer.pt` (the run state
  and the RNG states) and renames the directory into place. DCP reshards on load, so a run saved by N processes
  resumes on any number (1 included, without a process group).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import random
import re
import shutil
import warnings
from dataclasses import is_dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import numpy as np
import torch

from hld import files
from hld.atomic import check_recorded, replace_dir, torch_save, write_checked, write_file, write_fix
from hld.config import RunConfig, resume_view, to_dict
from hld.distributed import Dist, any_rank, barrier, main_only
from hld.errors import HldError, one_line
from hld.train.state import RunState

if TYPE_CHECKING:
    from hld.train.setup import Setup

CKPT_NAME = "checkpoint.pt"
TRAINER_NAME = "trainer.pt"  # inside a DCP directory: the RunState and the RNG states (rank 0's)
_DCP_NAME = re.compile(r"^\.?step-(\d{8})\.dcp(\.old)?$")


def atomic_save(obj: Any, path: Path, *, checked: bool = False) -> None:
    """torch.save, complete or absent, and on disk (fsync) before the rename: a checkpoint survives a crash.
    `checked`: its sha256 recorded beside it (`<name>.sha256`), checked before it is read back."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # checkpoints/ a regular file: FileExistsError, worded
        (write_checked if checked else write_file)(path, lambda fh: torch_save(obj, fh), fsync=True)
    except OSError as exc:
        raise HldError(f"could not write {path}: {exc.strerror or exc}", write_fix(exc)) from exc


def rng_state() -> dict:
    """RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_checkpoint(
    run_dir: Path,
    state: RunState,
    *,
    student: torch.nn.Module,
    projectors: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    identity: Optional[dict] = None,
) -> Path:
    """`identity`: the run's (`run_identity`), checked on resume."""
    path = run_dir / "checkpoints" / CKPT_NAME
    atomic_save(
        {
            **state.to_dict(),
            **_identity_keys(identity),
            "student": student.state_dict(),
            "projectors": projectors.state_dict() if projectors is not None else None,
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
        },
        path,
        checked=True,
    )
    return path


_DAMAGED_FIX = "delete it and rerun with --resume (a run without a checkpoint starts from step 0)"


def load_checkpoint(run_dir: Path) -> dict:
    """The single-file checkpoint as saved: the RunState's fields, the state dicts and the RNG states
    (its recorded sha256 checked first)."""
    path = run_dir / "checkpoints" / CKPT_NAME
    if not files.present(path):
        raise HldError(
            f"no checkpoint in {run_dir}", "rerun with --resume: a run without a checkpoint starts from step 0"
        )
    files.regular_file(path, "checkpoint", _DAMAGED_FIX)  # a directory, a dangling link, /dev/zero, a FIFO
    check_recorded(path, _DAMAGED_FIX, "checkpoint")
    ck = _load_file(path)
    if not isinstance(ck, dict) or not all(isinstance(ck.get(k), dict) for k in ("student", "optimizer", "rng")):
        raise HldError(f"checkpoint {path} is damaged (its state dicts are missing)", _DAMAGED_FIX)
    return ck


def run_identity(cfg: RunConfig, *, data: str, teacher: str) -> dict:
    """What makes a checkpoint this run's and no other's, written into every checkpoint and checked by
    `--resume`: the hash of the resolved config without the sections a resume may change
    (`hld.config.resume_view`), the seed (also in that hash: named apart for the message), the training
    windows' fingerprint (`windows_fingerprint`) and the teacher weights' identity ("" for ce)."""
    view = resume_view(to_dict(cfg))
    # where the teacher cache lies is no part of what the run computes (a study directory moves with its
    # caches): the cache's own identity is checked against the run's when it is opened
    view["teacher"] = {k: v for k, v in view["teacher"].items() if k != "cache"}
    text = json.dumps(view, sort_keys=True, default=str)
    return {
        "config": hashlib.sha256(text.encode()).hexdigest()[:16],
        "seed": int(cfg.train.seed),
        "data": data,
        "teacher": teacher,
    }


def _identity_keys(identity: Optional[dict]) -> dict:
    """A checkpoint's identity entries (`data_fingerprint` too: what an hld before identities checked)."""
    if not identity:
        return {}
    return {"identity": dict(identity), "data_fingerprint": identity.get("data", "")}


_FOREIGN_FIX = (
    "resume the run this checkpoint belongs to (its --out, config and seed), or delete the checkpoint to start "
    "this run from step 0"
)


def check_identity(ck: dict, path: Path, identity: Optional[dict]) -> None:
    """Refuse a checkpoint of another run: another seed, teacher, training data or config (a checkpoint
    copied between run directories). A checkpoint of an hld before identities holds its data fingerprint
    only: that is checked, the rest cannot be (docs/decisions.md, "Run identity")."""
    if not identity:
        return
    saved = ck.get("identity")
    check_data(ck, path, identity.get("data", ""))
    if not isinstance(saved, dict):
        if saved is not None:
            raise HldError(f"checkpoint {path} is damaged (its run identity is not a record)", _DAMAGED_FIX)
        return
    for key, what in (("seed", "seed"), ("teacher", "teacher weights"), ("config", "resolved config (hash)")):
        if saved.get(key) != identity.get(key):
            raise HldError(
                f"--resume: checkpoint {path} belongs to another run: its {what} is {saved.get(key)!r}, "
                f"this run's {identity.get(key)!r}",
                _FOREIGN_FIX,
            )


def check_data(ck: dict, path: Path, data_fingerprint: str) -> None:
    """Refuse to resume on other training data than the checkpoint's (a checkpoint of an older hld
    records none: not checked)."""
    saved = ck.get("data_fingerprint")
    if isinstance(ck.get("identity"), dict):
        saved = ck["identity"].get("data", saved)
    if saved and data_fingerprint and saved != data_fingerprint:
        raise HldError(
            f"--resume: the training data differs from the data checkpoint {path} was trained on "
            f"(fingerprint {data_fingerprint}, checkpoint {saved})",
            "resume with the data the run was started with (data.train and its files), or start a new --out",
        )


def restore_checkpoint(
    run_dir: Path,
    *,
    student: torch.nn.Module,
    projectors: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    identity: Optional[dict] = None,
) -> RunState:
    """Load the single-file checkpoint into the modules, the optimiser and the RNGs; return its run state.
    `identity`: this run's (`run_identity`); a checkpoint of another run is refused."""
    ck = load_checkpoint(run_dir)
    state = RunState.from_dict(ck, run_dir / "checkpoints" / CKPT_NAME)
    check_identity(ck, run_dir / "checkpoints" / CKPT_NAME, identity)
    try:
        student.load_state_dict(ck["student"])
        if projectors is not None:
            projectors.load_state_dict(ck["projectors"])
        optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise HldError(
            f"the checkpoint does not fit this run ({load_reason(exc)})",
            "resume with the config the run was started with",
        ) from exc
    set_rng_state(ck["rng"])
    return state


def _load_file(path: Path) -> dict:
    files.regular_file(path, "checkpoint", _DAMAGED_FIX)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HldError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__})", _DAMAGED_FIX) from exc


def load_reason(exc: BaseException) -> str:
    """The informative line of a load error (torch's state-dict errors open with a header line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return one_line(lines[0] if lines else type(exc).__name__)


def has_checkpoint(run_dir: Path) -> bool:
    """Is there a checkpoint to resume from? Anything at `checkpoints/checkpoint.pt` counts, a dangling link
    included (reading it refuses it in one line: saved steps are never thrown away for a link gone wrong);
    `checkpoints` that is not a directory is refused."""
    ck = Path(run_dir) / "checkpoints"
    if files.present(ck):
        files.directory(ck, "the run's checkpoints", "move it away (hld writes its checkpoints into that directory)")
    return files.present(ck / CKPT_NAME) or _latest_sharded(ck) is not None


def remove_torn(run_dir: Path) -> None:
    """Temporary files and directories of writes cut short by a kill: never read (rank 0, on resume)."""
    ck = Path(run_dir) / "checkpoints"
    for torn in ck.glob(".*.tmp"):
        shutil.rmtree(torn) if torn.is_dir() else torn.unlink()
    for old in ck.glob(".step-*.dcp.old"):  # set aside while its step was rewritten, which completed
        if (ck / old.name[1 : -len(".old")]).is_dir():
            shutil.rmtree(old)


# --------------------------------------------------------------------------- DCP (fsdp2)


def _sharded_dirs(ck: Path) -> list[tuple[int, Path]]:
    """Complete DCP checkpoints, (step, path). `.step-N.dcp.old` is one set aside while the same step
    was written again; it counts only when `step-N.dcp` is missing."""
    found: dict[int, Path] = {}
    for p in ck.glob("*step-*.dcp*") if ck.is_dir() else []:
        m = _DCP_NAME.match(p.name)
        if m and p.is_dir() and (m.group(2) is None or int(m.group(1)) not in found):
            found[int(m.group(1))] = p
    return sorted(found.items())


def _latest_sharded(ck: Path) -> Optional[Path]:
    dirs = _sharded_dirs(ck)
    return dirs[-1][1] if dirs else None


def save_sharded(
    run_dir: Path,
    d: Dist,
    state: RunState,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    identity: Optional[dict] = None,
) -> Path:
    """A DCP checkpoint of `modules` and the optimiser's state; a collective (every rank calls it).
    World size 1: no process group, DCP writes one shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step-{state.step:08d}.dcp"
    tmp = ck / f".{final.name}.tmp"
    if d.is_main:
        ck.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    barrier(d)
    model_sd, optim_sd = get_state_dict(torch.nn.ModuleDict(modules), optimizer)
    # tensors only: the optimiser's hyperparameters come from the config, which --resume checks
    error: Optional[BaseException] = None
    try:
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=tmp, no_dist=not d.active)
        if d.is_main:
            atomic_save({**state.to_dict(), **_identity_keys(identity), "rng": rng_state()}, tmp / TRAINER_NAME)
            replace_dir(tmp, final)
            for _, old in _sharded_dirs(ck):
                if old != final:
                    shutil.rmtree(old)
    except (OSError, HldError, dcp.api.CheckpointException) as exc:
        error = exc
    if any_rank(d, error is not None):  # every rank raises: none waits on a rank that gave up
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, HldError):
            raise error
        raise HldError(
            f"could not write checkpoint {final}: {_reason(error)}", "free disk space or pick another --out"
        ) from error
    return final


def _reason(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "another process failed to write its shard"
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()]
    for e in [exc, *failures, exc.__cause__]:  # DCP: {rank: (exception, traceback)}
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return type(exc).__name__


def load_sharded(
    run_dir: Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    identity: Optional[dict] = None,
) -> RunState:
    """Load the newest DCP checkpoint into `modules`, `optimizer` (resharding to this world size) and the
    RNGs (rank 0's, from its `trainer.pt`); return the run state saved there. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = _latest_sharded(Path(run_dir) / "checkpoints")
    if path is None:
        raise HldError(
            f"no sharded checkpoint in {run_dir} (train.parallel=fsdp2 writes checkpoints/step-*.dcp)",
            "run without --resume, or resume with the train.parallel the run was started with",
        )
    trainer = _load_file(path / TRAINER_NAME) if (path / TRAINER_NAME).exists() else None
    stored = _stored_keys(path)
    if trainer is None or stored is None:
        raise HldError(
            f"checkpoint {path} is corrupt or unreadable (metadata)",
            "delete it and rerun with --resume (a run without a checkpoint starts from step 0)",
        )
    check_identity(trainer, path, identity)
    container = torch.nn.ModuleDict(modules)
    # creates the optimiser's state (a zero-lr step)
    model_sd, optim_sd = cast(tuple[Any, Any], get_state_dict(container, optimizer))
    # a parameter that had no gradient yet (hld-first's hidden phase: the final norm) has no state in
    # the checkpoint: it is not read, and its made-up state is dropped after, as in the run that was saved
    stateless = [fqn for fqn in optim_sd["state"] if f"optim.{fqn}.step" not in stored]
    state = {"model": model_sd, "optim": {k: v for k, v in optim_sd["state"].items() if k not in stateless}}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
        set_state_dict(
            container,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict={
                "state": {**optim_sd["state"], **state["optim"]},
                "param_groups": optim_sd["param_groups"],
            },
        )
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError, dcp.api.CheckpointException) as exc:
        cause = next((f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()), exc)
        if isinstance(cause, (ValueError, KeyError)) or "Missing key" in str(cause):  # planned against our shapes
            raise HldError(
                f"the checkpoint does not fit this run ({load_reason(cause)})",
                "resume with the config the run was started with",
            ) from exc
        raise HldError(
            f"checkpoint {path} is corrupt or unreadable ({load_reason(cause)})",
            "delete it and rerun with --resume (a run without a checkpoint starts from step 0)",
        ) from exc
    params = dict(container.named_parameters())
    for fqn in stateless:
        optimizer.state.pop(params[fqn], None)
    set_rng_state(trainer["rng"])
    return RunState.from_dict(trainer, path / TRAINER_NAME)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; at world size 1 that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _is_dcp_record(obj: Any, module: str) -> bool:
    """A dataclass or an enum of torch.distributed.checkpoint: DCP's own metadata records."""
    return (
        module.startswith("torch.distributed.checkpoint.")
        and isinstance(obj, type)
        and (is_dataclass(obj) or issubclass(obj, Enum))
    )


def _enum_member(cls: Any, name: Any) -> Enum:
    """Stands in for `builtins.getattr` while the metadata is read. Early 3.11 releases (Debian 12's
    3.11.2 among them) pickle an enum member as `getattr(EnumClass, "NAME")` where 3.10, later 3.11 and
    3.12 write `EnumClass(value)`, so a checkpoint written there names getattr. Only that use is
    admitted: a DCP enum and one of its members' names, never an attribute that could be a callable."""
    ok = isinstance(cls, type) and issubclass(cls, Enum) and _is_dcp_record(cls, cls.__module__)
    if not (ok and isinstance(name, str) and name in cls.__members__):
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not allowed in checkpoint metadata")
    return cls.__members__[name]


class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads its `.metadata` file with plain `pickle.load`, which runs any code a crafted file
    names. This unpickler is run first and admits only DCP's own metadata records (dataclasses and
    enums of torch.distributed.checkpoint), torch dtypes and sizes, and paths, on every Python that
    writes them (an enum member as `getattr(cls, name)` too: `_enum_member`)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("builtins", "getattr"), ("__builtin__", "getattr")):
            return _enum_member
        obj = super().find_class(module, name) if module.split(".")[0] in ("torch", "pathlib") else None
        ok = _is_dcp_record(obj, module)
        ok = ok or (module == "torch" and (obj is torch.Size or isinstance(obj, torch.dtype)))
        ok = ok or (module, name) in {
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"),
        }
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj


def _stored_keys(path: Path) -> Optional[set[str]]:
    """The keys a DCP checkpoint holds, read safely; None if the metadata is unreadable, names anything
    but DCP's records, or holds pickled objects (DCP loads those with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        with open(path / ".metadata", "rb") as fh:
            md = _MetadataUnpickler(fh).load()
        entries = md.state_dict_metadata
    except Exception:
        return None
    if not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
        return None
    return set(entries)


def state_modules(s: Setup) -> dict[str, torch.nn.Module]:
    """What a DCP checkpoint holds, by name (the optimiser's state is keyed by these names)."""
    return {"student": s.student, **({"projectors": s.projectors} if s.projectors is not None else {})}


def save_run(s: Setup, out: Path, state: RunState) -> None:
    """The run's checkpoint at `state`: every rank its shards (fsdp2), else rank 0 one file."""
    if s.dist.mode == "fsdp2":
        save_sharded(out, s.dist, state, modules=state_modules(s), optimizer=s.optimizer, identity=s.identity)
        return
    main_only(
        s.dist,
        lambda: save_checkpoint(
            out,
            state,
            student=s.student,
            projectors=s.projectors,
            optimizer=s.optimizer,
            identity=s.identity,
        ),
    )
