"""Tokenise documents and pack them into fixed-length windows.

The protocol (the same for training, the teacher cache, validation, `hld eval` and studies; the
README states it in short; docs/runs.md has the BOS measurement):
- each document becomes its tokens + EOS (text that spells a special token, e.g. "<bos>", is
  tokenised as ordinary text); documents are joined into one stream;
- the stream is cut into consecutive chunks of `seq_len - 1` tokens; the last partial chunk is
  dropped;
- window = BOS + chunk: **every window starts with BOS**, as Gemma models expect at the start of every
  sequence (what dropping it costs the teacher: docs/runs.md);
- every position of a window predicts the next token of that window (`seq_len - 1` predictions per
  window; an EOS predicts the first token of the next document, as in the usual C4 packing);
  ppl = exp(mean NLL over all predictions).
Attention is not masked at document edges (see docs/decisions.md).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from hld.errors import HldError

IGNORE = -100  # label of a position that predicts nothing
_SURROGATE = re.compile("[\ud800-\udfff]")  # code points UTF-8 cannot hold
PROTOCOL = "bos-window-v2"  # names the protocol above; token caches and teacher caches record it


def encode_batches(
    docs: Iterable[str], tokenizer, *, eos_id: int, counts: dict, batch_docs: int = 256
) -> Iterator[np.ndarray]:
    """uint32 arrays of tokens + EOS per document (the BOS belongs to windows, not documents), a batch of
    documents at a time; `counts` gains "docs" and "repaired". A document with lone surrogates (JSON can
    spell them, UTF-8 cannot hold them) is repaired (each becomes U+FFFD) and counted, not a crash."""
    batch: list[str] = []

    def flush() -> np.ndarray:
        # split_special_tokens: a document that contains the text "<bos>" must not get a real BOS
        enc = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        counts["docs"] = counts.get("docs", 0) + len(batch)
        batch.clear()
        return np.concatenate([np.asarray([*ids, eos_id], dtype=np.uint32) for ids in enc])

    for doc in docs:
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            doc = _SURROGATE.sub("\ufffd", doc)
            counts["repaired"] = counts.get("repaired", 0) + 1
        batch.append(doc)
        if len(batch) == batch_docs:
            yield flush()
    if batch:
        yield flush()


def tokenize_stream(
    docs: Iterable[str], tokenizer, *, eos_id: int, max_docs: Optional[int] = None, batch_docs: int = 256
) -> np.ndarray:
    """One int32 stream in memory: tokens + EOS for every document (what a token store's shards hold,
    concatenated; used for small inputs and as the store's reference in tests)."""
    docs = itertools.islice(docs, max_docs) if max_docs is not None else docs
    pieces = list(encode_batches(docs, tokenizer, eos_id=eos_id, counts={}, batch_docs=batch_docs))
    if not pieces:
        raise HldError("the data source holds no document with text", "point data.train/validation at real text")
    return np.concatenate(pieces).astype(np.int32)


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
    # the target count, taken on the host before `to` moves the batch: counting on the device would
    # read the sum back (a host sync per micro-batch on a GPU)
    host_n_targets: Optional[int] = field(default=None, repr=False, compare=False)
    host_input_ids: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)  # before `to`
    # a teacher with another tokenizer (`student.tokenizer`, hld.data.paired): the teacher's rows of the same
    # text (B, T_teacher) int64, and each window's alignment (hld.data.align.Alignment, bounds into its rows;
    # hld.distill.cross_tok.chunks.Chunks reads them). None: the teacher reads `input_ids`
    teacher_ids: Optional[torch.Tensor] = None
    alignments: Optional[list] = field(default=None, repr=False, compare=False)

    def input_ids_on_host(self) -> torch.Tensor:
        """The tokens in host memory: kept by `to`, so a check against them reads nothing back."""
        return self.host_input_ids if self.host_input_ids is not None else self.input_ids.cpu()

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE  # (B, T) bool

    @property
    def n_targets(self) -> int:
        if self.host_n_targets is None:
            self.host_n_targets = int(self.mask.sum())
        return self.host_n_targets

    @property
    def paired(self) -> bool:
        """Does the teacher read other tokens than the student (a teacher with another tokenizer)?"""
        return self.teacher_ids is not None

    @property
    def teacher_mask(self) -> torch.Tensor:
        """(B, T_teacher) bool: the teacher's positions that hold its window's tokens (not padding); without
        paired windows every position (the teacher reads the student's rows, which hold no padding)."""
        if not self.paired:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        assert self.teacher_ids is not None and self.alignments is not None
        lengths = torch.tensor([int(al.teacher_bounds[-1]) for al in self.alignments], device=self.teacher_ids.device)
        return torch.arange(self.teacher_ids.shape[1], device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)

    def first(self, n: int) -> Batch:
        """The batch's first n windows."""
        wids = self.window_ids[:n] if self.window_ids is not None else None
        teacher = self.teacher_ids[:n] if self.teacher_ids is not None else None
        als = self.alignments[:n] if self.alignments is not None else None
        return Batch(self.input_ids[:n], self.labels[:n], wids, teacher_ids=teacher, alignments=als)

    def split(self, n: int) -> list[Batch]:
        wids = self.window_ids.chunk(n) if self.window_ids is not None else [None] * n
        parts = zip(self.input_ids.chunk(n), self.labels.chunk(n), wids)
        if not self.paired:
            return [Batch(i, lab, w) for i, lab, w in parts]
        assert self.alignments is not None and self.teacher_ids is not None
        size = -(-self.input_ids.shape[0] // n)  # torch.chunk's rows per part
        return [
            Batch(i, lab, w, teacher_ids=t, alignments=self.alignments[k * size : (k + 1) * size])
            for k, ((i, lab, w), t) in enumerate(zip(parts, self.teacher_ids.chunk(n)))
        ]

    def truncate(self, length: int) -> Batch:
        """The first `length` positions of every window, with their labels (position length-1 still
        predicts token `length`, which the labels hold): a causal model's outputs on this prefix equal
        its outputs on those positions of the whole window. Not for paired windows (a chunk would be cut:
        their runs end on whole steps, `hld.train.budget`)."""
        if self.paired:
            raise ValueError("a batch of paired windows cannot be cut inside its windows")
        return Batch(self.input_ids[:, :length], self.labels[:, :length], self.window_ids)

    def to(self, device: torch.device) -> Batch:
        host = self.input_ids if self.input_ids.device.type == "cpu" else None
        teacher = self.teacher_ids.to(device) if self.teacher_ids is not None else None
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.window_ids,
            self.n_targets,
            host,
            teacher_ids=teacher,
            alignments=self.alignments,
        )


def make_batch(windows: np.ndarray, *, window_ids: Optional[np.ndarray] = None) -> Batch:
    """Every position predicts the next token of its window; the last position predicts nothing."""
    ids = torch.from_numpy(np.ascontiguousarray(windows)).long()  # (B, T)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    wids = torch.from_numpy(np.asarray(window_ids, dtype=np.int64)) if window_ids is not None else None
    return Batch(ids, labels, wids)


def make_paired_batch(rows, *, window_ids: Optional[np.ndarray] = None) -> Batch:
    """A batch of paired windows (`hld.data.paired.PairedRows`): the student's rows are `input_ids`, each
    position predicting the next token of its window up to the window's last (the padding after it
    predicts nothing and is not predicted); the teacher's rows of the same text ride along as
    `teacher_ids`, with the windows' alignments."""
    ids = torch.from_numpy(np.ascontiguousarray(rows.student_ids)).long()  # (B, T)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    lengths = torch.as_tensor(np.asarray(rows.student_lengths), dtype=torch.int64)  # (B,)
    labels[torch.arange(ids.shape[1]).unsqueeze(0) >= (lengths - 1).unsqueeze(1)] = IGNORE
    wids = torch.from_numpy(np.asarray(window_ids, dtype=np.int64)) if window_ids is not None else None
    teacher = torch.from_numpy(np.ascontiguousarray(rows.teacher_ids)).long()
    return Batch(ids, labels, wids, teacher_ids=teacher, alignments=list(rows.alignments))
