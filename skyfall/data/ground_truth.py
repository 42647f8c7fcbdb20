"""The schema of a tile's optional ground truth (``gt/``), checked when the tile loads.

The evaluations read ``gt/dsm.json`` + ``gt/dsm.npy`` and the view sets ``gt/views/<set>/`` only when
they first run, minutes into training; these checks read the JSON files and the array and image
headers (never the cells or pixels) so that a malformed file stops a run before it starts, with one
line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from skyfall.data.camera_path import read_camera_path
from skyfall.errors import TileFormatError


def check_gt(tile_dir: str | Path) -> None:
    """Check the optional ground truth of a tile folder, as ``load_tile`` does.

    The evaluations read ``gt/dsm.json`` + ``gt/dsm.npy`` (`check_gt_dsm`) and the
    view sets ``gt/views/<set>/`` (`check_view_set`) only when they first
    run, minutes into training; a malformed file would then stop the run with a KeyError. This
    reads the JSON files and the array and image headers, never the cells or pixels. Nothing to
    check when the tile has no ``gt/``.

    Raises:
        TileFormatError: naming the file and the field.
    """
    if not (Path(tile_dir) / "gt").is_dir():
        return
    check_gt_dsm(tile_dir)
    check_gt_views(tile_dir)


GT_DSM_KEYS = ("x_min", "y_max", "resolution", "width", "height")
"""The georeference fields of ``gt/dsm.json`` (cell (i, j) centre: x_min + (j + .5) res, y_max - (i + .5) res)."""


def read_gt_georef(path: str | Path) -> dict:
    """``gt/dsm.json``, checked: finite numbers ``x_min`` / ``y_max``, ``resolution`` > 0 and positive
    whole ``width`` / ``height``. Other keys (e.g. ``crs``) are kept as they are.

    Raises:
        TileFormatError: naming the file and the missing or invalid field.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TileFormatError(path, None, f"the file cannot be read ({e}).") from e
    except json.JSONDecodeError as e:
        raise TileFormatError(path, f"line {e.lineno}", f"the file is not valid JSON ({e.msg}).") from e
    if not isinstance(doc, dict):
        raise TileFormatError(path, None, "the top level of the file must be a JSON object.")
    for key in GT_DSM_KEYS:
        if key not in doc:
            raise TileFormatError(
                path, key, f"the required field is missing (a DSM georeference has {', '.join(GT_DSM_KEYS)})."
            )
        value = doc[key]
        # bool is an int subclass in Python; true/false are not numbers in a georeference.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TileFormatError(path, key, f"expected a finite number, got {value!r}.")
    if not doc["resolution"] > 0:
        raise TileFormatError(
            path, "resolution", f"the cell size must be positive, got {doc['resolution']!r}."
        )
    for key in ("width", "height"):
        if not (doc[key] > 0 and float(doc[key]).is_integer()):
            raise TileFormatError(path, key, f"expected a positive whole number of cells, got {doc[key]!r}.")
    return doc


def check_gt_dsm(tile_dir: str | Path) -> None:
    """Check the tile's optional ground-truth DSM without reading its cells.

    ``gt/dsm.json`` alone is valid (it gives the tile's extent); ``gt/dsm.npy`` needs it, and its
    shape (read from the .npy header) must be ``height x width`` of the georeference.

    Raises:
        TileFormatError: naming ``gt/dsm.json`` or ``gt/dsm.npy`` and the field.
    """
    root = Path(tile_dir) / "gt"
    npy, js = root / "dsm.npy", root / "dsm.json"
    georef = read_gt_georef(js) if js.is_file() else None
    if not npy.is_file():
        return
    if georef is None:
        raise TileFormatError(npy, None, f"the ground-truth DSM has no georeference {js} next to it.")
    try:
        shape = np.load(npy, mmap_mode="r", allow_pickle=False).shape  # the header only
    except (OSError, ValueError) as e:
        raise TileFormatError(npy, None, f"the file cannot be read as a .npy array ({e}).") from e
    check_shape(npy, shape, georef)


def check_shape(npy: Path, shape: tuple[int, ...], georef: dict) -> None:
    want = (int(georef["height"]), int(georef["width"]))
    if tuple(shape) != want:
        raise TileFormatError(
            npy,
            "shape",
            f"the DSM has shape {'x'.join(map(str, shape))} but dsm.json says height x width {want[0]}x{want[1]}.",
        )


def view_set_images(folder: Path) -> list[Path]:
    """The images of a ground-truth view set, in camera order: ``images/*.png`` then ``*.jpg``, sorted
    by name (the synthetic tiles name them 00000.png, 00001.png, ...)."""
    return sorted((folder / "images").glob("*.png")) + sorted((folder / "images").glob("*.jpg"))


def check_view_set(folder: Path) -> int:
    """Check a ground-truth view set without decoding its images; returns its number of cameras.

    ``camera_path.json`` must parse, ``images/`` must hold one image per camera at the camera path's
    size (read from the file headers), and an optional ``depth/<image stem>.npy`` must be H x W.

    Raises:
        TileFormatError: naming the offending file.
    """
    cp = folder / "camera_path.json"
    try:
        cams = read_camera_path(cp)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # read_camera_path names most problems itself; these are values of the wrong type.
        raise TileFormatError(cp, None, f"the camera path is malformed ({type(e).__name__}: {e}).") from e
    files = view_set_images(folder)
    if len(files) != len(cams):
        raise TileFormatError(
            folder / "images",
            None,
            f"{len(files)} images for the {len(cams)} cameras of {cp}, need one per camera.",
        )
    for f in files:
        try:
            with Image.open(f) as im:
                size = im.size
        except (OSError, SyntaxError, ValueError) as e:
            raise TileFormatError(f, None, f"the image cannot be read ({e}).") from e
        if size != (cams.width, cams.height):
            raise TileFormatError(
                f, "size", f"the image is {size[0]}x{size[1]} but {cp} renders {cams.width}x{cams.height}."
            )
        dp = folder / "depth" / f"{f.stem}.npy"
        if dp.is_file():
            try:
                shape = np.load(dp, mmap_mode="r", allow_pickle=False).shape  # the header only
            except (OSError, ValueError) as e:
                raise TileFormatError(dp, None, f"the file cannot be read as a .npy array ({e}).") from e
            if tuple(shape) != (cams.height, cams.width):
                raise TileFormatError(
                    dp,
                    "shape",
                    f"the depth map has shape {'x'.join(map(str, shape))}, its image is "
                    f"{cams.height}x{cams.width} (HxW).",
                )
    return len(cams)


def check_gt_views(tile_dir: str | Path) -> None:
    """Check every ground-truth view set ``gt/views/<set>/`` (a folder with ``camera_path.json``)."""
    views = Path(tile_dir) / "gt" / "views"
    if not views.is_dir():
        return
    for folder in sorted(p for p in views.iterdir() if (p / "camera_path.json").is_file()):
        check_view_set(folder)
