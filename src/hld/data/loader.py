"""Deterministic batch order: batch `k` is a pure function of (windows, seed, batch size, k).

Every arm of a study sees the same sequence of batches, and resuming at step k needs nothing but
k. Epochs are permutations drawn from `seed + epoch`; a batch never straddles two epochs' orders
in a way that depends on history (it just reads positions k*B .. k*B+B-1 of the concatenated
permutations). Under torchrun the global batch is the same for every world size; each process
computes its `rank_slice` of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hld.data.packing import Batch, make_batch, make_paired_batch

if TYPE_CHECKING:
    from hld.data.paired import PairedWindows
    from hld.data.store import WindowArray


class BatchOrder:
    def __init__(self, windows: WindowArray, *, batch_size: int, seed: int) -> None:
        self.windows = windows  # (N, T)
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            # keep one epoch (memory stays flat), in int32 while ids fit: 4 bytes per window, not 8
            self._perms = {epoch: perm.astype(np.int32) if self.n_windows < 2**31 else perm}
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Window indices of batch `step`."""
        start = step * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j in range(self.batch_size):
            epoch, pos = divmod(start + j, self.n_windows)
            out[j] = self._perm(epoch)[pos]
        return out

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        return make_batch(self.windows[idx], window_ids=idx)

    def window_ids(self, steps: int) -> np.ndarray:
        """Distinct windows read by steps 0..steps-1, sorted (what a teacher cache must hold)."""
        return np.unique(np.concatenate([self.indices(k) for k in range(steps)]))


class PairedOrder(BatchOrder):
    """The same order over paired windows (a student with its own tokenizer, `hld.data.paired`): batch k
    reads the same window indices, each given as both sides' rows and its alignment (`make_paired_batch`)."""

    def __init__(self, windows: PairedWindows, *, batch_size: int, seed: int) -> None:
        super().__init__(windows, batch_size=batch_size, seed=seed)  # type: ignore[arg-type]
        self.paired = windows

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        return make_paired_batch(self.paired.rows(idx), window_ids=idx)


def rank_slice(batch: Batch, *, rank: int, world_size: int) -> Batch:
    """Process `rank`'s contiguous share of a global batch: rows rank*B/W .. (rank+1)*B/W - 1
    (B % W == 0 is checked when the run starts). World size 1: the whole batch."""
    if world_size == 1:
        return batch
    return batch.split(world_size)[rank]
