"""Merging per-tile results into one city: Gaussian splats, DSMs, and the seams between cores.

Ownership rule. A point of the city frame belongs to the cell whose core contains it, with half-open
intervals ``[x0, x1) x [y0, y1)`` so that a point on an edge shared by two cores (or a corner shared
by four) belongs to exactly one of them. On the city's outer boundary the max side is closed instead
(``x == city x1`` belongs to the easternmost cells, ``y == city y1`` to the northernmost), so nothing
on the outer edge is lost. Because the cores tile the city rectangle exactly (checked by
``CityManifest``), every point of the closed city rectangle has exactly one owner and every point
outside it has none.

A Gaussian is owned by the cell whose core contains its centre, in the city frame
(``means_tile + cell.origin``, computed in float64). Every tile holds the Gaussians of its whole
extent (core + margin); cropping each to its core before concatenating keeps each world Gaussian
once, from the tile whose core holds it, where it lies at least the margin away from that tile's
borders inside the city.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from skyfall.city.manifest import Bounds, CityCell, cells_bounds
from skyfall.dsm import DsmGrid

Array = Any  # np.ndarray or torch.Tensor


def _to_numpy64(a: Array) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def in_core(x: np.ndarray, y: np.ndarray, core: Bounds, city_bounds: Bounds) -> np.ndarray:
    """Bool mask of city-frame points owned by ``core`` under the half-open rule (outer max sides closed)."""
    x0, x1, y0, y1 = core
    _, cx1, _, cy1 = city_bounds
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    in_x = (x >= x0) & ((x < x1) | ((x1 >= cx1) & (x == x1)))
    in_y = (y >= y0) & ((y < y1) | ((y1 >= cy1) & (y == y1)))
    return in_x & in_y


def ownership_mask(means_tile: Array, cell: CityCell, city_bounds: Bounds) -> Array:
    """Which of a tile's Gaussians (centres ``means_tile`` [N, 3] in the tile frame) the cell owns.

    ``city_bounds`` (x0, x1, y0, y1; e.g. ``CityManifest.bounds``) is needed to close the city's
    outer max edges. Returns a bool tensor for a tensor input, else a bool array.
    """
    m = _to_numpy64(means_tile)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"means must be [N, 3], got shape {tuple(m.shape)}")
    ox, oy, _ = cell.origin
    mask = in_core(m[:, 0] + ox, m[:, 1] + oy, cell.core, city_bounds)
    if isinstance(means_tile, torch.Tensor):
        return torch.from_numpy(mask).to(means_tile.device)
    return mask


def _translate(means: Array, origin: tuple[float, float, float]) -> Array:
    if isinstance(means, torch.Tensor):
        o = torch.tensor(origin, dtype=torch.float64, device=means.device)
        return (means.to(torch.float64) + o).to(means.dtype)
    m = np.asarray(means)
    return (m.astype(np.float64) + np.asarray(origin, np.float64)).astype(m.dtype)


def merge_splats(
    parts: Sequence[tuple[CityCell, dict[str, Array]]], city_bounds: Bounds | None = None
) -> tuple[dict[str, Array], dict[str, int]]:
    """One city-frame splat set from per-tile parameter dicts.

    Each part is ``(cell, params)``: ``params['means']`` [N, 3] in the tile frame and any other
    per-Gaussian arrays (tensors or numpy arrays) with the same leading dimension N; all parts need
    the same keys. Each tile is cropped to its core (``ownership_mask``), its means are translated
    into the city frame, and every array is concatenated in part order. Rotations, scales and
    colours need no change because tile and city frames share their axes.

    ``city_bounds`` defaults to the bounding rectangle of the parts' cores. Returns
    ``(params, counts)`` with ``counts[cell.name]`` = Gaussians kept from that cell.
    """
    if not parts:
        raise ValueError("merge_splats needs at least one part")
    cells = [cell for cell, _ in parts]
    bounds = cells_bounds(cells) if city_bounds is None else city_bounds
    keys = list(parts[0][1].keys())
    if "means" not in keys:
        raise ValueError(f"part {cells[0].name!r} has no 'means'")
    pieces: dict[str, list[Array]] = {k: [] for k in keys}
    counts: dict[str, int] = {}
    for cell, params in parts:
        if set(params.keys()) != set(keys):
            raise ValueError(f"part {cell.name!r} has keys {sorted(params)}, expected {sorted(keys)}")
        n = len(params["means"])
        for k in keys:
            if len(params[k]) != n:
                raise ValueError(f"part {cell.name!r}: {k!r} has {len(params[k])} rows, 'means' has {n}")
        mask = np.asarray(ownership_mask(_to_numpy64(params["means"]), cell, bounds))
        for k in keys:
            v = params[k]
            kept = (
                v[torch.from_numpy(mask).to(v.device)] if isinstance(v, torch.Tensor) else np.asarray(v)[mask]
            )
            pieces[k].append(_translate(kept, cell.origin) if k == "means" else kept)
        counts[cell.name] = int(mask.sum())
    merged: dict[str, Array] = {}
    for k, vs in pieces.items():
        merged[k] = torch.cat(vs, dim=0) if isinstance(vs[0], torch.Tensor) else np.concatenate(vs, axis=0)
    return merged, counts


def mosaic_grid(bounds: Bounds, resolution: float) -> DsmGrid:
    """The city's mosaic grid: north-up from the north-west corner of ``bounds`` (x0, x1, y0, y1),
    ``resolution`` metres per cell, as many cells as cover the bounds."""
    bx0, bx1, by0, by1 = bounds
    res = float(resolution)
    cols = max(1, math.ceil((bx1 - bx0) / res - 1e-9))
    rows = max(1, math.ceil((by1 - by0) / res - 1e-9))
    return DsmGrid(float(bx0), float(by1), res, cols, rows)


def mosaic_dsm(
    parts: Sequence[tuple[CityCell, np.ndarray, tuple[float, float, float]]],
    resolution: float,
    city_bounds: Bounds | None = None,
) -> tuple[np.ndarray, float, float]:
    """One city-wide north-up DSM from per-tile DSMs.

    Each part is ``(cell, heights [H, W], (x_min, y_max, resolution))`` with the grid in the tile
    frame (cell (i, j) centred at ``(x_min + (j + .5) res, y_max - (i + .5) res)``) and heights as
    tile-frame z. The output grid covers ``city_bounds`` (default: the parts' cores) from its
    north-west corner at ``resolution``; each output cell takes the value of the tile whose core
    contains its centre, read from that tile's raster at the same world point (nearest cell) and
    shifted by the tile's z origin. NaN where no given tile owns the centre or the owning tile's
    raster does not reach it.

    Returns ``(heights [rows, cols] float64, x_min, y_max)`` in the city frame.
    """
    if not parts:
        raise ValueError("mosaic_dsm needs at least one part")
    bounds = cells_bounds([p[0] for p in parts]) if city_bounds is None else city_bounds
    g = mosaic_grid(bounds, resolution)
    bx0, by1, res, cols, rows = g.x_min, g.y_max, g.resolution, g.width, g.height
    x = bx0 + (np.arange(cols) + 0.5) * res
    y = by1 - (np.arange(rows) + 0.5) * res
    xx, yy = np.meshgrid(x, y, indexing="xy")
    out = np.full((rows, cols), np.nan, dtype=np.float64)
    done = np.zeros((rows, cols), dtype=bool)
    for cell, heights, (gx_min, gy_max, gres) in parts:
        h = np.asarray(heights, dtype=np.float64)
        own = in_core(xx, yy, cell.core, bounds) & ~done
        if not own.any():
            continue
        done |= own
        ox, oy, oz = cell.origin
        tx = xx[own] - ox
        ty = yy[own] - oy
        j = np.floor((tx - gx_min) / gres).astype(np.int64)
        i = np.floor((gy_max - ty) / gres).astype(np.int64)
        ok = (i >= 0) & (i < h.shape[0]) & (j >= 0) & (j < h.shape[1])
        vals = np.full(tx.shape, np.nan)
        vals[ok] = h[i[ok], j[ok]] + oz
        out[own] = vals
    return out, float(bx0), float(by1)


def seam_mask(cells: Sequence[CityCell], x: Array, y: Array, distance_m: float = 10.0) -> np.ndarray:
    """Bool mask of city-frame points within ``distance_m`` of an interior core border (a core edge
    that is not on the city's outer boundary), e.g. to report seam errors apart from interior ones.

    The city is the bounding rectangle of ``cells`` (cores tile it exactly), so an edge is interior
    unless it lies on that rectangle's boundary. Distance is to the edge segment, ends included.
    """
    px = np.asarray(x, dtype=np.float64)
    py = np.asarray(y, dtype=np.float64)
    bx0, bx1, by0, by1 = cells_bounds(list(cells))
    near = np.zeros(np.broadcast(px, py).shape, dtype=bool)
    d2 = float(distance_m) ** 2
    for cell in cells:
        x0, x1, y0, y1 = cell.core
        for ex in (x0, x1):  # vertical edges
            if ex in (bx0, bx1):
                continue
            dy = np.maximum(np.maximum(y0 - py, py - y1), 0.0)
            near |= (px - ex) ** 2 + dy**2 <= d2
        for ey in (y0, y1):  # horizontal edges
            if ey in (by0, by1):
                continue
            dx = np.maximum(np.maximum(x0 - px, px - x1), 0.0)
            near |= (py - ey) ** 2 + dx**2 <= d2
    return near
