"""Issue 35, item 5: `hld plan`'s peak-memory estimate against a trace of the training step itself
(`hld.memtrace`: `train_step` under fake tensors, live bytes counted, the GPU's path of the fused head).
A change to the step that the estimate's formula misses (a new saved tensor, a larger buffer) fails the
slow test; the paper configs' figures are benchmarks/memory_trace.py's (docs/performance.md)."""

from __future__ import annotations

import weakref

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


# --------------------------------------------------------------------------- a student with its own tokenizer


class RealLiveBytes(memtrace.LiveBytes):
    """`LiveBytes` of real tensors: a real CPU step of a paired run (whose host-side chunk arithmetic fake
    tensors cannot run). Its head and teacher rows take no GPU-only path (the cross-tokenizer head is one code
    path on every device), so the CPU's live bytes are the GPU's."""

    def add(self, t: torch.Tensor, category: str) -> None:
        st = t.untyped_storage()
        if st._cdata not in self.live:
            self.live[st._cdata] = [st.nbytes(), category, self._op]
            self.by[category] += st.nbytes()
            self.now += st.nbytes()
            weakref.finalize(st, self._free, st._cdata)

    def hold(self, modules) -> None:
        """Count the weights that exist before the trace starts."""
        for m in modules:
            for p in m.parameters() if m is not None else ():
                self.add(p, "weights")


# two random Gemma 3 teachers on the tiny teacher's tokenizer (its 512 ids a subset of a larger vocabulary, as in
# test_plan's CPU peak): WIDE's head (65,536 ids, the student's sample-bpe-8k 8,192) dominates the step; DEEP's
# forward (d 512, d_ff 2048 over windows ~2.4x the student's) exceeds the student's activations
TEACHERS = {"wide": {"vocab_size": 65536}, "deep": {"hidden_size": 512, "intermediate_size": 2048}}
PAIRED = {
    "wide": ["data.seq_len=128", "train.batch_size=4", "train.micro_batch_size=2"],
    "deep": ["data.seq_len=128", "train.batch_size=32", "train.micro_batch_size=16"],
}
CROSS_CASES = {  # id: (teacher, arm, loss, per-chunk cache)
    "kd-uld-online": ("wide", "kd", "uld", False),
    "kd-alm-online": ("wide", "kd", "alm", False),
    "kd-gold-online": ("wide", "kd", "gold", False),
    "hld-joint-online": ("wide", "hld-joint", "uld", False),
    "kd-uld-cached": ("wide", "kd", "uld", True),
    "kd-alm-cached": ("wide", "kd", "alm", True),
    "hld-joint-cached": ("wide", "hld-joint", "uld", True),
    "kd-uld-online-deep": ("deep", "kd", "uld", False),
    "hld-joint-online-deep": ("deep", "hld-joint", "alm", False),
}


@pytest.fixture(scope="module")
def paired_teachers(tmp_path_factory, assets) -> dict:
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for name, shape in TEACHERS.items():
        d = tmp_path_factory.mktemp(f"teacher-{name}")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(assets / "tiny_teacher" / f, d / f)
        config = json.loads((assets / "tiny_teacher" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **shape}))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CROSS_CASES))
def test_a_paired_runs_estimate_is_within_20_percent_of_its_traced_step(
    case, tmp_path, overrides, paired_teachers, monkeypatch
):
    import hld.models.loading as loading
    import hld.train.loop as loop
    from hld.cli import main
    from hld.distill import chunked
    from hld.plan import plan_run
    from hld.train.resources import Resources

    for module in (loop, loading):  # the 512-id tokenizer of a larger vocabulary, on purpose (above)
        monkeypatch.setattr(module, "check_tokenizer_size", lambda *a, **k: None)
    teacher, arm, loss, cached = CROSS_CASES[case]
    ov = [
        *overrides,
        f"teacher.model={paired_teachers[teacher]}",
        *PAIRED[teacher],
        "student.tokenizer=sample-bpe-8k",
        f"objective.method={arm}",
        f"objective.cross_tokenizer.loss={loss}",
        "train.loss_chunk_tokens=64",
        "train.precision=bfloat16",
        "teacher.dtype=bfloat16",
        "budget.tokens=100000",
    ]
    if cached:  # no teacher weights at all: across tokenizers the layer diagnostics are off
        assert main(["cache-teacher", "--out", str(tmp_path / "cache"), "--config", "smoke", *ov, "--quiet"]) == 0
        ov.append(f"teacher.cache={tmp_path / 'cache'}")
    cfg = load_config("smoke", ov)
    s = loop.build(cfg, Resources())
    assert (s.teacher_lm is None) == cached
    saved = chunked.WORKSPACE.bufs
    chunked.WORKSPACE.bufs = {}
    try:
        with RealLiveBytes() as t:
            t.hold([s.student, s.projectors, s.teacher_lm])
            for step in range(2):  # the second step holds AdamW's moments and the gradients
                loop.train_step(s, step)
    finally:
        chunked.WORKSPACE.bufs = saved
    row = plan_run(cfg)
    assert row["vocabulary"]["teacher_seq_len"] == s.order.batch(0).teacher_ids.shape[1]
    est = row["memory_bytes"]
    ratio = est["total"] / t.peak
    print(f"{case}: estimate {est['total'] / 2**20:.1f} MiB, trace {t.peak / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) <= 0.2, (ratio, est, t.at_peak)
