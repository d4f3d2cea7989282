"""Checkpoints: written atomically (a temporary file, then a rename), read with weights_only=True.

A checkpoint holds the student, the projectors, the optimiser, the step (which is the data
position: the batch order is a pure function of the step) and the RNG states.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hld.errors import HldError

CKPT_NAME = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise HldError(f"could not write {path}: {exc.strerror or exc}", "free disk space or pick another --out") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    """RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_checkpoint(run_dir: Path, *, step: int, tokens: int, student: torch.nn.Module,
                    projectors: torch.nn.Module | None, optimizer: torch.optim.Optimizer, extra: dict) -> Path:
    path = run_dir / "checkpoints" / CKPT_NAME
    atomic_save({
        "step": step, "tokens": tokens,
        "student": student.state_dict(),
        "projectors": projectors.state_dict() if projectors is not None else None,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(), **extra,
    }, path)
    return path


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / CKPT_NAME
    if not path.exists():
        raise HldError(f"no checkpoint in {run_dir}", "run without --resume, or point --out at the run to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HldError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__})",
                       "delete it and restart the run without --resume") from exc
