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


class Stopped(BaseException):
    """A signal stopped the command: printed as one line `hld: error: <problem> — <fix>`, exit code `code`
    (2 for SIGTERM, as every other stop hld reports; 130 for SIGINT, the shell's). A BaseException, as
    KeyboardInterrupt is: no `except Exception` on its way up (a model loader's "cannot load model", a
    cache's "damaged: rebuild it") can word it as another error, blame a valid path, or swallow it."""

    def __init__(self, problem: str, fix: str = "", code: int = 2) -> None:
        self.problem, self.fix, self.code = problem, fix, code
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


@contextlib.contextmanager
def sigterm_as_error(problem: str, fix: str):
    """SIGTERM raises `Stopped` where the code is, so its cleanup runs and the user gets one line (the
    default action would end the process at once and silently, exit 143, leaving temporary files behind).
    Main thread only (elsewhere a no-op); the previous handler is restored on the way out."""

    def handle(signum, frame):
        raise Stopped(problem, fix)

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, handle) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
