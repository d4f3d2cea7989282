"""What a study's students are measured against, on the very validation windows they are scored on:
count-based n-gram models, the fidelity of each teacher signal, and the teacher's own scores.

N-gram references: a unigram and a bigram fitted on training windows.

The window protocol is the students': every window is BOS + seq_len-1 stream tokens, and a window
of T tokens makes T-1 predictions, of positions 1..T-1 from positions 0..T-2. So the unigram counts
the predicted tokens (positions 1..T-1) and the bigram counts the (input, target) pairs, whose first
context is BOS.

- unigram: add-k, P(b) = (c(b) + k) / (N + kV), k = 0.01 by default (V = 262,144 for Gemma 3: add-one
  would put 262,144 pseudo-counts against the sample corpus's ~1.2M tokens);
- bigram: Witten-Bell interpolation with that unigram, which has no parameter to tune:
  P(b | a) = (c(a, b) + n(a) P(b)) / (c(a) + n(a)), n(a) = the number of distinct successors of a;
  a context never seen (c(a) = 0) falls back to P(b).

Signal fidelity: how far the teacher signal a study's cells are trained on is from the teacher's full
distribution: the mean KL per predicted token, on validation windows, for each distinct signal (a cache's top-k, an
online top-k, the online full distribution).

A top-k signal states k probabilities and one remaining mass (`top_k_rest: bucket`); the distribution
it stands for is its k probabilities with the remaining mass spread evenly over the other V - k ids
(the completion with the most entropy, the one that assumes nothing), so

    KL(p || p̂) = sum_{j in top-k} p_j log(p_j / p̂_j) + sum_{j off top-k} p_j log(p_j (V - k) / p̂_rest)

with p the teacher's tempered softmax over its full logits and p̂ what `TopK.logprobs` gives the loss.
`renormalize` puts no mass off the k ids: its KL is infinite. A cached signal is measured as
the study's cells read it: a cache built by `hld.cache.build.ensure_cache` over validation windows and
read back with `CachedTeacher` (so the codec's rounding counts), against the same teacher's logits.

A sampled signal (distill/sampled.py: distinct ids drawn from p with weights w) leaves every id it did not
draw at zero, so KL(p || w) is infinite for any finite number of draws although its KD gradient is
unbiased. Its row reports the other direction, KL(w || p) = sum_i w_i log(w_i / p_i): the KD loss the
teacher itself would get from the signal (0 only when w = p; it shrinks as the draws grow, ~ (unique ids
drawn - 1) / (2 K) at tau = 1). The two directions are not the same measure: a sampled row is not ranked
against a top-k row by this number (the report names the direction in the signal's description).

Unhealed students: a student derived from its teacher (`student.preset=depth-N`) scored before any
training step on the same windows (study.json's derived_reference), the start each arm heals from; the
report states what share of the gap from there to the teacher each arm recovered. With the layer
diagnostics on, the reference also holds the unhealed student's CKA per mapped layer pair on the
diagnostics windows: the step-0 point of every cell's CKA-over-training curve.

Scores: each finished cell's student on the study's tasks (downstream.json), and the teacher's
validation loss and task scores on the same windows (study.json's teacher_reference), each kept once
done so a resumed study does not redo it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hld.config import RunConfig, to_dict
from hld.distill.signals import TeacherLogits
from hld.study.spec import Study

# --------------------------------------------------------------------------- n-gram references

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


def cross_entropy(c: Counts, windows: Sequence[np.ndarray], *, k: float = ADD_K, chars: Optional[int] = None) -> dict:
    """Mean nats per prediction of the unigram and of the bigram on `windows` (and `chars`, the characters of
    their text, kept for bits per character)."""
    a, b = pairs(windows)
    out = {
        "unigram": float(-np.log(unigram_prob(c, b, k=k)).mean()),
        "bigram": float(-np.log(bigram_prob(c, a, b, k=k)).mean()),
        "predictions": int(len(b)),
    }
    return out if chars is None else {**out, "chars": chars}


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
    """Unigram and bigram cross-entropies (hld.study.references) on each cell's validation windows: fitted
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
        key = json.dumps([d.train, d.validation, d.seq_len, d.val_tokens, cfg.teacher.model, cfg.student.tokenizer])
        chars = None  # the validation text's characters (a student with its own tokenizer: bits per character)
        if cfg.student.tokenizer:  # the student's own tokens of the paired windows, unpadded
            stok = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer")
            vocab = len(stok)
            paired = resources.paired_windows(d, tok, stok)
            sample = resources.paired_validation(d, tok, stok)
            val, chars = sample.student_windows(), int(sample.chars.sum())
            train_windows = paired.student_windows() if key not in whole else []
        else:
            vocab = int(resources.teacher_config(cfg.teacher.model).vocab_size)
            train = resources.train_windows(d, tok)
            val = list(resources.validation_windows(d, tok))
        if key not in whole:
            if cfg.student.tokenizer:
                counts, label = fit(train_windows, vocab_size=vocab), "train split"
            else:
                counts, n_read = fit_split(train, vocab_size=vocab)
                label = (
                    "train split" if n_read == len(train) else f"train split (its first {n_read * d.seq_len:,} tokens)"
                )
            whole[key] = {**cross_entropy(counts, val, chars=chars), "label": label}
        summary = json.loads((run_dir / "summary.json").read_text())
        B, steps = cfg.train.batch_size, int(summary["steps"])
        last = (int(summary["tokens"]) - (steps - 1) * B * d.seq_len) // B
        what = "the tokens the equal-FLOPs ce cells read" if cell.flops_of else "the tokens each budget's cells read"
        # cells that read the same windows (same seed, batch and length, whatever their arm or grid point)
        # share one fit, so a grid of 24 configurations gives one row per budget, not 24 copies
        read_key = (key, what, f"{int(summary['tokens']):,} tokens, batch {B}", cfg.train.seed)
        if read_key in read:
            continue
        if cfg.student.tokenizer:  # whole steps of paired windows, their student tokens
            order = BatchOrder(paired, batch_size=B, seed=cfg.train.seed)
            windows = [paired.window(int(i)).student_ids for k in range(steps) for i in order.indices(k)]
        else:
            windows = read_windows(BatchOrder(train, batch_size=B, seed=cfg.train.seed), steps=steps, last_len=last)
        read[read_key] = {
            **cross_entropy(fit(windows, vocab_size=vocab), val, chars=chars),
            "fit_tokens": int(summary["tokens"]),
        }
    for key, on_split in whole.items():
        groups = {on_split["label"]: [on_split]}
        for rk, r in read.items():
            if rk[0] == key:
                groups.setdefault(f"{rk[1]} ({rk[2]})", []).append(r)
        for fit_name, rs in groups.items():
            for model in ("unigram", "bigram"):
                row = {
                    "model": model,
                    "fit": fit_name,
                    "validation": json.loads(key)[1],
                    "val_loss": sum(r[model] for r in rs) / len(rs),
                    "seeds": len(rs),
                    "fit_tokens": rs[0].get("fit_tokens"),
                    "predictions": rs[0]["predictions"],
                    "add_k": ADD_K,
                }
                if "chars" in rs[0]:  # bits per character of the same text (a student with its own tokenizer)
                    row["val_bpc"] = row["val_loss"] * row["predictions"] / math.log(2) / rs[0]["chars"]
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- signal fidelity

WINDOWS = 8  # validation windows measured per signal (8 x 127 predictions at seq_len 128)


def completion_kl(
    full: torch.Tensor, signal: TeacherLogits, *, temperature: float = 1.0, top_k_rest: str = "bucket"
) -> torch.Tensor:
    """How far `signal` is from p = softmax(full / T) per row, (n,) float64 (full: (n, V) logits): each
    kind's measure (`TeacherLogits.fidelity`; the module docstring)."""
    return signal.fidelity(full, temperature, top_k_rest)


def signal_key(cfg: RunConfig) -> Optional[dict]:
    """What decides a cell's teacher signal (None for ce, which reads none, and for a student with its own
    tokenizer, whose losses read the teacher's full rows online at other positions than its own)."""
    if cfg.objective.method == "ce" or cfg.student.tokenizer:
        return None
    t, o, d = cfg.teacher, cfg.objective, cfg.data
    sampled = {}
    if t.cache and t.cache_signal == "sampled":  # (keys absent for top-k: entries of older studies still match)
        sampled = {
            "cache_signal": "sampled",
            "cache_samples": t.cache_samples,
            "cache_proposal_temperature": t.cache_proposal_temperature,
        }
    return sampled | {
        "model": t.model,
        "dtype": t.dtype,
        "source": "cache" if t.cache else "online",
        "cache_top_k": t.cache_top_k if t.cache else None,
        "cache_codec": t.cache_codec if t.cache else None,
        "cache_value_bits": t.cache_value_bits if t.cache and t.cache_codec == "compact" else None,
        "top_k": o.top_k,
        "top_k_rest": o.top_k_rest,
        "temperature": o.temperature,
        "validation": d.validation,
        "seq_len": d.seq_len,
    }


def describe(key: dict) -> str:
    """`cache top-64 + rest (exact codec)`, `online top-16 + rest`, `online full distribution`,
    `cache sampled, 12 draws/token (tau 1), KL(signal ‖ full)`."""
    if key.get("cache_signal") == "sampled":
        tau = key["cache_proposal_temperature"]
        return f"cache sampled, {key['cache_samples']} draws/token (tau {tau:g}), KL(signal ‖ full)"
    k = min(key["top_k"] or key["cache_top_k"], key["cache_top_k"]) if key["source"] == "cache" else key["top_k"]
    if k is None:
        return "online, full distribution"
    rest = "+ remaining mass" if key["top_k_rest"] == "bucket" else "renormalised"
    codec = f" ({key['cache_codec']} codec)" if key["source"] == "cache" else ""
    return f"{key['source']} top-{k} {rest}{codec}"


def _fidelity_config(cfg: RunConfig, windows: int) -> RunConfig:
    """The cell's config pointed at the validation split: its cache (kd: logits only) then holds the
    validation windows a budget of `windows` windows reads, built as the study builds its caches."""
    d, t = cfg.data, cfg.teacher
    B = cfg.train.batch_size
    windows = max(B, windows // B * B)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(d, train=d.validation, max_train_docs=None),
        teacher=dataclasses.replace(t, cache=None),
        objective=dataclasses.replace(cfg.objective, method="kd"),
        budget=dataclasses.replace(cfg.budget, tokens=windows * d.seq_len, flops=None),
    )


def measure(cfg: RunConfig, resources, work_dir: Path, *, windows: int = WINDOWS, quiet: bool = True) -> dict:
    """The mean KL per predicted token between the teacher's full distribution and the cell's signal,
    on `windows` validation windows (the first ones a cache of the validation split would hold)."""
    from hld.cache.build import ensure_cache
    from hld.cache.meta import cache_identity, signal_identity
    from hld.cache.reader import CachedTeacher
    from hld.data.loader import BatchOrder
    from hld.distill.signals import Needs
    from hld.distill.signals.online import OnlineLogits, OnlineTeacher
    from hld.train.budget import sized_plan

    key = signal_key(cfg)
    assert key is not None, "ce reads no teacher signal"
    if key["source"] == "online" and key["top_k"] is None:  # trained on the full distribution itself
        return {**key, **_ran(cfg), "kl_per_token": 0.0, "predictions": None, "window_ids": []}
    fcfg = _fidelity_config(cfg, windows)
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    tok = loaded.tokenizer
    val = resources.train_windows(fcfg.data, tok)
    B, T = fcfg.train.batch_size, fcfg.data.seq_len
    steps = sized_plan(fcfg, loaded.model, tok)[1]  # as ensure_cache sizes the cache
    order = BatchOrder(val, batch_size=B, seed=fcfg.train.seed)
    online = OnlineTeacher(loaded.model)
    cached = None
    if key["source"] == "cache":
        ensure_cache([fcfg], work_dir, resources, quiet=quiet)
        identity = cache_identity(
            teacher=loaded.identity,
            tokenizer=tok,
            seq_len=T,
            train_windows=val,
            layers=[],
            top_k=0 if fcfg.teacher.cache_signal == "sampled" else fcfg.teacher.cache_top_k,
            **signal_identity(fcfg.teacher),
        )
        cached = CachedTeacher(work_dir, expect=identity)
    total, count, ids = 0.0, 0, []
    needs = Needs(logits=True)
    for step in range(steps):
        batch = order.batch(step)
        ids += batch.window_ids.tolist()
        full = online(batch, needs)
        assert full is not None and isinstance(full.source, OnlineLogits)  # the teacher's full distribution
        sig = cached(batch, needs) if cached is not None else full
        mask = batch.mask.reshape(-1)
        for s in range(0, mask.numel(), 64):
            rows = slice(s, min(s + 64, mask.numel()))
            got = sig.logits(rows).top_k(cfg.objective.top_k)  # before `ref`: online logits share one buffer
            ref = full.source.rows(rows).logits
            kl = completion_kl(ref, got, temperature=cfg.objective.temperature, top_k_rest=cfg.objective.top_k_rest)
            total += float(kl[mask[rows]].sum())
            count += int(mask[rows].sum())
    return {**key, **_ran(cfg), "kl_per_token": total / count, "predictions": count, "window_ids": ids}


def _ran(cfg: RunConfig) -> dict:
    from hld.precision import dtype_name, resolve_dtype

    key = signal_key(cfg)
    return {"signal": describe(key), "teacher_dtype": dtype_name(resolve_dtype(cfg.teacher.dtype))}


def _entry_of(entries: Sequence[dict], key: dict) -> Optional[dict]:
    """The first entry that holds every item of `key` (an entry of study.json's references, which may
    carry more fields than its key), or None."""
    return next((e for e in entries if {k: e.get(k) for k in key} == key), None)


def study_fidelity(planned: list, out: Path, resources, done: list[dict], *, quiet: bool = True) -> list[dict]:
    """One entry per distinct signal the study's cells read (what study.json already holds is kept)."""
    entries: list[dict] = []
    for _, cfg, _ in planned:
        key = signal_key(cfg)
        if key is None or _entry_of(entries, key) is not None:
            continue
        have = _entry_of(done, key)
        if have is None:
            # its own directory, apart from the cells' caches/ (a cache of validation windows, kept for a resume)
            have = measure(cfg, resources, out / "fidelity" / f"signal-{len(entries)}", quiet=quiet)
        entries.append(have)
    return entries


def fidelity_rows(entries: list[dict]) -> list[str]:
    """The report's rows: one per signal."""
    if not entries:
        return []
    lines = [
        "Teacher signal fidelity: the mean KL per predicted token from the teacher's full distribution to "
        "the distribution the cells' signal states (a top-k's remaining mass spread evenly over the other "
        "ids), on validation windows; 0 for the full distribution computed online. A sampled signal is measured "
        "the other way, KL(signal ‖ full) (KL(full ‖ signal) is infinite off the ids drawn; its gradient is unbiased).",
        "",
        "| signal | teacher dtype | temperature | validation predictions | KL(full ‖ signal), nats/token |",
        "|---|---|---:|---:|---:|",
    ]
    for e in entries:
        kl = "∞" if math.isinf(e["kl_per_token"]) else f"{e['kl_per_token']:.4f}"
        n = f"{e['predictions']:,}" if e.get("predictions") else "— (by construction)"
        lines.append(f"| {e['signal']} | `{e.get('teacher_dtype', e['dtype'])}` | {e['temperature']:g} | {n} | {kl} |")
    return lines + [""]


# --------------------------------------------------------------------------- scores


def _scored(scores: dict, study: Study) -> bool:
    """`scores` (downstream.json or a reference's tasks) holds every task of the study at its limit."""
    return all(t in scores and scores[t].get("limit") == study.task_limit for t in study.tasks)


def _score(lm, tokenizer, study: Study, quiet: bool, *, rolling_len: int) -> dict:
    """Task scores; rolling log-likelihoods over windows of the cells' `data.seq_len`, for teacher and
    students alike."""
    from hld.eval.harness import evaluate_tasks

    rows = evaluate_tasks(
        lm, tokenizer, list(study.tasks), limit=study.task_limit, quiet=quiet, rolling_len=rolling_len
    )
    return {t: {**r, "limit": study.task_limit} for t, r in rows.items()}


def downstream(study: Study, cfg: RunConfig, run_dir: Path, resources, quiet: bool) -> dict:
    """Score a finished cell's student on the study's tasks into run_dir/downstream.json (kept when
    it already holds them, so a resumed study does not score a cell twice)."""
    if not study.tasks or not study.score_students:
        return {}
    from hld.eval.downstream import read_downstream, write_downstream

    have = read_downstream(run_dir)
    if _scored(have, study):
        return {t: have[t] for t in study.tasks}
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32)
    have.update(_score(lm, resources.tokenizer(cfg.teacher.model), study, quiet, rolling_len=cfg.data.seq_len))
    write_downstream(run_dir, have)
    return {t: have[t] for t in study.tasks}


def _reference_key(cfg: RunConfig) -> dict:
    d = cfg.data
    key = {
        "model": cfg.teacher.model,
        "dtype": cfg.teacher.dtype,
        "validation": d.validation,
        "seq_len": d.seq_len,
        "val_tokens": d.val_tokens,
        "text_field": d.text_field,
    }
    # a student with its own tokenizer: the teacher on its own tokens of the students' validation text
    return key if not cfg.student.tokenizer else {**key, "student_tokenizer": cfg.student.tokenizer}


def teacher_references(study: Study, planned: list, done: list[dict], resources, quiet: bool) -> list[dict]:
    """The teacher's validation loss on the very windows each cell is validated on (one entry per
    distinct teacher and validation set; usually one), and its scores on the study's tasks: the
    reference the report measures students against. What study.json already holds is kept, so a
    resumed study does not redo it."""
    from hld.eval.perplexity import perplexity
    from hld.precision import resolve_dtype

    out: list[dict] = []
    for cfg in [cfg for _, cfg, _ in planned]:
        key = _reference_key(cfg)
        if _entry_of(out, key) is not None:
            continue
        have = _entry_of(done, key)
        if have is None:
            t0 = time.time()
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            tok = loaded.tokenizer
            if cfg.student.tokenizer:  # the students' windows as the teacher reads them (the same text)
                stok = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer")
                val = resources.paired_validation(cfg.data, tok, stok).teacher_side()
            else:
                val = resources.validation_windows(cfg.data, tok)
            r = perplexity(
                loaded.model,
                val,
                compute_dtype=resolve_dtype(cfg.teacher.dtype),
                progress=None if quiet else "teacher validation",
            )
            have = {
                **key,
                "val_loss": r["loss"],
                "val_ppl": r["ppl"],
                "predictions": r["tokens"],
                "seconds": time.time() - t0,
                **({"val_bpc": r["bpc"]} if "bpc" in r else {}),
            }
        if study.tasks and not _scored(have.get("tasks") or {}, study):
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            have = {
                **have,
                "tasks": {
                    **(have.get("tasks") or {}),
                    **_score(loaded.model, loaded.tokenizer, study, quiet, rolling_len=cfg.data.seq_len),
                },
            }
        out.append(have)
    return out


def _derived_key(cfg: RunConfig) -> dict:
    sizes = {k: getattr(cfg.student, k) for k in ("d_model", "n_heads", "n_kv_heads", "d_ff")}
    return {
        **_reference_key(cfg),
        "student": cfg.student.preset,
        "init": to_dict(cfg.student.init),
        "train": cfg.data.train,
        # the widths a derived student is narrowed to (absent when none is: the keys study.json already holds)
        **({"sizes": sizes} if any(v is not None for v in sizes.values()) else {}),
    }


def derived_references(planned: list, done: list[dict], resources, quiet: bool) -> list[dict]:
    """Each derived student (one per teacher, preset, init and validation set) scored before training on
    the windows its cells are validated on: what the arms heal from. What study.json holds is kept."""
    from hld.config_checks import derived_depth
    from hld.eval.perplexity import perplexity
    from hld.models.derive import derived_student
    from hld.precision import resolve_dtype

    out: list[dict] = []
    for cfg in [cfg for _, cfg, _ in planned if derived_depth(cfg.student.preset) is not None]:
        key = _derived_key(cfg)
        if _entry_of(out, key) is not None:
            continue
        have = _entry_of(done, key)
        if have is None:
            t0 = time.time()
            tok = resources.tokenizer(cfg.teacher.model)
            train = resources.train_windows(cfg.data, tok)
            lm = resources.teacher(cfg.teacher.model, cfg.teacher.dtype).model
            d = resources.derivation(cfg.student, cfg.teacher.model, cfg.teacher.dtype, train, device=lm.device)
            student = derived_student(lm, d).eval()  # its kept blocks, narrowed as derived
            r = perplexity(
                student,
                resources.validation_windows(cfg.data, tok),
                compute_dtype=resolve_dtype(cfg.train.precision),  # as its cells validate
                progress=None if quiet else "unhealed student",
            )
            cka = _unhealed_cka(cfg, student, d.kept, resources, tok) if cfg.objective.hidden.diagnostics else None
            del student
            have = {
                **key,
                "kept": list(d.kept),
                "val_loss": r["loss"],
                "val_ppl": r["ppl"],
                "predictions": r["tokens"],
                **({"cka": cka} if cka is not None else {}),
                "seconds": time.time() - t0,
            }
        out.append(have)
    return out


def _unhealed_cka(cfg: RunConfig, student, kept, resources, tok) -> dict[str, float]:
    """Linear CKA of each mapped (student, teacher) layer pair of the unhealed derived student, on the
    diagnostics windows its cells' validations use (`val/cka/...` at step 0: every arm and seed starts
    from it)."""
    from hld.distill.mapping import layer_pairs
    from hld.distill.projectors import pair_key
    from hld.distill.signals.online import Backbone
    from hld.eval.cka import window_states
    from hld.models.hooks import n_blocks
    from hld.precision import resolve_dtype

    h = cfg.objective.hidden
    win = resources.validation_windows(cfg.data, tok)[: h.diagnostics_windows]
    dev = next(student.parameters()).device
    teacher = resources.teacher_states(
        cfg.teacher.model, cfg.teacher.dtype, win, skip_first=h.skip_first_position, device=dev
    )
    pairs = layer_pairs(h, n_student=n_blocks(student), n_teacher=n_blocks(teacher.lm), kept=tuple(kept))
    st = window_states(
        student,
        Backbone(student),
        win,
        sorted({a for a, _ in pairs}),
        skip_first=h.skip_first_position,
        compute_dtype=resolve_dtype(cfg.train.precision),
        device=dev,
    )
    return {pair_key(p): teacher.cka(p[1], st[p[0]]) for p in pairs}
