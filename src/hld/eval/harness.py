"""lm-evaluation-harness adapter: score an in-memory Hugging Face causal LM (a student, the teacher)
on harness tasks — the paper's (hellaswag, winogrande, lambada_openai, piqa, arc_easy, wikitext) or
the two shipped offline ones (`hld_lambada`, `hld_mc`, see docs/evaluation.md).

The model is wrapped in lm-eval's `HFLM` with one change, tokenisation: every scored text gets
exactly one BOS in front and no EOS, as in our perplexity protocol (`hld.eval.perplexity`); a
tokenizer's own default (Gemma's adds BOS, the tiny test tokenizer does not) is never used.
Rolling log-likelihoods (wikitext) follow our window protocol, not the harness's overlapping rolling
windows: a document's tokens are cut into chunks of `rolling_len - 1`, each scored as BOS + chunk with
every token predicted (`rolling_len` is the window every compared model gets: in a study the cells'
`data.seq_len`, for teacher and students alike; in `hld eval`, `--seq-len`). So every window starts
with BOS, and two models are compared on the same windows whatever their context lengths.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from hld.errors import HldError, exc_line

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_TASKS: tuple[str, ...] = ("hld_lambada", "hld_mc")
PAPER_TASKS: tuple[str, ...] = ("hellaswag", "winogrande", "lambada_openai", "piqa", "arc_easy", "wikitext")
ALIASES = {"shipped": SHIPPED_TASKS, "paper": PAPER_TASKS}
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-type metrics (acc's is analytic)


def expand_tasks(spec: str | list[str]) -> list[str]:
    """ "shipped,hellaswag" -> ["hld_lambada", "hld_mc", "hellaswag"] (aliases: shipped, paper;
    duplicates dropped, order kept)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for t in ALIASES.get(name, (name,) if name else ()):
            if t not in out:
                out.append(t)
    return out


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: Optional[int] = None,
    batch_size: int = 8,
    device=None,
    quiet: bool = False,
    dataset_paths: Optional[dict[str, str]] = None,
    rolling_len: Optional[int] = None,
) -> dict[str, dict]:
    """Score `model` on harness `tasks` (zero-shot). Returns, per (leaf) task,
    {"metric", "value", "stderr", "chance", "n", "metrics"}: the headline metric (acc, or
    word_perplexity for rolling-likelihood tasks such as wikitext), its standard error, the
    chance level (multiple choice: mean of 1/choices over the scored items; else None), the
    number of scored items and every metric the harness reported. `limit`: the first N items of
    each task. `device`: where the model is moved and run (default: CUDA when available, else CPU;
    its dtype is kept). `dataset_paths`: {task: local dataset dir} in place of the task's hub dataset.
    `rolling_len`: the window of rolling log-likelihood tasks (BOS + rolling_len - 1 tokens, see the
    module's docstring; None: `hld.eval.hld_lm.ROLLING_LEN`). The model's train/eval mode is restored afterwards."""
    if rolling_len is not None and rolling_len < 2:
        raise HldError(f"rolling window {rolling_len} leaves no prediction", "use a window of at least 2 tokens")
    _require_lm_eval()
    from lm_eval import simple_evaluate

    from hld.eval.hld_lm import ROLLING_LEN, HldLM

    tasks = expand_tasks(tasks)
    if not tasks:
        raise HldError("no tasks given", f"name harness tasks, or 'shipped' ({', '.join(SHIPPED_TASKS)})")
    stream = sys.stderr  # our progress line; the harness's own output is silenced
    with _harness_output():
        manager = task_manager(tasks)
        built = _load_tasks(manager, tasks, dataset_paths or {})
        was_training = model.training
        lm = HldLM(
            model=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device,
            quiet=quiet,
            desc="eval " + ",".join(tasks),
            stream=stream,
            rolling_len=ROLLING_LEN if rolling_len is None else rolling_len,
        )
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(built.values()),
                task_manager=manager,
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        finally:
            lm.progress.close()
            model.train(was_training)
    return {name: _row(name, task, out) for name, task in built.items()}


def check_tasks(tasks: list[str], dataset_paths: Optional[dict[str, str]] = None) -> None:
    """Load `tasks` (names and data) without scoring anything: a study calls this before it trains, so
    a misspelt task or missing hub data is one line at once, not after the first cell."""
    _require_lm_eval()
    tasks = expand_tasks(tasks)
    with _harness_output():
        _load_tasks(task_manager(tasks), tasks, dataset_paths or {})


# --------------------------------------------------------------------------- loading tasks

# the harness's folders of the paper's tasks: indexing only these takes a second, all its
# thousands of task files tens of seconds
PAPER_TASK_DIRS = {
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "lambada_openai": "lambada",
    "piqa": "piqa",
    "arc_easy": "arc",
    "wikitext": "wikitext",
}
_MANAGERS: dict = {}


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager over the shipped tasks plus the harness's folders these tasks need
    (its whole index when a task is neither shipped nor one of the paper's); one per process and
    set of folders."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    harness = Path(lm_eval.tasks.__file__).resolve().parent
    dirs = {harness / PAPER_TASK_DIRS[t] for t in tasks if t in PAPER_TASK_DIRS}
    whole = any(t not in PAPER_TASK_DIRS and t not in SHIPPED_TASKS for t in tasks) or not all(d.is_dir() for d in dirs)
    key = "all" if whole else frozenset(dirs)
    if key not in _MANAGERS:
        paths = [TASKS_DIR] if whole else [TASKS_DIR, *sorted(dirs)]
        _MANAGERS[key] = TaskManager(include_path=[str(p) for p in paths], include_defaults=whole)
    return _MANAGERS[key]


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise HldError("evaluating harness tasks needs lm-evaluation-harness (lm-eval)", "pip install 'hld[eval]'")


def _load_tasks(manager, names: list[str], dataset_paths: dict[str, str]) -> dict:
    """{leaf task name: Task}; a task whose data cannot be read is one HldError naming it."""
    unknown = [n for n in dataset_paths if n not in names]
    if unknown:
        raise HldError(
            f"a local dataset is given for {', '.join(unknown)}, which is not among the tasks",
            "add the task to --tasks or drop its --task-data",
        )
    built: dict = {}
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HldError(
                f"unknown lm-eval task {name!r}{hint}",
                f"give a harness task name (`lm-eval ls tasks` lists them), or shipped "
                f"({', '.join(SHIPPED_TASKS)}), or paper ({', '.join(PAPER_TASKS)})",
            )
        spec = _local_spec(manager, name, dataset_paths[name]) if name in dataset_paths else name
        try:
            loaded = manager.load(spec)
        except Exception as exc:  # the hub is out of reach, the cache lacks the data, a bad local copy
            raise _data_error(manager, name, exc) from exc
        built.update(loaded["tasks"])
    return built


def _data_error(manager, name: str, exc: Exception) -> HldError:
    source = _yaml_field(manager, name, "dataset_path")
    what = f" ({source})" if source else ""
    detail = exc_line(exc)
    return HldError(
        f"the data of task {name}{what} cannot be loaded: {detail}",
        f"download it where the hub is reachable and rerun with HF_DATASETS_OFFLINE=1 and that HF cache "
        f"(HF_HOME or HF_DATASETS_CACHE), or point the task at a local copy: --task-data {name}=DIR "
        f"(a snapshot of the dataset repo, a folder of split files, or a save_to_disk directory)",
    )


def _yaml_field(manager, name: str, key: str) -> Optional[str]:
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if not path:
        return None
    m = re.search(rf"^{key}:\s*(\S+)", Path(path).read_text(encoding="utf-8"), re.MULTILINE)
    return m.group(1) if m else None


def _local_spec(manager, name: str, directory: str) -> dict:
    """The task's full config with its dataset replaced by a local directory."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise HldError(f"--task-data {name}={directory}: no such directory", "give the folder of a local copy")
    entry = manager.task_index[name]
    if not getattr(entry, "yaml_path", None):
        raise HldError(
            f"task {name} is not defined by a YAML file, so its dataset cannot be replaced",
            "use HF_DATASETS_OFFLINE=1 with a populated HF cache instead",
        )
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("tag", None)  # a tag would register the task a second time
    dataset = _read_local(name, path, cfg.get("dataset_name"))
    cfg["custom_dataset"] = lambda **_metadata: dataset
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) not in dataset:  # a partial copy (say, validation only) is enough
            cfg[key] = None
    return cfg


def _read_local(name: str, path: Path, config_name: Optional[str]):
    """A `save_to_disk` directory, or a dataset folder: a snapshot of the hub repository (its README
    names the configs) or plain split files (validation.jsonl, test.parquet, ...)."""
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path), config_name if (path / "README.md").exists() else None)
    except Exception as exc:
        raise HldError(
            f"--task-data {name}={path} cannot be read: {exc_line(exc)}",
            "give a dataset repository snapshot, a folder of split files or a save_to_disk directory",
        ) from exc
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"test": ds})


# --------------------------------------------------------------------------- results


def _row(name: str, task, out: dict) -> dict:
    res = out["results"][name]
    metrics = {
        k.split(",")[0]: v for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))
    }
    output_type = task.get_config("output_type")
    metric = (
        "word_perplexity"
        if output_type == "loglikelihood_rolling"
        else "acc"
        if "acc" in metrics
        else next(iter(metrics))
    )
    stderr = next((v for k, v in res.items() if k.split(",")[0] == f"{metric}_stderr"), None)
    samples = out.get("samples", {}).get(name, [])
    chance = None
    if output_type == "multiple_choice" and samples:
        chance = sum(1.0 / len(task.doc_to_choice(s["doc"])) for s in samples) / len(samples)
    n = out.get("n-samples", {}).get(name, {}).get("effective", len(samples))
    return {
        "metric": metric,
        "value": float(metrics[metric]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        "chance": chance,
        "n": int(n),
        "metrics": metrics,
    }


@contextlib.contextmanager
def _harness_output():
    """The harness prints to stdout, draws its own tqdm bars and logs freely: silence all of it
    (stdout keeps our --json line; our progress line writes to the stream saved before), keep
    its log to errors, and bootstrap stderrs without a process pool."""
    import lm_eval.evaluator as evaluator

    log = logging.getLogger("lm_eval")
    level, env = log.level, os.environ.get("DISABLE_MULTIPROC")
    # the results' provenance we never read: `git describe` in the working directory (its "fatal: not a
    # git repository" goes to the terminal, past any redirect) and torch's environment report (~1.6 s)
    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    log.setLevel(logging.ERROR)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved
        log.setLevel(level)
        if env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = env
