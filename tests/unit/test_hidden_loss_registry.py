"""The hidden-loss registry: every registered loss declares what the objective, the assembly, the study
grid and the FLOPs count ask of it, config accepts exactly the registered names, and every loss runs
through `HiddenObjective` with the projector and target its declarations say."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch

from hld.config import load_config
from hld.config_checks import HIDDEN_LOSSES
from hld.data.packing import IGNORE, Batch
from hld.distill.chunked import HeadLossSpec
from hld.distill.hidden import Moments
from hld.distill.hidden_losses import registry as registry_module
from hld.distill.hidden_losses.base import HiddenLoss
from hld.distill.hidden_losses.lens import Lens
from hld.distill.hidden_losses.registry import REGISTRY, hidden_loss
from hld.distill.objectives import HiddenObjective
from hld.distill.projectors import Projectors
from hld.distill.signals import StudentOutputs, TeacherSignals
from hld.errors import HldError
from hld.study.spec import ignores

B, T, D_S, D_T, V = 2, 6, 4, 8, 13


def test_a_class_without_a_row_or_a_row_without_a_class_is_refused_on_import(monkeypatch):
    """The registry module checks, when imported, that its classes and config_checks' rows name the same
    losses (config reads the names there); executed afresh against a table with one row too many or one
    too few, it refuses to import."""
    path = Path(registry_module.__file__)
    for change in ("extra", "missing"):
        with monkeypatch.context() as mp:
            if change == "extra":
                mp.setitem(HIDDEN_LOSSES, "l1", "a row whose class was never written")
            else:
                mp.delitem(HIDDEN_LOSSES, "huber")
            spec = importlib.util.spec_from_file_location("_registry_afresh", path)
            assert spec is not None and spec.loader is not None
            with pytest.raises(ImportError, match="hidden losses"):
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
    spec = importlib.util.spec_from_file_location("_registry_afresh", path)  # the table as shipped imports
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_each_name_computes_its_own_loss():
    """A name is wired to its own computation: on the same states, pairs and projector initialisation,
    no two registered names give the same value through `HiddenObjective` (a name mapped to another
    loss's class, or two classes sharing a computation, give equal values)."""
    values = {name: _objective_value(name) for name in REGISTRY}
    for a, b in itertools.combinations(REGISTRY, 2):
        assert not math.isclose(values[a], values[b], rel_tol=1e-4), (a, b, values)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_loss_declares_what_is_asked_of_it(name):
    cls = REGISTRY[name]
    assert issubclass(cls, HiddenLoss) and cls.name == name and hidden_loss(name) is cls
    assert not inspect.isabstract(cls)
    for attr in ("projector", "normalized_target", "teacher_head"):
        assert isinstance(getattr(cls, attr), bool), attr
    dims = _loss(name).cost_dims(d_student=D_S, d_teacher=D_T, seq_len=T)
    assert isinstance(dims, tuple) and all(len(d) == 2 and all(x > 0 for x in d) for d in dims)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_config_accepts_every_registered_name(name):
    assert load_config(None, [f"objective.hidden.loss={name}"]).objective.hidden.loss == name


def test_config_refuses_an_unknown_name_in_one_line():
    with pytest.raises(HldError) as err:
        load_config(None, ["objective.hidden.loss=l1"])
    line = str(err.value)
    assert "\n" not in line and "objective.hidden.loss='l1' is not one of" in line
    assert all(name in err.value.fix for name in REGISTRY)
    with pytest.raises(ValueError, match="unknown hidden loss 'l1'"):
        hidden_loss("l1")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_study_grid_asks_the_loss_whether_it_reads_the_normalisation(name):
    point = {"objective.hidden.loss": name, "objective.hidden.normalize_teacher": "rms"}
    assert ignores("hld-joint", "objective.hidden.normalize_teacher", point) == (not REGISTRY[name].normalized_target)
    assert ignores("kd", "objective.hidden.normalize_teacher", point)


class _Norm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _lens() -> tuple[Lens, HeadLossSpec]:
    W = torch.randn(V, D_T, generator=torch.Generator().manual_seed(0))
    return Lens(norm=_Norm(), head_weight=W), HeadLossSpec(ce_weight=0.0, kd_weight=1.0, chunk_tokens=5)


def _loss(name: str) -> HiddenLoss:
    lens, spec = _lens()
    return REGISTRY[name].build(lens=lens, lens_spec=spec)


def _objective(name: str) -> HiddenObjective:
    cls = REGISTRY[name]
    torch.manual_seed(0)  # the projectors' initialisation
    proj = Projectors([(1, 2), (2, 2)], d_student=D_S, d_teacher=D_T, linear=cls.projector)
    lens, spec = _lens()
    return HiddenObjective(
        proj,
        loss=name,
        normalize_teacher="standardize",
        beta=1.0,
        lens=lens if cls.teacher_head else None,
        lens_spec=spec if cls.teacher_head else None,
    )


def _inputs() -> tuple[Batch, StudentOutputs, TeacherSignals, dict[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    s = {k: torch.randn(B, T, D_S, generator=g).requires_grad_(True) for k in (1, 2)}
    t = {2: torch.randn(B, T, D_T, generator=g) * 30 + 5}
    student = StudentOutputs(final_hidden=torch.zeros(B, T, D_S), hidden=s, head_weight=torch.zeros(3, D_S))
    return Batch(ids, labels), student, TeacherSignals(hidden=t), s


_STATS = {2: Moments(mean=torch.full((D_T,), 5.0), std=torch.full((D_T,), 30.0), count=1)}


def _objective_value(name: str) -> float:
    obj = _objective(name)
    obj.stats = _STATS
    batch, student, teacher, _ = _inputs()
    return float(obj(batch, student, teacher)[0].detach())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_loss_runs_through_the_objective_as_declared(name):
    """Projector or not, normalised target or the raw one, a finite sum whose gradient reaches the
    student state (and the projector); the FLOPs dims are the projector's plus the loss's, per pair."""
    cls = REGISTRY[name]
    obj = _objective(name)
    assert obj.wants_stats == cls.normalized_target and obj.n_pairs == (2 if cls.projector else 0)
    obj.stats = _STATS
    batch, student, teacher, s = _inputs()
    value, n, _ = obj(batch, student, teacher)
    value.backward()
    assert torch.isfinite(value) and float(value.detach()) > 0 and n == int((batch.labels != IGNORE).sum())
    assert all(float(x.grad.abs().sum()) > 0 for x in s.values())
    own = obj.kind.cost_dims(d_student=D_S, d_teacher=D_T, seq_len=T)
    assert obj.cost_dims(T) == ((D_S, D_T),) * 2 * cls.projector + own * 2
    if not cls.normalized_target:  # the raw state: the statistics change nothing
        before = float(value.detach())
        obj.stats = {2: Moments(mean=torch.zeros(D_T), std=torch.ones(D_T), count=1)}
        assert float(obj(batch, student, teacher)[0].detach()) == before


def test_a_projector_free_loss_refuses_projectors_and_the_others_need_them():
    for name, cls in REGISTRY.items():
        proj = Projectors([(1, 1)], d_student=D_S, d_teacher=D_T, linear=not cls.projector)
        lens, spec = _lens()
        with pytest.raises(ValueError, match=f"loss={name} (needs|takes no) projectors"):
            HiddenObjective(proj, loss=name, normalize_teacher="none", beta=1.0, lens=lens, lens_spec=spec)
