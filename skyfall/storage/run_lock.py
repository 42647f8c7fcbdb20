"""The exclusive lock that makes a run folder one run's while it trains.

``RUN/.lock`` is locked with ``flock`` (released by the kernel when the process ends, however it
ends, so a killed run never leaves a stale lock) and holds the owner's PID, which a second process
names in its error. Re-entrant within one process: ``train all`` holds it across both stages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from skyfall.errors import SkyfallError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against a second process
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

_held: dict[Path, tuple[int, int]] = {}
"""Locked run folders of this process: resolved path -> (fd, depth)."""


class RunInUseError(SkyfallError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[Path]:
    """Hold ``root``'s lock (creating the folder) for the ``with`` block; yields the lock file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = root.resolve()
    lock_file = root / LOCK_NAME
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield lock_file
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                raise RunInUseError(
                    f"{root}: in use by another skyfall process (PID {holder}); wait for it to finish "
                    "or stop it, or choose another run folder"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = (fd, 1)
        try:
            yield lock_file
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
