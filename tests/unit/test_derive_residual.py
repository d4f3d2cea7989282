"""A derived student narrower than its teacher's residual stream (hld.models.residual_width): pruned channels
or a projected basis, each checked against an independent computation on the checked-in tiny Gemma 3 teacher
(3 blocks, d = 48), its norm weights drawn at random so that no norm is the identity."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_TEACHER, bos_led_windows, tiny_overrides
from hld.cli import main
from hld.config import load_config
from hld.distill.projectors import Projectors
from hld.errors import HldError
from hld.flops import calibration_flops, planned_calibration
from hld.models import derive as D
from hld.models import residual_width as R


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    lm.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for name, m in lm.named_modules():
        if name.endswith("norm") and m.weight.shape == (48,):  # every residual norm: v = 1 + w far from 1
            m.weight.copy_(torch.randn(48, generator=g))
    return lm


@pytest.fixture(scope="module")
def windows():
    return bos_led_windows()


def logits(lm, windows) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=torch.as_tensor(windows)).logits


def uniform_writes(teacher):
    """The teacher with its post-attention, post-feedforward and final norms' v uniform (0.7): the norms a
    projected student can only approximate otherwise (a diagonal in the teacher's basis is not one in P's)."""
    lm = copy.deepcopy(teacher)
    for name, m in lm.named_modules():
        if name.endswith(R.WRITES) or name == "model.norm":
            m.weight.fill_(-0.3)
    return lm


def test_keeping_every_channel_gives_the_teachers_logits(teacher, windows):
    r = R.narrow(teacher, windows, (0, 1, 2), how="prune", d_model=48)
    assert r.channels == list(range(48)) and torch.equal(r.basis, torch.eye(48, dtype=torch.float64))
    student = D.prune_depth(teacher, (0, 1, 2), residual=r)
    torch.testing.assert_close(logits(student, windows), logits(teacher, windows), rtol=1e-5, atol=1e-5)


def test_the_identity_basis_gives_the_teachers_logits_with_the_norms_folded(teacher, windows):
    stats = R.moments(teacher, windows, (0, 1, 2), full=True)
    eye = torch.eye(48, dtype=torch.float64)
    scales = R.norm_scales(teacher, stats, eye, fold=R.READS)
    r = R.Residual("project", 48, eye, scales, fold=R.READS)
    student = D.prune_depth(teacher, (0, 1, 2), residual=r)
    torch.testing.assert_close(logits(student, windows), logits(teacher, windows), rtol=1e-5, atol=1e-5)


def test_a_full_rank_rotation_gives_the_teachers_logits(teacher, windows):
    lm = uniform_writes(teacher)
    r = R.narrow(lm, windows, (0, 1, 2), how="project", d_model=48)
    assert not torch.allclose(r.basis.abs(), torch.eye(48, dtype=torch.float64), atol=0.1)  # a real rotation
    torch.testing.assert_close(r.basis.T @ r.basis, torch.eye(48, dtype=torch.float64))
    student = D.prune_depth(lm, (0, 1, 2), residual=r)
    torch.testing.assert_close(logits(student, windows), logits(lm, windows), rtol=1e-4, atol=1e-4)
    # the reading norms' v folded into q/k/v and gate/up is what makes it exact: kept as a diagonal it is not
    diagonal = R.narrow(lm, windows, (0, 1, 2), how="project", d_model=48, fold=())
    unfolded = D.prune_depth(lm, (0, 1, 2), residual=diagonal)
    assert (logits(unfolded, windows) - logits(lm, windows)).abs().max() > 1e-2


def hf_states(teacher, windows, kept) -> dict[tuple[int, str], np.ndarray]:
    """Each norm's input and output, float64 (n, T, d), from transformers' own forward: the block inputs from
    output_hidden_states (the final norm made the identity, so the last is its input), the mid-block residual
    as the block input plus the post-attention norm's output, outputs from forward hooks."""
    lm = copy.deepcopy(teacher)
    final = lm.model.norm
    lm.model.norm = torch.nn.Identity()
    out, seen = {}, {}
    hooks = []
    for b in kept:
        for name in ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm"):
            mod = getattr(lm.model.layers[b], name)
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=(b, name): seen.__setitem__(key, o)))
    try:
        with torch.no_grad():
            hs = lm(input_ids=torch.as_tensor(windows), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    for b in kept:
        out[(b, "input_layernorm", "in")] = hs[b].double().numpy()
        out[(b, "pre_feedforward_layernorm", "in")] = (hs[b] + seen[(b, "post_attention_layernorm")]).double().numpy()
        for name in ("input_layernorm", "pre_feedforward_layernorm"):
            out[(b, name, "out")] = seen[(b, name)].double().numpy()
    out[(-1, "final", "in")] = hs[-1].double().numpy()
    with torch.no_grad():
        out[(-1, "final", "out")] = final(hs[-1]).double().numpy()
    return out


def test_channel_importance_against_numpy(teacher, windows):
    kept = (0, 2)
    states = hf_states(teacher, windows, kept)
    want = sum(np.abs(y[:, 1:]).reshape(-1, 48).mean(0) for k, y in states.items() if k[2] == "out")
    got = R.channel_ranking(R.moments(teacher, windows, kept, full=False))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    r = R.narrow(teacher, windows, kept, how="prune", d_model=20)
    assert r.channels == sorted(np.argsort(-want, kind="stable")[:20].tolist())
    assert r.basis[r.channels, range(20)].eq(1).all() and r.basis.sum() == 20


def test_projection_basis_against_numpy_eigh(teacher, windows):
    kept = (0, 2)
    states = hf_states(teacher, windows, kept)
    m = np.zeros((48, 48))
    for k, x in states.items():
        if k[2] == "in":
            u = x[:, 1:].reshape(-1, 48)
            u = u / np.linalg.norm(u, axis=1, keepdims=True)
            m += u.T @ u / len(u)
    vals, vecs = np.linalg.eigh(m)
    want = vecs[:, ::-1][:, :20]
    r = R.narrow(teacher, windows, kept, how="project", d_model=20)
    got = r.basis.numpy()
    np.testing.assert_allclose(got * np.sign((got * want).sum(0)), want, atol=1e-5)  # up to each column's sign
    assert r.captured == pytest.approx(vals[::-1][:20].sum() / vals.sum(), rel=1e-6)


@pytest.mark.parametrize("how", ["prune", "project"])
def test_the_students_embedding_output_is_the_teachers_in_its_basis(teacher, windows, how):
    """Gemma 3 scales the embedding by sqrt(hidden_size) inside the model: the student's sqrt(32) and its
    copied rows must still give P^T (the teacher's scaled embedding)."""
    r = R.narrow(teacher, windows, (0, 1), how=how, d_model=32)
    student = D.prune_depth(teacher, (0, 1), residual=r)
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        got = student.model.embed_tokens(ids).double()
        want = teacher.model.embed_tokens(ids).double() @ r.basis
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert student.config.hidden_size == 32 and student.lm_head.weight is student.model.embed_tokens.weight


def test_a_narrow_student_reloads_in_plain_transformers_and_gradients_reach_every_parameter(teacher, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    r = R.narrow(teacher, windows, (0, 2), how="project", d_model=24)
    student = D.prune_depth(teacher, (0, 2), residual=r)
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.hidden_size == 24 and again.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(again, windows), logits(student.eval(), windows))
    ids = torch.as_tensor(windows)
    out = student.train()(input_ids=ids).logits[:, :-1]
    F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_the_kept_mapping_lifts_the_student_through_the_basis(teacher, windows):
    r = R.narrow(teacher, windows, (0, 2), how="project", d_model=24)
    proj = Projectors([(1, 1), (2, 3)], d_student=24, d_teacher=48, identity=True, basis=r.basis)
    s = torch.randn(2, 5, 24, dtype=torch.float64)
    np.testing.assert_allclose(proj((1, 1), s).numpy(), s.numpy() @ r.basis.numpy().T, atol=1e-6)  # P held in fp32
    assert proj.n_params() == 0 and not proj.linear and "basis" not in proj.state_dict()
    with pytest.raises(ValueError, match="not torch.Size"):
        Projectors([(1, 1)], d_student=24, d_teacher=48, identity=True, basis=r.basis.T)


def test_residual_calibration_flops_by_hand(teacher):
    # tiny teacher: d 48, 2 heads x 24 (1 kv head), d_ff 96, 3 sliding blocks (window 64), V 512
    d, q, kv, ff, L, T = 48, 48, 24, 96, 3, 32
    fwd = L * (2 * (d * q + 2 * d * kv + q * d + 3 * d * ff) + 4 * q * (T + 1) / 2)  # one forward, no head
    prune = ["student.preset=depth-2", "student.init.blocks=[0, 2]", "student.d_model=32"]
    cfg = load_config(None, [*prune, "student.init.calibration_windows=8"]).student
    assert planned_calibration(cfg, teacher, T) == ("explicit", pytest.approx(fwd * 8 * T))
    project = (4 * 2 + 1) * 2 * d * d * 8 * (T - 1) + 9 * d**3  # 9 norms' x x^T, one 48 x 48 eigh
    cfg = load_config(None, [*prune, "student.init.calibration_windows=8", "student.init.residual=project"]).student
    assert planned_calibration(cfg, teacher, T)[1] == pytest.approx(fwd * 8 * T + project)
    cfg = load_config(None, ["student.preset=depth-2", "student.d_model=32"]).student  # ranked, then narrowed
    assert planned_calibration(cfg, teacher, T)[1] == pytest.approx(2 * fwd * 16 * T)
    assert calibration_flops(teacher, "explicit", windows=8, seq_len=T, residual="project", kept_blocks=2) == (
        pytest.approx(fwd * 8 * T + project)
    )
    # every pass at once: loss_drop's L + 1 whole forwards, the width pass, then the residual's forward + sums
    whole = fwd + 2 * 512 * d  # with the head
    got = calibration_flops(teacher, "loss_drop", windows=8, seq_len=T, width=True, residual="project", kept_blocks=2)
    assert got == pytest.approx((L + 1) * whole * 8 * T + fwd * 8 * T + fwd * 8 * T + project)


def test_residual_bad_input_is_one_line(teacher, capsys):
    with pytest.raises(HldError, match="d_model=64 is wider than the teacher's 48"):
        D.planned_d_model(load_config(None, ["student.preset=depth-2", "student.d_model=64"]).student, teacher)
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama", hidden_size=64))
    with pytest.raises(HldError, match="residual width of a llama teacher cannot be narrowed"):
        R.check_residual(llama, 32)
    with pytest.raises(HldError, match="student.init.residual=project is set but student.preset=tiny-2l"):
        load_config(None, ["student.init.residual=project"])
    with pytest.raises(HldError, match="student.head_dim set for student.preset=depth-2"):
        load_config(None, ["student.preset=depth-2", "student.head_dim=16"])
    argv = ["plan", "--config", "smoke", "--run", *tiny_overrides(), "student.preset=depth-2", "student.d_model=64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d_model=64 is wider than the teacher's 48" in err[0]


def test_the_norm_scale_undoes_the_narrower_rms(teacher, windows):
    """With every channel's energy kept (prune at full width) each norm's scale is its teacher v; narrower, a
    reading norm's is v[kept] * sqrt(d_t / d_s) * rho, rho^2 the kept share of its input's energy."""
    kept = (0,)
    stats = R.moments(teacher, windows, kept, full=False)
    r = R.residual_of(teacher, stats, how="prune", d_model=16)
    x = hf_states(teacher, windows, kept)[(0, "input_layernorm", "in")][:, 1:].reshape(-1, 48)
    rho = math.sqrt(np.mean((x[:, r.channels] ** 2).sum(1) / (x**2).sum(1)))
    v = 1 + teacher.model.layers[0].input_layernorm.weight.double().numpy()
    np.testing.assert_allclose(r.scales[(0, "input_layernorm")].numpy(), v[r.channels] * math.sqrt(3) * rho)


def test_the_residual_composes_with_narrowed_heads_and_channels(teacher, windows):
    """Heads and MLP channels are cut first, then the residual side of the same matrices is mapped: keeping
    every residual channel gives the head-and-channel-pruned student's logits, and a narrower one still runs."""
    from hld.models.prune_width import Widths, choose, importance, teacher_widths

    target = Widths(n_heads=1, n_kv_heads=1, d_ff=40)
    per_block = [choose(s, teacher_widths(teacher), target) for s in importance(teacher, windows)]
    narrow = D.prune_depth(teacher, (0, 1, 2), widths=target, per_block=per_block)
    full = R.narrow(teacher, windows, (0, 1, 2), how="prune", d_model=48)
    both = D.prune_depth(teacher, (0, 1, 2), widths=target, per_block=per_block, residual=full)
    torch.testing.assert_close(logits(both, windows), logits(narrow, windows), rtol=1e-5, atol=1e-5)
    r = R.narrow(teacher, windows, (0, 1, 2), how="project", d_model=24)
    small = D.prune_depth(teacher, (0, 1, 2), widths=target, per_block=per_block, residual=r)
    assert small.model.layers[0].mlp.down_proj.weight.shape == (24, 40)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (24, 24)  # 1 head of 24 reads 24 channels
    assert torch.isfinite(logits(small, windows)).all()


def test_the_hidden_loss_of_a_narrowed_student_compares_its_lifted_state(teacher, windows):
    """mse under `mapping: kept`: per position the mean over the teacher's 48 dimensions of (P s - h)^2,
    summed over the mask (no normalisation), written out in numpy."""
    from hld.distill.objectives import HiddenObjective

    r = R.narrow(teacher, windows, (0, 2), how="project", d_model=24)
    proj = Projectors([(1, 1)], d_student=24, d_teacher=48, identity=True, basis=r.basis)
    obj = HiddenObjective(proj, loss="mse", normalize_teacher="none", beta=1.0)
    g = torch.Generator().manual_seed(3)
    s, h = torch.randn(2, 6, 24, generator=g), torch.randn(2, 6, 48, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    p = r.basis.float().numpy()
    want = (((s.numpy() @ p.T - h.numpy()) ** 2).mean(-1) * mask.numpy()).sum()
    assert float(obj.pair_sum((1, 1), s, h, mask)) == pytest.approx(want, rel=1e-5)
    assert obj.n_pairs == 0 and obj.cost_dims(32) == ((24, 2 * 48 / 3),)  # 6 * 24 * 32 = 4 d_s d_t a token
