"""The hidden losses by name. Their names and help texts live in `hld.config_checks.HIDDEN_LOSSES`
(config reads them there: it ranks below distill, scripts/import_layers.py); this module holds their
classes and refuses, when imported, a class without a row there or a row without a class."""

from __future__ import annotations

from hld.config_checks import HIDDEN_LOSSES
from hld.distill.hidden_losses.base import HiddenLoss, RowLoss
from hld.distill.hidden_losses.cka import Cka
from hld.distill.hidden_losses.cosine import Cosine
from hld.distill.hidden_losses.huber import Huber
from hld.distill.hidden_losses.lens import LensLoss
from hld.distill.hidden_losses.mse import Mse
from hld.distill.hidden_losses.nmse import Nmse
from hld.distill.hidden_losses.relation import Relation

CLASSES: tuple[type[HiddenLoss], ...] = (Mse, Nmse, Cosine, Relation, LensLoss, Cka, Huber)
REGISTRY: dict[str, type[HiddenLoss]] = {c.name: c for c in CLASSES}
if list(REGISTRY) != list(HIDDEN_LOSSES):
    raise ImportError(f"hidden losses {list(REGISTRY)} != config_checks.HIDDEN_LOSSES {list(HIDDEN_LOSSES)}")


def hidden_loss(name: str) -> type[HiddenLoss]:
    """The class of `objective.hidden.loss=name` (config has refused any other name before a run)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown hidden loss {name!r} (one of {', '.join(REGISTRY)})") from None


def row_loss(name: str) -> RowLoss:
    """A per-position loss (`mse`, `nmse`, `cosine`), to call `row_sum` on flat rows."""
    loss = hidden_loss(name).build()
    if not isinstance(loss, RowLoss):
        raise ValueError(f"hidden loss {name!r} is not a per-position loss")
    return loss
