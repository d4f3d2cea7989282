"""Tokenise documents and pack them into fixed-length windows.

The protocol (the same for training, the teacher cache, validation, `hld eval` and studies; the
README states it word for word):
- each document becomes its tokens + EOS (text that spells a special token, e.g. "<bos>", is
  tokenised as ordinary text); documents are joined into one stream;
- the stream is cut into consecutive chunks of `seq_len - 1` tokens; the last partial chunk is
  dropped;
- window = BOS + chunk: **every window starts with BOS**, as Gemma models expect at the start of every
  sequence (without it Gemma 3 270M's held-out loss is ~2.4 nats worse);
- every position of a window predicts the next token of that window (`seq_len - 1` predictions per
  window; an EOS predicts the first token of the next document, as in the usual C4 packing);
  ppl = exp(mean NLL over all predictions).
Attention is not masked at document edges (see docs/decisions.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hld.atomic import write_file
from hld.data.sources import fingerprint, iter_documents
from hld.errors import HldError
from hld.fingerprint import tokenizer_fingerprint
from hld.paths import cache_root

IGNORE = -100  # label of a position that predicts nothing
PROTOCOL = "bos-window-v2"  # names the protocol above; token caches and teacher caches record it


def tokenize_stream(
    docs: Iterable[str], tokenizer, *, eos_id: int, max_docs: Optional[int] = None, batch_docs: int = 256
) -> np.ndarray:
    """One int32 stream: tokens + EOS for every document (the BOS belongs to windows, not documents)."""
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        # split_special_tokens: a document that contains the text "<bos>" must not get a real BOS
        enc = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for ids in enc:
            pieces.append(np.asarray([*ids, eos_id], dtype=np.int32))
        batch.clear()

    for n, doc in enumerate(docs):
        if max_docs is not None and n >= max_docs:
            break
        batch.append(doc)
        if len(batch) == batch_docs:
            flush()
    if batch:
        flush()
    if not pieces:
        raise HldError("the data source holds no document with text", "point data.train/validation at real text")
    return np.concatenate(pieces)


def load_stream(
    spec: str, tokenizer, *, text_field: str = "text", max_docs: Optional[int] = None, use_cache: bool = True
) -> np.ndarray:
    """Tokenised stream of a source, cached on disk (keyed by source files and tokenizer)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise HldError("the tokenizer has no BOS or EOS token", "use a tokenizer that defines both")
    docs = iter_documents(spec, text_field)
    if spec.startswith("hf:") or not use_cache:
        return tokenize_stream(docs, tokenizer, eos_id=eos, max_docs=max_docs)
    key = hashlib.sha256(
        f"{PROTOCOL}|{fingerprint(spec)}|{tokenizer_fingerprint(tokenizer)}|{text_field}|{max_docs}".encode()
    ).hexdigest()[:20]
    # the protocol is in the name too: a stream tokenised under another protocol is never read
    path = cache_root() / "tokens" / f"{PROTOCOL}-{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError):  # EOFError: an empty file (np.load finds no magic)
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    stream = tokenize_stream(docs, tokenizer, eos_id=eos, max_docs=max_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda fh: np.save(fh, stream))
    return stream


def pack_windows(stream: np.ndarray, seq_len: int, *, bos_id: int) -> np.ndarray:
    """(n_windows, seq_len) int64 windows, each BOS + the next `seq_len - 1` stream tokens; the last
    partial chunk is dropped."""
    if seq_len < 2:
        raise HldError(
            f"data.seq_len={seq_len} leaves no prediction in a window (BOS + seq_len-1 tokens)", "use data.seq_len >= 2"
        )
    n = len(stream) // (seq_len - 1)
    if n == 0:
        raise HldError(
            f"the corpus has {len(stream)} tokens, fewer than one window of data.seq_len={seq_len}",
            "add text or lower data.seq_len",
        )
    out = np.empty((n, seq_len), dtype=np.int64)
    out[:, 0] = bos_id
    out[:, 1:] = stream[: n * (seq_len - 1)].reshape(n, seq_len - 1)
    return out


@dataclass
class Batch:
    """A batch of packed windows and their next-token labels."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64; labels[:, i] = input_ids[:, i+1]; last column IGNORE
    window_ids: Optional[torch.Tensor] = None  # (B,) which packed windows these are (the cache's key)

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE  # (B, T) bool

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())

    def split(self, n: int) -> list[Batch]:
        wids = self.window_ids.chunk(n) if self.window_ids is not None else [None] * n
        return [Batch(i, lab, w) for i, lab, w in zip(self.input_ids.chunk(n), self.labels.chunk(n), wids)]

    def truncate(self, length: int) -> Batch:
        """The first `length` positions of every window, with their labels (position length-1 still
        predicts token `length`, which the labels hold): a causal model's outputs on this prefix equal
        its outputs on those positions of the whole window."""
        return Batch(self.input_ids[:, :length], self.labels[:, :length], self.window_ids)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.window_ids)


def make_batch(windows: np.ndarray, *, window_ids: Optional[np.ndarray] = None) -> Batch:
    """Every position predicts the next token of its window; the last position predicts nothing."""
    ids = torch.from_numpy(np.ascontiguousarray(windows)).long()  # (B, T)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    wids = torch.from_numpy(np.asarray(window_ids, dtype=np.int64)) if window_ids is not None else None
    return Batch(ids, labels, wids)
