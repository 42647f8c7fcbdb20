"""Atomic, ``weights_only``-loadable training checkpoints.

[FIX] Skyfall-GS's ``GaussianModel.capture`` checkpoint leaves out ``filter_3D`` (it is only in the
PLY, and ``load_ply`` does not restore it), so resuming is broken; here the checkpoint holds the
filter and the appearance state too.

A checkpoint is one ``torch.save`` file holding only tensors, dicts, lists, tuples, numbers, strings,
bools and None, so it loads with ``torch.load(path, weights_only=True)`` (no pickled code). Typical
payload: ``{"step", "config" (plain dict), "model" (GaussianModel.state_dict(), incl. Adam states and
filter_3d), "appearance", "rng" (capture_rng_state())}``.

Files are named ``ckpt_{step:06d}.pt`` and written with `skyfall.storage.atomic.atomic_write`
(temporary file in the same folder, fsync, ``os.replace``), so a crash mid-write never leaves a
truncated file under a checkpoint name. Each has a ``ckpt_{step:06d}.pt.sha256`` beside it
(``sha256sum -c`` format), written before the checkpoint is renamed into place, so a flipped byte
(disk or copy damage) is detected at load. Loading the latest checkpoint falls back to the newest
one that verifies and loads (`load_latest_checkpoint`), with a warning naming the damaged ones.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfall.errors import SkyfallError
from skyfall.storage.atomic import atomic_write, atomic_write_text

CHECKPOINT_RE = re.compile(r"ckpt_(\d+)\.pt")
"""Full-match pattern of checkpoint file names; the group is the step."""

_PLAIN_SCALARS = (bool, int, float, str, type(None), torch.dtype)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``directory / ckpt_{step:06d}.pt``."""
    return Path(directory) / f"ckpt_{step:06d}.pt"


def _check_plain(obj: Any, where: str = "payload") -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, containers, numbers and strings "
        "(store state_dicts and plain-dict configs)"
    )


class CheckpointError(SkyfallError):
    """A checkpoint that cannot be used (damaged, truncated, not a skyfall checkpoint), or none at all."""


class _HashingWriter:
    """A file wrapper for ``torch.save`` that hashes what it writes and keeps the first OSError.

    ``torch.save`` turns a failed write (a full disk) into an opaque RuntimeError; the kept error
    lets the caller report the real one (errno, file name).
    """

    def __init__(self, f: Any, name: Path):
        self.f, self.name = f, name
        self.sha = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(memoryview(data)[:n] if n is not None else data)
        return len(data) if n is None else n

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: str | Path) -> Path:
    """The ``.sha256`` file beside a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` with its checksum file (see the module docstring)."""
    _check_plain(payload)
    path = Path(path)
    with atomic_write(path) as f:
        w = _HashingWriter(f, path)
        try:
            torch.save(payload, w)
        except (RuntimeError, OSError):
            if w.error is not None:  # report the write that failed, naming the checkpoint
                err = w.error
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise
        # Before the rename: a checkpoint under its final name always has its checksum beside it.
        atomic_write_text(checksum_path(path), f"{w.sha.hexdigest()}  {path.name}\n")
    return path


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and its checksum file."""
    path = Path(path)
    for p in (path, checksum_path(path)):
        p.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors on ``map_location``).

    With ``verify`` the file must match its ``.sha256`` (when it has one), load, and be a skyfall
    checkpoint (a dict with ``step`` and ``model``; the step its name says); otherwise
    `CheckpointError` says which.
    """
    path = Path(path)
    if verify:
        side = checksum_path(path)
        if side.is_file():
            want = side.read_text().split()[:1]
            if not want or want[0] != _sha256(path):
                raise CheckpointError(f"{path}: damaged (its content does not match {side.name})")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first[:160]})") from None
    if verify:
        if not isinstance(st, dict) or "model" not in st or "step" not in st:
            raise CheckpointError(f"{path}: not a skyfall checkpoint (no 'step'/'model' entries)")
        m = CHECKPOINT_RE.fullmatch(path.name)
        if m and int(st["step"]) != int(m.group(1)):
            raise CheckpointError(f"{path}: holds step {int(st['step'])}, not the step its name says")
    return st


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint's file name says (ValueError for a name that is not ``ckpt_<step>.pt``)."""
    m = CHECKPOINT_RE.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint name (ckpt_<step>.pt)")
    return int(m.group(1))


def checkpoints(directory: str | Path) -> list[Path]:
    """The ``ckpt_<step>.pt`` files of ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_RE.fullmatch(p.name) and p.is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``ckpt_<step>.pt`` in ``directory`` with the largest step, or None if there is none."""
    found = checkpoints(directory)
    return found[-1] if found else None


def load_latest_checkpoint(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    set_aside: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``directory`` that verifies and loads, and its payload.

    Damaged ones are skipped with a warning on stderr; with ``set_aside`` (a run about to continue
    training) they are renamed to ``*.damaged`` so that they neither block nor count as kept
    checkpoints. Raises `CheckpointError` when there is no checkpoint or none loads.
    """
    found = checkpoints(directory)
    if not found:
        raise CheckpointError(f"{directory}: no checkpoint (ckpt_NNNNNN.pt)")
    problems = []
    for path in reversed(found):
        try:
            st = load_checkpoint(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            if set_aside:
                for p in (path, checksum_path(path)):
                    if p.exists():
                        os.replace(p, p.with_name(p.name + ".damaged"))
            continue
        for msg in problems:
            print(f"skyfall: warning: {msg}; using {path.name}", file=sys.stderr, flush=True)
        return path, st
    raise CheckpointError(f"{directory}: no checkpoint loads ({'; '.join(problems)})")


# ---------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy (legacy global) and Python ``random`` states as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only when as many devices exist."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("torch_cuda", [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
