"""Perplexity protocol (`hld eval`, and `val/ppl` during training):

each document -> its tokens + EOS; documents joined into one stream; the stream cut into
consecutive chunks of `seq_len - 1` tokens, the last partial chunk dropped; window = BOS + chunk;
every position of a window predicts the next token of that window (`seq_len - 1` predictions per
window); ppl = exp(mean NLL over all predictions of all windows) (`hld.data.packing`). The head runs
in token chunks, so memory does not scale with V x T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as tdist

from hld.data.packing import Batch, make_batch
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.signals.online import Backbone, head_of
from hld.distributed import Dist, unsharded
from hld.precision import autocast
from hld.progress import Progress

if TYPE_CHECKING:
    from hld.data.paired import PairedSample, TeacherSide
    from hld.data.store import WindowArray

PPL_BATCH = 8  # windows per forward; perplexity_over_ranks deals batches of this size over the ranks


@torch.no_grad()
def perplexity(
    lm: torch.nn.Module,
    windows: WindowArray | PairedSample | TeacherSide,
    *,
    batch_size: int = PPL_BATCH,
    chunk_tokens: int = 512,
    compute_dtype: torch.dtype = torch.float32,
    progress: Optional[str] = None,
    backbone: Optional[torch.nn.Module] = None,
    after_forward: Optional[Callable[[Batch], None]] = None,
) -> dict:
    """Mean NLL and ppl of `lm` on packed `windows`; `progress` names a progress line (None: silent).
    `backbone` maps ids to final hidden states (default `Backbone(lm)`; a sharded run passes its own).
    `after_forward(batch)` runs after each batch's forward, before its head: for hooks that read the
    forward's layer states (the layer diagnostics, `hld.eval.cka.Diagnostics.from_validation`)."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    backbone = backbone if backbone is not None else Backbone(lm)
    weight, cap = head_of(lm)
    spec = HeadLossSpec(
        ce_weight=1.0,
        softcap=cap,
        chunk_tokens=chunk_tokens,
        matmul_dtype=None if compute_dtype == torch.float32 else compute_dtype,
    )
    nll, count, t0 = 0.0, 0, time.time()
    prog = Progress(len(windows), desc=progress or "eval", quiet=progress is None)
    for start in range(0, len(windows), batch_size):
        stop = start + batch_size
        batch = windows.batch(start, stop) if hasattr(windows, "batch") else make_batch(windows[start:stop])
        ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        with autocast(compute_dtype, device):
            h = backbone(ids)
        if after_forward is not None:
            after_forward(batch)
        total, _ = head_loss(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), (labels != -100).reshape(-1), spec)
        nll += float(total)
        count += int((labels != -100).sum())
        done = min(start + batch_size, len(windows))
        prog.update(done, tokens_per_s=done * windows.shape[1] / max(time.time() - t0, 1e-9))
    prog.close()
    lm.train(was_training)
    return summary(nll, count, windows)


def summary(nll: float, count: int, windows) -> dict:
    """The NLL sum and count as loss and ppl, and bits per character where the windows know their text's
    characters (paired windows, `hld.data.paired.PairedSample`): NLL / ln 2 over the characters their
    predictions spell, comparable across tokenizers."""
    mean = nll / max(count, 1)
    out = {"nll_sum": nll, "tokens": count, "loss": mean, "ppl": math.exp(min(mean, 700.0))}
    chars = getattr(windows, "chars", None)
    if chars is not None:
        out["chars"] = int(chars.sum())
        out["bpc"] = nll / math.log(2) / max(out["chars"], 1)
    return out


def perplexity_over_ranks(
    d: Dist,
    lm: torch.nn.Module,
    windows: WindowArray | PairedSample | TeacherSide,
    *,
    backbone: torch.nn.Module,
    chunk_tokens: int,
    compute_dtype: torch.dtype,
    after_forward: Optional[Callable[[Batch], None]] = None,
) -> dict:
    """`perplexity` with its batches dealt round-robin over the ranks (`after_forward`: one process only). Every batch
    is computed as one process would, and the per-batch sums are added in the same order: the result
    equals the single-process value (bitwise, for the same weights)."""
    kw: dict[str, Any] = dict(chunk_tokens=chunk_tokens, compute_dtype=compute_dtype, batch_size=PPL_BATCH)
    if not d.active:
        return perplexity(lm, windows, after_forward=after_forward, **kw)
    assert after_forward is None, "after_forward sees every batch in one process only"
    n = math.ceil(len(windows) / PPL_BATCH)
    sums = torch.zeros(n, 2, dtype=torch.float64, device=d.device)  # per batch: NLL sum, predictions
    with unsharded(d, backbone):
        for i in range(math.ceil(n / d.world_size)):
            b = d.rank + i * d.world_size
            if b >= n and not d.sharded:
                break
            # fsdp2: a forward is a collective, so every rank runs as many (a spare one repeats batch 0)
            part = windows[b * PPL_BATCH : (b + 1) * PPL_BATCH] if b < n else windows[:PPL_BATCH]
            r = perplexity(lm, part, backbone=backbone if d.sharded else None, **kw)
            if b < n:
                sums[b, 0], sums[b, 1] = r["nll_sum"], r["tokens"]
    tdist.all_reduce(sums)
    nll, count = 0.0, 0
    for b in range(n):  # the order perplexity() adds them in
        nll += float(sums[b, 0])
        count += int(sums[b, 1])
    return summary(nll, count, windows)
