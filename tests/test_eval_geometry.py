"""Geometry: depth back-projection, plyflatten-style rasterisation, NCC shift + vertical offset recovery."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.orbits import nadir_grid_camera
from skyfall.errors import MissingDependencyError, TileFormatError
from skyfall.eval.geometry import (
    DsmGrid,
    depth_to_points,
    dsm_metrics,
    flatten_points,
    load_dfc_dsm,
    ncc_shift,
    read_dfc_bounds,
    register_dsm,
    shift_image,
    shift_image_subcell,
)


def _city(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A DSM with a gentle slope and random flat-roofed blocks."""
    rng = np.random.default_rng(seed)
    z = np.add.outer(np.linspace(0, 3, h), np.linspace(0, 2, w))
    for _ in range(h * w // 400):
        i, j = rng.integers(0, h - 12), rng.integers(0, w - 12)
        z[i : i + rng.integers(4, 12), j : j + rng.integers(4, 12)] += rng.uniform(3, 30)
    return z


def test_shift_image_semantics():
    a = np.arange(12.0).reshape(3, 4)
    s = shift_image(a, 1, -1)
    assert s[1, 0] == a[0, 1] and s[2, 2] == a[1, 3]
    assert np.isnan(s[0]).all() and np.isnan(s[:, -1]).all()


def test_known_shift_and_offset_are_recovered():
    gt = _city(160, 180)
    rng = np.random.default_rng(1)
    # pred[i, j] = gt[i + 3, j - 4] - 2.5 (+ noise, with holes): registration must undo it.
    pred = shift_image(gt, -3, 4) - 2.5 + rng.normal(0, 0.05, gt.shape)
    pred[rng.uniform(size=gt.shape) < 0.1] = np.nan
    reg, info = register_dsm(pred, gt)
    assert (info["shift_rows"], info["shift_cols"]) == (3, -4)
    assert info["dz_m"] == pytest.approx(2.5, abs=0.01)
    m = dsm_metrics(pred, gt)
    assert m["dsm_mae_m"] < 0.06 and m["dsm_mae_unregistered_m"] > 1.0
    assert m["dsm_completeness"] == pytest.approx(np.isfinite(reg).sum() / gt.size, abs=1e-12)


def _waves(h: int, w: int, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
    """A smooth DSM sampled at rows + dy, columns + dx (sub-cell offsets are exact)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    y, x = yy + dy, xx + dx
    return 10 + 6 * np.sin(x / 9.0) * np.cos(y / 7.0) + 0.05 * x


def test_subcell_shift_matches_the_integer_shift_on_whole_cells():
    a = np.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(shift_image_subcell(a, 1, -2), shift_image(a, 1, -2))
    half = shift_image_subcell(a, 0.5, 0.0)
    assert half[2, 1] == pytest.approx(0.5 * (a[1, 1] + a[2, 1])) and np.isnan(half[0]).all()


@pytest.mark.parametrize("dx", [0.0, 0.3, 0.45, 0.55, 0.7, 1.4])
def test_subcell_registration_follows_the_offset_where_the_integer_one_jumps(dx: float):
    """pred = the truth sampled dx cells right and 0.2 cells down: the integer protocol's MAE rises
    towards half a cell and its shift flips from 0 to 1; the refined shift follows dx continuously and
    leaves almost nothing."""
    gt = _waves(120, 140)
    m = dsm_metrics(_waves(120, 140, dy=0.2, dx=dx) + 1.0, gt, radius=3, pyramid=False)
    assert m["shift_cols"] == round(dx + 1e-9) or abs(dx - 0.5) < 0.1  # near half a cell: either
    assert m["shift_cols_subcell"] == pytest.approx(dx, abs=0.03)
    assert m["shift_rows_subcell"] == pytest.approx(0.2, abs=0.03)
    assert m["dsm_mae_subcell_m"] < 0.01
    if abs(dx - round(dx)) > 0.25:
        assert m["dsm_mae_m"] > 5 * m["dsm_mae_subcell_m"]


def test_multiscale_search_finds_shifts_beyond_one_level():
    gt = _city(420, 400, seed=2)
    pred = shift_image(gt, 13, -9) + 1.0  # more than +-5 px: needs the pyramid
    assert ncc_shift(gt, pred) == (-13, 9)


def test_flatten_points_mean_and_max_by_hand():
    grid = DsmGrid(x_min=0.0, y_max=4.0, resolution=1.0, width=4, height=4)
    pts = np.array([[0.5, 3.5, 10.0], [1.5, 3.5, 20.0], [3.5, 0.5, 5.0]])
    r0 = flatten_points(pts, grid, radius=0)
    assert r0[0, 0] == 10.0 and r0[0, 1] == 20.0 and r0[3, 3] == 5.0 and np.isnan(r0[2, 0])
    r1 = flatten_points(pts, grid, radius=1)
    # Cell (1, 1) receives both top-left points' 3x3 windows: mean of 10 and 20.
    assert r1[1, 1] == 15.0 and r1[1, 0] == 15.0 and r1[0, 2] == 20.0 and r1[2, 2] == 5.0
    assert np.isnan(r1[3, 0])
    assert flatten_points(pts, grid, radius=1, reduce="max")[1, 1] == 20.0


def test_depth_to_points_on_a_nadir_grid_camera():
    cam = nadir_grid_camera(-2.0, 2.0, 0.5, 8, 8, distance=100.0)
    heights = np.linspace(0, 7, 64).reshape(8, 8)
    # z-depth of a straight-down camera = camera height - surface height.
    pts = depth_to_points(torch.from_numpy(100.0 - heights), cam)
    grid = DsmGrid(-2.0, 2.0, 0.5, 8, 8)
    dsm = flatten_points(pts, grid, radius=0)
    assert np.allclose(dsm, heights, atol=1e-9)


def test_dfc_bounds_and_missing_rasterio(tmp_path: Path):
    txt = tmp_path / "JAX_068_DSM.txt"
    txt.write_text("435525.0\n3354520.0\n512\n0.5\n")
    g = read_dfc_bounds(txt)
    assert (g.x_min, g.y_max, g.width, g.height, g.resolution) == (435525.0, 3354520.0 + 256.0, 512, 512, 0.5)
    (tmp_path / "bad.txt").write_text("1 2")
    with pytest.raises(TileFormatError, match="bad.txt"):
        read_dfc_bounds(tmp_path / "bad.txt")
    try:
        import rasterio  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="rasterio"):
            load_dfc_dsm(tmp_path / "JAX_068_DSM.tif", txt)


def test_identical_dsm_is_perfect():
    gt = _city(120, 120, seed=3)
    m = dsm_metrics(gt.copy(), gt)
    assert (
        m["dsm_mae_m"] == 0.0
        and m["shift_rows"] == 0
        and m["shift_cols"] == 0
        and math.isclose(m["dsm_completeness"], 1.0)
    )
