"""`hld train` under `torchrun --nproc-per-node 2` (CPU, gloo) against the same run on one process:
a SIGTERM that reaches one rank stops both at the same step with a checkpoint; that checkpoint (ddp:
one file; fsdp2: a DCP directory of two shards) resumes on ONE process and ends where the uninterrupted
one-process run ends; and `torchrun -m hld train` writes a complete run directory with the same
metrics, validation and exported student as one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_worker import launch
from helpers import cache_arrays, tiny_overrides
from hld.cli import main

# Adam at lr 3e-3 moves a weight by up to ~3e-3 per step; two processes sum the gradient in another
# order (fp32 rounding), which Adam turns into weight differences of ~1e-5 after 8 steps. A wrong data
# split or gradient scale moves weights by whole steps.
WEIGHT_ATOL = 1e-4


def _argv(run: Path, mode: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "smoke",
        "--out",
        str(run),
        *tiny_overrides(),
        "budget.tokens=1024",
        "objective.method=hld-joint",
        f"train.parallel={mode}",
        "train.checkpoint_every_steps=2",
        "--quiet",
        *extra,
    ]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=WEIGHT_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_metrics(got: list[dict], ref: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for g, r in zip(got, ref):
        assert g["phase"] == r["phase"] and g["tokens"] == r["tokens"] and g["flops"] == r["flops"]
        for k in r:
            if k.startswith(("train/", "val/")) and not k.startswith(("val/cka/", "val/r2/")):  # 1 process only
                assert g[k] == pytest.approx(r[k], rel=2e-5), (r["step"], k)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted one-process runs, per mode (the mode picks the checkpoint format)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("ref-cache")))
        for mode in ("ddp", "fsdp2"):
            run = tmp_path_factory.mktemp(f"ref-{mode}") / "run"
            assert main(_argv(run, mode)) == 0
            out[mode] = run
    return out


@pytest.mark.parametrize("mode,sigterm_rank", [("ddp", 0), ("fsdp2", 1)])
@pytest.mark.slow
def test_sigterm_on_one_rank_then_resume_on_one_process(tmp_path, hld_cache_dir, references, mode, sigterm_rank):
    run = tmp_path / "run"
    # rank `sigterm_rank` alone gets SIGTERM during step 3 (index 2); the flag is all-reduced
    proc = launch(["train", "2", str(sigterm_rank), "--", *_argv(run, mode)], cache_dir=hld_cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("hld: preempted at step 3/8") == 1  # said once, by rank 0 (the flag is all-reduced)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]  # rank 0 alone logged
    assert not (run / "summary.json").exists() and not (run / "student").exists()
    ck = run / "checkpoints"
    if mode == "ddp":  # one file, written by rank 0
        assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
        assert torch.load(ck / "checkpoint.pt", weights_only=True)["step"] == 3
    else:  # a DCP directory holding one shard per rank; the step-2 one was replaced
        assert [p.name for p in ck.iterdir()] == ["step-00000003.dcp"]
        assert {p.name for p in (ck / "step-00000003.dcp").iterdir()} == {
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "trainer.pt",
        }

    assert main([*_argv(run, mode), "--resume"]) == 0  # one process, no torchrun
    ref = references[mode]
    _assert_close_weights(
        load_file(run / "student" / "model.safetensors"), load_file(ref / "student" / "model.safetensors")
    )
    if mode == "ddp":  # the projectors trained on two processes, too
        _assert_close_weights(
            torch.load(ck / "checkpoint.pt", weights_only=True)["projectors"],
            torch.load(ref / "checkpoints" / "checkpoint.pt", weights_only=True)["projectors"],
        )
    _assert_same_metrics(_metrics(run), _metrics(ref))
    got, want = json.loads((run / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert got["steps"] == want["steps"] == 8 and got["tokens"] == want["tokens"]
    assert got["val/ppl"] == pytest.approx(want["val/ppl"], rel=2e-5)


_LOG_TOKENIZE = """import os
import hld.data.tokenize as tk
_unit = tk.tokenize_unit
def _logged(*args, **kwargs):
    with open(os.environ["HLD_TEST_TOKENIZE_LOG"], "a") as fh:
        fh.write(os.environ.get("RANK", "-") + "\\n")
    return _unit(*args, **kwargs)
tk.tokenize_unit = _logged
"""


@pytest.mark.slow
def test_torchrun_cli_end_to_end(tmp_path, hld_cache_dir, monkeypatch):
    """`torchrun --nproc-per-node 2 -m hld train ... train.parallel=fsdp2` on hld-first (both phases),
    with periodic validation and checkpoints, against the same command on one process. The token
    stores start empty: rank 0 tokenises (every unit it tokenises is logged by a sitecustomize), rank 1
    memory-maps what rank 0 wrote and never tokenises."""
    site, log = tmp_path / "site", tmp_path / "tokenized.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_LOG_TOKENIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HLD_TEST_TOKENIZE_LOG", str(log))
    assert not (hld_cache_dir / "stores").exists()
    extra = ("objective.method=hld-first", "train.eval_every_steps=4", "train.checkpoint_every_steps=3")
    two, one = tmp_path / "two", tmp_path / "one"
    proc = launch(_argv(two, "fsdp2", *extra), cache_dir=hld_cache_dir, module=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert log.read_text().split() == ["0", "0", "0"]  # 2 train files + 1 validation file, all on rank 0
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("run ")] == [
        f"run smoke: 8 steps, 1,024 tokens, val ppl {json.loads((two / 'summary.json').read_text())['val/ppl']:.2f} "
        f"-> {two}"
    ]  # the final line, once (rank 0), not per rank
    assert main(_argv(one, "fsdp2", *extra)) == 0

    files = {"config.yaml", "metrics.jsonl", "checkpoints", "student", "summary.json", "hidden_stats.pt"}
    files |= {"hidden_stats.pt.sha256"}  # its checksum record, checked on --resume
    assert {p.name for p in two.iterdir()} == files
    assert {p.name for p in one.iterdir()} == files | {"cka.json"}  # layer diagnostics: one process only
    assert (two / "config.yaml").read_text() == (one / "config.yaml").read_text()
    assert yaml.safe_load((two / "config.yaml").read_text())["train"]["parallel"] == "fsdp2"
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000008.dcp"]
    _assert_same_metrics(_metrics(two), _metrics(one))
    # first_share 0.2 of 8 steps: the boundary falls inside step 1, which blends both objectives
    assert [m["phase"] for m in _metrics(two)] == ["hidden", "hidden+kd", "kd", "kd", "kd", "kd", "kd", "kd"]
    assert "val/ppl" in _metrics(two)[3] and "val/ppl" in _metrics(two)[7]
    # the student exported from shards is an ordinary HF checkpoint (tied head once), as on one process
    _assert_close_weights(
        load_file(two / "student" / "model.safetensors"), load_file(one / "student" / "model.safetensors")
    )
    got, want = json.loads((two / "summary.json").read_text()), json.loads((one / "summary.json").read_text())
    diag = {k for k in want if k.startswith(("val/cka/", "val/r2/"))}  # layer diagnostics: one process only
    assert got.keys() == want.keys() - diag
    for k in got:
        if k not in ("train_seconds", "val/loss", "val/ppl", "student_sha256"):  # weights: close, not equal
            assert got[k] == want[k], k
    assert got["val/ppl"] == pytest.approx(want["val/ppl"], rel=2e-5)


_BLOW_UP = """import torch
_step = torch.optim.AdamW.step
def _step_to_inf(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    with torch.no_grad():
        for g in self.param_groups:
            for p in g["params"]:
                p.fill_(float("inf"))
    return out
torch.optim.AdamW.step = _step_to_inf
"""


@pytest.mark.slow
def test_non_finite_steps_stop_every_process(tmp_path, hld_cache_dir, monkeypatch):
    # the first update blows the weights up (a sitecustomize in each worker; lr=1e30 did it before the
    # config refused it); the loss and gradient norm are all-reduced, so both processes skip the same
    # steps and stop together with the same line
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOW_UP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    run = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "smoke",
        "--out",
        str(run),
        *tiny_overrides(),
        "budget.tokens=1536",
        "train.warmup_share=0",
        "--quiet",
    ]
    proc = launch(argv, cache_dir=hld_cache_dir, module=True)
    assert proc.returncode != 0  # torchrun reports its workers' exit code 2 as a failure
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hld: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 says it, once (both ranks exit with code 2)
    assert "non-finite for 5 steps in a row" in errors[0]
    assert "Traceback" not in proc.stderr.split("failed (exitcode: 2)")[0]  # the workers' part (not torchrun's)
    lines = _metrics(run)
    assert [m["skipped"] for m in lines][-5:] == [True] * 5
    assert not (run / "student").exists() and not (run / "summary.json").exists()


@pytest.mark.parametrize(
    "signal", [[], ["teacher.cache_signal=sampled", "teacher.cache_samples=7"]], ids=["topk", "sampled"]
)
@pytest.mark.slow
def test_torchrun_cache_teacher_equals_one_process(tmp_path, hld_cache_dir, signal):
    """`torchrun --nproc-per-node 2 -m hld cache-teacher`: each rank builds its shards (s % 2 == rank),
    the last to finish assembles; the arrays are the bytes of a one-process build (a sampled signal's
    draws too: seeded per window)."""
    over = [*tiny_overrides(), "budget.tokens=20000", "objective.method=hld-joint", *signal]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = launch(
        ["cache-teacher", "--config", "smoke", "--out", str(two), *over, "--quiet"],
        cache_dir=hld_cache_dir,
        module=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(["cache-teacher", "--config", "smoke", "--out", str(one), *over, "--quiet"]) == 0

    arrays = cache_arrays

    m = json.loads((two / "manifest.json").read_text())
    assert {r["part"] for r in m["shards"]} == {"p00000of00002", "p00001of00002"}  # both ranks built
    assert arrays(two) == arrays(one)
