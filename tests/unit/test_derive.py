"""Students derived from the teacher (hld.models.derive): each ranking and the pruned model checked
against an independent computation on the checked-in tiny Gemma 3 teacher (3 blocks, d = 48)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_TEACHER, bos_led_windows
from hld.config import load_config
from hld.errors import HldError
from hld.flops import calibration_flops, planned_calibration
from hld.models import derive as D


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    lm.requires_grad_(False)
    return lm


@pytest.fixture(scope="module")
def windows():
    return bos_led_windows()


def without_block(teacher, i: int):
    """The teacher with block i deleted from its ModuleList and its config (not through prune_depth)."""
    lm = copy.deepcopy(teacher)
    del lm.model.layers[i]
    lm.config.num_hidden_layers -= 1
    lm.config.layer_types = [t for j, t in enumerate(lm.config.layer_types) if j != i]
    lm.config.use_cache = False  # the blocks after i keep their old layer_idx: no KV cache
    return lm


def nll(lm, windows) -> float:
    ids = torch.as_tensor(windows)
    logits = lm(input_ids=ids).logits[:, :-1].double()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def states_pre_norm(teacher, windows) -> list[np.ndarray]:
    """x_0..x_L from transformers' own output_hidden_states, the final norm made the identity (HF's last
    hidden state is after it)."""
    lm = copy.deepcopy(teacher)
    lm.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hs = lm(input_ids=torch.as_tensor(windows), output_hidden_states=True).hidden_states
    return [h.double().numpy() for h in hs]


def cos_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a[:, 1:], b[:, 1:]  # position 0 (the BOS) left out
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_nothing_pruned_gives_the_teachers_logits(teacher, windows):
    student = D.prune_depth(teacher, (0, 1, 2))
    ids = torch.as_tensor(windows)
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert type(student) is type(teacher) and student.training
    assert all(p.requires_grad for p in student.parameters())


def test_a_pruned_student_is_the_teacher_without_those_blocks(teacher, windows):
    ids = torch.as_tensor(windows)
    got = D.prune_depth(teacher, (0, 2))
    want = without_block(teacher, 1)
    assert got.config.num_hidden_layers == 2 and got.config.layer_types == want.config.layer_types
    torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)


def test_loss_drop_equals_the_loss_of_the_teacher_without_each_block(teacher, windows):
    base = nll(teacher, windows)
    want = [nll(without_block(teacher, i), windows) - base for i in range(3)]
    np.testing.assert_allclose(D.loss_drop(teacher, windows), want, rtol=1e-4, atol=1e-6)


def test_block_influence_and_angular_distance_against_numpy(teacher, windows):
    x = states_pre_norm(teacher, windows)
    st = D.layer_states(teacher, windows)
    bi = [1 - cos_np(x[i], x[i + 1]).mean() for i in range(3)]
    np.testing.assert_allclose(D.block_influence(st), bi, rtol=1e-5)
    for n in (1, 2):
        ang = [np.arccos(np.clip(cos_np(x[a], x[a + n]), -1, 1)).mean() / math.pi for a in range(3 - n + 1)]
        np.testing.assert_allclose(D.angular_distances(st, n), ang, rtol=1e-5)


def test_derive_keeps_the_top_ranked_blocks_and_the_angular_run_is_contiguous(teacher, windows):
    cfg = load_config(None, ["student.preset=depth-2", "student.init.rank=loss_drop"]).student
    got = D.derive(cfg, teacher=teacher, teacher_name="tiny", train_windows=windows)
    scores = D.loss_drop(teacher, windows)
    assert got.kept == tuple(sorted(np.argsort(scores)[::-1][:2].tolist()))
    assert got.calibration_tokens == 4 * 32 and got.calibration_windows == 4  # the store held only 4
    cfg = load_config(None, ["student.preset=depth-1", "student.init.rank=angular"]).student
    got = D.derive(cfg, teacher=teacher, teacher_name="tiny", train_windows=windows)
    d = D.angular_distances(D.layer_states(teacher, windows), 2)
    start = int(np.argmin(d))
    assert got.kept == tuple(i for i in range(3) if i not in (start, start + 1))
    cfg = load_config(None, ["student.preset=depth-2", "student.init.blocks=[0, 2]"]).student
    got = D.derive(cfg, teacher=teacher, teacher_name="tiny", train_windows=windows)
    assert (got.kept, got.rank, got.scores, got.calibration_tokens) == ((0, 2), "explicit", None, 0)


def test_calibration_flops_by_hand(teacher):
    # tiny teacher: d 48, 2 heads x 24 (1 kv head), d_ff 96, 3 sliding blocks (window 64), V 512
    d, q, kv, ff, V, L, T = 48, 48, 24, 96, 512, 3, 32
    matmul = d * q + 2 * d * kv + q * d + 3 * d * ff  # q, k, v, o, gate/up/down
    attn = 4 * q * (T + 1) / 2  # T < window: full causal context
    fwd_blocks = L * (2 * matmul + attn)
    assert calibration_flops(teacher, "block_influence", windows=16, seq_len=T) == pytest.approx(fwd_blocks * 16 * T)
    assert calibration_flops(teacher, "angular", windows=16, seq_len=T) == pytest.approx(fwd_blocks * 16 * T)
    whole = fwd_blocks + 2 * V * d
    assert calibration_flops(teacher, "loss_drop", windows=2, seq_len=T) == pytest.approx((L + 1) * whole * 2 * T)
    assert calibration_flops(teacher, "explicit", windows=16, seq_len=T) == 0
    cfg = load_config(None, ["student.preset=depth-2", "student.init.calibration_windows=8"]).student
    assert planned_calibration(cfg, teacher, T) == ("block_influence", pytest.approx(fwd_blocks * 8 * T))


def test_gradients_of_a_pruned_student_are_those_of_the_teacher_without_the_block(teacher, windows):
    ids = torch.as_tensor(windows[:2])
    got = D.prune_depth(teacher, (0, 2))
    want = without_block(teacher, 1).train().requires_grad_(True)
    for lm in (got, want):
        logits = lm(input_ids=ids).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    g_want = dict(want.named_parameters())
    for name, p in got.named_parameters():
        torch.testing.assert_close(p.grad, g_want[name].grad, rtol=1e-5, atol=1e-7)


def test_bad_input_is_one_line(teacher):
    more = load_config(None, ["student.preset=depth-4"]).student
    with pytest.raises(HldError, match="keeps 4 blocks but the teacher has 3"):
        D.planned_kept(more, teacher)
    beyond = load_config(None, ["student.preset=depth-2", "student.init.blocks=[0, 3]"]).student
    with pytest.raises(HldError, match="names block 3"):
        D.planned_kept(beyond, teacher)
    other = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(HldError, match="a gpt2 teacher cannot be depth-pruned"):
        D.check_prunable(other, "depth-2")
    for overrides, match in (
        (["student.preset=depth-2", "student.init.calibration_windows=0"], "calibration_windows=0 is outside"),
        (["student.preset=depth-2", "student.init.blocks=[0]"], "does not list 2 block indices"),
        (["student.preset=depth-2", "student.init.blocks=[2, 0]"], "increasing order"),
        (["student.preset=depth-2", "student.n_layers=3"], "whose depth and head width are its teacher's"),
        (["student.preset=depth-0"], "keeps no block"),
        (["student.init.blocks=[0, 1]"], "built from scratch"),
        (["objective.hidden.mapping=kept"], "needs a student made of its teacher's blocks"),
    ):
        with pytest.raises(HldError, match=match):
            load_config(None, overrides)


def test_a_ranked_student_matched_through_a_cache_must_list_its_blocks():
    base = ["student.preset=depth-2", "objective.hidden.mapping=kept", "objective.method=hld-joint"]
    with pytest.raises(HldError, match="the cache's layers are chosen before the ranking runs"):
        load_config(None, [*base, "teacher.cache=/tmp/c"])
    load_config(None, [*base, "teacher.cache=/tmp/c", "student.init.blocks=[0, 2]"])
    load_config(None, base)  # online: the ranking runs first


# --------------------------------------------------------------------------- width pruning


def zeroed(teacher, kept: list[dict]):
    """The teacher with each dropped MLP channel's up row and each dropped head's o_proj columns zeroed:
    their contribution is 0, which is what removing them computes (independent of hld's slicing)."""
    lm = copy.deepcopy(teacher)
    hd = lm.config.head_dim
    for block, k in zip(lm.model.layers, kept):
        drop_c = [c for c in range(lm.config.intermediate_size) if c not in k["channels"]]
        block.mlp.up_proj.weight[drop_c] = 0
        for h in range(lm.config.num_attention_heads):
            if h not in k["heads"]:
                block.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
    return lm


def test_a_narrowed_student_computes_what_the_teacher_computes_without_the_dropped_channels(teacher, windows):
    from hld.models.prune_width import Widths, choose, importance, teacher_widths

    scores = importance(teacher, windows)
    target = Widths(n_heads=1, n_kv_heads=1, d_ff=40)
    kept = [choose(s, teacher_widths(teacher), target) for s in scores]
    got = D.prune_depth(teacher, (0, 1, 2), widths=target, per_block=kept)
    assert (got.config.num_attention_heads, got.config.intermediate_size) == (1, 40)
    assert got.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
    ids = torch.as_tensor(windows)
    torch.testing.assert_close(
        got(input_ids=ids).logits, zeroed(teacher, kept)(input_ids=ids).logits, rtol=1e-4, atol=1e-4
    )
    same = D.prune_depth(
        teacher,
        (0, 1, 2),
        widths=teacher_widths(teacher),
        per_block=[choose(s, teacher_widths(teacher), teacher_widths(teacher)) for s in scores],
    )
    assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)  # nothing narrowed


def test_channel_importance_against_the_activation_recomputed_from_gate_and_up(teacher, windows):
    from hld.models.prune_width import importance

    got = importance(teacher, windows)
    seen = {}
    block = teacher.model.layers[1].mlp
    hooks = [
        block.act_fn.register_forward_hook(lambda m, a, o: seen.__setitem__("act", o)),
        block.up_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("up", o)),
    ]
    try:
        with torch.no_grad():
            teacher(input_ids=torch.as_tensor(windows))
    finally:
        for h in hooks:
            h.remove()
    a = (seen["act"] * seen["up"])[:, 1:].double().abs()  # (n, T-1, d_ff), position 0 left out
    torch.testing.assert_close(got[1]["channels"], a.reshape(-1, a.shape[-1]).mean(0), rtol=1e-6, atol=1e-9)
    assert got[1]["heads"].shape == (2,)


def test_kept_heads_respect_their_key_value_groups():
    from hld.models.prune_width import Widths, choose

    scores = {"heads": torch.tensor([1.0, 5.0, 2.0, 2.5, 0.1, 0.2]), "channels": torch.tensor([3.0, 1.0, 2.0])}
    t = Widths(n_heads=6, n_kv_heads=3, d_ff=3)  # groups (0, 1), (2, 3), (4, 5): sums 6, 4.5, 0.3
    assert choose(scores, t, Widths(2, 2, 2)) == {"heads": [1, 3], "groups": [0, 1], "channels": [0, 2]}
    assert choose(scores, t, Widths(2, 1, 1))["heads"] == [0, 1]  # one group, both its heads


def test_width_pruning_bad_input_is_one_line(teacher):
    from hld.models.prune_width import target_widths

    with pytest.raises(HldError, match="d_ff=200 is wider than the teacher's 96"):
        target_widths(teacher, n_heads=None, n_kv_heads=None, d_ff=200)
    gqa = SimpleNamespace(config=SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=8))
    with pytest.raises(HldError, match="does not split into student.n_kv_heads=2 groups"):
        target_widths(gqa, n_heads=3, n_kv_heads=2, d_ff=None)
    with pytest.raises(HldError, match="does not split"):
        target_widths(gqa, n_heads=4, n_kv_heads=1, d_ff=None)  # a group keeps at most its own 2 heads
    assert target_widths(gqa, n_heads=None, n_kv_heads=1, d_ff=None).n_heads == 2
    with pytest.raises(HldError, match="whose depth and head width are its teacher's"):
        load_config(None, ["student.preset=depth-2", "student.head_dim=12"])


def test_width_calibration_flops_by_hand(teacher):
    d, q, kv, ff, L, T = 48, 48, 24, 96, 3, 32
    fwd_blocks = L * (2 * (d * q + 2 * d * kv + q * d + 3 * d * ff) + 4 * q * (T + 1) / 2)
    cfg = load_config(None, ["student.preset=depth-2", "student.init.blocks=[0, 2]", "student.d_ff=48"]).student
    assert planned_calibration(cfg, teacher, T) == ("explicit", pytest.approx(fwd_blocks * 16 * T))
    cfg = load_config(None, ["student.preset=depth-2", "student.d_ff=48"]).student  # ranked, then narrowed
    assert planned_calibration(cfg, teacher, T)[1] == pytest.approx(2 * fwd_blocks * 16 * T)
