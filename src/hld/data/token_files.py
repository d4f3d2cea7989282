"""Flat token files from other tools as a source: `tokens:PATH` (a 1-D integer `.npy`, e.g. dolma's or
nanoGPT's) or `tokens:PATH:DTYPE` (a raw `.bin` of little-endian ids: `uint16`, `uint32` or `int32`,
e.g. nanoGPT's `train.bin`), PATH a file or a glob (files sorted by name, one unit each), documents
separated by the tokenizer's EOS. The ids are copied into a token store (`hld.data.tokenize`) as they
are, checked against the run's tokenizer on the way: a negative id or one outside its vocabulary is
refused, and a file whose last document has no closing EOS gets one (counted as repaired). Whether the
ids come from the run's tokenizer the file cannot say: that is the user's claim, recorded in the
store's identity like any other source's.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hld.errors import HldError
from hld.files import regular_file
from hld.fingerprint import files_fingerprint

DTYPES = {"uint16": "<u2", "uint32": "<u4", "int32": "<i4"}
BLOCK = 1 << 24  # ids copied at a time (64 MB as uint32)


def is_token_file(spec: str) -> bool:
    return spec.startswith("tokens:")


def _parse(spec: str) -> tuple[str, str | None]:
    body = spec[len("tokens:") :]
    path, sep, dtype = body.rpartition(":")
    if sep and dtype in DTYPES:
        return path, dtype
    return body, None


def files(spec: str) -> list[Path]:
    pattern, dtype = _parse(spec)
    found = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()))) or [Path(pattern)]
    for f in found:
        if not os.path.lexists(f):
            raise HldError(f"token file source {spec!r} matches no file", "give an existing .npy or .bin path")
        regular_file(f, "token file", "give a regular .npy or .bin file (never a device, FIFO or directory)")
        if f.suffix == ".npy" and dtype is not None:
            raise HldError(
                f"{f} is a .npy file: its header holds its dtype", f"write tokens:{pattern} without :{dtype}"
            )
        if f.suffix != ".npy" and dtype is None:
            raise HldError(
                f"{f} is a raw token file: its dtype cannot be read from it",
                f"name it: tokens:{pattern}:uint16 (or {', '.join(d for d in DTYPES if d != 'uint16')})",
            )
    return found


def fingerprint(spec: str) -> str:
    return files_fingerprint(files(spec), hashlib.sha256(spec.encode()))


def _open(spec: str, f: Path) -> np.ndarray:
    _, dtype = _parse(spec)
    try:
        arr = np.load(f, mmap_mode="r") if dtype is None else np.memmap(f, dtype=DTYPES[dtype], mode="r")
    except (OSError, ValueError) as exc:
        raise HldError(
            f"cannot read the token file {f}: {exc}", "give a 1-D integer .npy or a raw .bin of ids"
        ) from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise HldError(
            f"{f} holds a {arr.ndim}-D {arr.dtype} array, not a 1-D array of integer ids",
            "save the ids as one flat integer array",
        )
    return arr


def iter_unit(spec: str, index: int, *, eos_id: int, vocab_size: int, counts: dict) -> Iterator[np.ndarray]:
    """uint32 blocks of file `index`'s ids (+ a closing EOS if its last document lacks one); `counts`
    gains "docs" (EOS count) and "repaired"."""
    f = files(spec)[index]
    arr = _open(spec, f)
    last = None
    for start in range(0, len(arr), BLOCK):
        block = np.asarray(arr[start : start + BLOCK])
        lo, hi = int(block.min()), int(block.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise HldError(
                f"{f} holds id {bad}, outside the tokenizer's vocabulary (0..{vocab_size - 1})",
                "give ids made by the run's tokenizer (teacher.model), or re-tokenise the text with hld tokenize",
            )
        counts["docs"] = counts.get("docs", 0) + int((block == eos_id).sum())
        last = int(block[-1])
        yield block.astype(np.uint32)
    if last is not None and last != eos_id:
        counts["docs"] = counts.get("docs", 0) + 1
        counts["repaired"] = counts.get("repaired", 0) + 1
        yield np.asarray([eos_id], dtype=np.uint32)
