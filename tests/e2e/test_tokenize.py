"""`hld tokenize` through the CLI: a store built beforehand is what `hld train` reads (it tokenises
nothing), `--out` with `data.store_dir`, bad flags one line, and a hub corpus without a store refused
in seconds."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from helpers import one_line_error, tiny_overrides, train_argv
from hld.cli import main
from hld.data import tokenize as tk


def _tokenize(capsys, *extra: str) -> list[dict]:
    capsys.readouterr()
    assert main(["tokenize", "--config", "smoke", *tiny_overrides(), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)["stores"]


def test_train_reads_the_store_tokenize_built(tmp_path, capsys, monkeypatch):
    rows = _tokenize(capsys, "--out", str(tmp_path / "stores"), "--workers", "1", "--verify")
    assert [r["what"] for r in rows] == ["data.train", "data.validation"]
    train, val = rows
    assert train["complete"] and train["shards"] == 2 and train["verified_shards"] == 2  # two fixture files
    assert train["bytes"] == train["tokens"] * 4
    shards = sorted((tmp_path / "stores").glob("*/shards/*.bin"))
    assert sum(p.stat().st_size for p in shards) == train["bytes"] + val["bytes"]

    def no_tokenising(*a, **k):
        raise AssertionError("hld train tokenised although hld tokenize built the stores")

    monkeypatch.setattr(tk, "tokenize_unit", no_tokenising)
    assert main(train_argv(tmp_path / "run", f"data.store_dir={tmp_path / 'stores'}")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens"] == 512


@pytest.mark.slow
def test_the_store_holds_the_tokenizers_ids(tmp_path, capsys):
    from transformers import AutoTokenizer

    from helpers import C4_TRAIN, TINY_TEACHER
    from hld.data.sources import iter_documents

    (row,) = _tokenize(capsys, "--out", str(tmp_path), "--split", "train")
    tok = AutoTokenizer.from_pretrained(str(TINY_TEACHER))
    want = [t for d in iter_documents(C4_TRAIN) for t in (*tok.encode(d, add_special_tokens=False), tok.eos_token_id)]
    got = np.concatenate([np.fromfile(p, dtype="<u4") for p in sorted(tmp_path.glob("*/shards/*.bin"))])
    assert got.tolist() == want and row["tokens"] == len(want)


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--shard", "2/2"], "--shard '2/2' is not I/N"),
        (["--shard", "one"], "--shard 'one' is not I/N"),
        (["--workers", "0"], "--workers 0 is not a positive number"),
        (["--max-tokens", "-1"], "--max-tokens -1 is not a positive number"),
    ],
)
def test_bad_flags_are_one_line(capsys, flags, problem):
    one_line_error(capsys, ["tokenize", "--config", "smoke", *tiny_overrides(), *flags], problem)


def test_hub_corpus_without_a_store_is_refused_in_seconds(tmp_path, capsys):
    t0 = time.time()
    line = one_line_error(
        capsys, ["train", "--config", "paper-123m", "--out", str(tmp_path / "run")], "has no token store"
    )
    assert time.time() - t0 < 30 and "hld tokenize --config paper-123m" in line
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_slurm_array_tasks_build_the_store_one_task_builds(tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "tokenize.sbatch"
    args = [*tiny_overrides(), f"data.store_dir={tmp_path / 'array'}"]
    for task in (1, 0):  # out of order: the task that commits the last unit writes the manifest
        env = {
            **os.environ,
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_CPUS_PER_TASK": "1",
            "PYTHON": sys.executable,
            "HLD_TOKENIZE_ARGS": "--quiet",
        }
        proc = subprocess.run(["bash", str(script), "smoke", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = _tokenize(capsys, "--out", str(tmp_path / "one"))

    def shards(root: Path) -> dict[str, bytes]:
        return {f"{p.parent.parent.name}/{p.name}": p.read_bytes() for p in sorted(root.glob("*/shards/*.bin"))}

    assert shards(tmp_path / "array") == shards(tmp_path / "one") and len(shards(tmp_path / "one")) == 3
    for row in one:
        m = json.loads((tmp_path / "array" / Path(row["store"]).name / "manifest.json").read_text())
        assert m["complete"] and m["tokens"] == row["tokens"]
