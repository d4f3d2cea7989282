"""`hld run`: the embedded default. One config, trained once per arm on the same budget, the same
batches in the same order; then every student and the teacher are scored on the same validation
windows; a table is printed and written to `<out>/results.json` and `<out>/results.md`, and the
training curves and final perplexities are plotted in `<out>/plots/training.png`."""

from __future__ import annotations

import time
from pathlib import Path

from hld.config import load_config
from hld.eval.perplexity import perplexity
from hld.precision import resolve_dtype
from hld.study.plots import plot_training
from hld.train.cache_build import ensure_cache
from hld.atomic import write_json
from hld.train.loop import train_or_resume
from hld.train.resources import Resources

ARMS = ("ce", "kd", "hld-joint", "hld-first")


def run_demo(out: Path, *, config: str = "demo", overrides: list[str] | None = None, quiet: bool = False,
             print_table: bool = True, arms: tuple[str, ...] = ARMS) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    resources = Resources()
    rows = []
    base = load_config(config, overrides)
    cfgs = {arm: load_config(config, list(overrides or []) + [f"objective.method={arm}", f"name={arm}"])
            for arm in arms}
    cache = None
    distilled = [c for c in cfgs.values() if c.objective.method != "ce"]
    if distilled and base.teacher.cache is None:
        # the teacher runs once over the windows every arm reads; the arms then read its signals
        cache = ensure_cache(distilled, out / "teacher_cache", resources, quiet=quiet)
        cfgs = {a: load_config(config, list(overrides or []) + [f"objective.method={a}", f"name={a}",
                                                               f"teacher.cache={out / 'teacher_cache'}"])
                if a != "ce" else c for a, c in cfgs.items()}
    for arm, cfg in cfgs.items():
        run_dir = out / arm
        summary = train_or_resume(cfg, run_dir, resources=resources, quiet=quiet)
        rows.append({"arm": arm, "student": cfg.student.preset, "tokens": summary["tokens"],
                     "flops": summary["flops"], "val_ppl": summary["val/ppl"]})
    rows.append(_teacher_row(base, resources, quiet))
    plots = plot_training({arm: out / arm for arm in cfgs}, out / "plots", teacher_ppl=rows[-1]["val_ppl"])
    result = {"rows": rows, "seconds": time.time() - t0, "out": str(out), "plots": [str(p) for p in plots]}
    if cache is not None:
        result["teacher_cache"] = {k: cache.get(k) for k in ("tokens", "build_seconds", "build_flops", "bytes")}
    write_json(out / "results.json", result)
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    if print_table:
        print(table)
        if cache is not None and cache.get("build_seconds") is not None:
            print(f"\nteacher cache: {cache['tokens']:,} tokens, {cache['build_flops']:.3g} FLOPs, built once in "
                  f"{cache['build_seconds']:.0f} s (the distilled arms' FLOPs include the teacher forward "
                  f"for the tokens they read)")
        print(f"{len(arms)} arms in {result['seconds']:.0f} s -> {out}")
    return result


def _teacher_row(cfg, resources: Resources, quiet: bool) -> dict:
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    tok = loaded.tokenizer
    d = cfg.data
    val = resources.windows(d.validation, tok, seq_len=d.seq_len, text_field=d.text_field)
    val = val[: max(1, d.val_tokens // d.seq_len)]
    r = perplexity(loaded.model, val, bos_id=tok.bos_token_id, compute_dtype=resolve_dtype(cfg.teacher.dtype),
                   progress=None if quiet else "teacher eval")
    return {"arm": "teacher", "student": cfg.teacher.model, "tokens": None, "flops": None, "val_ppl": r["ppl"]}


def format_table(rows: list[dict]) -> str:
    lines = ["| arm | student | train tokens | train FLOPs | val ppl |", "|---|---|---:|---:|---:|"]
    for r in rows:
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "—"
        flops = f"{r['flops']:.3g}" if r["flops"] is not None else "—"
        lines.append(f"| {r['arm']} | {r['student']} | {tokens} | {flops} | {r['val_ppl']:.2f} |")
    return "\n".join(lines)
