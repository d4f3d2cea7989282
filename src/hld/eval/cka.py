"""Layer diagnostics: does training make the student's layers more teacher-like?

- Linear CKA (Kornblith et al., 2019) between a student layer's states X (n, d_s) and a teacher
  layer's Y (n, d_t) on the same n token positions, columns centred:
      CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
  in [0, 1], invariant to orthogonal transforms and isotropic scaling of either side, so it needs
  no projector and compares CE, KD and HLD runs alike. Computed on raw states (no normalisation).
- R^2 of a projector: the share of the standardised target's variance its prediction explains,
  1 - mean_d SSE_d / SST_d over the target dimensions d (target = what the hidden loss matches:
  the teacher layer normalised as the run normalises it). Not defined for `relation` (no projector).

At every validation (`objective.hidden.diagnostics`): `val/cka/s{i}_t{j}` per mapped pair (the pairs
an HLD run of the config matches, also for CE and KD runs) and `val/r2/s{i}_t{j}`; at the end of a
run the full student-layer x teacher-layer matrix in RUN_DIR/cka.json. All on the first
`diagnostics_windows` validation windows, positions left out as the hidden loss leaves them out.

The matrix, on few positions (while one side's n x n float64 matrices fit in GRAM_BYTES: the demo's
n = 2,032 and 19 teacher layers take 599 MiB), goes through the centred Gram matrices
K = X_c X_c^T (n, n): ||Y_c^T X_c||_F^2 = <K_X, K_Y>_F and ||X_c^T X_c||_F = ||K_X||_F, so each layer
costs one n x n x d product and each pair an n^2 dot, not a d_s x d_t x n product per pair (the demo's
10 x 19 layers: 316 -> 53 GFLOP per run, the teacher's Gram matrices kept for the process's runs, every
pair's dot in one product: benchmarks/cka_matrix.py).
The student's states of a validation are kept until the next optimiser step: the end-of-run matrix
reuses those of the last validation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from hld.data.packing import make_batch
from hld.distill.hidden import hidden_mask
from hld.distill.projectors import pair_key
from hld.errors import HldError
from hld.models.hooks import LayerCapture, StopForward, n_blocks
from hld.precision import autocast

CKA_FILE = "cka.json"
GRAM_BYTES = 1 << 30  # the matrix goes through n x n Gram matrices while one side's, all layers, fit in this


def cka_terms(x: torch.Tensor, norm: Optional[float] = None) -> tuple[torch.Tensor, float]:
    """What linear CKA needs of one side x (n, d): its columns centred (float64) and ||x^T x||_F
    (`norm`: that value, known already)."""
    xc = x.double() - x.double().mean(0)
    return xc, float((xc.T @ xc).pow(2).sum().sqrt()) if norm is None else norm


def cka_of_terms(a: tuple[torch.Tensor, float], b: tuple[torch.Tensor, float]) -> float:
    denom = a[1] * b[1]
    return float((b[0].T @ a[0]).pow(2).sum()) / denom if denom > 0 else 0.0


def gram_stack(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of `states` (n, d_i) as its centred Gram matrix K = x_c x_c^T, flattened: (L, n*n) float64,
    with their Frobenius norms (L,) (= ||x_c^T x_c||_F)."""
    ks = []
    for x in states:
        xc = x.double() - x.double().mean(0)
        ks.append((xc @ xc.T).reshape(-1))
    k = torch.stack(ks)
    return k, torch.linalg.vector_norm(k, dim=1)


def cka_of_stacks(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Linear CKA of every layer of `a` against every layer of `b` (two `gram_stack`s on the same positions):
    <K_X, K_Y>_F / (||K_X|| ||K_Y||), (L_a, L_b) float64, 0 where a side is constant. One product over the
    n*n entries for all pairs."""
    denom = a[1][:, None] * b[1][None, :]
    num = a[0] @ b[0].T
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, 1.0), 0.0)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x (n, d1) and y (n, d2), in float64."""
    return cka_of_terms(cka_terms(x), cka_terms(y))


def r2_standardized(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - mean over dimensions of SSE_d / SST_d. pred, target (n, d)."""
    pred, target = pred.double(), target.double()
    sse = (pred - target).pow(2).sum(0)
    sst = (target - target.mean(0)).pow(2).sum(0).clamp_min(1e-12)
    return float(1 - (sse / sst).mean())


@torch.no_grad()
def window_states(
    lm: torch.nn.Module,
    forward,
    windows,
    layers: list[int],
    *,
    skip_first: bool,
    compute_dtype: torch.dtype,
    device: torch.device,
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """Layer -> (n, d) float32 states at the kept positions of `windows` (CPU)."""
    if len(windows) == 0:  # torch.cat of nothing: a traceback after training, before
        raise HldError(
            "the layer diagnostics have no validation windows to measure",
            "raise data.val_tokens (at least one window of data.seq_len), or set objective.hidden.diagnostics=false",
        )
    cap = LayerCapture(lm, layers)
    out: dict[int, list] = {i: [] for i in layers}
    try:
        for start in range(0, len(windows), batch_size):
            batch = make_batch(windows[start : start + batch_size])
            keep = hidden_mask(batch.mask, skip_first=skip_first).reshape(-1)
            with autocast(compute_dtype, device):
                try:
                    forward(batch.input_ids.to(device))
                except StopForward:
                    pass
            got = cap.pop()
            for i in layers:
                out[i].append(got[i].float().reshape(-1, got[i].shape[-1]).cpu()[keep])
    finally:
        cap.remove()
    return {i: torch.cat(v) for i, v in out.items()}


class TeacherStates:
    """The teacher's states on the diagnostics windows, each layer computed once, with its CKA norm.
    One per process and windows (`Resources.teacher_states`): every cell of `hld run` validates on the
    same windows with the same teacher, so its states are not recomputed per cell."""

    def __init__(self, lm: torch.nn.Module, windows, skip_first: bool) -> None:
        self.lm, self.windows, self.skip_first = lm, windows, skip_first
        self._states: dict[int, torch.Tensor] = {}
        self._norms: dict[int, float] = {}  # ||y^T y||_F per layer (the centred float64 copies are not kept)
        self._grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # gram_stacks, the matrix on few positions

    def states(self, layers: list[int]) -> dict[int, torch.Tensor]:
        missing = [t for t in layers if t not in self._states]
        if missing:
            from hld.distill.signals.online import Backbone

            dev = next(self.lm.parameters()).device
            self._states.update(
                window_states(
                    self.lm,
                    Backbone(self.lm),
                    self.windows,
                    missing,
                    skip_first=self.skip_first,
                    compute_dtype=torch.float32,
                    device=dev,
                )
            )
        return {t: self._states[t] for t in layers}

    def terms(self, layer: int) -> tuple[torch.Tensor, float]:
        xc, norm = cka_terms(self.states([layer])[layer], self._norms.get(layer))
        self._norms[layer] = norm
        return xc, norm

    def cka(self, layer: int, x: torch.Tensor) -> float:
        """Linear CKA of states x (n, d) on these windows against the teacher's `layer`."""
        return cka_of_terms(cka_terms(x), self.terms(layer))

    def gram_stack(self, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`gram_stack` of `layers`, kept for the process's runs."""
        g = self._grams.get(tuple(layers))
        if g is None:
            states = self.states(layers)
            g = self._grams[tuple(layers)] = gram_stack([states[t] for t in layers])
        return g


class Diagnostics:
    """What a run's validations share: the windows, the pairs, the teacher's states (computed once)."""

    def __init__(self, s) -> None:
        from hld.distill.mapping import layer_pairs
        from hld.distill.objectives import hidden_objectives

        cfg = s.cfg
        h = cfg.objective.hidden
        self.s = s
        self.teacher = s.diagnostics_states()  # shared by the process's runs on the same windows
        self.windows, self.skip_first = self.teacher.windows, self.teacher.skip_first
        self.pairs = (
            list(s.projectors.pairs)
            if s.projectors is not None
            else layer_pairs(
                h,
                n_student=n_blocks(s.student),
                n_teacher=n_blocks(self.teacher.lm),
                kept=s.derivation.kept if s.derivation is not None else None,  # a derived student's own blocks
            )
        )
        objs = hidden_objectives(s.plan)
        self.hidden = objs[0] if objs else None
        self._kept: tuple = (None, {})  # (the optimiser steps taken, every layer's states after them)

    def student_states(self) -> dict[int, torch.Tensor]:
        """Every student layer's states (0 = embeddings; one forward, as deep as the deepest), computed
        again only after another optimiser step (`Setup.steps_taken`)."""
        s = self.s
        version = s.steps_taken
        if self._kept[0] == version:
            return self._kept[1]
        was = s.student.training
        s.student.eval()
        try:
            # the eager backbone: a compiled one (train.compile) runs the forward hooks it was compiled
            # with, and the diagnostics' hooks come later (a CE run had none: KeyError 0 before)
            states = window_states(
                s.student,
                getattr(s.runner.backbone, "_orig_mod", s.runner.backbone),
                self.windows,
                list(range(n_blocks(s.student) + 1)),
                skip_first=self.skip_first,
                compute_dtype=s.compute_dtype,
                device=s.device,
            )
        finally:
            s.student.train(was)
        self._kept = (version, states)
        return states

    @contextlib.contextmanager
    def from_validation(self) -> Iterator[Optional[Callable]]:
        """For the validation's forward (`perplexity(after_forward=...)`): keeps every student layer's states
        of the diagnostics windows, the validation windows' first ones, from that forward, so
        `student_states` runs none of its own (one student forward over the windows less per validation).
        The states are those `student_states` computes: the same layers and positions, the same batches of
        `PPL_BATCH` = `window_states`' 8 windows, in eval mode and the run's compute dtype. Kept only when
        every diagnostics window went through; yields None when this step's states are already kept."""
        s = self.s
        if self._kept[0] == s.steps_taken:
            yield None
            return
        layers = list(range(n_blocks(s.student) + 1))
        cap = LayerCapture(s.student, layers)
        got: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        seen = [0]

        def after(batch) -> None:
            states, take = cap.pop(), min(batch.input_ids.shape[0], len(self.windows) - seen[0])
            if take <= 0:
                return
            keep = hidden_mask(batch.mask[:take], skip_first=self.skip_first).reshape(-1)
            for i in layers:
                got[i].append(states[i][:take].float().reshape(-1, states[i].shape[-1]).cpu()[keep])
            seen[0] += take

        try:
            yield after
        finally:
            cap.remove()
        if seen[0] == len(self.windows):
            self._kept = (s.steps_taken, {i: torch.cat(v) for i, v in got.items()})

    def per_pair(self) -> dict[str, float]:
        st = self.student_states()
        # every teacher layer in the one forward: cka.json reads them all at the run's end (a forward to the
        # deepest mapped layer, then another for the rest, before)
        every = self.teacher.states(list(range(n_blocks(self.teacher.lm) + 1)))
        te = {b: every[b] for _, b in self.pairs}
        out = {}
        for pair in self.pairs:
            a, b = pair
            key = pair_key(pair)
            out[f"val/cka/{key}"] = self.teacher.cka(b, st[a])
            proj = self.s.projectors.proj[key] if self.s.projectors is not None and self.s.projectors.linear else None
            if self.s.projectors is not None and self.s.projectors.identity and self.hidden is not None:
                with torch.no_grad():  # a kept teacher block: its state normalised as the teacher's is the prediction
                    out[f"val/r2/{key}"] = r2_standardized(
                        self.hidden.target(b, self.s.projectors(pair, st[a])).cpu(), self.hidden.target(b, te[b]).cpu()
                    )
            elif proj is not None and self.hidden is not None:
                with torch.no_grad():
                    pred = proj(st[a].to(proj.weight.device, proj.weight.dtype)).float().cpu()
                    target = self.hidden.target(b, te[b]).cpu()
                out[f"val/r2/{key}"] = r2_standardized(pred, target)
        return out

    def matrix(self) -> dict:
        s_layers = list(range(0, n_blocks(self.s.student) + 1))
        t_layers = list(range(0, n_blocks(self.teacher.lm) + 1))
        states = self.student_states()
        # every teacher layer in one forward: asked for one at a time, each missing layer cost a forward
        # to its depth (17 passes of Gemma 3 270M, 53 s of the demo's first cell)
        self.teacher.states(t_layers)
        n = states[0].shape[0]
        if n * n * 8 * max(len(s_layers), len(t_layers)) <= GRAM_BYTES:  # few positions: Gram matrices
            student = gram_stack([states[a] for a in s_layers])
            cka = cka_of_stacks(student, self.teacher.gram_stack(t_layers)).tolist()
        else:
            cka = [[0.0] * len(t_layers) for _ in s_layers]
            st = {a: cka_terms(states[a]) for a in s_layers}
            for j, b in enumerate(t_layers):  # one teacher layer's centred float64 copy at a time
                tb = self.teacher.terms(b)
                for i, a in enumerate(s_layers):
                    cka[i][j] = cka_of_terms(st[a], tb)
        return {
            "student_layers": s_layers,
            "teacher_layers": t_layers,
            "pairs": [list(p) for p in self.pairs],
            "cka": cka,
        }


def diagnostics_of(s) -> Optional[Diagnostics]:
    # one process only: under torchrun the student's forward is a collective (fsdp2) that rank 0 alone
    # would enter for cka.json, and the states would have to be gathered over the ranks (not built); and
    # only where the run made the teacher's states (`Setup.diagnostics_states`: not across tokenizers,
    # whose states share no positions)
    if not s.cfg.objective.hidden.diagnostics or s.dist.active or s.diagnostics_states is None:
        return None
    diag = getattr(s, "_diagnostics", None)
    if diag is None:
        diag = Diagnostics(s)
        s._diagnostics = diag
    return diag


def layer_diagnostics(s) -> dict[str, float]:
    """`val/cka/...` and `val/r2/...` for the run's validation line (empty when turned off)."""
    diag = diagnostics_of(s)
    return diag.per_pair() if diag is not None else {}


def write_cka_matrix(s, run_dir: Path) -> Optional[Path]:
    from hld import atomic

    diag = diagnostics_of(s)
    if diag is None:
        return None
    path = Path(run_dir) / CKA_FILE
    atomic.write_json(path, diag.matrix())
    return path
