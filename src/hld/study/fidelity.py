"""How far the teacher signal a study's cells are trained on is from the teacher's full distribution:
the mean KL per predicted token, on validation windows, for each distinct signal (a cache's top-k, an
online top-k, the online full distribution).

A top-k signal states k probabilities and one remaining mass (`top_k_rest: bucket`); the distribution
it stands for is its k probabilities with the remaining mass spread evenly over the other V - k ids
(the completion with the most entropy, the one that assumes nothing), so

    KL(p || p̂) = sum_{j in top-k} p_j log(p_j / p̂_j) + sum_{j off top-k} p_j log(p_j (V - k) / p̂_rest)

with p the teacher's tempered softmax over its full logits and p̂ what `losses.teacher_logprobs` gives
the loss. `renormalize` puts no mass off the k ids: its KL is infinite. A cached signal is measured as
the study's cells read it: a cache built by `train.cache_build.ensure_cache` over validation windows and
read back with `CachedTeacher` (so the codec's rounding counts), against the same teacher's logits.

A sampled signal (distill/sampled.py: distinct ids drawn from p with weights w) leaves every id it did not
draw at zero, so KL(p || w) is infinite for any finite number of draws although its KD gradient is
unbiased. Its row reports the other direction, KL(w || p) = sum_i w_i log(w_i / p_i): the KD loss the
teacher itself would get from the signal (0 only when w = p; it shrinks as the draws grow, ~ (unique ids
drawn - 1) / (2 K) at tau = 1). The two directions are not the same measure: a sampled row is not ranked
against a top-k row by this number (the report names the direction in the signal's description).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from hld.config import RunConfig
from hld.distill.losses import TeacherLogits

WINDOWS = 8  # validation windows measured per signal (8 x 127 predictions at seq_len 128)


def completion_kl(
    full: torch.Tensor, signal: TeacherLogits, *, temperature: float = 1.0, top_k_rest: str = "bucket"
) -> torch.Tensor:
    """KL(p || p̂) per row, (n,) float64: p = softmax(full / T) over the vocabulary (full: (n, V) logits),
    p̂ = the distribution `signal` states (dense, or top-k + the rest spread evenly; module docstring)."""
    logp = torch.log_softmax(full.double() / temperature, dim=-1)  # (n, V)
    if signal.weights is not None:  # sampled: KL(w || p) (module docstring)
        w = signal.weights.double()
        return (torch.xlogy(w, w) - w * logp.gather(-1, signal.indices.long())).sum(-1)
    sig = signal_logprobs(signal, temperature, top_k_rest)  # (n, V), (n, k+1) or (n, k)
    if signal.dense is not None:
        return (logp.exp() * (logp - sig)).sum(-1)
    idx = signal.indices.long()
    k, V = idx.shape[-1], logp.shape[-1]
    p = logp.exp()
    top = (p.gather(-1, idx) * (logp.gather(-1, idx) - sig[:, :k])).sum(-1)  # (n,)
    if top_k_rest == "renormalize" or k >= V:
        off = p.sum(-1) - p.gather(-1, idx).sum(-1)
        return torch.where(off > 0, math.inf, top) if k < V else top
    mask = torch.ones_like(p, dtype=torch.bool).scatter_(-1, idx, False)  # the ids off the top k
    p_off = torch.where(mask, p, 0.0)
    rest = (torch.where(mask, p * logp, 0.0)).sum(-1) - p_off.sum(-1) * (sig[:, k] - math.log(V - k))
    return top + rest


def signal_logprobs(signal: TeacherLogits, temperature: float, top_k_rest: str) -> torch.Tensor:
    """`losses.teacher_logprobs` (the loss's convention: the rest's log-mass is tempered like a logit) in
    float64, so that the measurement adds no rounding of its own."""
    if signal.dense is not None:
        return torch.log_softmax(signal.dense.double() / temperature, dim=-1)
    v = signal.values.double()
    if top_k_rest == "renormalize":
        return torch.log_softmax(v / temperature, dim=-1)
    return torch.log_softmax(torch.cat([v, signal.rest.double()[:, None]], -1) / temperature, dim=-1)


def signal_key(cfg: RunConfig) -> Optional[dict]:
    """What decides a cell's teacher signal (None for ce, which reads none)."""
    if cfg.objective.method == "ce":
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
    from hld.data.loader import BatchOrder
    from hld.distill.cache import CachedTeacher
    from hld.distill.cache_meta import cache_identity, signal_identity
    from hld.distill.signals import Needs, OnlineTeacher
    from hld.train.budget import sized_plan
    from hld.train.cache_build import ensure_cache

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
        sig = cached(batch, needs) if cached is not None else full
        mask = batch.mask.reshape(-1)
        for s in range(0, mask.numel(), 64):
            rows = slice(s, min(s + 64, mask.numel()))
            got = sig.logits(rows).top_k(cfg.objective.top_k)  # before `ref`: online logits share one buffer
            ref = full.logits(rows).dense
            kl = completion_kl(ref, got, temperature=cfg.objective.temperature, top_k_rest=cfg.objective.top_k_rest)
            total += float(kl[mask[rows]].sum())
            count += int(mask[rows].sum())
    return {**key, **_ran(cfg), "kl_per_token": total / count, "predictions": count, "window_ids": ids}


def _ran(cfg: RunConfig) -> dict:
    from hld.precision import dtype_name, resolve_dtype

    key = signal_key(cfg)
    return {"signal": describe(key), "teacher_dtype": dtype_name(resolve_dtype(cfg.teacher.dtype))}


def study_fidelity(planned: list, out: Path, resources, done: list[dict], *, quiet: bool = True) -> list[dict]:
    """One entry per distinct signal the study's cells read (what study.json already holds is kept)."""
    entries: list[dict] = []
    for _, cfg, _ in planned:
        key = signal_key(cfg)
        if key is None or any({k: e.get(k) for k in key} == key for e in entries):
            continue
        have = next((e for e in done if {k: e.get(k) for k in key} == key), None)
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
