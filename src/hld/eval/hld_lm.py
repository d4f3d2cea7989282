"""The harness's model: lm-eval's `HFLM` with our tokenisation and progress line (see
`hld.eval.harness`'s docstring). lm-eval is optional: this module imports it, so import this module
only where lm-eval is required (`harness.evaluate_tasks` does, after checking it is installed)."""

from __future__ import annotations

import time
from typing import Optional

import torch
from lm_eval.models.huggingface import HFLM

from hld.distill.signals.online import Backbone
from hld.precision import default_device
from hld.progress import Progress

ROLLING_LEN = 512  # the rolling log-likelihood window when the caller names none (`hld eval --seq-len`)

# families whose logits are lm_head(final hidden state), soft-capped when the config says so
PLAIN_HEAD = frozenset({"gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"})


class HldLM(HFLM):
    """HFLM with our tokenisation (one BOS, BOS-led rolling windows), a head run on continuation
    positions only, and our progress line."""

    def __init__(
        self,
        *,
        model,
        tokenizer,
        batch_size: int,
        device,
        quiet: bool,
        desc: str,
        stream,
        rolling_len: int = ROLLING_LEN,
    ) -> None:
        device = torch.device(device) if device is not None else default_device()
        model.to(device)
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), add_bos_token=True
        )
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._rolling = False
        self.rolling_len = rolling_len
        self._cont_len: dict = {}
        self.progress = Progress(0, desc=desc, quiet=True)
        self._quiet, self._desc, self._stream = quiet, desc, stream

    # one BOS, never a tokenizer's other special tokens; none inside rolling windows
    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None, **kwargs
    ) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        bos = add_special_tokens if add_special_tokens is not None else not self._rolling
        if bos:
            ids = [self.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._start(len(requests))
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Sum of log-likelihoods of each document over disjoint BOS-led windows: the
        document's tokens in chunks of rolling_len - 1, each scored after one BOS."""
        self._start(len(requests))
        self._rolling = True
        try:
            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                ids = self.tok_encode(string)  # no BOS: self._rolling
                for s in range(0, len(ids), self.rolling_len - 1):
                    windows.append((None, [self.bos_id], ids[s : s + self.rolling_len - 1]))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for s in range(0, len(windows), self.batch_size):
                part = windows[s : s + self.batch_size]
                for i, (ll, _) in zip(
                    owner[s : s + len(part)], self._loglikelihood_tokens(part, override_bs=len(part))
                ):
                    totals[i] += ll
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
            return totals
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # the continuation length of every input row the harness will build, so that
        # _model_call can run the (vocabulary-wide) head on continuation positions only
        self._cont_len = {}
        for _, ctx, cont in requests:
            key = tuple((ctx + cont)[-(self.max_length + 1) :][:-1])
            self._cont_len[key] = max(self._cont_len.get(key, 0), len(cont))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
        finally:
            self._cont_len = {}

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is None and labels is None and self.model.config.model_type in PLAIN_HEAD:
            logits = self._continuation_logits(inps)
        else:
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)  # (B, T, V)
        self._rows += inps.shape[0]
        self._tokens += inps.numel()
        rate = self._tokens / max(time.time() - self._t0, 1e-9)
        self.progress.update(min(self._rows, self.progress.total), tokens_per_s=rate)
        return logits

    @torch.no_grad()
    def _continuation_logits(self, inps: torch.Tensor) -> torch.Tensor:
        """The model's logits where the harness reads them — each row's continuation — in
        a suffix of the positions, zeros elsewhere: with Gemma's 262k vocabulary the head is
        most of a forward's FLOPs and the (B, T, V) logits most of its memory. The harness
        aligns logits to the end of the input (`ctx_len = inplen + logits_len - padded_len`),
        so the suffix from the batch's earliest continuation suffices."""
        hidden = Backbone(self.model)(inps)  # (B, T, D)
        spans = [self._continuation_span(row) for row in inps.tolist()]
        start = min(lo for lo, _ in spans)
        keep = torch.zeros(inps.shape[0], inps.shape[1] - start, dtype=torch.bool, device=inps.device)
        for r, (lo, hi) in enumerate(spans):
            keep[r, lo - start : hi - start] = True  # (B, T - start)
        picked = self.model.get_output_embeddings()(hidden[:, start:][keep])  # (N, V)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            picked = torch.tanh(picked / cap) * cap
        logits = picked.new_zeros(*keep.shape, picked.shape[-1])  # (B, T - start, V)
        logits[keep] = picked
        return logits

    def _continuation_span(self, row: list[int]) -> tuple[int, int]:
        """Positions [lo, hi) whose logits the harness reads in a right-padded row ((0, T):
        unknown, compute all). Padding is 0s, which may also be real tokens: try every length."""
        end = len(row)
        while end > 0 and row[end - 1] == 0:
            end -= 1
        hits = [
            (n - self._cont_len[key], n)
            for n in range(max(end, 1), len(row) + 1)
            if (key := tuple(row[:n])) in self._cont_len
        ]
        if not hits:
            return 0, len(row)
        return max(min(lo for lo, _ in hits), 0), max(hi for _, hi in hits)

    def _start(self, total: int) -> None:
        self.progress.close()
        self.progress = Progress(total, desc=self._desc, quiet=self._quiet, stream=self._stream)
        self._rows, self._tokens, self._t0 = 0, 0, time.time()
