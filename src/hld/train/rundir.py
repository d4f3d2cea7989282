"""The run directory around the loop: checked and set up for a new run or a resume, the resumed run's
state read back, metric lines past the checkpoint dropped, and SIGTERM turned into a flag the loop reads.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import torch

from hld import atomic
from hld.config import RunConfig, dump_yaml, to_dict
from hld.distributed import Dist, barrier
from hld.errors import HldError
from hld.train.checkpoint import has_checkpoint, load_sharded, remove_torn, restore_checkpoint
from hld.train.loggers import read_metrics
from hld.train.state import RunState


def prepare_dir(cfg: RunConfig, out: Path, resume: bool, *, write: bool = True) -> None:
    """Check `out` for a new run or a resume; write config.yaml (`write`: rank 0 only)."""
    text = dump_yaml(cfg)
    cfg_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise HldError(f"--out {out} is an existing file, not a run directory", "give a directory for --out")
    if resume and not cfg_path.exists() and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise HldError(
            f"--resume: {out} holds a run's files but no config.yaml",
            "check --out, or delete that directory and run again",
        )
    if resume and cfg_path.exists():  # without config.yaml nothing ran: start (a requeued job that died early)
        if not same_config(cfg_path, cfg):
            raise HldError(
                f"--resume with a config that differs from {cfg_path}",
                "resume with the same config and overrides, or start a new --out",
            )
        return
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise HldError(
            f"{out} already holds a run",
            "pass --resume to continue it (from its last checkpoint, or "
            "from step 0 if it has none), or choose another --out",
        )
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cfg_path, text)
        except OSError as exc:
            raise HldError(
                f"cannot create the run directory {out}: {exc.strerror or exc}", atomic.write_fix(exc)
            ) from exc


def same_config(path: Path, cfg: RunConfig) -> bool:
    """Does the resolved config saved at `path` equal `cfg`? The `log` section (where metric lines
    also go) changes nothing a run computes, so it may differ, or be absent from older runs."""
    import yaml

    saved, now = yaml.safe_load(path.read_text()), to_dict(cfg)
    saved.pop("log", None)
    now.pop("log", None)
    return json.dumps(saved, sort_keys=True) == json.dumps(now, sort_keys=True)


def resume_state(
    out: Path, d: Dist, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> RunState:
    """Load the run's last checkpoint into `modules` ("student", and "projectors" when trained) and the
    optimiser, and return where the run stood; a run stopped before its first checkpoint starts again
    from step 0. Every rank calls it."""
    if d.is_main:
        remove_torn(out)  # a write cut short by a kill: never read
    barrier(d)
    if not has_checkpoint(out):  # stopped or failed before its first checkpoint (or it was deleted)
        if (out / "summary.json").exists():
            raise HldError(
                f"no checkpoint in {out}, and its run has finished (summary.json)",
                "export it with `hld export`, or start a new run in another --out",
            )
        if d.is_main:
            say(f"hld: no checkpoint in {out} yet: starting its run from step 0")
        state = RunState()
    elif d.mode == "fsdp2":  # a DCP directory, resharded to this world size
        state = load_sharded(out, modules=modules, optimizer=optimizer)
    else:
        state = restore_checkpoint(
            out, student=modules["student"], projectors=modules.get("projectors"), optimizer=optimizer
        )
    if d.is_main:
        _truncate_metrics(out, state.step)
    return state


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))


def last_validation(run_dir: Path) -> dict:
    """The `val/` metrics of the last line that has them ({} if none)."""
    vals = [r for r in read_metrics(run_dir) if "val/ppl" in r]
    return {k: v for k, v in vals[-1].items() if k.startswith("val/")} if vals else {}


def say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Preempted(Exception):
    """SIGTERM arrived: the step in flight finished, a checkpoint was written, the run can resume."""

    def __init__(self, run_dir: Path, step: int, total: int) -> None:
        super().__init__(f"preempted at step {step}/{total}; checkpoint saved in {run_dir}")
        self.run_dir, self.step, self.total = run_dir, step, total


class SigtermFlag:
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
