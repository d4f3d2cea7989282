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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


MAX_FIT_TOKENS = 50_000_000  # the whole-split fit reads at most this many tokens (its first windows)
_MERGE_PAIRS = 1 << 23  # pair codes buffered before they are merged into the running counts


def fit_split(windows, *, vocab_size: int, max_tokens: int = MAX_FIT_TOKENS) -> tuple[Counts, int]:
    """`fit` over the first windows of a split holding at most `max_tokens` tokens, read a block at a
    time (a token store's windows are never all in memory): memory grows with the distinct pairs, not
    the tokens. Returns the counts and the number of windows read (all of them for a small split)."""
    n = min(len(windows), max(1, max_tokens // windows.shape[1]))
    unigram = np.zeros(vocab_size, dtype=np.float64)
    codes, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    pending: list[np.ndarray] = []

    def merge() -> None:
        nonlocal codes, counts
        new, inv = np.unique(np.concatenate([codes, *pending]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([counts, np.ones(sum(map(len, pending)), np.int64)]))
        codes, counts = new, counts.astype(np.int64)
        pending.clear()

    for start in range(0, n, 4096):
        w = np.asarray(windows[start : min(n, start + 4096)], dtype=np.int64)
        a, b = w[:, :-1].ravel(), w[:, 1:].ravel()
        unigram += np.bincount(b, minlength=vocab_size)
        pending.append(a * vocab_size + b)
        if sum(map(len, pending)) >= _MERGE_PAIRS:
            merge()
    merge()
    ctx = codes // vocab_size
    c = Counts(
        vocab_size=vocab_size,
        unigram=unigram,
        pair_codes=codes,
        pair_counts=counts.astype(np.float64),
        context=np.bincount(ctx, weights=counts, minlength=vocab_size),
        successors=np.bincount(ctx, minlength=vocab_size).astype(np.float64),
    )
    return c, n


def fit(windows: Sequence[np.ndarray], *, vocab_size: int) -> Counts:
    a, b = pairs(windows)
    codes, counts = np.unique(a * vocab_size + b, return_counts=True)
    ctx = codes // vocab_size
    return Counts(
        vocab_size=vocab_size,
        unigram=np.bincount(b, minlength=vocab_size).astype(np.float64),
        pair_codes=codes,
        pair_counts=counts.astype(np.float64),
        context=np.bincount(ctx, weights=counts, minlength=vocab_size),
        successors=np.bincount(ctx, minlength=vocab_size).astype(np.float64),
    )


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
    return {
        "unigram": float(-np.log(unigram_prob(c, b, k=k)).mean()),
        "bigram": float(-np.log(bigram_prob(c, a, b, k=k)).mean()),
        "predictions": int(len(b)),
    }


def read_windows(order, *, steps: int, last_len: int) -> list[np.ndarray]:
    """The windows (cut to what was read) that `steps` optimiser steps of a BatchOrder read, the last
    step reading only its windows' first `last_len` positions."""
    out = []
    for k in range(steps):
        for i in order.indices(k):
            w = order.windows[i]
            out.append(w[:last_len] if k == steps - 1 else w)
    return out


def study_references(planned: list, out: Path, resources) -> list[dict]:
    """Unigram and bigram cross-entropies (hld.study.ngram) on each cell's validation windows: fitted
    on the whole training split (its first `MAX_FIT_TOKENS` at most), and on the windows the cells of
    each budget read (the mean over their seeds; cells of one budget and seed read the same windows
    whatever their arm)."""
    from hld.data.loader import BatchOrder

    rows: list[dict] = []
    whole: dict[str, dict] = {}  # data key -> the fit on the whole training split
    read: dict[tuple, dict] = {}  # (data key, what, windows, seed) -> the fit on the windows cells read
    for cell, cfg, _ in planned:
        run_dir = out / "runs" / cell.id
        if not (run_dir / "summary.json").exists():
            continue
        d = cfg.data
        tok = resources.tokenizer(cfg.teacher.model)
        vocab = int(resources.teacher_config(cfg.teacher.model).vocab_size)
        train = resources.train_windows(d, tok)
        val = resources.validation_windows(d, tok)
        key = json.dumps([d.train, d.validation, d.seq_len, d.val_tokens, cfg.teacher.model])
        if key not in whole:
            counts, n_read = fit_split(train, vocab_size=vocab)
            label = "train split" if n_read == len(train) else f"train split (its first {n_read * d.seq_len:,} tokens)"
            whole[key] = {**cross_entropy(counts, list(val)), "label": label}
        summary = json.loads((run_dir / "summary.json").read_text())
        B, steps = cfg.train.batch_size, int(summary["steps"])
        last = (int(summary["tokens"]) - (steps - 1) * B * d.seq_len) // B
        what = "the tokens the equal-FLOPs ce cells read" if cell.flops_of else "the tokens each budget's cells read"
        # cells that read the same windows (same seed, batch and length, whatever their arm or grid point)
        # share one fit, so a grid of 24 configurations gives one row per budget, not 24 copies
        read_key = (key, what, f"{int(summary['tokens']):,} tokens, batch {B}", cfg.train.seed)
        if read_key in read:
            continue
        windows = read_windows(BatchOrder(train, batch_size=B, seed=cfg.train.seed), steps=steps, last_len=last)
        read[read_key] = {
            **cross_entropy(fit(windows, vocab_size=vocab), list(val)),
            "fit_tokens": int(summary["tokens"]),
        }
    for key, on_split in whole.items():
        groups = {on_split["label"]: [on_split]}
        for rk, r in read.items():
            if rk[0] == key:
                groups.setdefault(f"{rk[1]} ({rk[2]})", []).append(r)
        for fit_name, rs in groups.items():
            for model in ("unigram", "bigram"):
                rows.append(
                    {
                        "model": model,
                        "fit": fit_name,
                        "validation": json.loads(key)[1],
                        "val_loss": sum(r[model] for r in rs) / len(rs),
                        "seeds": len(rs),
                        "fit_tokens": rs[0].get("fit_tokens"),
                        "predictions": rs[0]["predictions"],
                        "add_k": ADD_K,
                    }
                )
    return rows
