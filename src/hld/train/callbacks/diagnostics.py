"""The layer diagnostics' file: cka.json (student x teacher layers' linear CKA) beside the exported
student. Their per-validation values (`val/cka/*`, `val/r2/*`) come with the validation line."""

from __future__ import annotations

from hld.eval.cka import write_cka_matrix
from hld.train.callbacks.base import Callback, Run


class LayerDiagnostics(Callback):
    def on_finish(self, run: Run) -> None:
        write_cka_matrix(run.s, run.out)
