"""`hld export RUN_DIR OUT_DIR`: a finished run's student as an ordinary Hugging Face checkpoint
(safetensors weights, config, generation config, tokenizer; no projectors) with a model card,
README.md, whose YAML front matter records the run: config, arm, student preset, parameter
counts, tokens, FLOPs, validation results and — when `RUN_DIR/downstream.json` exists — the
downstream task results (`{task: {metric, value, stderr, chance, n}}`).

OUT_DIR appears complete or not at all: everything is written into a temporary sibling directory
that is then renamed. Every export holds a marker, `.hld-export.json`, naming the files it wrote:
`--force` replaces a directory only when that marker says it is an earlier export and it holds nothing
else, so a home directory, a project checkout or any tree hld did not write is refused untouched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from hld.atomic import new_dir, write_fix
from hld.errors import HldError
from hld.eval.downstream import read_downstream
from hld.files import MAX_CONFIG_BYTES, read_text
from hld.fingerprint import file_sha256, sha256_mismatch
from hld.train.rundir import read_run_config, read_summary

REFUSED = ("checkpoint.pt",)  # never copied, whatever a student dir holds
MARKER = ".hld-export.json"  # in every export: {"kind": "hld-export", "files": [the names it wrote]}


def export_run(run_dir: Path, out_dir: Path, *, force: bool = False) -> dict:
    """Copy the run's student into `out_dir` with a model card; return what was written. The weights
    are verified (header, shapes against config.json, the sha256 recorded at training time) before
    and after the copy."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    student = _finished_student(run_dir)
    _check_out_dir(run_dir, out_dir, force=force)
    rewrite = "the run did not finish writing it: rerun `hld train --resume --out RUN_DIR --config ...` to rewrite it"
    summary = read_summary(run_dir, rewrite)
    config = read_run_config(run_dir / "config.yaml")
    if config is None:
        raise HldError(f"{run_dir}/config.yaml is not an hld run config", "restore the run's config.yaml")
    downstream = read_downstream(run_dir)
    recorded = summary.get("student_sha256") or {}
    verify_student(student, recorded)
    files = [p for p in sorted(student.iterdir()) if p.is_file() and p.name not in REFUSED]
    try:
        with new_dir(out_dir) as tmp:  # --force: the old contents go only once the new ones are complete
            for p in files:
                shutil.copy2(p, tmp / p.name)
            _check_sha(
                tmp, {p.name: file_sha256(student / p.name) for p in files if p.suffix == ".safetensors"}, "the copy"
            )
            card = model_card(summary, config, downstream, _architecture(student))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            written = sorted([p.name for p in files] + ["README.md"])
            (tmp / MARKER).write_text(json.dumps({"kind": "hld-export", "run": str(run_dir), "files": written}))
    except OSError as exc:
        raise HldError(f"cannot write {out_dir}: {exc.strerror or exc}", write_fix(exc, "OUT_DIR")) from exc
    return {
        "out_dir": str(out_dir),
        "files": sorted([p.name for p in files] + ["README.md"]),
        "downstream": sorted(downstream),
        "verified_sha256": bool(recorded),
    }


def _check_out_dir(run_dir: Path, out_dir: Path, *, force: bool) -> None:
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or run in out.parents or out in run.parents:
        where = "is" if out == run else "is inside" if run in out.parents else "contains"
        raise HldError(
            f"OUT_DIR {out_dir} {where} the run directory {run_dir}: exporting there would replace the run",
            "give an OUT_DIR outside the run directory",
        )
    if out_dir.is_symlink():
        raise HldError(
            f"OUT_DIR {out_dir} is a symbolic link: hld does not replace links or what they point to",
            "give a new directory, or the link's target itself if it is an earlier export",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise HldError(f"OUT_DIR {out_dir} exists and is not a directory", "choose another OUT_DIR")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise HldError(
            f"{out_dir} exists and is not empty",
            "choose another OUT_DIR, or pass --force to replace an earlier hld export",
        )
    cwd = Path.cwd().resolve()
    if out_dir.exists() and (out == cwd or out in cwd.parents):
        raise HldError(
            f"OUT_DIR {out_dir} {'is' if out == cwd else 'contains'} the current directory: exporting there would "
            "replace it and everything beside it",
            "give a new OUT_DIR, e.g. OUT_DIR/student",
        )
    if force and os.path.ismount(out_dir):
        raise HldError(
            f"OUT_DIR {out_dir} is a mount point, which cannot be replaced",
            "export into a new directory inside it, e.g. OUT_DIR/student",
        )
    if force and out_dir.exists() and any(out_dir.iterdir()):
        _check_earlier_export(out_dir)


def _check_earlier_export(out_dir: Path) -> None:
    """--force replaces only what an earlier `hld export` wrote: its marker must be there, readable, and
    name every entry of the directory. Anything else (no marker: a home directory, a checkout, another
    tool's checkpoint; a marker beside files the export did not write) is refused with nothing touched."""
    fix = "choose another OUT_DIR (a new one, or an earlier hld export), or move its contents away yourself"
    path, files = out_dir / MARKER, None
    try:  # a regular file of a marker's size (never a link, FIFO or device read blind)
        if not path.is_symlink():
            marker = json.loads(read_text(path, "export marker", fix, max_bytes=MAX_CONFIG_BYTES))
            if marker.get("kind") == "hld-export" and all(isinstance(f, str) for f in marker["files"]):
                files = set(marker["files"])
    except (HldError, OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if files is None:
        raise HldError(
            f"--force refused: {out_dir} is not an earlier hld export (no readable {MARKER} marker), "
            "and --force replaces only those",
            fix,
        )
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name != MARKER and (p.name not in files or not p.is_file()))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise HldError(
            f"--force refused: {out_dir} is an earlier hld export but also holds what the export did not write "
            f"({shown})",
            fix,
        )


def verify_student(student: Path, recorded: dict) -> None:
    """Refuse weights that are truncated, do not fit student/config.json, or differ from training's."""
    from safetensors import safe_open

    fix = "the exported student is damaged: rerun `hld train --resume --out RUN_DIR --config ...` to export it again"
    shapes = {}
    for path in sorted(student.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
        except Exception as exc:  # safetensors raises its own error type for a torn header or body
            raise HldError(f"{path} is truncated or not safetensors ({str(exc)[:80]})", fix) from exc
    expected = _expected_shapes(student, fix)
    wrong = sorted(k for k, v in shapes.items() if expected.get(k) != v)
    missing = sorted(set(expected) - set(shapes) - {"lm_head.weight"})  # the head is tied to the embedding
    if wrong or missing:
        name = (wrong or missing)[0]
        raise HldError(
            f"{student} weights do not fit its config.json ({name}: {shapes.get(name)} in the file, "
            f"{expected.get(name)} expected)",
            fix,
        )
    _check_sha(student, recorded, "training")


def _expected_shapes(student: Path, fix: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(student)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        raise HldError(f"{student}/config.json is unreadable ({type(exc).__name__})", fix) from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_sha(directory: Path, recorded: dict, when: str) -> None:
    name = sha256_mismatch(directory, recorded)
    if name is not None:
        raise HldError(
            f"{directory / name} differs from the weights written at {when} (sha256 mismatch)",
            "the student file was changed or damaged: rerun `hld train --resume --out RUN_DIR "
            "--config ...` to export it again",
        )


def _finished_student(run_dir: Path) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise HldError(f"{run_dir} is not a run directory (no config.yaml)", "give the --out of `hld train`")
    student = run_dir / "student"
    weights = list(student.glob("*.safetensors")) if student.is_dir() else []
    summary = os.path.lexists(run_dir / "summary.json")  # whatever it is: read_summary refuses a non-file
    if not summary or not (student / "config.json").is_file() or not weights:
        raise HldError(
            f"{run_dir} has no finished student (student/ and summary.json are written at the end of training)",
            "finish the run first: hld train --resume --out RUN_DIR --config ...",
        )
    return student


def model_card(summary: dict, config: dict, downstream: dict, architecture: str = "Gemma3ForCausalLM") -> str:
    """README.md: YAML front matter (Hugging Face metadata plus an `hld` section), then prose."""
    validation = {k: v for k, v in summary.items() if k.startswith("val/")}
    hld = {
        "run": summary.get("name"),
        "arm": summary.get("arm"),
        "student_preset": summary.get("student"),
        "student_params": summary.get("student_params"),
        "student_params_non_embedding": summary.get("student_params_non_embedding"),
        "teacher": (config.get("teacher") or {}).get("model"),
        "steps": summary.get("steps"),
        "train_tokens": summary.get("tokens"),
        "train_flops": summary.get("flops"),
        "validation": validation,
        "downstream": downstream or None,
        "config": config,
    }
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["hld", "knowledge-distillation", str(summary.get("arm"))],
        "hld": hld,
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    lines = [
        f"---\n{front}---",
        "",
        f"# {summary.get('name')}",
        "",
        f"A `{summary.get('student')}` student ({architecture}, {_count(summary.get('student_params'))} "
        f"parameters, {_count(summary.get('student_params_non_embedding'))} outside the embedding) trained by "
        f"[hld](https://arxiv.org/abs/2605.11513) with the `{summary.get('arm')}` objective from the teacher "
        f"`{hld['teacher']}`: {_count(summary.get('tokens'))} tokens, {_count(summary.get('flops'), '.3g')} FLOPs. "
        "An ordinary Hugging Face checkpoint (no projectors): load it with "
        "`AutoModelForCausalLM.from_pretrained(DIR)`.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in validation.items() if isinstance(v, (int, float))]
    if downstream:
        lines += ["", "| task | metric | value | stderr | chance | n |", "|---|---|---:|---:|---:|---:|"]
        for task, r in downstream.items():
            lines.append(
                f"| {task} | {r.get('metric', '')} | {_num(r.get('value'))} | {_num(r.get('stderr'))} "
                f"| {_num(r.get('chance'))} | {r.get('n', '')} |"
            )
    lines += ["", "The full training config is under `hld.config` in the front matter above.", ""]
    return "\n".join(lines)


def _architecture(student: Path) -> str:
    """The student's model class as its config.json names it (verified readable by verify_student)."""
    names = json.loads((student / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"]
    return str(names[0])


def _count(x, spec: str = ",") -> str:
    """A figure of the summary for the card ("—" where a damaged summary lacks it)."""
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "—"
