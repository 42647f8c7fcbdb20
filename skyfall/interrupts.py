"""Stopping on SIGINT, SIGTERM and SIGHUP without losing work.

The CLI installs `handlers` for the whole command. Inside a training loop (`deferred`) a signal only
marks a stop as pending: the loop finishes its step, saves a checkpoint and raises `StopRequested`
(`Trainer.train`). Anywhere else the handler raises `StopRequested` at once; every artefact is
written atomically, so nothing complete is lost. A second signal while a stop is pending stops at
once. The CLI exits with 128 + the signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as shells do.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = tuple(
    s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s
)

_deferring = 0
_pending: int | None = None


class StopRequested(BaseException):
    """A signal asked the command to stop (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it)."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        self.detail = detail
        super().__init__(f"{signal_name(signum)}{': ' + detail if detail else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handle(signum: int, frame: object) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        print(
            f"\nskyfall: {signal_name(signum)} received; stopping after this step with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise StopRequested(signum)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Install the handlers for the ``with`` block (main thread only; elsewhere a no-op)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _pending = None
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals inside the block only mark a stop as pending (see `pending`)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def pending() -> int | None:
    """The signal number of a pending stop, or None."""
    return _pending


def clear() -> None:
    """Forget a pending stop (tests)."""
    global _pending
    _pending = None
