"""`train.compile=true` compiles the student's forward (its blocks, with the layer-capture hooks of the
hld arms): one graph, no graph break, for every arm (torch._dynamo.explain: cheap, no backend), and
the compiled steps give eager's losses and gradient norms within fp32 tolerance (inductor's C++
backend on a CPU; marked slow). The fused head loss is not compiled: it is already a hand-fused
sequence of in-place kernels over reused workspace buffers, which dynamo splits (kd: 9 graphs, 8
breaks). On CUDA benchmarks/gpu_check.sh runs the compiled step."""

from __future__ import annotations

import pytest
import torch

from hld.config import load_config
from hld.train.loop import build, train_step
from hld.train.resources import Resources

pytestmark = [pytest.mark.slow, pytest.mark.device_proxy]

ARMS = ["ce", "kd", "hld-joint", "hld-first"]


def _cfg(overrides, method, compiled):
    extra = ["objective.hidden.first_share=0.5"] if method == "hld-first" else []
    return load_config("smoke", [*overrides, f"objective.method={method}", f"train.compile={compiled}", *extra])


@pytest.mark.parametrize("method", ARMS)
def test_the_compiled_student_forward_has_no_graph_break(overrides, method):
    s = build(_cfg(overrides, method, False), Resources())
    torch._dynamo.reset()
    ex = torch._dynamo.explain(s.runner.backbone)(s.order.batch(0).input_ids)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    if s.runner.capture is not None:  # the hooks ran inside the graph: the captured layers are there
        assert set(s.runner.capture.pop()) == set(s.plan.student_layers)


@pytest.mark.parametrize("method", ARMS)
def test_compiled_steps_match_eager(overrides, method):
    runs = {}
    for compiled in (False, True):
        s = build(_cfg(overrides, method, compiled), Resources())
        lines = [train_step(s, k) for k in range(s.total_steps)]  # hld-first: both phases
        runs[compiled] = [v for m in lines for v in (m["train/loss"], m["grad_norm"])]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
