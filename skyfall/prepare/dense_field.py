"""The dense heights of ``skyfall prepare`` on disk: ``TILE/dense/field.npz``.

The ENU height field itself (heights, match scores, grid), written next to the tile's other files so
that later steps work from it without matching again: ``skyfall.export.stereo`` writes it as a
georeferenced DSM, ``skyfall.eval.stereo`` scores it against a truth DSM, and ``skyfall city
prepare`` joins the tiles' fields into the city's stereo DSM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skyfall.errors import TileFormatError
from skyfall.prepare.dense import DenseHeights
from skyfall.storage.atomic import atomic_write

DENSE_DIR = "dense"
FIELD_FILE = "field.npz"


def field_path(tile: str | Path) -> Path:
    """Where a tile keeps its dense heights."""
    return Path(tile) / DENSE_DIR / FIELD_FILE


def save_field(path: str | Path, field: DenseHeights) -> None:
    """The dense heights on their ENU grid, as an ``.npz`` (atomic; heights and scores as float32)."""
    with atomic_write(path) as f:
        np.savez_compressed(
            f, heights=field.heights.astype(np.float32), score=field.score.astype(np.float32),
            grid=np.array([field.x0, field.y1, field.resolution, field.step], np.float64),
            planes=np.int64(field.planes), lowered=np.float64(field.lowered),
        )  # fmt: skip


def load_field(tile: str | Path) -> DenseHeights | None:
    """``TILE/dense/field.npz`` (None when the tile has none: dense heights off, or an older tile).

    Raises:
        TileFormatError: the file is there but not a field written by ``save_field``.
    """
    path = field_path(tile)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            x0, y1, res, step = (float(v) for v in z["grid"])
            heights, score = z["heights"].astype(np.float64), z["score"].astype(np.float64)
            planes, lowered = int(z["planes"]), float(z["lowered"])
    except (OSError, ValueError, KeyError) as e:
        raise TileFormatError(path, None, f"not a dense height field: {e}") from e
    if heights.ndim != 2 or score.shape != heights.shape or not res > 0:
        raise TileFormatError(path, "heights", "need 2-D heights and scores of one shape and a cell > 0")
    return DenseHeights(heights, score, x0, y1, res, step, planes, lowered)
