"""The teacher cache's encoding, overlapped with the teacher's forward: a build hands each batch's
encode (and each shard's final encode and commit) to one background thread, in order, and runs the
next batch's forward meanwhile. One worker, first in first out: every write reaches the part files in
exactly the order a serial build makes it, so the cache is byte-identical (tested); at most `depth`
calls wait, which bounds the host memory their tensors hold. An error in the thread is raised in the
building thread at its next call (or at `drain`), and nothing after it is written."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class OrderedEncoder:
    def __init__(self, *, overlap: bool = True, depth: int = 4) -> None:
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hld-cache-encode") if overlap else None
        self.pending: deque[Future] = deque()
        self.failed = False  # set by the thread at its first error: the calls queued after it are skipped

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
        """Run `fn(*args, **kwargs)` after every call submitted before it (now, when not overlapping)."""
        if self.pool is None:
            fn(*args, **kwargs)
            return
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.depth):
            self.pending.popleft().result()  # raises the thread's error here
        self.pending.append(self.pool.submit(self._run, fn, args, kwargs))

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if self.failed:  # an earlier call failed: writing this one would leave a gap in the part files
            raise RuntimeError("skipped after an earlier encode error")
        try:
            fn(*args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    def drain(self) -> None:
        """Wait for every submitted call; the first error among them is raised."""
        while self.pending:
            self.pending.popleft().result()  # FIFO: the first error is met before the skips it caused

    def close(self) -> None:
        """Stop the thread: queued calls not yet started are dropped, the running one is waited for."""
        if self.pool is not None:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()

    # a shard writer seen through the encoder: `put` goes to the thread (as `_fill_shard` calls it)
    def writer(self, shard) -> Deferred:
        return Deferred(self, shard)


class Deferred:
    def __init__(self, encoder: OrderedEncoder, shard) -> None:
        self.encoder, self.shard = encoder, shard
        self.layers = shard.layers

    def put(self, b: int, **arrays) -> None:
        self.encoder.submit(self.shard.put, b, **arrays)
