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
from typing import TYPE_CHECKING, Optional

import torch

from hld.data.packing import make_batch
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.signals import Backbone, head_of
from hld.precision import autocast
from hld.progress import Progress

if TYPE_CHECKING:
    from hld.data.store import WindowArray

PPL_BATCH = 8  # windows per forward; distributed.perplexity deals batches of this size over the ranks


@torch.no_grad()
def perplexity(
    lm: torch.nn.Module,
    windows: WindowArray,
    *,
    batch_size: int = PPL_BATCH,
    chunk_tokens: int = 512,
    compute_dtype: torch.dtype = torch.float32,
    progress: Optional[str] = None,
    backbone: Optional[torch.nn.Module] = None,
) -> dict:
    """Mean NLL and ppl of `lm` on packed `windows`; `progress` names a progress line (None: silent).
    `backbone` maps ids to final hidden states (default `Backbone(lm)`; a sharded run passes its own)."""
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
        batch = make_batch(windows[start : start + batch_size])
        ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        with autocast(compute_dtype, device):
            h = backbone(ids)
        total, _ = head_loss(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), (labels != -100).reshape(-1), spec)
        nll += float(total)
        count += int((labels != -100).sum())
        done = min(start + batch_size, len(windows))
        prog.update(done, tokens_per_s=done * windows.shape[1] / max(time.time() - t0, 1e-9))
    prog.close()
    lm.train(was_training)
    mean = nll / max(count, 1)
    return {"nll_sum": nll, "tokens": count, "loss": mean, "ppl": math.exp(min(mean, 700.0))}
