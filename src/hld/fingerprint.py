"""Identities of the things caches and manifests must match: files, tokenizers, token windows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: its vocabulary (pieces and ids) and special tokens."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    h.update(f"bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def windows_fingerprint(windows: np.ndarray) -> str:
    """Identity of packed token windows (their content and shape)."""
    arr = np.ascontiguousarray(windows, dtype=np.int32)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()[:20]
