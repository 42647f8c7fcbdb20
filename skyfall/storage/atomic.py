"""Atomic file writes: the one mechanism every writer of run artefacts uses.

The data goes to a temporary file in the target's folder, is flushed and fsynced, and is then renamed
over the target with ``os.replace`` (atomic on POSIX and Windows within one file system), so a crash
or an exception mid-write never leaves a truncated file under the final name: readers see either
the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it to ``path``.

    Args:
        path: final file name; missing parent folders are created.
        mode: ``"wb"`` (binary, default) or ``"w"`` (text, UTF-8).

    On any exception the temporary file is deleted and ``path`` (if it existed) is left untouched.
    The temporary name starts with a dot and ends in ``.tmp`` (`is_temp_name`), so it never matches
    a checkpoint or output pattern. The final file gets the permissions of any file the user creates
    (0666 less the umask), not ``mkstemp``'s private 0600.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself (best effort: not every platform can open a directory).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of `atomic_write`'s temporary files."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temp(folder: str | Path, *, recursive: bool = False) -> int:
    """Delete `atomic_write` temporary files left in ``folder`` by a killed process; returns how many.

    Only for folders whose writers the caller excludes (a run folder under its lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    n = 0
    for p in found:
        if p.is_file() and is_temp_name(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)
