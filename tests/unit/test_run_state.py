"""RunState: saved whole in a checkpoint and restored whole; checkpoints from before it still load,
and one without a run state is refused with a one-line message."""

from __future__ import annotations

import pytest
import torch

from hld.errors import HldError
from hld.train.checkpoint import CKPT_NAME, load_checkpoint, restore_checkpoint, save_checkpoint
from hld.train.state import RunState


def test_advance_counts_a_step_and_skips_are_counted_in_a_row():
    s = RunState()
    s.advance(tokens=128, flops_per_token=3.0, seconds=0.5)
    s.advance(tokens=64, flops_per_token=2.0, seconds=0.25)
    s.count_skipped(True)
    s.count_skipped(True)
    assert s == RunState(step=2, tokens=192, flops=128 * 3.0 + 64 * 2.0, train_seconds=0.75, skipped_in_row=2)
    s.count_skipped(False)
    assert s.skipped_in_row == 0


def _modules():
    torch.manual_seed(0)
    student, proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW([*student.parameters(), *proj.parameters()], lr=1e-2)
    student(torch.randn(3, 4)).sum().backward()
    opt.step()
    return student, proj, opt


def test_a_checkpoint_restores_the_state_whole(tmp_path):
    student, proj, opt = _modules()
    state = RunState(step=7, tokens=896, flops=1.5e9, train_seconds=12.25, skipped_in_row=1)
    save_checkpoint(tmp_path, state, student=student, projectors=proj, optimizer=opt)
    want = torch.rand(3)  # the RNG stream after the save
    s2, p2, o2 = _modules()
    got = restore_checkpoint(tmp_path, student=s2, projectors=p2, optimizer=o2)
    assert got == state
    assert torch.equal(torch.rand(3), want)  # the RNG states came back with it
    for a, b in zip([*student.parameters(), *proj.parameters()], [*s2.parameters(), *p2.parameters()]):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_run_state_loads(tmp_path):
    student, proj, opt = _modules()
    save_checkpoint(tmp_path, RunState(), student=student, projectors=proj, optimizer=opt)
    path = tmp_path / "checkpoints" / CKPT_NAME
    ck = load_checkpoint(tmp_path)
    old = {k: v for k, v in ck.items() if k not in ("train_seconds", "skipped_in_row")}  # step, tokens, flops
    torch.save({**old, "step": 3, "tokens": 384, "flops": 2.0e6}, path)
    (tmp_path / "checkpoints" / f"{CKPT_NAME}.sha256").unlink()  # an older hld wrote no checksum record
    got = restore_checkpoint(tmp_path, student=student, projectors=proj, optimizer=opt)
    assert got == RunState(step=3, tokens=384, flops=2.0e6)


def test_a_checkpoint_without_a_run_state_is_refused(tmp_path):
    student, proj, opt = _modules()
    save_checkpoint(tmp_path, RunState(), student=student, projectors=proj, optimizer=opt)
    ck = load_checkpoint(tmp_path)
    torch.save({k: v for k, v in ck.items() if k not in ("step", "flops")}, tmp_path / "checkpoints" / CKPT_NAME)
    (tmp_path / "checkpoints" / f"{CKPT_NAME}.sha256").unlink()  # an older hld wrote no checksum record
    with pytest.raises(HldError, match=r"holds no run state \(step, flops missing\)") as err:
        restore_checkpoint(tmp_path, student=student, projectors=proj, optimizer=opt)
    assert "\n" not in err.value.line()
