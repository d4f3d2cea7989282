"""Count-based reference models for a study's report: a unigram and a bigram fitted on training
windows, scored on the very validation windows the students are scored on.

The window protocol is the students': every window is BOS + seq_len-1 stream tokens, and a window
of T tokens makes T-1 predictions, of positions 1..T-1 from positions 0..T-2. So the unigram counts
the predicted tokens (positions 1..T-1) and the bigram counts the (input, target) pairs, whose first
context is BOS.

- unigram: add-k, P(b) = (c(b) + k) / (N + kV), k = 0.01 by default (V = 262,144 for Gemma 3: add-one
  would put 262,144 pseudo-counts against the sample corpus's ~1.2M tokens);
- bigram: Witten-Bell interpolation with that unigram, which has no parameter to tune:
  P(b | a) = (c(a, b) + n(a) P(b)) / (c(a) + n(a)), n(a) = the number of distinct successors of a;
  a context never seen (c(a) = 0) falls back to P(b).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ADD_K = 0.01


@dataclass(frozen=True)
class Counts:
    vocab_size: int
    unigram: np.ndarray  # (V,) counts of predicted tokens
    pair_codes: np.ndarray  # sorted distinct a * V + b
    pair_counts: np.ndarray  # counts of those pairs
    context: np.ndarray  # (V,) c(a): pairs with context a
    successors: np.ndarray  # (V,) n(a): distinct b after a

    @property
    def tokens(self) -> int:
        return int(self.unigram.sum())


def pairs(windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of every prediction of `windows` (each a BOS-led 1-D array, any length)."""
    a = [np.asarray(w[:-1], dtype=np.int64) for w in windows if len(w) > 1]
    b = [np.asarray(w[1:], dtype=np.int64) for w in windows if len(w) > 1]
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a), np.concatenate(b)


def fit(windows: Sequence[np.ndarray], *, vocab_size: int) -> Counts:
    a, b = pairs(windows)
    codes, counts = np.unique(a * vocab_size + b, return_counts=True)
    ctx = codes // vocab_size
    return Counts(vocab_size=vocab_size, unigram=np.bincount(b, minlength=vocab_size).astype(np.float64),
                  pair_codes=codes, pair_counts=counts.astype(np.float64),
                  context=np.bincount(ctx, weights=counts, minlength=vocab_size),
                  successors=np.bincount(ctx, minlength=vocab_size).astype(np.float64))


def unigram_prob(c: Counts, b: np.ndarray, *, k: float = ADD_K) -> np.ndarray:
    return (c.unigram[b] + k) / (c.tokens + k * c.vocab_size)


def bigram_prob(c: Counts, a: np.ndarray, b: np.ndarray, *, k: float = ADD_K) -> np.ndarray:
    codes = a * c.vocab_size + b
    pos = np.searchsorted(c.pair_codes, codes).clip(max=max(len(c.pair_codes) - 1, 0))
    found = (c.pair_codes[pos] == codes) if len(c.pair_codes) else np.zeros(len(codes), bool)
    cab = np.where(found, c.pair_counts[pos] if len(c.pair_codes) else 0.0, 0.0)
    ca, na, pu = c.context[a], c.successors[a], unigram_prob(c, b, k=k)
    seen = ca > 0
    return np.where(seen, (cab + na * pu) / np.where(seen, ca + na, 1.0), pu)


def cross_entropy(c: Counts, windows: Sequence[np.ndarray], *, k: float = ADD_K) -> dict:
    """Mean nats per prediction of the unigram and of the bigram on `windows`."""
    a, b = pairs(windows)
    return {"unigram": float(-np.log(unigram_prob(c, b, k=k)).mean()),
            "bigram": float(-np.log(bigram_prob(c, a, b, k=k)).mean()), "predictions": int(len(b))}


def read_windows(order, *, steps: int, last_len: int) -> list[np.ndarray]:
    """The windows (cut to what was read) that `steps` optimiser steps of a BatchOrder read, the last
    step reading only its windows' first `last_len` positions."""
    out = []
    for k in range(steps):
        for i in order.indices(k):
            w = order.windows[i]
            out.append(w[:last_len] if k == steps - 1 else w)
    return out
