"""Issue 35, item 5: `hld plan`'s peak-memory estimate against a trace of the training step itself
(`hld.memtrace`: `train_step` under fake tensors, live bytes counted, the GPU's path of the fused head).
A change to the step that the estimate's formula misses (a new saved tensor, a larger buffer) fails the
slow test; the paper configs' figures are benchmarks/memory_trace.py's (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hld import memtrace
from hld.config import load_config
from hld.distill.chunked import WORKSPACE

# a small student whose step has every term of the estimate in play (activations, the head's buffers,
# weights, AdamW, the teacher), seconds on a CPU: Gemma 3 270M's shipped config as the teacher
SMALL = [
    "student.preset=small-6l",
    "data.seq_len=1024",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.loss_chunk_tokens=1024",
    "train.precision=bfloat16",
    "budget.tokens=1000000",
]


def test_live_bytes_counts_storages_once_and_frees_them_with_their_last_view():
    with FakeTensorMode(), memtrace.LiveBytes() as t:
        a = torch.empty(1024, 256)  # 1 MiB
        b = a[:512]  # a view: no new storage
        c = a * 2  # 1 MiB more
        assert t.now == 2 * 2**20 and t.peak == 2 * 2**20
        del a, c
        assert t.now == 2**20  # b keeps a's storage
        del b
        assert t.now == 0 and t.peak == 2 * 2**20


def test_fake_copy_keeps_tied_weights_tied():
    with torch.device("meta"):
        lm = torch.nn.Sequential(torch.nn.Embedding(16, 4), torch.nn.Linear(4, 16, bias=False))
    lm[1].weight = lm[0].weight
    with FakeTensorMode(allow_non_fake_inputs=True), memtrace.LiveBytes() as t:
        memtrace.fake_copy(lm)
        assert lm[1].weight is lm[0].weight and lm[0].weight.device.type == "cpu"
        assert t.now == 16 * 4 * 4  # one storage


@pytest.mark.slow
@pytest.mark.device_proxy
@pytest.mark.parametrize("signal", ["online", "cached"])
def test_the_memory_estimate_is_within_20_percent_of_the_traced_step(signal):
    cfg = load_config("smoke", SMALL + (["teacher.cache=(cache)"] if signal == "cached" else []))
    held = dict(WORKSPACE.bufs)
    trace = memtrace.trace_step(cfg)
    assert WORKSPACE.bufs == held  # the trace's fake buffers do not stay in the process's workspace
    est = memtrace.estimate(cfg)
    ratio = est["total"] / trace["peak_bytes"]
    print(
        f"{signal}: estimate {est['total'] / 2**20:.0f} MiB, trace {trace['peak_bytes'] / 2**20:.0f} MiB "
        f"at {trace['peak_where']}, ratio {ratio:.3f}"
    )
    assert trace["peak_where"].startswith("step 1 micro-batch 2")  # the steady state: moments and gradients held
    assert abs(ratio - 1) <= 0.2, (ratio, est, trace["at_peak"])
