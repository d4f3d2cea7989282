"""`hld export`: the exported directory is an ordinary Hugging Face checkpoint whose logits equal,
bit for bit, those of the student rebuilt from the run's final checkpoint; its tokenizer round-trips;
its model card's front matter records the run; nothing half-written ever looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from hld import export as export_mod
from hld.cli import main
from hld.config import load_config
from hld.errors import HldError
from hld.models.student import build_student
from hld.train.checkpoint import load_checkpoint

SAMPLE = "The socket module provides access to the BSD socket interface."


@pytest.fixture
def run(hld_run) -> Path:
    """The shared tiny hld-joint run (it has projectors, which must not be exported); read only."""
    return hld_run


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.slow
def test_export_is_an_hf_checkpoint_equal_to_the_trained_student(hld_run_copy, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = hld_run_copy  # given a downstream.json
    downstream = {"hld_mc": {"metric": "acc", "value": 0.31, "stderr": 0.046, "chance": 0.25, "n": 100}}
    (run / "downstream.json").write_text(json.dumps(downstream))
    out = tmp_path / "hf"
    rc, _, err = _cli(capsys, "export", str(run), str(out), "--json")
    assert rc == 0, err

    # the student rebuilt from the final checkpoint (not from the files export copied)
    cfg = load_config(str(run / "config.yaml"))
    tok_run = AutoTokenizer.from_pretrained(cfg.teacher.model)
    ck = load_checkpoint(run)
    student = build_student(
        cfg.student,
        vocab_size=ck["student"]["model.embed_tokens.weight"].shape[0],
        bos_id=tok_run.bos_token_id,
        eos_id=tok_run.eos_token_id,
        pad_id=tok_run.pad_token_id,
        seed=0,
    )
    student.load_state_dict(ck["student"])
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[tok_run.bos_token_id] + tok_run(SAMPLE, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported.eval()(ids).logits, student.eval()(ids).logits)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok(SAMPLE)["input_ids"] == tok_run(SAMPLE)["input_ids"]
    assert tok.decode(tok(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        tok_run.bos_token_id,
        tok_run.eos_token_id,
        tok_run.pad_token_id,
    )

    # no projectors (the run has some): every stored tensor is a parameter of the student
    assert ck["projectors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) <= set(student.state_dict())

    meta = _front_matter(out / "README.md")
    summary = json.loads((run / "summary.json").read_text())
    hld = meta["hld"]
    assert meta["library_name"] == "transformers" and hld["arm"] == "hld-joint"
    assert hld["student_preset"] == summary["student"] == "tiny-2l"
    assert (
        hld["student_params"]
        == summary["student_params"]
        == sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())
    )
    assert (hld["train_tokens"], hld["train_flops"]) == (summary["tokens"], summary["flops"])
    assert hld["validation"]["val/ppl"] == summary["val/ppl"]
    assert hld["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert hld["downstream"] == downstream
    assert "| hld_mc | acc | 0.3100 |" in (out / "README.md").read_text()


def test_export_refuses_a_non_empty_out_dir_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = _cli(capsys, "export", str(run), str(out))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "exists and is not empty" in lines[0] and "--force" in lines[0]
    assert (out / "mine.txt").read_text() == "keep me"
    # --force does not replace a directory hld did not write either
    rc, _, err = _cli(capsys, "export", str(run), str(out), "--force")
    assert rc == 2 and "not an earlier hld export" in err, err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_force_replaces_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _cli(capsys, "export", str(run), str(out))[0] == 0
    marker = json.loads((out / export_mod.MARKER).read_text())
    assert marker["kind"] == "hld-export" and sorted(marker["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != export_mod.MARKER
    )
    (out / "README.md").write_text("an older card")
    rc, _, err = _cli(capsys, "export", str(run), str(out), "--force")
    assert rc == 0, err
    assert (out / "README.md").read_text().startswith("---\n")  # the new card replaced the old one
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directories left behind


@pytest.mark.parametrize("extra", ["notes.txt", "sub"])
def test_force_refuses_an_earlier_export_holding_other_files(run, tmp_path, capsys, extra):
    out = tmp_path / "hf"
    assert _cli(capsys, "export", str(run), str(out))[0] == 0
    (out / "sub").mkdir() if extra == "sub" else (out / extra).write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    rc, _, err = _cli(capsys, "export", str(run), str(out), "--force")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"also holds what the export did not write ({extra})" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_export_refuses_an_unfinished_run(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("student", "summary.json"))
    for src, why in ((unfinished, "has no finished student"), (tmp_path / "nothing", "not a run directory")):
        rc, _, err = _cli(capsys, "export", str(src), str(tmp_path / "out"))
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and why in lines[0], err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_export_leaves_no_out_dir(run, tmp_path, monkeypatch):
    calls = []

    real = shutil.copy2

    def copy_then_fail(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(export_mod.shutil, "copy2", copy_then_fail)
    with pytest.raises(HldError, match="No space left on device — free disk space"):  # one line, not a traceback
        export_mod.export_run(run, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def _python(code: str) -> subprocess.Popen:
    """`code` in another Python process on this tree's sources, its stdout piped (it holds something)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_a_killed_exports_temporary_directory_is_cleared_by_the_next(tmp_path, capsys, run):
    """SIGKILL left export/GGUF temporary directories (549 MB) that nothing ever removed."""
    out = tmp_path / "export"
    code = (
        "import time\nfrom pathlib import Path\nfrom hld.atomic import new_dir\n"
        f"with new_dir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(bytes(1 << 20))\n    print(tmp, flush=True)\n    time.sleep(60)\n"
    )
    proc = _python(code)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and left.name.startswith(".export.tmp-")
    other = tmp_path / f".export.tmp-{socket.gethostname()}-{os.getpid()}-live"  # a live process's: kept
    other.mkdir()
    assert main(["export", str(run), str(out), "--quiet"]) == 0
    assert not left.exists() and other.is_dir() and (out / "model.safetensors").is_file()
