"""Inputs that would train or score silently wrong are refused in one line (issue 24, each reproduced
first): a tokenizer far smaller than the model's vocabulary, a run's student weights that differ from
the sha256 its summary recorded (wherever a run is loaded as a model), and a checkpoint or statistics
file whose bytes differ from the sha256 recorded beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import ASSETS, TINY_TEACHER, train_argv
from helpers import one_line_error as _one_line
from hld.cli import main


def _flip_tensor_byte(path: Path) -> None:
    """Invert one byte inside the data of the first tensor of a torch file (its zip structure intact)."""
    import torch

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    t = next(t for t in tensors(torch.load(path, weights_only=True)) if t.numel() >= 8 and t.is_floating_point())
    data = bytearray(path.read_bytes())
    i = data.find(t.contiguous().numpy().tobytes())
    assert i >= 0
    data[i + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip(path: Path, at: float = 0.5) -> None:
    """Invert one byte at the relative position `at` (inside the tensor data of a torch or safetensors file)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def teacher_without_tokenizer(tmp_path) -> Path:
    d = tmp_path / "teacher"
    d.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY_TEACHER / name, d / name)
    return d


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(tmp_path, capsys, teacher_without_tokenizer):
    """6: without tokenizer files transformers builds a 5-token tokenizer (the corpus becomes UNK/EOS)."""
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(teacher_without_tokenizer)) == 5  # what the sweep met
    t = str(teacher_without_tokenizer)
    line = _one_line(capsys, train_argv(tmp_path / "r", f"teacher.model={t}"), "has 5 tokens")
    assert "vocabulary 512" in line
    argv = ["eval", "--model", t, "--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32"]
    _one_line(capsys, [*argv, "--max-docs", "4"], "has 5 tokens")


def test_damaged_student_weights_are_refused_wherever_a_run_is_loaded(tmp_path, capsys, hld_run_copy):
    """7: `hld eval --model RUN` and `teacher.model=RUN` accepted them (only export checked the sha256)."""
    _flip(hld_run_copy / "student" / "model.safetensors", 0.7)
    data = ["--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32", "--max-docs", "4"]
    _one_line(capsys, ["eval", "--model", str(hld_run_copy), *data], "sha256 mismatch")
    argv = train_argv(tmp_path / "r", f"teacher.model={hld_run_copy}", "objective.method=kd")
    _one_line(capsys, argv, "sha256 mismatch")


def test_an_intact_run_still_loads_as_a_model(capsys, hld_run):
    data = ["--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32", "--max-docs", "4"]
    assert main(["eval", "--model", str(hld_run), *data, "--quiet"]) == 0


@pytest.mark.parametrize("name", ["checkpoints/checkpoint.pt", "hidden_stats.pt"])
@pytest.mark.slow
def test_a_bit_flipped_checkpoint_or_statistics_file_is_refused_on_resume(capsys, hld_run_copy, name):
    """8: a flipped byte in checkpoint.pt or hidden_stats.pt trained on (val loss 9.19 / 12.03 vs 8.97)."""
    import torch

    path = hld_run_copy / name
    assert (hld_run_copy / f"{name}.sha256").is_file()  # recorded when written
    _flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # still loads: only the checksum tells
    _one_line(capsys, [*train_argv(hld_run_copy, "objective.method=hld-joint"), "--resume"], "sha256 differs")
