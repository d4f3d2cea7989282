"""The one exception type users see: a problem and its fix, printed as one line, exit code 2."""

from __future__ import annotations

import contextlib
import signal
import threading


class HldError(Exception):
    """A user-facing error: `problem` says what is wrong, `fix` says what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


def one_line(text: str, limit: int = 200) -> str:
    """`text` as one line for an error message: whitespace runs (newlines too) collapsed to a space,
    cut at `limit` characters (a library's message may be a page long)."""
    return " ".join(str(text).split())[:limit]


def exc_line(exc: BaseException, limit: int = 200) -> str:
    """A caught exception as `Type: message`, on one line (`one_line`)."""
    return one_line(f"{type(exc).__name__}: {exc}", limit)


@contextlib.contextmanager
def sigterm_as_error(problem: str, fix: str):
    """SIGTERM raises an HldError where the code is, so its cleanup runs and the user gets one line
    (the default action would end the process at once and silently, leaving temporary files behind).
    Main thread only (elsewhere a no-op); the previous handler is restored on the way out."""

    def handle(signum, frame):
        raise HldError(problem, fix)

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, handle) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
