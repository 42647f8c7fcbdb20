"""Reader for COLMAP's text point cloud (``points3D.txt``), the initial point cloud of a tile.

Format, one point per line: ``POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX)...``;
lines starting with ``#`` are comments. Only the first eight columns are read, so tracks of any
length (including none) are fine.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from skyfall.errors import TileFormatError

_N_COLUMNS = 8  # ID X Y Z R G B ERROR


def read_points3d_text(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a COLMAP ``points3D.txt``.

    Args:
        path: the text file.

    Returns:
        xyz: [P, 3] float64 positions; rgb: [P, 3] uint8 colours; errors: [P] float64 reprojection errors.

    Raises:
        TileFormatError: the file is missing or unreadable, holds no points, or has a malformed line
            (the field is ``"line N"``, 1-based), a colour outside 0..255 or a non-finite position.
    """
    path = Path(path)
    if not path.is_file():
        raise TileFormatError(path, None, "the point cloud file does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            # numpy's C parser reads only the first columns (usecols), so tracks of any length pass.
            table = np.loadtxt(
                path, usecols=range(_N_COLUMNS), comments="#", dtype=np.float64, ndmin=2, encoding="utf-8"
            )
    except ValueError as e:
        _raise_first_bad_line(path)
        raise TileFormatError(path, None, f"the point cloud file cannot be parsed ({e}).") from e
    except (OSError, UnicodeDecodeError) as e:
        raise TileFormatError(path, None, f"the point cloud file cannot be read as text ({e}).") from e
    if len(table) == 0:
        raise TileFormatError(path, None, "the point cloud file contains no points.")

    xyz = table[:, 1:4]
    rgb = table[:, 4:7]
    bad_xyz = ~np.isfinite(xyz).all(axis=1)
    bad_rgb = ~((rgb >= 0) & (rgb <= 255) & (rgb == np.round(rgb))).all(axis=1)
    if bad_xyz.any() or bad_rgb.any():
        row = int(np.argmax(bad_xyz | bad_rgb))
        where = f"line {_data_line_numbers(path)[row]}"
        if bad_xyz[row]:
            raise TileFormatError(path, where, "the point position X Y Z is not finite.")
        raise TileFormatError(path, where, "the colour R G B must be integers in 0..255.")
    return np.ascontiguousarray(xyz), rgb.astype(np.uint8), np.ascontiguousarray(table[:, 7])


def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, first columns) of every data line, skipping blanks and ``#`` comments."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            content = line.split("#", 1)[0].strip()
            if content:
                out.append((number, content.split(None, _N_COLUMNS)[:_N_COLUMNS]))
    return out


def _data_line_numbers(path: Path) -> list[int]:
    return [number for number, _ in _data_lines(path)]


def _raise_first_bad_line(path: Path) -> None:
    """Slow path, on parse errors only: name the first malformed line."""
    for number, tokens in _data_lines(path):
        if len(tokens) < _N_COLUMNS:
            raise TileFormatError(
                path,
                f"line {number}",
                f"expected at least {_N_COLUMNS} columns (ID X Y Z R G B ERROR), found {len(tokens)}.",
            )
        for column, token in enumerate(tokens):
            try:
                float(token)
            except ValueError:
                raise TileFormatError(
                    path, f"line {number}", f"column {column + 1} value {token!r} is not a number."
                ) from None
