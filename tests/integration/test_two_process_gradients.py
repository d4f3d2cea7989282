"""Data parallelism (`hld.distributed`) on CPU with gloo, 2 processes under torchrun: after one step the
gradients of the student and the projectors, the logged sums and the validation perplexity equal
those of one process on the same global batch, for ddp and fsdp2. Plus the pieces that need no second
process: the batch split, the mode, and the DCP checkpoint format at world size 1."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from dist_worker import launch
from helpers import named_params, tiny_overrides
from hld.cli import main
from hld.config import load_config
from hld.data.loader import rank_slice
from hld.distributed import check_batch, resolve_mode
from hld.errors import HldError
from hld.train.callbacks import validate_now
from hld.train.loop import build, release_hooks, train_step
from hld.train.resources import Resources

# 8 steps of 4 x 32 tokens; no clipping, so the raw summed gradient is compared
BASE = [*tiny_overrides(), "budget.tokens=1024", "train.grad_clip=0"]
STEP = 2
SCENARIOS = {
    "ddp-ce": (["train.parallel=ddp", "objective.method=ce"], STEP),
    "ddp-kd-micro": (["train.parallel=ddp", "objective.method=kd", "train.micro_batch_size=1"], STEP),
    "ddp-hld-joint": (["train.parallel=ddp", "objective.method=hld-joint"], STEP),
    # hidden phase: no LM loss, so the final norm gets no gradient (torch's DDP reducer fails here)
    "ddp-hld-first-hidden": (
        ["train.parallel=ddp", "objective.method=hld-first", "objective.hidden.first_share=0.5"],
        STEP,
    ),
    "fsdp2-kd": (["train.parallel=fsdp2", "objective.method=kd"], STEP),
    "fsdp2-hld-joint-micro": (["train.parallel=fsdp2", "objective.method=hld-joint", "train.micro_batch_size=1"], STEP),
    "fsdp2-hld-first-hidden": (
        ["train.parallel=fsdp2", "objective.method=hld-first", "objective.hidden.first_share=0.5"],
        STEP,
    ),
    "fsdp2-hld-first-kd": (
        ["train.parallel=fsdp2", "objective.method=hld-first", "objective.hidden.first_share=0.5"],
        5,
    ),  # projectors unused: no gradient
}


def _one_process(overrides: list[str], step: int, resources: Resources) -> dict:
    """The single-process reference: validation, then the real train_step's gradient."""
    s = build(load_config("smoke", overrides), resources, device=torch.device("cpu"))
    val = validate_now(s)
    params, grads = named_params(s), {}

    def capture(*args, **kwargs):
        grads.update({k: p.grad.detach().clone() if p.grad is not None else None for k, p in params.items()})

    s.optimizer.step = capture
    metrics = train_step(s, step)
    counts = [b.n_targets for b in s.order.batch(step).split(2)]
    release_hooks(s)
    return {"grads": grads, "metrics": metrics, "val": val, "counts": counts}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """Every scenario in one torchrun job (process start-up dominates)."""
    tmp = tmp_path_factory.mktemp("dist-grads")
    spec = [[name, [*BASE, *extra], step] for name, (extra, step) in SCENARIOS.items()]
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = launch(["grads", str(tmp / "out.pt"), str(tmp / "spec.json")], cache_dir=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("one-cache")))
        resources = Resources()
        return {name: _one_process([*BASE, *extra], step, resources) for name, (extra, step) in SCENARIOS.items()}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.slow
def test_two_processes_give_the_single_process_gradient(two_processes, one_process, name):
    got, ref = two_processes[name], one_process[name]
    assert got["world_size"] == 2 and got["mode"] == name.split("-")[0]
    assert got["grads"].keys() == ref["grads"].keys()
    for k, g_ref in ref["grads"].items():
        g = got["grads"][k]
        if g_ref is None:  # no gradient in this phase: none (zeros, as captured) on the ranks either
            assert not g.any(), k
            continue
        scale = max(float(g_ref.abs().max()), 1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6 * scale, msg=lambda m, k=k: f"{name}: {k}: {m}")
    for key, v in ref["metrics"].items():  # loss and metric sums were all-reduced: the global batch's values
        if key.startswith("train/") or key == "grad_norm":
            # the norm is summed in another order over shards: float32 round-off, as for the gradients
            assert got["metrics"][key] == pytest.approx(v, rel=1e-5 if key == "grad_norm" else 1e-6), key
    assert got["metrics"]["phase"] == ref["metrics"]["phase"]
    # validation batches dealt over the ranks, sums added in the single-process order: bitwise equal
    # (layer diagnostics, val/cka/..., are computed at world size 1 only: hld.eval.cka.diagnostics_of)
    assert got["val"] == {k: ref["val"][k] for k in ("val/loss", "val/ppl")}


def test_the_scenarios_exercise_the_phases(one_process):
    # every window is BOS + seq_len-1 predicted tokens (hld.data.packing), so the ranks of a step
    # always hold equal target counts and local vs global normalisation cannot differ through the
    # data; the global count is still what each rank divides by (hld.train.loop.train_step)
    for name, (_, step) in SCENARIOS.items():
        if step == STEP:
            assert len(set(one_process[name]["counts"])) == 1, name
    # and the phases exercised: projectors trained, final norm idle, projectors idle
    g = one_process["ddp-hld-joint"]["grads"]
    assert all(v is not None and v.abs().max() > 0 for k, v in g.items() if k.startswith("projectors."))
    assert one_process["ddp-hld-first-hidden"]["grads"]["student.model.norm.weight"] is None
    assert all(v is None for k, v in one_process["fsdp2-hld-first-kd"]["grads"].items() if k.startswith("projectors."))


# --------------------------------------------------------------------------- no second process needed


def test_rank_slices_tile_the_global_batch():
    from hld.data.packing import make_batch

    windows = np.arange(8 * 5).reshape(8, 5)
    batch = make_batch(windows, window_ids=np.arange(8))
    parts = [rank_slice(batch, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)  # contiguous, in rank order
    assert [p.window_ids.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_slice(batch, rank=0, world_size=1) is batch


def test_batch_split_and_mode_rules():
    train = load_config("smoke", ["train.batch_size=6", "train.micro_batch_size=3"]).train
    check_batch(train, 2)  # 3 per rank, one micro-batch of 3
    with pytest.raises(HldError, match="train.batch_size=6 is not a multiple of the world size 4"):
        check_batch(train, 4)
    with pytest.raises(HldError, match="does not divide the per-process batch 2"):
        check_batch(train, 3)
    assert resolve_mode("auto", 1) == "none" and resolve_mode("auto", 8) == "ddp"
    assert resolve_mode("fsdp2", 1) == "fsdp2"  # a sharded run resumed on one process keeps its format
    with pytest.raises(HldError, match="train.parallel=none but torchrun started 2 processes"):
        resolve_mode("none", 2)


def _argv(run, *extra):
    return [
        "train",
        "--config",
        "smoke",
        "--out",
        str(run),
        *tiny_overrides(),
        "budget.tokens=1024",
        "objective.method=hld-first",
        "objective.hidden.first_share=0.5",
        "train.parallel=fsdp2",
        "train.checkpoint_every_steps=2",
        "--quiet",
        *extra,
    ]


def test_sharded_checkpoint_resumes_bitwise_on_one_process(tmp_path, monkeypatch):
    """fsdp2's DCP format at world size 1 (no process group): interrupted during hld-first's hidden
    phase (the final norm has no optimiser state yet), resumed, equal bit for bit to a straight run."""
    from safetensors.torch import load_file

    from hld.train import loop

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(a)) == 0
    real_step = loop.launch_step

    def interrupted(s, step):
        if step == 3:  # after the checkpoint of step 2, still in the hidden phase (steps 0-3)
            raise KeyboardInterrupt
        return real_step(s, step)

    monkeypatch.setattr(loop, "launch_step", interrupted)
    assert main(_argv(b)) == 130
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-00000002.dcp"]
    (b / "checkpoints" / ".step-00000004.dcp.tmp").mkdir()  # a save cut short: removed, never read
    monkeypatch.setattr(loop, "launch_step", real_step)
    assert main(_argv(b, "--resume")) == 0
    assert not (b / "checkpoints" / ".step-00000004.dcp.tmp").exists()
    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    summaries = [json.loads((r / "summary.json").read_text()) for r in (a, b)]
    assert summaries[0]["val/ppl"] == summaries[1]["val/ppl"]


def test_sharded_checkpoint_refuses_pickled_code(tmp_path, capsys):
    """DCP reads `.metadata` with pickle.load; a crafted file is refused before that, and never runs."""
    run = tmp_path / "run"
    assert main(_argv(run)) == 0
    ck = next((run / "checkpoints").glob("step-*.dcp"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (str(run / "config.yaml"), str(marker)))

    (ck / ".metadata").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main(_argv(run, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt or unreadable (metadata)" in err[0], err
    assert not marker.exists()
