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
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from hld.errors import HldError
from hld.train.progress import Progress

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_TASKS: tuple[str, ...] = ("hld_lambada", "hld_mc")
PAPER_TASKS: tuple[str, ...] = ("hellaswag", "winogrande", "lambada_openai", "piqa", "arc_easy", "wikitext")
ALIASES = {"shipped": SHIPPED_TASKS, "paper": PAPER_TASKS}
# families whose logits are lm_head(final hidden state), soft-capped when the config says so
PLAIN_HEAD = frozenset({"gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"})
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-type metrics (acc's is analytic)


def expand_tasks(spec: str | list[str]) -> list[str]:
    """"shipped,hellaswag" -> ["hld_lambada", "hld_mc", "hellaswag"] (aliases: shipped, paper;
    duplicates dropped, order kept)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for t in ALIASES.get(name, (name,) if name else ()):
            if t not in out:
                out.append(t)
    return out


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: Optional[int] = None,
                   batch_size: int = 8, device=None, quiet: bool = False,
                   dataset_paths: Optional[dict[str, str]] = None, rolling_len: int = 512) -> dict[str, dict]:
    """Score `model` on harness `tasks` (zero-shot). Returns, per (leaf) task,
    {"metric", "value", "stderr", "chance", "n", "metrics"}: the headline metric (acc, or
    word_perplexity for rolling-likelihood tasks such as wikitext), its standard error, the
    chance level (multiple choice: mean of 1/choices over the scored items; else None), the
    number of scored items and every metric the harness reported. `limit`: the first N items of
    each task. `device`: where the model is moved and run (default: CUDA when available, else CPU;
    its dtype is kept). `dataset_paths`: {task: local dataset dir} in place of the task's hub dataset.
    `rolling_len`: the window of rolling log-likelihood tasks (BOS + rolling_len - 1 tokens, see the
    module's docstring). The model's train/eval mode is restored afterwards."""
    if rolling_len < 2:
        raise HldError(f"rolling window {rolling_len} leaves no prediction", "use a window of at least 2 tokens")
    _require_lm_eval()
    from lm_eval import simple_evaluate

    tasks = expand_tasks(tasks)
    if not tasks:
        raise HldError("no tasks given", f"name harness tasks, or 'shipped' ({', '.join(SHIPPED_TASKS)})")
    stream = sys.stderr  # our progress line; the harness's own output is silenced
    with _harness_output():
        manager = task_manager(tasks)
        built = _load_tasks(manager, tasks, dataset_paths or {})
        was_training = model.training
        lm = _hld_lm_class()(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                             quiet=quiet, desc="eval " + ",".join(tasks), stream=stream, rolling_len=rolling_len)
        try:
            out = simple_evaluate(model=lm, tasks=list(built.values()), task_manager=manager, limit=limit,
                                  bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
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


def read_downstream(run_dir: Path) -> dict:
    """A run's downstream.json (written by `hld study`: what evaluate_tasks returned, per task), or {}."""
    path = Path(run_dir) / "downstream.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HldError(f"{path} is not valid JSON ({exc.msg})", "rewrite it, or delete it and rerun the study") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "value" in v for v in data.values()):
        raise HldError(f"{path} is not {{task: {{metric, value, stderr, chance, n}}}}", "rewrite or delete it")
    return data


# --------------------------------------------------------------------------- loading tasks

# the harness's folders of the paper's tasks: indexing only these takes a second, all its
# thousands of task files tens of seconds
PAPER_TASK_DIRS = {"hellaswag": "hellaswag", "winogrande": "winogrande", "lambada_openai": "lambada",
                   "piqa": "piqa", "arc_easy": "arc", "wikitext": "wikitext"}
_MANAGERS: dict = {}


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager over the shipped tasks plus the harness's folders these tasks need
    (its whole index when a task is neither shipped nor one of the paper's); one per process and
    set of folders."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    harness = Path(lm_eval.tasks.__file__).resolve().parent
    dirs = {harness / PAPER_TASK_DIRS[t] for t in tasks if t in PAPER_TASK_DIRS}
    whole = any(t not in PAPER_TASK_DIRS and t not in SHIPPED_TASKS for t in tasks) \
        or not all(d.is_dir() for d in dirs)
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
        raise HldError(f"a local dataset is given for {', '.join(unknown)}, which is not among the tasks",
                       "add the task to --tasks or drop its --task-data")
    built: dict = {}
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HldError(f"unknown lm-eval task {name!r}{hint}",
                           f"give a harness task name (`lm-eval ls tasks` lists them), or shipped "
                           f"({', '.join(SHIPPED_TASKS)}), or paper ({', '.join(PAPER_TASKS)})")
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
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    return HldError(
        f"the data of task {name}{what} cannot be loaded: {detail}",
        f"download it where the hub is reachable and rerun with HF_DATASETS_OFFLINE=1 and that HF cache "
        f"(HF_HOME or HF_DATASETS_CACHE), or point the task at a local copy: --task-data {name}=DIR "
        f"(a snapshot of the dataset repo, a folder of split files, or a save_to_disk directory)")


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
        raise HldError(f"task {name} is not defined by a YAML file, so its dataset cannot be replaced",
                       "use HF_DATASETS_OFFLINE=1 with a populated HF cache instead")
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
        raise HldError(f"--task-data {name}={path} cannot be read: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:160]}",
                       "give a dataset repository snapshot, a folder of split files or a save_to_disk directory",
                       ) from exc
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"test": ds})


# --------------------------------------------------------------------------- results

def _row(name: str, task, out: dict) -> dict:
    res = out["results"][name]
    metrics = {k.split(",")[0]: v for k, v in res.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    output_type = task.get_config("output_type")
    metric = "word_perplexity" if output_type == "loglikelihood_rolling" else \
        "acc" if "acc" in metrics else next(iter(metrics))
    stderr = next((v for k, v in res.items() if k.split(",")[0] == f"{metric}_stderr"), None)
    samples = out.get("samples", {}).get(name, [])
    chance = None
    if output_type == "multiple_choice" and samples:
        chance = sum(1.0 / len(task.doc_to_choice(s["doc"])) for s in samples) / len(samples)
    n = out.get("n-samples", {}).get(name, {}).get("effective", len(samples))
    return {"metric": metric, "value": float(metrics[metric]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            "chance": chance, "n": int(n), "metrics": metrics}


@contextlib.contextmanager
def _harness_output():
    """The harness prints to stdout, draws its own tqdm bars and logs freely: silence all of it
    (stdout keeps our --json line; our progress line writes to the stream saved before), keep
    its log to errors, and bootstrap stderrs without a process pool."""
    log = logging.getLogger("lm_eval")
    level, env = log.level, os.environ.get("DISABLE_MULTIPROC")
    log.setLevel(logging.ERROR)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        log.setLevel(level)
        if env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = env


# --------------------------------------------------------------------------- the model wrapper

_CLASS = None


def _hld_lm_class():
    """HFLM with our tokenisation and progress line (built on first use: lm-eval is optional)."""
    global _CLASS
    if _CLASS is None:
        from lm_eval.models.huggingface import HFLM

        class HldLM(HFLM):
            def __init__(self, *, model, tokenizer, batch_size: int, device, quiet: bool, desc: str,
                         stream, rolling_len: int = 512) -> None:
                from hld.precision import default_device

                device = torch.device(device) if device is not None else default_device()
                model.to(device)
                super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                 device=str(device), add_bos_token=True)
                self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
                    else tokenizer.eos_token_id
                self._rolling = False
                self.rolling_len = rolling_len
                self._cont_len: dict = {}
                self.progress = Progress(0, desc=desc, quiet=True)
                self._quiet, self._desc, self._stream = quiet, desc, stream

            # one BOS, never a tokenizer's other special tokens; none inside rolling windows
            def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                           left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
                ids = self.tokenizer(string, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                bos = add_special_tokens if add_special_tokens is not None else not self._rolling
                if bos:
                    ids = [self.bos_id] + ids
                return ids[-left_truncate_len:] if left_truncate_len else ids

            @property
            def prefix_token_id(self) -> int:
                return self.bos_id

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                self._start(len(requests))
                return super().loglikelihood(requests, disable_tqdm=True)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                """Sum of log-likelihoods of each document over disjoint BOS-led windows: the
                document's tokens in chunks of rolling_len - 1, each scored after one BOS."""
                self._start(len(requests))
                self._rolling = True
                try:
                    windows, owner = [], []
                    for i, (string,) in enumerate(req.args for req in requests):
                        ids = self.tok_encode(string)  # no BOS: self._rolling
                        for s in range(0, len(ids), self.rolling_len - 1):
                            windows.append((None, [self.bos_id], ids[s:s + self.rolling_len - 1]))
                            owner.append(i)
                    totals = [0.0] * len(requests)
                    for s in range(0, len(windows), self.batch_size):
                        part = windows[s:s + self.batch_size]
                        for i, (ll, _) in zip(owner[s:s + len(part)],
                                              self._loglikelihood_tokens(part, override_bs=len(part))):
                            totals[i] += ll
                    for req, total in zip(requests, totals):
                        self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
                    return totals
                finally:
                    self._rolling = False

            def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
                # the continuation length of every input row the harness will build, so that
                # _model_call can run the (vocabulary-wide) head on continuation positions only
                self._cont_len = {}
                for _, ctx, cont in requests:
                    key = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
                    self._cont_len[key] = max(self._cont_len.get(key, 0), len(cont))
                try:
                    return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
                finally:
                    self._cont_len = {}

            def _model_call(self, inps, attn_mask=None, labels=None):
                if attn_mask is None and labels is None and self.model.config.model_type in PLAIN_HEAD:
                    logits = self._continuation_logits(inps)
                else:
                    logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)  # (B, T, V)
                self._rows += inps.shape[0]
                self._tokens += inps.numel()
                rate = self._tokens / max(time.time() - self._t0, 1e-9)
                self.progress.update(min(self._rows, self.progress.total), tokens_per_s=rate)
                return logits

            @torch.no_grad()
            def _continuation_logits(self, inps: torch.Tensor) -> torch.Tensor:
                """The model's logits where the harness reads them — each row's continuation — in
                a suffix of the positions, zeros elsewhere: with Gemma's 262k vocabulary the head is
                most of a forward's FLOPs and the (B, T, V) logits most of its memory. The harness
                aligns logits to the end of the input (`ctx_len = inplen + logits_len - padded_len`),
                so the suffix from the batch's earliest continuation suffices."""
                from hld.distill.signals import Backbone

                hidden = Backbone(self.model)(inps)  # (B, T, D)
                spans = [self._continuation_span(row) for row in inps.tolist()]
                start = min(lo for lo, _ in spans)
                keep = torch.zeros(inps.shape[0], inps.shape[1] - start, dtype=torch.bool, device=inps.device)
                for r, (lo, hi) in enumerate(spans):
                    keep[r, lo - start:hi - start] = True  # (B, T - start)
                picked = self.model.get_output_embeddings()(hidden[:, start:][keep])  # (N, V)
                cap = getattr(self.model.config, "final_logit_softcapping", None)
                if cap:
                    picked = torch.tanh(picked / cap) * cap
                logits = picked.new_zeros(*keep.shape, picked.shape[-1])  # (B, T - start, V)
                logits[keep] = picked
                return logits

            def _continuation_span(self, row: list[int]) -> tuple[int, int]:
                """Positions [lo, hi) whose logits the harness reads in a right-padded row ((0, T):
                unknown, compute all). Padding is 0s, which may also be real tokens: try every length."""
                end = len(row)
                while end > 0 and row[end - 1] == 0:
                    end -= 1
                hits = [(n - self._cont_len[key], n) for n in range(max(end, 1), len(row) + 1)
                        if (key := tuple(row[:n])) in self._cont_len]
                if not hits:
                    return 0, len(row)
                return max(min(lo for lo, _ in hits), 0), max(hi for _, hi in hits)

            def _start(self, total: int) -> None:
                self.progress.close()
                self.progress = Progress(total, desc=self._desc, quiet=self._quiet, stream=self._stream)
                self._rows, self._tokens, self._t0 = 0, 0, time.time()

        _CLASS = HldLM
    return _CLASS
