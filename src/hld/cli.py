"""`hld` command line. Every command takes --json and then prints one JSON object as its last
stdout line. User errors print one line `hld: error: <problem> — <fix>` and exit with code 2
(--debug shows the traceback)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from hld.errors import HldError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hld", description="Knowledge distillation during LLM pre-training: "
                                     "CE vs logit KD vs hidden-layer distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the embedded default: all arms on the sample corpus with Gemma 3 270M")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--config", default="demo", help="base config (preset name or YAML path; default: demo)")
    p.add_argument("--arms", default="ce,kd,hld-joint,hld-first", help="comma-separated arms to train")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm, e.g. budget.tokens=32768")
    _common(p)

    p = sub.add_parser("train", help="one training run")
    p.add_argument("--config", required=True, help="YAML file or preset name (see src/hld/configs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 objective.method=kd")
    _common(p)

    p = sub.add_parser("eval", help="perplexity of a model on a text source")
    p.add_argument("--model", required=True, help="HF id, HF dir, .gguf, run dir, or gemma-3-270m")
    p.add_argument("--data", required=True, help="C4 shard glob, .jsonl(.gz), .txt, sample:validation, hf:...")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    _common(p)

    p = sub.add_parser("cache-teacher", help="run the teacher once and store its signals for a config's runs")
    p.add_argument("--config", required=True, help="YAML file or preset name")
    p.add_argument("--out", required=True, help="cache directory to write (then pass teacher.cache=DIR)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    _common(p)

    p = sub.add_parser("config", help="list every config key with its help and default")
    _common(p)

    p = sub.add_parser("study", help="a grid of arms x students x budgets x hyperparameters x seeds, then its report")
    p.add_argument("--config", required=True, help="study YAML or shipped study name (see src/hld/configs/studies)")
    p.add_argument("--out", default=None, help="study directory (default: studies/<name>); rerun to resume")
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
    if not args.json:
        print(f"run {cfg.name}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"val ppl {summary.get('val/ppl', float('nan')):.2f} -> {out}")
    return {"run_dir": str(out), **summary}


def cmd_eval(args) -> dict:
    from hld.data.packing import load_stream, pack_windows
    from hld.eval.perplexity import perplexity
    from hld.models.loading import freeze, load_causal_lm
    from hld.precision import default_device, resolve_dtype

    if args.seq_len < 2:
        raise HldError(f"--seq-len {args.seq_len} is too short", "use at least 2 (default 512)")
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.time()
    loaded = load_causal_lm(args.model, dtype=dtype)
    lm = freeze(loaded.model).to(device)
    windows = pack_windows(load_stream(args.data, loaded.tokenizer, max_docs=args.max_docs), args.seq_len)
    r = perplexity(lm, windows, bos_id=loaded.tokenizer.bos_token_id, batch_size=args.batch_size,
                   compute_dtype=dtype, progress=None if args.quiet or args.json else "eval")
    row = {"model": args.model, "data": args.data, "seq_len": args.seq_len, "windows": len(windows),
           "tokens": r["tokens"], "loss": r["loss"], "ppl": r["ppl"], "seconds": time.time() - t0}
    if not args.json:
        print(f"{args.model} on {args.data}: ppl {r['ppl']:.3f} (mean NLL {r['loss']:.4f} over {r['tokens']:,} "
              f"predictions, {len(windows)} windows of {args.seq_len})")
    return row


def cmd_run(args) -> dict:
    from hld.study.demo import ARMS, run_demo

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise HldError(f"unknown arm(s) {unknown or arms}", f"choose from {', '.join(ARMS)}")
    return run_demo(Path(args.out), config=args.config, overrides=args.overrides, arms=arms,
                    quiet=args.quiet or args.json, print_table=not args.json)


def cmd_cache_teacher(args) -> dict:
    from hld.config import load_config
    from hld.train.cache_build import ensure_cache
    from hld.train.resources import Resources

    cfg = load_config(args.config, args.overrides)
    if not cfg.objective.method.startswith("hld"):
        # store the hidden layers an HLD run of the same config would match, so one cache serves all arms
        cfg = load_config(args.config, list(args.overrides) + ["objective.method=hld-joint"])
    m = ensure_cache([cfg], Path(args.out), Resources(), quiet=args.quiet or args.json)
    row = {"cache_dir": args.out, "tokens": m["tokens"], "layers": m["identity"]["layers"],
           "top_k": m["identity"]["top_k"], "build_seconds": m.get("build_seconds"), "bytes": m.get("bytes"),
           "bytes_per_token": m["bytes"] / m["tokens"] if m.get("bytes") else None,
           "build_flops": m.get("build_flops")}
    if not args.json:
        print(f"teacher cache {args.out}: {m['tokens']:,} tokens, top-{row['top_k']}, layers {row['layers']}")
    return row


def cmd_config(args) -> dict:
    from hld.config import field_help

    rows = field_help()
    if not args.json:
        for key, help_text, default in rows:
            print(f"{key} = {default!r}\n    {help_text}")
    return {"keys": [{"key": k, "help": h, "default": d} for k, h, d in rows]}


def cmd_study(args) -> dict:
    from hld.study.runner import run_study

    result = run_study(args.config, Path(args.out) if args.out else None, overrides=args.overrides,
                       quiet=args.quiet or args.json)
    if not args.json:
        _print_report(result)
        print(f"{result['cells']} cells ({len(result['trained'])} trained, {len(result['skipped'])} already done) "
              f"in {result['seconds']:.0f} s")
    return result


def cmd_report(args) -> dict:
    from hld.study.report import build_report

    if not (Path(args.dir) / "runs").is_dir():
        raise HldError(f"{args.dir} is not a study directory (no runs/ inside)", "give the --out of `hld study`")
    result = build_report(Path(args.dir))
    if not args.json:
        _print_report(result)
    return result


def _print_report(result: dict) -> None:
    for line in result["verdicts"]:
        print(line.replace("**", ""))
    print(f"report: {result['report']} ({result['cells']} cells; results.csv, {len(result['plots'])} plots)")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "run": cmd_run, "cache-teacher": cmd_cache_teacher,
            "config": cmd_config,
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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    _quiet_libraries()
    from hld.train.loop import Preempted

    try:
        result = COMMANDS[args.command](args)
    except HldError as exc:
        if args.debug:
            raise
        print(f"hld: error: {exc.line()}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": exc.line()}))
        return 2
    except Preempted as exc:  # SIGTERM: checkpoint written, exit 0 so a scheduler can requeue
        print(f"hld: {exc} — rerun the same command with --resume (hld run: rerun as is) to continue",
              file=sys.stderr)
        if args.json:
            print(json.dumps({"preempted": True, "step": exc.step, "steps": exc.total, "run_dir": str(exc.run_dir)}))
        return 0
    except KeyboardInterrupt:
        print("hld: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
