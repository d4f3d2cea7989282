"""`hld` command line. Every command takes --json and then prints one JSON object as its last
stdout line. User errors print one line `hld: error: <problem> — <fix>` and exit with code 2
(--debug shows the traceback)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Optional

from hld.commands import COMMANDS, is_main_rank
from hld.errors import HldError, Stopped, sigterm_as_error


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def _add_eval(sub) -> None:
    """`hld eval`: perplexity and harness tasks of any model (its many options apart from the rest)."""
    p = sub.add_parser("eval", help="perplexity on a text source (--data) and/or lm-eval harness tasks (--tasks)")
    p.add_argument("--model", required=True, help="HF id, HF dir, .gguf, run dir, or gemma-3-270m")
    p.add_argument("--data", default=None, help="C4 shard glob, .jsonl(.gz), .txt, sample:validation, hf:...")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy; "
        "'shipped' = the offline tasks hld_lambada,hld_mc; 'paper' = the paper's six",
    )
    p.add_argument("--limit", type=int, default=None, help="tasks: score the first N items of each task")
    p.add_argument(
        "--task-data",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="tasks: read TASK's dataset from a local copy (repeatable)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows (perplexity; default 4) or requests (tasks; default 8) per forward pass",
    )
    _common(p)


def _add_study(sub) -> None:
    """`hld study` (with its job entry points) and `hld report`."""
    p = sub.add_parser("study", help="a grid of arms x students x budgets x hyperparameters x seeds, then its report")
    p.add_argument("--config", required=True, help="study YAML or shipped study name (see src/hld/configs/studies)")
    p.add_argument("--out", default=None, help="study directory (default: studies/<name>); rerun to resume")
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument(
        "--list",
        action="store_true",
        help="print every cell and teacher cache: its id, the command that runs it, what it waits for",
    )
    jobs.add_argument(
        "--cell",
        default=None,
        metavar="ID",
        help="train one cell (resumable; skipped when finished; under torchrun too)",
    )
    jobs.add_argument("--cache", default=None, metavar="GROUP", help="build one cache group's teacher cache")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="with --cache: build part I of N of it (a SLURM array task each; the last to finish assembles it)",
    )
    p.add_argument("overrides", nargs="*", help="study keys (arms=[ce,kd], seeds=[0,1]) or dotted run overrides")
    _common(p)

    p = sub.add_parser("report", help="(re)build report.md, results.csv and plots of a study from its run dirs")
    p.add_argument("dir", help="study directory (holding runs/)")
    _common(p)


def _add_run(sub) -> None:
    """`hld run`: the embedded default."""
    p = sub.add_parser(
        "run",
        help="the embedded default: a small study (Gemma 3 270M teacher, a student made of 9 of its blocks, "
        "healed by ce/kd/hld-joint at equal student tokens plus ce at kd's FLOPs; the seeds and arms of "
        "src/hld/configs/studies/demo.yaml) and its report",
    )
    p.add_argument("--out", default="runs/demo", help="study directory (default: runs/demo); rerun to resume")
    p.add_argument("--config", default="demo", help="study YAML or shipped study name (default: demo)")
    p.add_argument("overrides", nargs="*", help="study keys (arms=[ce,kd], seeds=[0,1]) or dotted run overrides")
    _common(p)


def _add_train(sub) -> None:
    """`hld train`: one run."""
    p = sub.add_parser("train", help="one training run")
    p.add_argument("--config", required=True, help="YAML file or preset name (see src/hld/configs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 objective.method=kd")
    _common(p)


def _add_export(sub) -> None:
    """`hld export`: a finished run's student as a Hugging Face checkpoint."""
    p = sub.add_parser("export", help="a finished run's student as a Hugging Face checkpoint with a model card")
    p.add_argument("run_dir", help="run directory (the --out of hld train)")
    p.add_argument("out_dir", help="directory to write; must be new or empty unless --force")
    p.add_argument("--force", action="store_true", help="replace an earlier hld export in OUT_DIR (nothing else)")
    _common(p)


def _add_cache_teacher(sub) -> None:
    """`hld cache-teacher`: the offline teacher cache."""
    p = sub.add_parser("cache-teacher", help="run the teacher once and store its signals for a config's runs")
    p.add_argument("--config", default=None, help="YAML file or preset name (required unless --verify)")
    p.add_argument("--out", required=True, help="cache directory to write (then pass teacher.cache=DIR)")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="build part I of N (shards s with s %% N == I; a SLURM array task each); the last to finish "
        "assembles the cache. Under torchrun each rank takes its part by itself",
    )
    p.add_argument(
        "--verify", action="store_true", help="check every shard of the cache at --out against its checksums"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build nothing: print what the build would write (hld plan's cache row: signal, tokens, bytes, files)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    _common(p)


def _add_tokenize(sub) -> None:
    """`hld tokenize`: token stores."""
    p = sub.add_parser(
        "tokenize",
        help="tokenise a config's train and validation sources once into memory-mapped token stores "
        "(parallel, resumable; runs then read them)",
    )
    p.add_argument("--config", required=True, help="YAML file or preset name (the same as hld train's)")
    p.add_argument("--out", default=None, help="store directory (default: data.store_dir, else $HLD_CACHE_DIR/stores)")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    p.add_argument("--shard", default="0/1", help="I/N: this task's share of the units (a SLURM array task)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="stop once this many tokens are stored (default: all of a local source; a hub source: "
        "what the budget reads)",
    )
    p.add_argument("--split", choices=["both", "train", "validation"], default="both", help="which sources")
    p.add_argument("--verify", action="store_true", help="check every shard's checksum after building")
    p.add_argument(
        "--student-tokenizer",
        default=None,
        metavar="TOK",
        help="a student's own tokenizer (a tokenizer directory, e.g. hld train-tokenizer's, a model directory "
        "or a hub id): build paired stores instead, each document tokenised by the teacher's and this "
        "tokenizer and aligned by text (docs/data-format.md, 'Paired stores')",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=/data/c4/c4-train.*.json.gz")
    _common(p)


def _add_train_tokenizer(sub) -> None:
    """`hld train-tokenizer`: a student's own tokenizer (issue 34)."""
    p = sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer on a corpus (a student's own vocabulary) and write it as a "
        "Hugging Face tokenizer directory",
    )
    p.add_argument("--data", required=True, help="C4 shard glob, .jsonl(.gz), .txt, sample:train, hf:...")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary, specials included")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--text-field", default="text", help="the JSON field that holds the text (default text)")
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    _common(p)


def _add_inspect_teacher(sub) -> None:
    """`hld inspect-teacher`: the teacher's layers as hidden targets."""
    p = sub.add_parser(
        "inspect-teacher",
        help="per teacher layer: the largest dimension's share of ||x||^2 and the "
        "share of the hidden target a constant predicts under each normalisation",
    )
    p.add_argument("--config", required=True, help="YAML file or preset name")
    p.add_argument("--windows", type=int, default=24, help="held-out validation windows measured (default 24)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    _common(p)


def _add_plan(sub) -> None:
    """`hld plan`: a run's or a study's cost, without loading weights."""
    p = sub.add_parser(
        "plan",
        help="what a run config or a study will cost, without loading weights: parameters, "
        "FLOPs per token, steps and tokens at the budget, the teacher cache's size, peak memory",
    )
    p.add_argument(
        "--config",
        required=True,
        help="run YAML or preset name, or a study YAML or shipped study name "
        "(a study of that name is taken first; --run for the run preset)",
    )
    p.add_argument("--run", action="store_true", help="read --config as a run config even where a study has its name")
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="processes to size the memory for (torchrun's --nproc-per-node x nodes; default 1)",
    )
    p.add_argument("overrides", nargs="*", help="dotted run overrides (and study keys for a study)")
    _common(p)


def _add_config(sub) -> None:
    """`hld config`: every key with its help."""
    p = sub.add_parser("config", help="list every config key with its help and default")
    _common(p)


# the subcommands in the order `hld --help` lists them (`_add_study` adds `study` and `report`)
BUILDERS = (
    _add_run,
    _add_train,
    _add_eval,
    _add_export,
    _add_cache_teacher,
    _add_tokenize,
    _add_train_tokenizer,
    _add_inspect_teacher,
    _add_plan,
    _add_config,
    _add_study,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hld",
        description="Knowledge distillation during LLM pre-training: CE vs logit KD vs hidden-layer distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BUILDERS:
        add(sub)
    return parser


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

    spread = command in ("train", "cache-teacher") or (command == "study" and cell)
    if not spread and launch_env()[0] > 1:
        raise HldError(
            f"`hld {command}` runs on one process, but torchrun started {launch_env()[0]}",
            "run it without torchrun (only `hld train`, `hld cache-teacher` and `hld study --cell` run on several "
            "processes)",
        )


_AFTER_SIGTERM = "rerun the same command (hld run and hld study resume where they stopped; hld train: add --resume)"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _run(args: argparse.Namespace) -> dict:
    """The command; a write no command turned into its own line (a full disk or quota, a read-only
    filesystem, under a cache or a store) becomes one (--debug: the traceback)."""
    try:
        return COMMANDS[args.command](args)
    except OSError as exc:
        if args.debug or exc.errno not in (*_FULL, errno.EROFS):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        fix = "free disk space" if exc.errno in _FULL else "point it at a writable place"
        raise HldError(
            f"{exc.strerror}{where}", f"{fix} (--out, HLD_CACHE_DIR for the caches), then rerun the same command"
        ) from exc


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    # SIGTERM anywhere outside a training step (which checkpoints) and a cache build (its own line), from
    # here to the last line printed: one line and the cleanups of what was being written, not a silent
    # end (exit 143), and never worded as another error (`Stopped` is no Exception)
    try:
        with sigterm_as_error(f"hld {args.command} stopped by SIGTERM", _AFTER_SIGTERM):
            return _main(args)
    except Stopped as exc:  # it came while _main was printing its result or its error
        if args.debug:
            raise
        if is_main_rank():
            _say(f"hld: error: {exc.line()}")
        return exc.code


def _main(args: argparse.Namespace) -> int:
    from hld.train.rundir import Preempted

    speak = is_main_rank()
    try:
        _quiet_libraries()
        _single_process(args.command, getattr(args, "cell", None))
        result = _run(args)
    except (Stopped, HldError) as exc:  # one line, and with --json one object; Stopped has its own code
        if args.debug:
            raise
        code, stopped = (exc.code, True) if isinstance(exc, Stopped) else (2, False)
        if speak:
            _say(f"hld: error: {exc.line()}")
            if args.json:
                print(json.dumps({"error": exc.line(), **({"stopped": True} if stopped else {})}))
        return code
    except Preempted as exc:  # SIGTERM: checkpoint written, exit 0 so a scheduler can requeue
        if speak:
            _say(f"hld: {exc} — rerun the same command with --resume (hld run: rerun as is) to continue")
            if args.json:
                print(
                    json.dumps({"preempted": True, "step": exc.step, "steps": exc.total, "run_dir": str(exc.run_dir)})
                )
        return 0
    except KeyboardInterrupt:  # SIGINT (Ctrl-C): one line, the shell's exit code for it
        if speak:
            _say(f"hld: error: hld {args.command} interrupted (SIGINT) — {_AFTER_SIGTERM}")
        return 130
    if args.json and speak:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
