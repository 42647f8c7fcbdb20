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
truncated file under a checkpoint name.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfall.storage.atomic import atomic_write

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


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` (see the module docstring); returns the path."""
    _check_plain(payload)
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors on ``map_location``)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``ckpt_<step>.pt`` in ``directory`` with the largest step, or None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in directory.iterdir():
        m = CHECKPOINT_RE.fullmatch(p.name)
        if m and p.is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return None if best is None else best[1]


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
