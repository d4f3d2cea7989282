"""`hld` command line. Every command takes --json and then prints one JSON object as its last
stdout line. User errors print one line `hld: error: <problem> — <fix>` and exit with code 2
(--debug shows the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from hld.errors import HldError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def _add_eval(sub) -> None:
    """`hld eval`: perplexity and harness tasks of any model (its many options apart from the rest)."""
    p = sub.add_parser("eval", help="perplexity on a text source (--data) and/or lm-eval harness tasks (--tasks)")
    p.add_argument("--model", required=True, help="HF id, HF dir, .gguf, run dir, or gemma-3-270m")
    p.add_argument("--data", default=None, help="C4 shard glob, .jsonl(.gz), .txt, sample:validation, hf:...")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy; "
                   "'shipped' = the offline tasks hld_lambada,hld_mc; 'paper' = the paper's six")
    p.add_argument("--limit", type=int, default=None, help="tasks: score the first N items of each task")
    p.add_argument("--task-data", action="append", default=[], metavar="TASK=DIR",
                   help="tasks: read TASK's dataset from a local copy (repeatable)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (perplexity; default 4) or requests (tasks; default 8) per forward pass")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hld", description="Knowledge distillation during LLM pre-training: "
                                     "CE vs logit KD vs hidden-layer distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the embedded default: a small equal-FLOPs study (Gemma 3 270M teacher, "
                       "two tiny students, all four arms, a learning-rate grid) and its report")
    p.add_argument("--out", default="runs/demo", help="study directory (default: runs/demo); rerun to resume")
    p.add_argument("--config", default="demo", help="study YAML or shipped study name (default: demo)")
    p.add_argument("overrides", nargs="*", help="study keys (arms=[ce,kd], seeds=[0,1]) or dotted run overrides")
    _common(p)

    p = sub.add_parser("train", help="one training run")
    p.add_argument("--config", required=True, help="YAML file or preset name (see src/hld/configs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 objective.method=kd")
    _common(p)

    _add_eval(sub)

    p = sub.add_parser("export", help="a finished run's student as a Hugging Face checkpoint with a model card")
    p.add_argument("run_dir", help="run directory (the --out of hld train)")
    p.add_argument("out_dir", help="directory to write; must be new or empty unless --force")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    _common(p)

    p = sub.add_parser("cache-teacher", help="run the teacher once and store its signals for a config's runs")
    p.add_argument("--config", required=True, help="YAML file or preset name")
    p.add_argument("--out", required=True, help="cache directory to write (then pass teacher.cache=DIR)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    _common(p)

    p = sub.add_parser("inspect-teacher", help="per teacher layer: the largest dimension's share of ||x||^2 and the "
                       "share of the hidden target a constant predicts under each normalisation")
    p.add_argument("--config", required=True, help="YAML file or preset name")
    p.add_argument("--windows", type=int, default=24, help="held-out validation windows measured (default 24)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    _common(p)

    p = sub.add_parser("plan", help="what a run config or a study will cost, without loading weights: parameters, "
                       "FLOPs per token, steps and tokens at the budget, the teacher cache's size, peak memory")
    p.add_argument("--config", required=True, help="run YAML or preset name, or a study YAML or shipped study name "
                   "(a study of that name is taken first; --run for the run preset)")
    p.add_argument("--run", action="store_true", help="read --config as a run config even where a study has its name")
    p.add_argument("--world-size", type=int, default=1, help="processes to size the memory for (torchrun's "
                   "--nproc-per-node x nodes; default 1)")
    p.add_argument("overrides", nargs="*", help="dotted run overrides (and study keys for a study)")
    _common(p)

    p = sub.add_parser("config", help="list every config key with its help and default")
    _common(p)

    p = sub.add_parser("study", help="a grid of arms x students x budgets x hyperparameters x seeds, then its report")
    p.add_argument("--config", required=True, help="study YAML or shipped study name (see src/hld/configs/studies)")
    p.add_argument("--out", default=None, help="study directory (default: studies/<name>); rerun to resume")
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--list", action="store_true",
                      help="print every cell and teacher cache: its id, the command that runs it, what it waits for")
    jobs.add_argument("--cell", default=None, metavar="ID",
                      help="train one cell (resumable; skipped when finished; under torchrun too)")
    jobs.add_argument("--cache", default=None, metavar="GROUP", help="build one cache group's teacher cache")
    p.add_argument("overrides", nargs="*", help="study keys (arms=[ce,kd], seeds=[0,1]) or dotted run overrides")
    _common(p)

    p = sub.add_parser("report", help="(re)build report.md, results.csv and plots of a study from its run dirs")
    p.add_argument("dir", help="study directory (holding runs/)")
    _common(p)
    return parser


def cmd_train(args) -> dict:
    from hld.config import load_config
    from hld.train.loop import train

    if args.resume and args.out is None:
        raise HldError("--resume needs --out (the run directory to continue)", "pass --out RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.name}")
    summary = train(cfg, out, resume=args.resume, quiet=args.quiet or args.json)
    if not args.json and _is_main_rank():
        print(f"run {cfg.name}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"val ppl {summary.get('val/ppl', float('nan')):.2f} -> {out}")
    return {"run_dir": str(out), **summary}


def cmd_eval(args) -> dict:
    from hld.models.loading import freeze, load_causal_lm
    from hld.precision import default_device, resolve_dtype

    if args.data is None and args.tasks is None:
        raise HldError("hld eval needs --data (perplexity) or --tasks (lm-eval tasks), or both",
                       "e.g. --data sample:validation, or --tasks shipped")
    if args.seq_len < 2:
        raise HldError(f"--seq-len {args.seq_len} is too short", "use at least 2 (default 512)")
    if args.tasks is None and (args.limit is not None or args.task_data):
        raise HldError("--limit and --task-data apply to --tasks", "add --tasks, or drop them")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--max-docs", args.max_docs)):
        if value is not None and value < 1:
            raise HldError(f"{flag} {value} is not a positive number", f"give {flag} 1 or more, or leave it out")
    _check_finished_run(Path(args.model))
    task_data = _task_data(args.task_data)
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.time()
    loaded = load_causal_lm(args.model, dtype=dtype)
    lm = freeze(loaded.model).to(device)
    row: dict = {"model": args.model}
    if args.data is not None:
        row.update(_eval_perplexity(args, loaded.tokenizer, lm, dtype))
    if args.tasks is not None:
        from hld.eval.harness import evaluate_tasks, expand_tasks

        t1 = time.time()
        row["tasks"] = evaluate_tasks(lm, loaded.tokenizer, expand_tasks(args.tasks), limit=args.limit,
                                      batch_size=args.batch_size or 8, device=device,
                                      quiet=args.quiet or args.json, dataset_paths=task_data,
                                      rolling_len=args.seq_len)
        row["tasks_seconds"] = time.time() - t1
        if not args.json:
            for name, r in row["tasks"].items():
                err = f" ± {r['stderr']:.3f}" if r["stderr"] is not None else ""
                chance = f", chance {r['chance']:.3f}" if r["chance"] is not None else ""
                print(f"{args.model} {name}: {r['metric']} {r['value']:.4f}{err} (n={r['n']}{chance})")
    row["seconds"] = time.time() - t0
    return row


def _check_finished_run(path: Path) -> None:
    """A run directory is a model once training has exported its student/."""
    if (path / "config.yaml").is_file() and not (path / "student" / "config.json").is_file():
        raise HldError(f"run {path} has not finished (no student/ yet: it is written at the end of training)",
                       f"finish it with `hld train --resume --out {path} --config ...`, then evaluate it")


# config keys named by the data errors of `hld train`, and what `hld eval` calls them
_EVAL_FLAGS = (("data.train/validation", "--data"), ("data.train", "--data"), ("data.validation", "--data"),
               ("data.seq_len", "--seq-len"), ("data.max_train_docs", "--max-docs"))


def _eval_data_error(exc: HldError, source: str) -> HldError:
    problem, fix = exc.problem, exc.fix
    for key, flag in _EVAL_FLAGS:
        problem, fix = problem.replace(key, flag), fix.replace(key, flag)
    if source not in problem:
        problem = f"--data {source}: {problem}"
    return HldError(problem, fix)


def _task_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise HldError(f"--task-data {item!r} is not TASK=DIR", "e.g. --task-data hellaswag=/data/hellaswag")
        out[task.strip()] = path
    return out


def _eval_perplexity(args, tokenizer, lm, dtype) -> dict:
    from hld.data.packing import load_stream, pack_windows
    from hld.eval.perplexity import perplexity

    try:
        windows = pack_windows(load_stream(args.data, tokenizer, max_docs=args.max_docs), args.seq_len,
                               bos_id=tokenizer.bos_token_id)
    except HldError as exc:  # the data errors speak of `hld train`'s config keys
        raise _eval_data_error(exc, args.data) from exc
    r = perplexity(lm, windows, batch_size=args.batch_size or 4,
                   compute_dtype=dtype, progress=None if args.quiet or args.json else "eval")
    if not args.json:
        print(f"{args.model} on {args.data}: ppl {r['ppl']:.3f} (mean NLL {r['loss']:.4f} over {r['tokens']:,} "
              f"predictions, {len(windows)} windows of {args.seq_len})")
    return {"data": args.data, "seq_len": args.seq_len, "windows": len(windows), "tokens": r["tokens"],
            "loss": r["loss"], "ppl": r["ppl"]}


def cmd_export(args) -> dict:
    from hld.export import export_run

    result = export_run(Path(args.run_dir), Path(args.out_dir), force=args.force)
    if not args.json:
        print(f"exported {args.run_dir} -> {result['out_dir']} ({', '.join(result['files'])})")
    return result


def cmd_cache_teacher(args) -> dict:
    from hld.config import load_config
    from hld.train.cache_build import ensure_cache
    from hld.train.resources import Resources

    cfg = load_config(args.config, args.overrides)
    if not cfg.objective.method.startswith("hld"):
        # store the hidden layers an HLD run of the same config would match, so one cache serves all arms
        cfg = load_config(args.config, list(args.overrides) + ["objective.method=hld-joint"])
    with _sigterm_as_error(f"hld cache-teacher stopped by SIGTERM before {args.out} was complete; what it held "
                           "before is kept", "rerun the same command to build the cache"):
        m = ensure_cache([cfg], Path(args.out), Resources(), quiet=args.quiet or args.json)
    row = {"cache_dir": args.out, "tokens": m["tokens"], "layers": m["identity"]["layers"],
           "top_k": m["identity"]["top_k"], "build_seconds": m.get("build_seconds"), "bytes": m.get("bytes"),
           "bytes_per_token": m["bytes"] / m["tokens"] if m.get("bytes") else None,
           "build_flops": m.get("build_flops")}
    if not args.json:
        print(f"teacher cache {args.out}: {m['tokens']:,} tokens, top-{row['top_k']}, layers {row['layers']}")
    return row


def cmd_inspect_teacher(args) -> dict:
    from hld.config import load_config
    from hld.distill.inspect import inspect_teacher
    from hld.train.resources import Resources

    cfg = load_config(args.config, args.overrides)
    rows = inspect_teacher(cfg, Resources(), n_windows=args.windows)
    if not args.json:
        print("layer | top dim | its share of ||x||^2 | constant-predictor share: none / rms / standardize")
        for r in rows:
            c = r["const_share"]
            print(f"{r['layer']:5d} | {r['top_dim']:7d} | {r['top_dim_share']:20.3f} | "
                  f"{c['none']:.3f} / {c['rms']:.3f} / {c['standardize']:.3f}")
    return {"layers": rows}


@contextlib.contextmanager
def _sigterm_as_error(problem: str, fix: str):
    """SIGTERM raises an HldError where the command is, so its cleanup runs (the default action
    would end the process at once, leaving its temporary directory behind)."""
    def handle(signum, frame):
        raise HldError(problem, fix)

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, handle) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _is_study(name_or_path: str) -> bool:
    """A study YAML (it names its arms) or a shipped study's name."""
    from hld.config import read_yaml
    from hld.study.grid import STUDY_DIR

    path = Path(name_or_path)
    if path.is_file():
        return "arms" in read_yaml(path)
    return (STUDY_DIR / f"{name_or_path}.yaml").is_file()


def cmd_plan(args) -> dict:
    from hld.config import load_config
    from hld.plan import check_world_size, format_run, format_study, plan_run, plan_study

    if not args.run and _is_study(args.config):
        result = plan_study(args.config, args.overrides, world_size=args.world_size)
        lines = format_study(result)
    else:
        cfg = load_config(args.config, args.overrides)
        check_world_size(args.world_size, cfg)
        result = plan_run(cfg, world_size=args.world_size)
        lines = format_run(result)
    if not args.json:
        print("\n".join(lines))
    return result


def cmd_config(args) -> dict:
    from hld.config import field_help

    rows = field_help()
    if not args.json:
        for key, help_text, default in rows:
            print(f"{key} = {default!r}\n    {help_text}")
    return {"keys": [{"key": k, "help": h, "default": d} for k, h, d in rows]}


def cmd_study(args) -> dict:
    from hld.study.runner import run_study

    if getattr(args, "list", False) or getattr(args, "cell", None) or getattr(args, "cache", None):
        return _study_job(args)
    result = run_study(args.config, Path(args.out) if args.out else None, overrides=args.overrides,
                       quiet=args.quiet or args.json)
    if not args.json:
        _print_report(result)
        print(f"{result['cells']} cells ({len(result['trained'])} trained, {len(result['skipped'])} already done) "
              f"in {result['seconds']:.0f} s")
    return result


def _study_job(args) -> dict:
    """`hld study --list / --cell ID / --cache GROUP`: one job of a study's graph (hld.study.jobs)."""
    from hld.study import jobs

    out = Path(args.out) if args.out else None
    quiet = args.quiet or args.json
    if args.list:
        listing = jobs.list_jobs(args.config, out, overrides=args.overrides)
        if not args.json:
            print(jobs.format_jobs(listing))
        return listing
    if args.cache:
        row = jobs.build_one_cache(args.config, out, args.cache, overrides=args.overrides, quiet=quiet)
        if not args.json:
            print(f"cache {args.cache}: {row['tokens']:,} tokens ({'reused' if row['reused'] else 'built'}) "
                  f"-> {row['dir']}")
        return row
    row = jobs.run_one_cell(args.config, out, args.cell, overrides=args.overrides, quiet=quiet)
    if not args.json and _launch_rank() == 0:
        ppl = f": val ppl {row['val/ppl']:.2f}" if row.get("val/ppl") is not None else ""
        print(f"cell {args.cell} {row['status']}{ppl} -> {row['run_dir']}")
    return row


def _launch_rank() -> int:
    from hld.distributed import launch_env

    return launch_env()[1]


def cmd_report(args) -> dict:
    from hld.locks import file_lock
    from hld.study.report import build_report

    if not (Path(args.dir) / "runs").is_dir():
        raise HldError(f"{args.dir} is not a study directory (no runs/ inside)", "give the --out of `hld study`")
    with file_lock(Path(args.dir) / ".study.lock"):  # a study process may be writing the report too
        result = build_report(Path(args.dir))
    if not args.json:
        _print_report(result)
    return result


def _print_report(result: dict) -> None:
    print(result["table"])
    for line in result["verdicts"]:
        print(line.replace("**", ""))
    print(f"report: {result['report']} ({result['cells']} cells; results.csv, {len(result['plots'])} plots)")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "run": cmd_study,
            "cache-teacher": cmd_cache_teacher, "inspect-teacher": cmd_inspect_teacher,
            "config": cmd_config, "plan": cmd_plan,
            "study": cmd_study, "report": cmd_report}


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse, letting `key=value` overrides stand anywhere (argparse stops a `*` positional at the
    first option, so `hld train --config c a=1 --out d b=2` would otherwise be refused)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    return args


def _quiet_libraries() -> None:
    """Our own progress lines say enough: silence transformers' per-load bars and the hub's."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every process shares it, and print() writes the
    text and the newline separately (stderr is unbuffered), so two processes' lines could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _single_process(command: str, cell: Optional[str] = None) -> None:
    """Only `hld train` and `hld study --cell` (a study cell is a training run) spread over processes;
    every other command would run once per rank and race on its outputs."""
    from hld.distributed import launch_env

    if command != "train" and not (command == "study" and cell) and launch_env()[0] > 1:
        raise HldError(f"`hld {command}` runs on one process, but torchrun started {launch_env()[0]}",
                       "run it without torchrun (only `hld train` and `hld study --cell` run on several processes)")


def _is_main_rank() -> bool:
    """Rank 0 (or no torchrun). Under torchrun every rank of `hld train` ends with the same result or the
    same error (the loop's decisions are all-reduced), so only rank 0 prints it: one line, not one per rank.
    A failure of another rank alone shows as that rank's exit code in torchrun's report; --debug raises
    it, with its traceback, on every rank."""
    from hld.distributed import launch_env

    try:
        return launch_env()[1] == 0
    except HldError:  # a malformed RANK: _single_process / setup report it
        return True


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    _quiet_libraries()
    from hld.train.rundir import Preempted

    speak = _is_main_rank()
    try:
        _single_process(args.command, getattr(args, "cell", None))
        result = COMMANDS[args.command](args)
    except HldError as exc:
        if args.debug:
            raise
        if speak:
            _say(f"hld: error: {exc.line()}")
            if args.json:
                print(json.dumps({"error": exc.line()}))
        return 2
    except Preempted as exc:  # SIGTERM: checkpoint written, exit 0 so a scheduler can requeue
        if speak:
            _say(f"hld: {exc} — rerun the same command with --resume (hld run: rerun as is) to continue")
            if args.json:
                print(json.dumps({"preempted": True, "step": exc.step, "steps": exc.total,
                                  "run_dir": str(exc.run_dir)}))
        return 0
    except KeyboardInterrupt:
        print("hld: interrupted", file=sys.stderr)
        return 130
    if args.json and speak:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
