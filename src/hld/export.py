"""`hld export RUN_DIR OUT_DIR`: a finished run's student as an ordinary Hugging Face checkpoint
(safetensors weights, config, generation config, tokenizer; no projectors) with a model card,
README.md, whose YAML front matter records the run: config, arm, student preset, parameter
counts, tokens, FLOPs, validation results and — when `RUN_DIR/downstream.json` exists — the
downstream task results (`{task: {metric, value, stderr, chance, n}}`).

OUT_DIR appears complete or not at all: everything is written into a temporary sibling directory
that is then renamed."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from hld.atomic import replace_dir
from hld.errors import HldError
from hld.eval.harness import read_downstream

REFUSED = ("checkpoint.pt",)  # never copied, whatever a student dir holds


def export_run(run_dir: Path, out_dir: Path, *, force: bool = False) -> dict:
    """Copy the run's student into `out_dir` with a model card; return what was written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    student = _finished_student(run_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise HldError(f"{out_dir} exists and is not empty", "choose another OUT_DIR, or pass --force to replace it")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    downstream = read_downstream(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        files = [p for p in sorted(student.iterdir()) if p.is_file() and p.name not in REFUSED]
        for p in files:
            shutil.copy2(p, tmp / p.name)
        (tmp / "README.md").write_text(model_card(summary, config, downstream), encoding="utf-8")
        replace_dir(tmp, out_dir)  # --force: the old contents go only once the new ones are complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "files": sorted([p.name for p in files] + ["README.md"]),
            "downstream": sorted(downstream)}


def _finished_student(run_dir: Path) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise HldError(f"{run_dir} is not a run directory (no config.yaml)", "give the --out of `hld train`")
    student = run_dir / "student"
    weights = list(student.glob("*.safetensors")) if student.is_dir() else []
    if not (run_dir / "summary.json").is_file() or not (student / "config.json").is_file() or not weights:
        raise HldError(f"{run_dir} has no finished student (student/ and summary.json are written at the end "
                       f"of training)", "finish the run first: hld train --resume --out RUN_DIR --config ...")
    return student


def model_card(summary: dict, config: dict, downstream: dict) -> str:
    """README.md: YAML front matter (Hugging Face metadata plus an `hld` section), then prose."""
    validation = {k: v for k, v in summary.items() if k.startswith("val/")}
    hld = {"run": summary.get("name"), "arm": summary.get("arm"), "student_preset": summary.get("student"),
           "student_params": summary.get("student_params"),
           "student_params_non_embedding": summary.get("student_params_non_embedding"),
           "teacher": (config.get("teacher") or {}).get("model"),
           "steps": summary.get("steps"), "train_tokens": summary.get("tokens"), "train_flops": summary.get("flops"),
           "validation": validation, "downstream": downstream or None, "config": config}
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["hld", "knowledge-distillation", str(summary.get("arm"))], "hld": hld}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    lines = [f"---\n{front}---", "", f"# {summary.get('name')}", "",
             f"A `{summary.get('student')}` student (Gemma 3 architecture, {summary.get('student_params'):,} "
             f"parameters, {summary.get('student_params_non_embedding'):,} outside the embedding) trained by "
             f"[hld](https://arxiv.org/abs/2605.11513) with the `{summary.get('arm')}` objective from the teacher "
             f"`{hld['teacher']}`: {summary.get('tokens'):,} tokens, {summary.get('flops'):.3g} FLOPs. "
             "An ordinary Hugging Face checkpoint (no projectors): load it with "
             "`AutoModelForCausalLM.from_pretrained(DIR)`.", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in validation.items() if isinstance(v, (int, float))]
    if downstream:
        lines += ["", "| task | metric | value | stderr | chance | n |", "|---|---|---:|---:|---:|---:|"]
        for task, r in downstream.items():
            lines.append(f"| {task} | {r.get('metric', '')} | {_num(r.get('value'))} | {_num(r.get('stderr'))} "
                         f"| {_num(r.get('chance'))} | {r.get('n', '')} |")
    lines += ["", "The full training config is under `hld.config` in the front matter above.", ""]
    return "\n".join(lines)


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "—"
