"""A non-finite step is skipped on the device (fused AdamW's found_inf): the weights, the moments and
the step count stay bit for bit what they were, as when the step was not called; a finite one is the
plain step."""

from __future__ import annotations

import copy

import pytest
import torch

from hld.train.loop import _step_unless


def _model_and_opt(fused: bool):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()  # state exists
    return m, opt


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_changes_nothing(fused):
    m, opt = _model_and_opt(fused)
    before = copy.deepcopy((m.state_dict(), opt.state_dict()))
    for p in m.parameters():
        p.grad = torch.full_like(p, float("nan"))
    _step_unless(opt, torch.tensor(True))
    after = (m.state_dict(), opt.state_dict())
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    for i, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[1]["state"][i][k]), (i, k)
    assert not hasattr(opt, "found_inf")


@pytest.mark.parametrize("fused", [True, False])
def test_a_finite_step_is_the_plain_step(fused):
    a, opt_a = _model_and_opt(fused)
    b, opt_b = copy.deepcopy((a, opt_a))
    for m in (a, b):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    _step_unless(opt_a, torch.tensor(False))
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
