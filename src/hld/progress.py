"""Progress of long work on stderr: a tqdm bar on a terminal, a line every `every_s` seconds
otherwise, nothing when quiet. Shows step, tokens/s, loss and ETA."""

from __future__ import annotations

import sys
import time
from typing import Optional

BAR_EVERY_S = 0.5  # a terminal's bar redraws at most this often (and reads the loss back only then)


class Progress:
    def __init__(
        self,
        total: int,
        *,
        desc: str,
        quiet: bool = False,
        every_s: float = 15.0,
        initial: int = 0,
        stream=None,
        unit: str = "step",
        rate_unit: str = "tok",
    ) -> None:
        self.total, self.desc, self.quiet, self.every_s, self.unit = total, desc, quiet, every_s, unit
        self.rate_unit = rate_unit  # what `tokens_per_s` counts (tok; chars where no tokens exist yet)
        self.stream = stream  # None: sys.stderr at the time of each write
        self.start = time.time()
        self.initial = initial
        self.last_print = 0.0  # when a line was printed or the bar redrawn
        self.bar = None
        if not quiet and (stream or sys.stderr).isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                leave=False,
                file=stream or sys.stderr,
            )

    def due(self, done: int) -> bool:
        """Would `update(done)` show something now? (A training loop reads the step's loss back from the
        device only then.)"""
        if self.quiet:
            return False
        every_s = BAR_EVERY_S if self.bar is not None else self.every_s
        return time.time() - self.last_print >= every_s or done >= self.total

    def update(self, done: int, *, tokens_per_s: float, loss: Optional[float] = None) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.last_print = time.time()
            self.bar.n = done
            post = {f"{self.rate_unit}/s": f"{tokens_per_s:,.0f}"}
            if loss is not None:
                post["loss"] = f"{loss:.3f}"
            self.bar.set_postfix(post, refresh=True)
            return
        now = time.time()
        if now - self.last_print < self.every_s and done < self.total:
            return
        self.last_print = now
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        loss_s = f" loss {loss:.3f}" if loss is not None else ""
        rate_s = f"{tokens_per_s:,.0f} {self.rate_unit}/s"
        print(
            f"[{self.desc}] {self.unit} {done}/{self.total} {rate_s}{loss_s} ETA {eta:,.0f}s",
            file=self.stream or sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
