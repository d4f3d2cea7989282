"""Where a run's metric lines go: `metrics.jsonl` always (what reports read), and TensorBoard and
Weights & Biases when `log.tensorboard` / `log.wandb` say so. The loop hands every line to one
`RunLogger` and closes it once; nothing else in the loop knows which sinks exist.

- TensorBoard: event files in `RUN_DIR/tensorboard/`, one scalar per numeric key, x = step. A
  resumed run purges the events logged after its checkpoint, as metrics.jsonl is truncated.
- W&B: one W&B run per run directory (its id is kept in `RUN_DIR/wandb-run-id`, so a resumed run
  continues it), files under `RUN_DIR/wandb/`, the resolved config as the W&B config.
  `WANDB_MODE=offline` needs no network or account (`wandb sync RUN_DIR/wandb/offline-run-*` later).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Optional

from hld import files
from hld.config import RunConfig, to_dict
from hld.errors import HldError, exc_line


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl lines ([] without one); a line cut short (a kill, a full disk) or damaged (not
    a JSON object, a step that is not a number, a figure that is not a number) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    fix = f"move {path} away (it is rewritten from the run's checkpoint by hld train --resume)"
    data = files.read_bytes(path, "metrics log", fix, max_bytes=files.MAX_METRICS_BYTES) if files.present(path) else b""
    out = []
    for ln in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(_metric_ok(k, v) for k, v in row.items()):
            out.append(row)
    return out


def _metric_ok(key: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number if key in ("step", "tokens", "flops") or key.startswith(("val/", "train/")) else True


class RunLogger:
    def __init__(self, out: Path, cfg: RunConfig, *, enabled: bool = True, resume_step: Optional[int] = None) -> None:
        """`enabled=False` (ranks other than 0) logs nowhere; `resume_step`: the checkpoint's step."""
        out = Path(out)
        self._jsonl = open(out / "metrics.jsonl" if enabled else os.devnull, "a")
        self._tb = _tensorboard(out, resume_step) if enabled and cfg.log.tensorboard else None
        self._wandb = _wandb(out, cfg) if enabled and cfg.log.wandb else None

    def log(self, line: dict) -> None:
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._tb is None and self._wandb is None:
            return
        step = int(line["step"])
        scalars = {
            k: float(v)
            for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _tensorboard(out: Path, resume_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise HldError("log.tensorboard=true needs the tensorboard package", "pip install 'hld[tensorboard]'") from exc
    # purge_step: events at or after it, left by the interrupted process, are dropped
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)


def _wandb(out: Path, cfg: RunConfig):
    try:
        import wandb
    except ImportError as exc:
        raise HldError("log.wandb=true needs the wandb package", "pip install 'hld[wandb]'") from exc
    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(
            project=cfg.log.wandb_project,
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=to_dict(cfg),
            settings=wandb.Settings(console="off", silent=True),
        )
    except Exception as exc:  # no account, no network
        raise HldError(
            f"W&B could not start: {exc_line(exc)}",
            "run `wandb login`, or set WANDB_MODE=offline (no network needed; `wandb sync` later)",
        ) from exc
