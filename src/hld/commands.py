"""What each `hld` subcommand does (`cli.py` parses the command line and handles errors): one
function per command, taking the parsed arguments and returning the JSON object `--json` prints."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hld.errors import HldError
from hld.paths import check_names


def cmd_train(args) -> dict:
    from hld.config import load_config
    from hld.data.tokenize import require_stores
    from hld.train.loop import train
    from hld.train.resources import Resources

    if args.resume and args.out is None:
        raise HldError("--resume needs --out (the run directory to continue)", "pass --out RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.name}")
    check_names(out, "--out" if args.out else "the run directory (runs/<name>)")
    require_stores(cfg.data, cfg.name)  # what is missing is said first: the estimate is moot without data
    resources = Resources()  # the memory check's tokenizers are the run's
    _check_memory(cfg, resources)
    summary = train(cfg, out, resume=args.resume, quiet=args.quiet or args.json, resources=resources)
    if not args.json and is_main_rank():
        print(
            f"run {cfg.name}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
            f"val ppl {summary.get('val/ppl', float('nan')):.2f} -> {out}"
        )
    return {"run_dir": str(out), **summary}


def _check_memory(cfg, resources) -> None:
    """Refuse a run that cannot fit this machine's memory before anything is allocated (`hld.plan`)."""
    import torch

    from hld.distributed import launch_env
    from hld.plan import check_memory
    from hld.precision import default_device

    world_size, _, local_rank = launch_env()
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun's processes on this node
    n_local = int(local) if local.isdigit() else 1
    check_memory(cfg, device=device, world_size=world_size, local_processes=n_local, resources=resources)


def cmd_eval(args) -> dict:
    from hld.models.loading import freeze, load_causal_lm
    from hld.precision import default_device, resolve_dtype

    if args.data is None and args.tasks is None:
        raise HldError(
            "hld eval needs --data (perplexity) or --tasks (lm-eval tasks), or both",
            "e.g. --data sample:validation, or --tasks shipped",
        )
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
        row["tasks"] = evaluate_tasks(
            lm,
            loaded.tokenizer,
            expand_tasks(args.tasks),
            limit=args.limit,
            batch_size=args.batch_size or 8,
            device=device,
            quiet=args.quiet or args.json,
            dataset_paths=task_data,
            rolling_len=args.seq_len,
        )
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
        raise HldError(
            f"run {path} has not finished (no student/ yet: it is written at the end of training)",
            f"finish it with `hld train --resume --out {path} --config ...`, then evaluate it",
        )


# config keys named by the data errors of `hld train`, and what `hld eval` calls them
_EVAL_FLAGS = (
    ("data.train/validation", "--data"),
    ("data.train", "--data"),
    ("data.validation", "--data"),
    ("data.seq_len", "--seq-len"),
    ("data.max_train_docs", "--max-docs"),
)


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
    from hld.data.tokenize import open_windows
    from hld.eval.perplexity import perplexity

    try:  # from the source's token store (built on first use for a local source)
        windows = open_windows(args.data, tokenizer, seq_len=args.seq_len, max_docs=args.max_docs)
    except HldError as exc:  # the data errors speak of `hld train`'s config keys
        raise _eval_data_error(exc, args.data) from exc
    r = perplexity(
        lm,
        windows,
        batch_size=args.batch_size or 4,
        compute_dtype=dtype,
        progress=None if args.quiet or args.json else "eval",
    )
    if not args.json:
        print(
            f"{args.model} on {args.data}: ppl {r['ppl']:.3f} (mean NLL {r['loss']:.4f} over {r['tokens']:,} "
            f"predictions, {len(windows)} windows of {args.seq_len})"
        )
    return {
        "data": args.data,
        "seq_len": args.seq_len,
        "windows": len(windows),
        "tokens": r["tokens"],
        "loss": r["loss"],
        "ppl": r["ppl"],
    }


def cmd_export(args) -> dict:
    from hld.export import export_run

    check_names(args.out_dir, "OUT_DIR")
    result = export_run(Path(args.run_dir), Path(args.out_dir), force=args.force)
    if not args.json:
        print(f"exported {args.run_dir} -> {result['out_dir']} ({', '.join(result['files'])})")
    return result


def cmd_cache_teacher(args) -> dict:
    from hld.cache.build import ensure_cache, verify_cache
    from hld.config import load_config
    from hld.distributed import launch_env
    from hld.train.resources import Resources

    check_names(args.out, "--out")
    if args.verify:
        return verify_cache(Path(args.out), quiet=args.quiet or args.json)
    # the layers of the config's own arm (none for kd): `hld plan` sizes the same cache; a study or
    # `hld run` builds one cache for all the arms that share it
    if args.config is None:
        raise HldError("hld cache-teacher needs --config (the config whose runs read the cache)", "add --config X")
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        return _cache_dry_run(cfg, args)
    world, rank, _ = launch_env()
    part = _shard_arg(args.shard) if args.shard else (rank, world)  # torchrun: each rank its shards
    if args.shard and world > 1:
        raise HldError("--shard and torchrun both split the build", "use one: --shard I/N per job, or torchrun")
    m = ensure_cache([cfg], Path(args.out), Resources(), part=part, quiet=args.quiet or args.json)
    if m.get("assembled") is False:
        row = {"cache_dir": args.out, "assembled": False, "shards_done": m["shards_done"], "shards": m["shards"]}
        if not args.json:
            print(
                f"teacher cache {args.out}: part {part[0]}/{part[1]} built; {m['shards_done']} of {m['shards']} "
                "shards done (the last part to finish assembles the cache)"
            )
        return row
    row = {
        "cache_dir": args.out,
        "assembled": True,
        "tokens": m["tokens"],
        "layers": m["identity"]["layers"],
        "top_k": m["identity"]["top_k"],
        "signal": m["identity"].get("cache_signal", "topk"),
        "samples": m["identity"].get("cache_samples"),
        "build_seconds": m.get("build_seconds"),
        "bytes": m.get("bytes"),
        "bytes_per_token": m["bytes"] / m["tokens"] if m.get("bytes") else None,
        "files": len(m.get("files", {})) + 1,
        "build_flops": m.get("build_flops"),
        "reused": bool(m.get("reused")),
    }
    if not args.json:
        what = f"sampled, {row['samples']} draws/token" if row["signal"] == "sampled" else f"top-{row['top_k']}"
        tokens = "tokens"
        if row["signal"] == "chunks":  # a per-chunk cache (student.tokenizer): what its loss reads per chunk
            loss = m["identity"]["chunks"]["loss"] or "pooled states"
            what, tokens = f"per-chunk values for {loss}", "student tokens"
        print(f"teacher cache {args.out}: {m['tokens']:,} {tokens}, {what}, layers {row['layers']}")
    return row


def _cache_dry_run(cfg, args) -> dict:
    """`hld cache-teacher --dry-run`: what the build would write, from `hld plan` (nothing loads or runs)."""
    from hld.plan import plan_run

    c = plan_run(cfg)["cache"]
    if c is None and cfg.objective.method != "ce":  # a student with its own tokenizer: a per-chunk cache
        if not args.json:
            print(
                f"teacher cache {args.out} (dry run): a per-chunk cache (student.tokenizer), not sized by hld plan; "
                "bytes per student token by loss: docs/cross-tokenizer.md"
            )
        return {"cache_dir": args.out, "dry_run": True, "tokens": None, "bytes": None}
    if c is None:  # ce reads no teacher signal
        if not args.json:
            print(f"teacher cache {args.out} (dry run): a ce config reads no teacher signal, nothing to build")
        return {"cache_dir": args.out, "dry_run": True, "tokens": 0, "bytes": 0}
    row = {"cache_dir": args.out, "dry_run": True, **{k: c[k] for k in c if k != "bytes_per_token"}}
    row["bytes_per_token"] = c["bytes_per_token"]["estimate"]
    if not args.json:
        print(
            f"teacher cache {args.out} (dry run): {c['tokens']:,} tokens, ~{row['bytes_per_token']:,.1f} B/token, "
            f"~{c['bytes']:,.0f} bytes, {c['files']} files"
        )
    return row


def _shard_arg(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise HldError(f"--shard {text!r} is not I/N with 0 <= I < N", "e.g. --shard $SLURM_ARRAY_TASK_ID/16")
    return int(i), int(n)


def cmd_tokenize(args) -> dict:
    from hld.config import load_config
    from hld.data import store as st
    from hld.data.store import verify_all
    from hld.data.tokenize import build, identity, is_remote, store_path
    from hld.train.resources import Resources

    cfg = load_config(args.config, args.overrides)
    shard = _shard_arg(args.shard)
    if args.workers is not None and args.workers < 1:
        raise HldError(f"--workers {args.workers} is not a positive number", "give --workers 1 or more")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise HldError(f"--max-tokens {args.max_tokens} is not a positive number", "give --max-tokens 1 or more")
    workers = args.workers or os.cpu_count() or 1
    d = cfg.data
    store_dir = args.out or d.store_dir
    if store_dir:
        check_names(store_dir, "--out" if args.out else "data.store_dir")
    tok = Resources().tokenizer(cfg.teacher.model)
    if args.student_tokenizer is not None:
        return _tokenize_paired(args, cfg, tok, shard=shard, store_dir=store_dir)
    rows = []
    for what, spec in (("data.train", d.train), ("data.validation", d.validation)):
        if args.split not in ("both", what.split(".")[1]):
            continue
        need_tokens, need_docs = args.max_tokens, d.max_train_docs if what == "data.train" else None
        if need_tokens is None and what == "data.validation":
            need_tokens = max(1, d.val_tokens // d.seq_len) * (d.seq_len - 1)  # all that runs read of it
        elif need_tokens is None and is_remote(spec) and need_docs is None:
            need_tokens = _budget_tokens(cfg)  # a hub corpus: what the budget reads, not all of it
        out = store_path(identity(spec, tok, d.text_field), store_dir)
        t0 = time.time()
        m = build(
            spec,
            tok,
            out,
            text_field=d.text_field,
            workers=workers,
            shard=shard,
            need_tokens=need_tokens,
            need_docs=need_docs,
            quiet=args.quiet or args.json,
            desc=f"tokenize {what.split('.')[1]}",
        )
        seconds = time.time() - t0
        checked = verify_all(out) if args.verify and m is not None else None
        row = {
            "what": what,
            "source": spec,
            "store": str(out),
            "seconds": seconds,
            "workers": workers,
            "shard": f"{shard[0]}/{shard[1]}",
            "complete": None if m is None else m["complete"],
            "tokens": None if m is None else m["tokens"],
            "docs": None if m is None else m["docs"],
            "shards": None if m is None else len(m["shards"]),
            "verified_shards": checked,
        }
        row["bytes"] = None if m is None else m["tokens"] * st.DTYPE.itemsize
        row["repaired_docs"] = None if m is None else sum(s.get("repaired", 0) for s in m["shards"])
        rows.append(row)
        if not args.json:
            if m is None:
                print(f"{what} {spec}: this task's units are committed in {out}; other tasks still have units to do")
            else:
                print(
                    f"{what} {spec}: {m['tokens']:,} tokens, {m['docs']:,} documents, {len(m['shards'])} shards "
                    f"in {out} ({'all of the source' if m['complete'] else 'a prefix'}; {seconds:.1f} s"
                    + (f"; {row['repaired_docs']:,} repaired to U+FFFD" if row["repaired_docs"] else "")
                    + ")"
                )
    if store_dir and not args.json:
        print(f"runs read these stores with data.store_dir={store_dir}")
    return {"stores": rows}


def cmd_train_tokenizer(args) -> dict:
    from hld.data.bpe import train_tokenizer

    check_names(args.out, "--out")
    t0 = time.time()
    record = train_tokenizer(
        args.data,
        Path(args.out),
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        max_docs=args.max_docs,
        quiet=args.quiet or args.json,
    )
    seconds = time.time() - t0
    if not args.json:
        print(
            f"tokenizer {args.out}: byte-level BPE, {record['vocab_size']:,} ids, trained on {record['docs']:,} "
            f"documents of {args.data} ({record['chars']:,} characters; {seconds:.1f} s); "
            f"a student reads it with AutoTokenizer.from_pretrained({str(args.out)!r})"
        )
    return {"out": str(args.out), "seconds": seconds, **record}


def load_tokenizer(spec: str, what: str = "--student-tokenizer"):
    """A tokenizer by spec: a directory holding a tokenizer alone (hld train-tokenizer's), else what
    `Resources.tokenizer` reads (a model or run directory, a .gguf, a hub id)."""
    from hld.train.resources import Resources

    return Resources().tokenizer(spec, what)


def _tokenize_paired(args, cfg, teacher, *, shard: tuple[int, int], store_dir) -> dict:
    """`hld tokenize --student-tokenizer`: paired stores (`hld.data.paired`) of the train and validation
    sources, as far as a run reads them."""
    from hld.data import paired
    from hld.data.tokenize import is_remote

    student = load_tokenizer(args.student_tokenizer)
    paired.aligner_for(teacher, student)  # a slow tokenizer, one that cannot spell text: one line, first
    d, rows = cfg.data, []
    for what, spec in (("data.train", d.train), ("data.validation", d.validation)):
        if args.split not in ("both", what.split(".")[1]):
            continue
        need_tokens, need_docs = args.max_tokens, d.max_train_docs if what == "data.train" else None
        if need_tokens is None and what == "data.validation":
            need_tokens = max(1, d.val_tokens // d.seq_len) * (d.seq_len - 1)
        elif need_tokens is None and is_remote(spec) and need_docs is None:
            need_tokens = _budget_tokens(cfg)
        out = paired.store_path(paired.identity(spec, teacher, student, d.text_field), store_dir)
        t0 = time.time()
        m = paired.build(
            spec,
            teacher,
            student,
            out,
            text_field=d.text_field,
            shard=shard,
            workers=args.workers or os.cpu_count() or 1,
            need_tokens=need_tokens,
            need_docs=need_docs,
            quiet=args.quiet or args.json,
            desc=f"align {what.split('.')[1]}",
        )
        row = {"what": what, "source": spec, "store": str(out), "seconds": time.time() - t0, "complete": None}
        row["verified_shards"] = paired.verify_all(out) if args.verify and m is not None else None
        row["shard"] = f"{shard[0]}/{shard[1]}"
        if m is not None:
            row.update({k: m[k] for k in ("complete", *paired.TOTALS)}, shards=len(m["shards"]))
            row["token_ratio"] = m["teacher_tokens"] / max(m["student_tokens"], 1)
        rows.append(row)
        if not args.json and m is None:
            print(f"{what} {spec}: this task's units are committed in {out}; other tasks still have units to do")
        elif not args.json:
            print(
                f"{what} {spec}: {m['docs']:,} documents aligned ({m['skipped']:,} skipped), {m['teacher_tokens']:,} "
                f"teacher / {m['student_tokens']:,} student tokens, {m['chunks']:,} chunks in {out} "
                f"({'all of the source' if m['complete'] else 'a prefix'}; {row['seconds']:.1f} s)"
            )
    return {"stores": rows, "student_tokenizer": args.student_tokenizer}


def _budget_tokens(cfg) -> int:
    """Training tokens the config's budget reads (hld plan's figure, teacher counted as configured)."""
    from hld.plan import plan_run

    row = plan_run(cfg)
    return int(row["length"]["teacher_counted" if cfg.budget.count_teacher else "teacher_not_counted"]["tokens"])


def cmd_inspect_teacher(args) -> dict:
    from hld.config import load_config
    from hld.distill.inspect import inspect_teacher
    from hld.train.resources import Resources

    if args.windows < 1:
        raise HldError(f"--windows {args.windows} is not a positive number", "give --windows 1 or more (default 24)")
    cfg = load_config(args.config, args.overrides)
    rows = inspect_teacher(cfg, Resources(), n_windows=args.windows)
    if not args.json:
        print("layer | top dim | its share of ||x||^2 | constant-predictor share: none / rms / standardize")
        for r in rows:
            c = r["const_share"]
            print(
                f"{r['layer']:5d} | {r['top_dim']:7d} | {r['top_dim_share']:20.3f} | "
                f"{c['none']:.3f} / {c['rms']:.3f} / {c['standardize']:.3f}"
            )
    return {"layers": rows}


def _is_study(name_or_path: str) -> bool:
    """A study YAML (it names its arms) or a shipped study's name."""
    from hld.config import read_yaml
    from hld.study.spec import STUDY_DIR

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

    for flag in ("cell", "cache"):
        value = getattr(args, flag, None)
        if value is not None and not value.strip():
            raise HldError(
                f"--{flag} is empty", f"give the id of one {flag} (`hld study --config ... --list` prints them)"
            )
    if args.out:
        check_names(args.out, "--out")
    if getattr(args, "list", False) or getattr(args, "cell", None) or getattr(args, "cache", None):
        return _study_job(args)
    result = run_study(
        args.config, Path(args.out) if args.out else None, overrides=args.overrides, quiet=args.quiet or args.json
    )
    if not args.json:
        _print_report(result)
        print(
            f"{result['cells']} cells ({len(result['trained'])} trained, {len(result['skipped'])} already done) "
            f"in {result['seconds']:.0f} s"
        )
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
    if args.shard and not args.cache:
        raise HldError("--shard splits a cache build", "use it with --cache GROUP")
    if args.cache:
        part = _shard_arg(args.shard) if args.shard else (0, 1)
        row = jobs.build_one_cache(args.config, out, args.cache, overrides=args.overrides, quiet=quiet, part=part)
        if not args.json and row.get("assembled") is False:
            print(f"cache {args.cache}: part {part[0]}/{part[1]} built; the last part to finish assembles it")
        elif not args.json:
            print(
                f"cache {args.cache}: {row['tokens']:,} tokens ({'reused' if row['reused'] else 'built'}) "
                f"-> {row['dir']}"
            )
        return row
    row = jobs.run_one_cell(args.config, out, args.cell, overrides=args.overrides, quiet=quiet)
    if not args.json and is_main_rank():
        ppl = f": val ppl {row['val/ppl']:.2f}" if row.get("val/ppl") is not None else ""
        print(f"cell {args.cell} {row['status']}{ppl} -> {row['run_dir']}")
    return row


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


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "run": cmd_study,
    "cache-teacher": cmd_cache_teacher,
    "inspect-teacher": cmd_inspect_teacher,
    "config": cmd_config,
    "plan": cmd_plan,
    "study": cmd_study,
    "report": cmd_report,
    "tokenize": cmd_tokenize,
    "train-tokenizer": cmd_train_tokenizer,
}


def is_main_rank() -> bool:
    """Rank 0 (or no torchrun). Under torchrun every rank of `hld train` ends with the same result or the
    same error (the loop's decisions are all-reduced), so only rank 0 prints it: one line, not one per rank.
    A failure of another rank alone shows as that rank's exit code in torchrun's report; --debug raises
    it, with its traceback, on every rank."""
    from hld.distributed import launch_env

    try:
        return launch_env()[1] == 0
    except HldError:  # a malformed RANK: _single_process / setup report it
        return True
