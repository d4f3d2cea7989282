"""The run directory around the loop: checked and set up for a new run or a resume, the resumed run's
state read back, metric lines past the checkpoint dropped, and SIGTERM turned into a flag the loop reads.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch

from hld import atomic, files
from hld.config import RunConfig, dump_yaml, resume_view, to_dict
from hld.distributed import Dist, barrier
from hld.errors import HldError
from hld.train.checkpoint import has_checkpoint, load_sharded, remove_torn, restore_checkpoint
from hld.train.loggers import read_metrics
from hld.train.state import RunState

RUN_LOCK = ".run.lock"  # held by the hld train writing the directory (hld.locks)


# what a run directory holds before its first metric line: a new run may start over these
# (cell.json: hld study; derivation.json: a derived student's kept blocks)
_STARTED = ("config.yaml", "hidden_stats.pt", "hidden_stats.pt.sha256", "cell.json", "derivation.json", RUN_LOCK)


def prepare_dir(cfg: RunConfig, out: Path, resume: bool, *, write: bool = True) -> None:
    """Check `out` for a new run or a resume; write config.yaml (`write`: rank 0 only). Nothing in `out`
    is changed before every check has passed."""
    text = dump_yaml(cfg)
    cfg_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise HldError(f"--out {out} is an existing file, not a run directory", "give a directory for --out")
    there = files.present(cfg_path)  # a dangling link too: read_run_config refuses it in one line
    saved = read_run_config(cfg_path) if there else None
    if there and saved is None or not there and _foreign(out):
        raise HldError(
            f"--out {out} is not empty and is not an hld run directory (it holds {_listing(out)})",
            "give a new or empty directory for --out (hld train writes config.yaml, summary.json, student/ there)",
        )
    if resume and not there and _logged(out):
        raise HldError(
            f"--resume: {out} holds a run's files but no config.yaml",
            "check --out, or delete that directory and run again",
        )
    if resume and saved is not None:  # without config.yaml nothing ran: start (a requeued job that died early)
        _check_run_files(out)
        if not same_config(saved, cfg):
            raise HldError(
                f"--resume with a config that differs from {cfg_path}",
                "resume with the same config and overrides, or start a new --out",
            )
        return
    if _logged(out):
        raise HldError(
            f"{out} already holds a run",
            "pass --resume to continue it (from its last checkpoint, or "
            "from step 0 if it has none), or choose another --out",
        )
    if _foreign(out):  # a run's config.yaml beside files a run that never logged a step cannot have written
        raise HldError(
            f"--out {out} is not empty and is not an hld run directory (it holds {_listing(out)})",
            "give a new or empty directory for --out (hld train writes config.yaml, summary.json, student/ there)",
        )
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cfg_path, text)
        except OSError as exc:
            raise HldError(
                f"cannot create the run directory {out}: {exc.strerror or exc}", atomic.write_fix(exc)
            ) from exc


def _entries(out: Path) -> list[str]:
    try:
        return sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError:
        return []


_RUN_FILES = (
    "summary.json",
    "metrics.jsonl",
    "cka.json",
    "downstream.json",
    "hidden_stats.pt",
    "hidden_stats.pt.sha256",
)
_RUN_DIRS = ("checkpoints", "student")


def _check_run_files(out: Path) -> None:
    """What a resumed run reads or replaces must be what hld wrote there: a file where it writes a file, a
    directory where it writes one (a directory at summary.json was a traceback at the end of the run)."""
    for name in _RUN_FILES:
        if files.present(out / name):
            files.regular_file(out / name, "run file", f"move {out / name} away (hld writes that file)")
    for name in _RUN_DIRS:
        if files.present(out / name):
            files.directory(out / name, "run directory", f"move {out / name} away (hld writes that directory)")


def _logged(out: Path) -> bool:
    """Has a run logged into `out` (metrics.jsonl or checkpoints/ there, whatever they are: a dangling link
    or a file where a directory belongs is refused when it is read, never taken for a new run)?"""
    return files.present(out / "metrics.jsonl") or files.present(out / "checkpoints")


def _foreign(out: Path) -> bool:
    """Does `out` hold something other than what a run writes before its first metric line (the files
    of a run that has logged are judged by the checks on metrics.jsonl and checkpoints/)?"""
    run_files = ("metrics.jsonl", "checkpoints", "summary.json", "student", "cka.json", "downstream.json", "cell.json")
    allowed = _STARTED + run_files if _logged(out) else _STARTED
    return any(n not in allowed and not n.endswith(".tmp") for n in _entries(out))


def _listing(out: Path) -> str:
    names = _entries(out)
    return ", ".join(names[:4]) + (f", … ({len(names)} entries)" if len(names) > 4 else "")


_SECTIONS = ("data", "teacher", "student", "objective", "budget", "train")  # every run's config.yaml has them
_READ_LEAVES = ("student.preset", "train.seed", "objective.method")  # what reports and studies read of it


def read_run_config(path: Path) -> dict | None:
    """A run directory's config.yaml as a dict; None if it is not an hld run config (another tool's YAML:
    not a mapping with `name` and only hld's sections); an HldError if it cannot be read or is damaged
    (truncated, not YAML, a section missing or of the wrong type)."""
    import yaml

    from hld.config import _build, migrate

    fix = f"restore {path} from a copy, or delete {path.parent} and train again"
    try:
        saved = yaml.safe_load(files.read_text(path, "the run's config", fix, max_bytes=files.MAX_CONFIG_BYTES))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise HldError(f"the run's config {path} is unreadable or not valid YAML (truncated?)", fix) from exc
    names = {f.name for f in fields(RunConfig)}
    if not isinstance(saved, dict) or "name" not in saved or not set(saved) <= names:
        return None
    missing = [k for k in _SECTIONS if not isinstance(saved.get(k), dict)]
    for leaf in _READ_LEAVES:
        section, key = leaf.split(".")
        if section not in missing and key not in saved[section]:
            missing.append(leaf)
    if missing:
        raise HldError(f"the run's config {path} is damaged ({missing[0]} is missing or not a mapping)", fix)
    try:
        _build(RunConfig, migrate(saved))
    except HldError as exc:
        raise HldError(f"the run's config {path} is damaged ({exc.problem})", fix) from exc
    return saved


_NUMBERS = ("steps", "tokens", "flops", "train_seconds", "student_params", "student_params_non_embedding")


def read_summary(run_dir: Path, fix: str) -> dict:
    """RUN_DIR/summary.json: a JSON object whose figures are numbers (`val/...` too), else one line."""
    path = Path(run_dir) / "summary.json"
    summary = atomic.read_json_object(path, "run summary", fix)
    for key, value in summary.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (key in _NUMBERS or key.startswith("val/")) and not number:
            raise HldError(f"run summary {path} is damaged: {key} is {value!r}, not a number", fix)
    sha = summary.get("student_sha256")
    if sha is not None and (not isinstance(sha, dict) or not all(isinstance(v, str) for v in sha.values())):
        raise HldError(f"run summary {path} is damaged: student_sha256 is not a mapping of file names to digests", fix)
    return summary


@contextlib.contextmanager
def run_lock(out: Path, d: Dist):
    """Hold RUN_DIR/.run.lock (rank 0) for the run: a second `hld train` into the same --out is refused
    in one line instead of interleaving its metrics, config and weights with the first's. The file is
    gone once the run ends (`hld.locks.sole_holder`); a killed holder's lock is released by the kernel.
    Under torchrun every rank raises when rank 0 finds it held."""
    from hld.distributed import any_rank
    from hld.locks import holder, sole_holder

    def refuse() -> HldError:
        who = holder(out / RUN_LOCK) if d.is_main else ""
        return HldError(
            f"another hld train is writing {out}" + (f" ({who})" if who else ""),
            "wait for it to finish, or give another --out",
        )

    if not d.is_main:
        if any_rank(d, False):
            raise refuse()
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = sole_holder(out / RUN_LOCK)
        got = lock.__enter__()
    except OSError as exc:
        any_rank(d, True)
        raise HldError(f"cannot create the run directory {out}: {exc.strerror or exc}", atomic.write_fix(exc)) from exc
    try:
        if any_rank(d, not got):
            raise refuse()
        yield
    finally:
        lock.__exit__(None, None, None)


def same_config(saved: dict, cfg: RunConfig) -> bool:
    """Does the resolved config saved in a run (`read_run_config`) equal `cfg`? The sections a resume may
    change (`hld.config.RESUME_MAY_CHANGE`: `log`, where metric lines also go) may differ, or be absent
    from older runs."""
    return json.dumps(resume_view(saved), sort_keys=True) == json.dumps(resume_view(to_dict(cfg)), sort_keys=True)


def resume_state(
    out: Path,
    d: Dist,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    identity: Optional[dict] = None,
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
        state = load_sharded(out, modules=modules, optimizer=optimizer, identity=identity)
    else:
        state = restore_checkpoint(
            out,
            student=modules["student"],
            projectors=modules.get("projectors"),
            optimizer=optimizer,
            identity=identity,
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
