"""`hld.flops` against torch's FlopCounterMode on the tiny teacher and a tiny student.

FlopCounterMode counts matmuls (mm, addmm, bmm) and the CUDA attention kernels; on CPU the SDPA
kernel is not counted at all, so the models run with eager attention here, where QK^T and AV are
two bmm's. Those bmm's are *dense*: a causal (or sliding-window) mask is applied after the full
T x T product, so the counter charges every query all T keys, while `forward_flops_per_token`
charges only the keys a query attends to (mean (T+1)/2 for causal attention). The two are therefore
compared term by term: linear layers and head exactly, attention after the dense->causal factor
2T/(T+1). Norms, activations, softmax and rotary embeddings are not counted by either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hld.config import StudentConfig
from hld.flops import _mean_context, forward_flops_per_token, step_cost
from hld.models.hooks import LayerCapture, StopForward

ASSETS = Path(__file__).resolve().parents[1] / "assets"
B = 2


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny_teacher", dtype=torch.float32, attn_implementation="eager")
    return lm.eval()


@pytest.fixture(scope="module")
def student():
    from hld.models.student import build_student

    lm = build_student(StudentConfig(preset="tiny-2l"), vocab_size=512, bos_id=2, eos_id=1, pad_id=0, seed=0)
    lm.config._attn_implementation = "eager"
    return lm


def _count(fn) -> dict[str, float]:
    """The counter's FLOPs by op, less those of the rotary embedding (kept apart as "rotary"): the
    angles are an outer product of inverse frequencies and positions, which transformers 5.17 computes
    as a bmm ((hd/2) x 1 @ 1 x T per position batch: 9,216 -> 9,228 bmm FLOPs per token at T=16) and
    5.25 as an elementwise product (not counted). Neither `hld.flops` nor the paper counts it."""
    with FlopCounterMode(display=False) as fc:
        fn()
    by_module = fc.get_flop_counts()
    rotary = [m for m in by_module if m.split(".")[-1] == "rotary_emb"]
    counts = {str(k): float(v) for k, v in by_module["Global"].items()}
    counts["rotary"] = 0.0
    for m in rotary:
        for k, v in by_module[m].items():
            counts[str(k)] -= float(v)
            counts["rotary"] += float(v)
    counts["total"] = float(fc.get_total_flops()) - counts["rotary"]
    return counts


def _rotary_bound(lm, T: int) -> float:
    """The most the rotary embedding's outer product can cost, per token of a batch of B: 2 * (hd/2) * T
    once per distinct RoPE (Gemma 3: local and global), shared by the batch's rows."""
    return 2 * (lm.config.head_dim // 2) * T * 2 / (B * T)


def _attention_dense(lm, T: int, n_layers: int) -> float:
    """Per-token FLOPs of QK^T and AV over all T keys (what the counter sees)."""
    cfg = lm.config
    return 4 * cfg.num_attention_heads * cfg.head_dim * T * n_layers


def _ids(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [16, 32, 64])
def test_teacher_forward_with_logits(teacher, T):
    """T <= sliding window (64): every layer is plainly causal."""
    n_tokens = B * T
    with torch.no_grad():
        c = _count(lambda: teacher(input_ids=_ids(T)))
    ours = forward_flops_per_token(teacher, T, logits=True)
    attn_dense = c.get("aten.bmm", 0.0) / n_tokens
    assert attn_dense == pytest.approx(_attention_dense(teacher, T, 3), rel=1e-9)  # the model is what we think
    assert c["rotary"] / n_tokens <= _rotary_bound(teacher, T)  # what was set apart is the rotary product only
    linear_and_head = c["aten.mm"] / n_tokens
    attn_ours = ours - linear_and_head  # our attention term, given that linear + head agree exactly ...
    assert attn_ours == pytest.approx(attn_dense * (T + 1) / (2 * T), rel=1e-9)  # ... it is the causal half
    # overall: the counter's total, with its attention made causal, within a fraction of a percent
    assert ours == pytest.approx(linear_and_head + attn_dense * (T + 1) / (2 * T), rel=5e-3)
    # raw, the whole gap is the masked half of the dense attention the counter charges ...
    raw = c["total"] / n_tokens
    assert raw - ours == pytest.approx(attn_dense * (T - 1) / (2 * T), rel=1e-6)
    if T <= 32:  # ... which is a few percent of the total at short lengths (8.6% at T=64)
        assert abs(ours - raw) / raw < 0.06


def test_teacher_linear_and_head_parameters_counted_exactly(teacher):
    """2 * (weights of every Linear in the blocks) + 2 * V * d for the head, by the counter."""
    T = 32
    with torch.no_grad():
        c_logits = _count(lambda: teacher(input_ids=_ids(T)))
        c_backbone = _count(lambda: teacher.model(input_ids=_ids(T)))
    n_tokens = B * T
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    assert (c_logits["aten.mm"] - c_backbone["aten.mm"]) / n_tokens == pytest.approx(2 * V * d, rel=1e-9)
    ours_head = forward_flops_per_token(teacher, T, logits=True) - forward_flops_per_token(teacher, T, logits=False)
    assert ours_head == pytest.approx(2 * V * d, rel=1e-12)
    attn = forward_flops_per_token(teacher, T, logits=False) - c_backbone["aten.mm"] / n_tokens
    assert attn == pytest.approx(_attention_dense(teacher, T, 3) * (T + 1) / (2 * T), rel=1e-9)


@pytest.mark.parametrize("upto", [1, 2])
def test_teacher_forward_up_to_a_layer(teacher, upto):
    """A hidden-only phase stops the teacher after its deepest needed block."""
    T = 32
    capture = LayerCapture(teacher, [upto])
    capture.stop_after = upto

    def run():
        try:
            teacher.model(input_ids=_ids(T))
        except StopForward:
            pass

    try:
        with torch.no_grad():
            c = _count(run)
    finally:
        capture.remove()
    n_tokens = B * T
    assert c["aten.bmm"] / n_tokens == pytest.approx(_attention_dense(teacher, T, upto), rel=1e-9)
    ours = forward_flops_per_token(teacher, T, logits=False, upto_layer=upto)
    counted = c["aten.mm"] / n_tokens + c["aten.bmm"] / n_tokens * (T + 1) / (2 * T)
    assert ours == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("T,w", [(128, 64), (100, 7), (64, 64), (10, 64), (5, 1)])
def test_sliding_window_mean_context_against_mask(T, w):
    """Mean number of keys a query attends to, counted on the explicit mask (key j visible from
    query i iff i - w < j <= i)."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    mask = (j <= i) & (j > i - w)
    assert _mean_context(T, w) == pytest.approx(mask.sum() / T, rel=1e-12)
    assert _mean_context(T, None) == pytest.approx(((j <= i).sum()) / T, rel=1e-12)


def test_sliding_layers_use_the_window(teacher):
    """The tiny teacher's three layers are sliding (window 64): at T=128 the attention term uses the
    windowed context, not the full causal one."""
    T, cfg = 128, teacher.config
    assert cfg.sliding_window == 64 and set(cfg.layer_types) == {"sliding_attention"}
    with torch.no_grad():
        c = _count(lambda: teacher.model(input_ids=_ids(T)))
    attn = forward_flops_per_token(teacher, T, logits=False) - c["aten.mm"] / (B * T)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    keys = ((j <= i) & (j > i - 64)).sum() / T
    assert attn == pytest.approx(4 * cfg.num_attention_heads * cfg.head_dim * keys * 3, rel=1e-9)


def test_student_training_step_is_three_forwards(student):
    """Forward + backward of the student under the counter: 3x its forward (every matmul has two
    matmuls in backward: grad of input and grad of weight), and step_cost's student term matches."""
    T = 32
    ids = _ids(T, seed=1)
    labels = torch.roll(ids, -1, 1)
    student.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            student(input_ids=ids)

    def train():
        logits = student(input_ids=ids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()

    fwd = _count(forward)
    step = _count(train)
    n_tokens = B * T
    assert step["total"] == pytest.approx(3 * fwd["total"], rel=1e-3)
    cost = step_cost(student, T)
    assert cost.teacher == 0 and cost.projectors == 0
    # the counter's training FLOPs with attention made causal == 3 * our forward
    causal = (step["total"] - step["aten.bmm"] * (T - 1) / (2 * T)) / n_tokens
    assert cost.student == pytest.approx(causal, rel=5e-3)
    assert cost.student == pytest.approx(3 * forward_flops_per_token(student, T), rel=1e-12)


def test_step_cost_adds_teacher_and_projectors(student, teacher):
    T = 32
    dims = ((64, 48), (64, 48))
    cost = step_cost(
        student, T, teacher=teacher, teacher_logits=False, teacher_upto=2, projector_dims=dims, student_logits=False
    )
    assert cost.teacher == pytest.approx(forward_flops_per_token(teacher, T, logits=False, upto_layer=2))
    # a trained Linear(d_s -> d_t): forward 2*d_s*d_t, backward twice that; counted by the counter
    proj = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(B * T, 64, requires_grad=True)
    c = _count(lambda: proj(x).sum().backward())
    assert cost.projectors == pytest.approx(2 * c["total"] / (B * T), rel=1e-9)
    assert cost.total == pytest.approx(cost.student + cost.teacher + cost.projectors)


def test_a_frozen_head_step_is_three_block_forwards_and_two_head_forwards(student):
    """train.freeze_embedding: torch's counter over forward + backward of the student with its tied
    embedding frozen: the head's backward computes dL/dh only, so the step is 3x the blocks' forward and 2x
    the head's, which step_cost(frozen_head=True) says."""
    T = 32
    ids = _ids(T, seed=2)
    labels = torch.roll(ids, -1, 1)
    w = student.get_input_embeddings().weight
    w.requires_grad_(False)
    try:

        def train():
            logits = student(input_ids=ids).logits
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()

        step = _count(train)
    finally:
        w.requires_grad_(True)
        student.zero_grad(set_to_none=True)
    causal = (step["total"] - step["aten.bmm"] * (T - 1) / (2 * T)) / (B * T)
    cost = step_cost(student, T, frozen_head=True)
    assert cost.student == pytest.approx(causal, rel=5e-3)
    head = 2 * w.numel()
    assert cost.student == pytest.approx(3 * forward_flops_per_token(student, T, logits=False) + 2 * head)
    assert step_cost(student, T).student - cost.student == pytest.approx(head)


def test_head_dim_apart_from_hidden_over_heads_and_mixed_layer_types():
    """Gemma 3's head_dim is not hidden_size / heads (256 vs 640 / 4): the attention term uses head_dim; and
    a model mixing full and sliding layers charges each its own context (T = 128, window 64)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ASSETS / "tiny_teacher")
    cfg.head_dim = 2 * cfg.hidden_size // cfg.num_attention_heads
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    assert cfg.num_hidden_layers == 3 and cfg.sliding_window == 64
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    T = 128
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    full, window = ((j <= i).sum() / T), (((j <= i) & (j > i - 64)).sum() / T)
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim
    with torch.no_grad():
        mm = _count(lambda: lm.model(input_ids=_ids(T)))["aten.mm"] / (B * T)  # the block matmuls

    def attention() -> float:  # forward_flops_per_token's attention term (QK^T and AV by the mean context)
        return forward_flops_per_token(lm, T, logits=False) - mm

    assert attention() == pytest.approx(per_key * (2 * full + window), rel=1e-9)
    # what the config says decides (the modules are the same): without layer_types (Mistral) a set
    # sliding_window applies to every block; without either (Llama) attention is full
    lm.config.layer_types = None
    assert attention() == pytest.approx(per_key * 3 * window, rel=1e-9)
    lm.config.sliding_window = None
    assert attention() == pytest.approx(per_key * 3 * full, rel=1e-9)


def test_step_cost_counts_the_teacher_head_unless_told_not_to(student, teacher):
    T = 16
    with_head = step_cost(student, T, teacher=teacher).teacher
    without = step_cost(student, T, teacher=teacher, teacher_logits=False).teacher
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    assert with_head - without == pytest.approx(2 * V * d)
