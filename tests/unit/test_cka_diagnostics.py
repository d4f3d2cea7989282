"""Linear CKA and the projector R^2 against numpy; the diagnostics in a run's metrics and cka.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hld.eval.cka import linear_cka, r2_standardized


def _cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Gram-matrix form (Kornblith et al. 2019, eq. HSIC with linear kernels), a different route
    from the feature-space formula in hld.eval.cka."""
    n = len(x)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ (x @ x.T) @ H, H @ (y @ y.T) @ H
    return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))


def test_linear_cka_matches_numpy_and_is_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(50, 9, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 0.5 * noise
    ref = _cka_numpy(x.numpy(), y.numpy())
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    assert linear_cka(x, 7.5 * y @ q) == pytest.approx(ref, rel=1e-9)  # rotation and isotropic scale
    assert linear_cka(x + 3.0, y) == pytest.approx(ref, rel=1e-9)  # centred
    assert linear_cka(x, x) == pytest.approx(1.0)
    # not invariant to anisotropic scaling (why the raw, unstandardised states are what it reports)
    assert linear_cka(x, y * torch.linspace(0.1, 10, 9, dtype=torch.float64)) != pytest.approx(ref, rel=1e-3)


def test_r2_standardized_matches_numpy():
    g = np.random.default_rng(1)
    t = g.normal(size=(40, 5)) * np.array([1, 10, 100, 0.1, 1])
    p = t + g.normal(size=t.shape)
    ref = np.mean([1 - ((p[:, d] - t[:, d]) ** 2).sum() / ((t[:, d] - t[:, d].mean()) ** 2).sum() for d in range(5)])
    assert r2_standardized(torch.from_numpy(p), torch.from_numpy(t)) == pytest.approx(ref, rel=1e-10)
    assert r2_standardized(torch.from_numpy(t), torch.from_numpy(t)) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["ce", "hld-joint"])
def test_runs_log_cka_and_write_the_matrix(overrides, tmp_path, method):
    from hld.config import load_config
    from hld.train.loggers import read_metrics
    from hld.train.loop import train

    cfg = load_config("smoke", [*overrides, f"objective.method={method}", "train.eval_every_steps=2"])
    train(cfg, tmp_path / "run", quiet=True)
    vals = [r for r in read_metrics(tmp_path / "run") if "val/ppl" in r]
    assert len(vals) >= 2
    for r in vals:
        assert {"val/cka/s1_t2", "val/cka/s2_t3"} <= set(r) and all(0 <= r[k] <= 1 + 1e-9 for k in r if "cka" in k)
        assert ("val/r2/s1_t2" in r) == (method == "hld-joint")
    m = json.loads((tmp_path / "run" / "cka.json").read_text())
    assert m["student_layers"] == [0, 1, 2] and m["teacher_layers"] == [0, 1, 2, 3]
    assert np.array(m["cka"]).shape == (3, 4)
    assert m["cka"][1][2] == pytest.approx(vals[-1]["val/cka/s1_t2"], rel=1e-9)  # the same windows and states


def test_study_report_draws_cka_plots(overrides, tmp_path):
    from hld.config import load_config
    from hld.study.report import build_report
    from hld.train.loop import train

    for arm in ("kd", "hld-joint"):
        cfg = load_config("smoke", [*overrides, f"objective.method={arm}", f"name={arm}", "train.eval_every_steps=2"])
        train(cfg, tmp_path / "runs" / arm, quiet=True)
    result = build_report(tmp_path)
    names = {Path(p).name for p in result["plots"]}
    assert {"cka_over_training.png", "cka_matrices.png"} <= names
    text = (tmp_path / "report.md").read_text()
    assert "plots/cka_over_training.png" in text and "plots/cka_matrices.png" in text


def test_cka_matrix_equals_a_direct_computation_and_runs_share_the_teacher_states(overrides, tmp_path, monkeypatch):
    """cka.json against CKA in numpy's Gram form of states read independently (transformers'
    output_hidden_states of the exported student and of the teacher, pre-final-norm last layer, on the
    first diagnostics windows, at the positions with a target less position 0); a CE and a KD run in
    one process (`hld run`'s case) share one teacher-state computation and still get these values; the
    student's states come from the validation's own forward (3 windows of its first batch of 8)."""
    from transformers import AutoModelForCausalLM

    import hld.eval.cka as cka
    from hld.config import load_config
    from hld.train.loop import build, train
    from hld.train.resources import Resources

    calls: list = []
    real = cka.window_states
    monkeypatch.setattr(cka, "window_states", lambda lm, *a, **k: calls.append(lm) or real(lm, *a, **k))
    res = Resources()
    teacher_runs, student_runs = [], []
    for method in ("ce", "kd"):
        cfg = load_config(
            "smoke",
            [
                *overrides,
                f"objective.method={method}",
                "objective.hidden.diagnostics_windows=3",
                "train.precision=float32",
            ],
        )
        train(cfg, tmp_path / method, quiet=True, resources=res)
        lm = res.teacher(cfg.teacher.model, cfg.teacher.dtype).model
        teacher_runs.append(sum(c is lm for c in calls))
        student_runs.append(sum(c is not lm for c in calls) - sum(student_runs))
    # one teacher pass in all: every layer at the first validation, which cka.json reads too (one pass per
    # missing layer before: 53 s of the demo); the kd run reused the ce run's states
    assert teacher_runs == [1, 1]
    # no student pass of their own: the validation's forward (the last step's) kept every layer's states of
    # the diagnostics windows, and the per-pair CKA and cka.json read those (the weights had not changed since)
    assert student_runs == [0, 0]
    s = build(cfg, Resources())
    win = torch.as_tensor(s.val_windows[:3])
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()

    def hidden(model, ids):
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        hs = list(out.hidden_states)
        hs[-1] = model_pre_norm(model, ids)  # hld's last layer is before the final norm
        return [h[:, 1:-1].reshape(-1, h.shape[-1]).double().numpy() for h in hs]  # positions with a target

    def model_pre_norm(model, ids):
        got = {}
        norm = model.model.norm
        handle = norm.register_forward_hook(lambda m, inp, out: got.setdefault("x", inp[0]))
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        return got["x"]

    t_states = hidden(teacher, win)
    for method in ("ce", "kd"):
        student = AutoModelForCausalLM.from_pretrained(tmp_path / method / "student", dtype=torch.float32).eval()
        s_states = hidden(student, win)
        m = json.loads((tmp_path / method / "cka.json").read_text())
        ref = [[_cka_numpy(a, b) for b in t_states] for a in s_states]
        np.testing.assert_allclose(np.array(m["cka"]), np.array(ref), rtol=1e-6, atol=1e-9)


def test_the_matrix_through_gram_matrices_equals_the_feature_route(overrides, monkeypatch):
    """cka.json's two routes (n x n Gram matrices on few positions, d_s x d_t products otherwise) give the
    same matrix; and new weights (an optimiser step) make the student's states be measured again."""
    import hld.eval.cka as cka
    from hld.config import load_config
    from hld.train.loop import build, train_step
    from hld.train.resources import Resources

    cfg = load_config("smoke", [*overrides, "objective.method=kd", "objective.hidden.diagnostics_windows=3"])
    s = build(cfg, Resources())
    diag = cka.diagnostics_of(s)
    assert diag is not None
    before = diag.student_states()
    assert diag.student_states() is before  # the same weights: kept
    train_step(s, 0)
    assert diag.student_states() is not before  # an optimiser step wrote the weights in place
    gram = diag.matrix()["cka"]
    monkeypatch.setattr(cka, "GRAM_BYTES", 0)
    feature = diag.matrix()["cka"]
    np.testing.assert_allclose(np.array(gram), np.array(feature), rtol=1e-9, atol=1e-12)
    assert 0 < np.array(gram).min() and np.array(gram).max() <= 1 + 1e-12


def test_states_of_no_windows_is_one_line_not_an_empty_concatenation():
    """An input leaving the diagnostics no validation window: torch.cat of an empty list, before."""
    from hld.errors import HldError
    from hld.eval.cka import window_states

    lm = torch.nn.Linear(2, 2)
    with pytest.raises(HldError, match="no validation windows") as err:
        window_states(
            lm, lm, np.zeros((0, 8), np.int64), [0], skip_first=True, compute_dtype=torch.float32, device="cpu"
        )
    assert "\n" not in err.value.line()
