"""What would go wrong on a GPU, caught on a CPU (issue 35; tests/proxies.py has the two modes):

- no tensor on an implicit device: every arm's whole run (steps, validation, the CKA diagnostics,
  export), online and cached, the cache build, `hld eval` and fsdp2 at world size 1 create no tensor
  from hld's code without naming its device;
- host syncs per training step, per arm and signal kind, pinned: none (before issue 35: 41 per tiny step,
  43 for hld-joint: a float per metric, a boolean-mask write per row block, the non-finite check; then
  one, the step's own read-back of its metric sums, gradient norm and skip flag). A step's metrics stay
  on the device; the loop reads every step not yet read back in one sync where a callback needs them (a
  logged, validated or checkpointed step, the progress line's redraw, the last step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hld.distill.chunked
from helpers import C4_VALIDATION, KeptLines, tiny_overrides
from hld.cache.build import ensure_cache
from hld.cli import main
from hld.config import load_config
from hld.train.callbacks import MetricLog, NonFiniteStop, Validation
from hld.train.loop import _steps, build, launch_step, train, train_step
from hld.train.resources import Resources
from hld.train.state import RunState
from proxies import PROXY_DEVICE, HostSyncs, ImplicitDevices

pytestmark = pytest.mark.device_proxy

# (arm, extra overrides): each arm, and the signal kinds an arm can read
CASES = {
    "ce": ("ce", []),
    "kd": ("kd", []),
    "kd-topk": ("kd", ["objective.top_k=8"]),
    "hld-joint": ("hld-joint", []),
    "hld-first": ("hld-first", ["objective.hidden.first_share=0.5"]),
}
CACHED = {
    "kd-cached": ("kd", "topk"),
    "kd-cached-sampled": ("kd", "sampled"),
    "hld-joint-cached": ("hld-joint", "topk"),
    "hld-first-cached": ("hld-first", "topk"),
}


def _cfg(method, *extra):
    return load_config("smoke", [*tiny_overrides(), "data.val_tokens=256", f"objective.method={method}", *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """One cache per signal kind, each built under the implicit-device mode (the cache build is covered)."""
    out, sites = {}, {}
    for signal in ("topk", "sampled"):
        path = tmp_path_factory.mktemp("cache") / signal
        cfgs = [_cfg("hld-joint", f"teacher.cache_signal={signal}")]
        with ImplicitDevices() as mode:
            ensure_cache(cfgs, path, Resources(), quiet=True)
        out[signal], sites[signal] = path, dict(mode.sites)
    return out, sites


def test_the_cache_build_names_its_devices(caches):
    assert caches[1] == {"topk": {}, "sampled": {}}


def _setup(name, caches):
    if name in CASES:
        method, extra = CASES[name]
        return _cfg(method, *extra)
    method, signal = CACHED[name]
    first = ["objective.hidden.first_share=0.5"] if method == "hld-first" else []
    return _cfg(method, f"teacher.cache={caches[0][signal]}", f"teacher.cache_signal={signal}", *first)


@pytest.mark.parametrize("name", [*CASES, *CACHED])
def test_a_whole_run_names_its_devices(name, caches, tmp_path):
    """Steps, validation, the layer diagnostics (hld arms) and the export, under the mode."""
    with ImplicitDevices() as mode:
        train(_setup(name, caches), tmp_path / "run", quiet=True)
    assert dict(mode.sites) == {}


@pytest.mark.parametrize("name", [*CASES, *CACHED])
def test_no_host_sync_in_a_training_step(name, caches):
    """Every step of the run (hld-first: both phases) leaves its metrics on the device."""
    s = build(_setup(name, caches), Resources(), PROXY_DEVICE)
    train_step(s, 0)  # the first step creates the optimiser's state
    for step in range(1, s.total_steps):
        with HostSyncs(s.student, s.projectors, s.teacher_lm) as syncs:
            launch_step(s, step)
        assert dict(syncs.counts) == {}, (step, dict(syncs.sites))


def test_the_loop_reads_metrics_back_once_per_logged_step(tmp_path):
    """Logging every 3rd of 8 steps: 3 syncs (steps 3, 6 and the last), each reading back every step not
    yet read; the lines logged are those of a run that reads back after every step."""
    cfg = load_config("smoke", [*tiny_overrides(), "budget.tokens=1024", "objective.method=kd"])
    runs = {}
    for every in (1, 3):
        s = build(cfg, Resources(), PROXY_DEVICE)
        assert s.total_steps == 8
        log = KeptLines()
        with HostSyncs(s.student, s.projectors, s.teacher_lm) as syncs:
            _steps(s, tmp_path / str(every), RunState(), [MetricLog(log, every), NonFiniteStop()])  # type: ignore[arg-type]
        runs[every] = (log.lines, dict(syncs.counts))
    assert runs[1][1] == {"to_host": 8} and runs[3][1] == {"to_host": 3}
    drop = ("tokens_per_s",)  # wall time
    every_step = {line["step"]: {k: v for k, v in line.items() if k not in drop} for line in runs[1][0]}
    logged = [{k: v for k, v in line.items() if k not in drop} for line in runs[3][0]]
    assert [line["step"] for line in logged] == [3, 6, 8]
    assert logged == [every_step[k] for k in (3, 6, 8)]


def test_validation_reads_back_at_its_step(tmp_path, monkeypatch):
    """Validating every 2nd of 4 steps, logging never but at the end: two read-backs, at steps 2 and 4,
    of two steps each."""
    calls = []
    real = hld.train.loop.read_back
    monkeypatch.setattr(hld.train.loop, "read_back", lambda steps: calls.append(len(steps)) or real(steps))
    s = build(load_config("smoke", [*tiny_overrides(), "objective.method=ce"]), Resources(), PROXY_DEVICE)
    log = KeptLines()
    _steps(s, tmp_path, RunState(), [Validation(2), MetricLog(log, 100)])  # type: ignore[arg-type]
    assert calls == [2, 2]
    assert [(line["step"], "val/ppl" in line) for line in log.lines] == [(2, True), (4, True)]


def test_hld_eval_and_fsdp2_at_world_size_1_name_their_devices(tmp_path, capsys):
    with ImplicitDevices() as mode:
        assert main(["train", "--config", "smoke", "--out", str(tmp_path / "run"), *tiny_overrides(),
                     "objective.method=hld-joint", "train.parallel=fsdp2", "--quiet"]) == 0  # fmt: skip
        assert main(["eval", "--model", str(tmp_path / "run"), "--data", C4_VALIDATION, "--quiet"]) == 0
    assert dict(mode.sites) == {}


def _plant(monkeypatch, where):
    """Wrap `hld.distill.chunked.logits_into` so that it first runs `torch.zeros(4)`, compiled under the
    file name of hld's module (the mode judges a call by the file that makes it)."""
    code = compile("def planted(*a, **k):\n    torch.zeros(4)\n    return real(*a, **k)\n", where, "exec")
    scope = {"torch": torch, "real": hld.distill.chunked.logits_into}
    exec(code, scope)
    monkeypatch.setattr(hld.distill.chunked, "logits_into", scope["planted"])


def test_a_planted_zeros_without_device_fails_the_run(monkeypatch, tmp_path):
    _plant(monkeypatch, hld.distill.chunked.__file__)
    s = build(_cfg("kd"), Resources(), PROXY_DEVICE)
    with pytest.raises(AssertionError, match=r"hld/distill/chunked.py:2: torch.zeros without device="):
        with ImplicitDevices(strict=True):
            train_step(s, 0)
    with ImplicitDevices() as mode:
        train_step(s, 1)
    assert dict(mode.sites) == {"hld/distill/chunked.py:2 torch.zeros": 1}


def test_a_planted_item_counts_as_a_sync(monkeypatch):
    code = compile("def planted(h, W, out):\n    float(h.sum())\n    return real(h, W, out)\n", "x", "exec")
    scope = {"real": hld.distill.chunked.logits_into}
    exec(code, scope)
    monkeypatch.setattr(hld.distill.chunked, "logits_into", scope["planted"])
    s = build(_cfg("ce"), Resources(), PROXY_DEVICE)
    train_step(s, 0)
    with HostSyncs(s.student) as syncs:
        launch_step(s, 1)
    assert dict(syncs.counts) == {"item": 1}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_gloo_processes_name_their_devices(parallel, tmp_path):
    """`hld train` of hld-joint under `torchrun --nproc-per-node 2` (gloo), each rank under the mode: the
    wrapping, the gradient sync, the sharded checkpoint and the export create no tensor without a device."""
    from dist_worker import launch

    out = tmp_path / "sites"
    argv = [
        *["train", "--config", "smoke", "--out", str(tmp_path / "run"), *tiny_overrides(), "budget.tokens=1024"],
        *["objective.method=hld-joint", f"train.parallel={parallel}", "train.checkpoint_every_steps=2", "--quiet"],
    ]
    r = launch(["proxy", str(out), "--", *argv], cache_dir=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        got = json.loads(Path(f"{out}.{rank}.json").read_text())
        assert got == {"code": 0, "sites": {}}, (rank, got)
