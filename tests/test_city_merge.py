"""City grid, ownership, splat merge, DSM mosaic and seams on a 2x2 city of 40 m cores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from skyfall.city.manifest import CityManifest, grid
from skyfall.city.merge import in_core, merge_splats, mosaic_dsm, ownership_mask, seam_mask
from skyfall.errors import SkyfallError

S = 40.0  # core edge (m)
OV = 8.0  # tile margin beyond the core (m)


def _city(z_origins: bool = False) -> CityManifest:
    m = grid(2, 2, S, OV, origin=(0.0, 0.0))
    if not z_origins:
        return m
    # Non-zero tile z origins check that heights and means are shifted by the full 3-vector.
    cells = [
        dataclasses.replace(c, origin=(c.origin[0], c.origin[1], 1.5 * (i + 1)))
        for i, c in enumerate(m.cells)
    ]
    return dataclasses.replace(m, cells=tuple(cells))


def _edge_points() -> np.ndarray:
    """Points on shared core edges, the shared corner, the outer edges and outer corners."""
    v = np.array([0.0, 13.0, 40.0, 67.0, 80.0])
    xx, yy = np.meshgrid(v, v)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def test_grid_cores_tile_area_exactly():
    m = _city()
    assert m.bounds == (0.0, 80.0, 0.0, 80.0)
    cores = np.array([c.core for c in m.cells])
    areas = (cores[:, 1] - cores[:, 0]) * (cores[:, 3] - cores[:, 2])
    assert areas.sum() == 80.0 * 80.0
    for i in range(4):
        for j in range(i + 1, 4):
            wx = min(cores[i, 1], cores[j, 1]) - max(cores[i, 0], cores[j, 0])
            wy = min(cores[i, 3], cores[j, 3]) - max(cores[i, 2], cores[j, 2])
            assert wx <= 0 or wy <= 0  # touching at most, never sharing area
    nw = m.cell("r000c000")  # row 0 is the northern row
    assert nw.core == (0.0, 40.0, 40.0, 80.0) and nw.origin == (20.0, 60.0, 0.0)
    assert m.tile_bounds(nw) == (0.0, 48.0, 32.0, 80.0)  # core + 8 m, clipped to the city
    assert nw.tile_bounds_local(m.bounds) == (-20.0, 28.0, -28.0, 20.0)


def test_every_city_point_has_exactly_one_owner():
    m = _city()
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(0, 80, (500, 2)), _edge_points()])
    owners = np.zeros(len(pts), dtype=int)
    for c in m.cells:
        means_tile = np.c_[pts - np.asarray(c.origin[:2]), np.zeros(len(pts))]
        mask = ownership_mask(means_tile, c, m.bounds)
        assert np.array_equal(mask, in_core(pts[:, 0], pts[:, 1], c.core, m.bounds))
        owners += mask
    assert np.all(owners == 1)
    # The shared corner goes to the north-east cell (half-open), the outer max corner too (closed).
    ne = m.cell("r000c001")
    assert in_core(np.array([40.0, 80.0]), np.array([40.0, 80.0]), ne.core, m.bounds).all()
    outside = np.array([[-0.001, 10.0], [80.001, 10.0], [10.0, 80.001], [10.0, -1.0]])
    for c in m.cells:
        assert not in_core(outside[:, 0], outside[:, 1], c.core, m.bounds).any()
    tmask = ownership_mask(torch.zeros(3, 3) + torch.tensor([0.0, 0.0, 0.0]), ne, m.bounds)
    assert tmask.dtype == torch.bool and tmask.shape == (3,)


def test_merge_splats_keeps_each_world_gaussian_once():
    m = _city(z_origins=True)
    rng = np.random.default_rng(1)
    # Dyadic coordinates (multiples of 1/64) so the tile -> city round trip is exact in float32.
    xy = rng.integers(0, 80 * 64 + 1, (1500, 2)) / 64.0
    xy = np.concatenate([xy, _edge_points()])
    n = len(xy)
    cloud = np.c_[xy, rng.integers(0, 30 * 64, n) / 64.0].astype(np.float32)
    ids = np.arange(n)
    colour = rng.random((n, 3, 4)).astype(np.float32)
    parts = []
    for c in m.cells:
        x0, x1, y0, y1 = m.tile_bounds(c)
        inside = (cloud[:, 0] >= x0) & (cloud[:, 0] <= x1) & (cloud[:, 1] >= y0) & (cloud[:, 1] <= y1)
        params = {
            "means": torch.from_numpy(cloud[inside] - np.asarray(c.origin, np.float32)),
            "ids": torch.from_numpy(ids[inside]),
            "sh": torch.from_numpy(colour[inside]),
        }
        parts.append((c, params))
    assert sum(len(p["means"]) for _, p in parts) > n  # the tiles really overlap
    merged, counts = merge_splats(parts, m.bounds)
    order = torch.argsort(merged["ids"])
    assert torch.equal(merged["ids"][order], torch.from_numpy(ids))
    assert torch.equal(merged["means"][order], torch.from_numpy(cloud))
    assert torch.equal(merged["sh"][order], torch.from_numpy(colour))
    assert merged["means"].dtype == torch.float32
    assert sum(counts.values()) == n
    for c in m.cells:
        assert counts[c.name] == int(in_core(cloud[:, 0], cloud[:, 1], c.core, m.bounds).sum())


def _f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Dyadic coefficients: exact at half-metre cell centres, so tile -> city is checked bit for bit.
    return 12.0 + 0.25 * x - 0.125 * y + 2.0**-9 * x * y


def _tile_dsm(m: CityManifest, c, res: float):
    x0, x1, y0, y1 = c.tile_bounds_local(m.bounds)
    w, h = round((x1 - x0) / res), round((y1 - y0) / res)
    ox, oy, oz = c.origin
    tx = x0 + (np.arange(w) + 0.5) * res
    ty = y1 - (np.arange(h) + 0.5) * res
    xx, yy = np.meshgrid(tx, ty)
    return c, _f(xx + ox, yy + oy) - oz, (x0, y1, res)


def test_mosaic_dsm_reproduces_analytic_surface():
    m = _city(z_origins=True)
    parts = [_tile_dsm(m, c, 1.0) for c in m.cells]
    heights, x_min, y_max = mosaic_dsm(parts, 1.0)
    assert heights.shape == (80, 80) and (x_min, y_max) == (0.0, 80.0)
    xx, yy = np.meshgrid(np.arange(80) + 0.5, 80 - (np.arange(80) + 0.5))
    np.testing.assert_array_equal(heights, _f(xx, yy))

    # A wider output grid is NaN beyond the city; a missing tile leaves its core NaN.
    wide, wx, wy = mosaic_dsm(parts, 1.0, city_bounds=(-4.0, 84.0, -4.0, 84.0))
    assert (wx, wy) == (-4.0, 84.0) and wide.shape == (88, 88)
    assert np.isnan(wide[:4]).all() and np.isnan(wide[:, -4:]).all()
    np.testing.assert_array_equal(wide[4:84, 4:84], _f(xx, yy))
    holed, _, _ = mosaic_dsm(parts[1:], 1.0, city_bounds=m.bounds)
    assert np.isnan(holed[:40, :40]).all()  # r000c000 is the north-west quadrant
    np.testing.assert_array_equal(holed[40:], _f(xx, yy)[40:])


def test_manifest_json_round_trip_and_bad_field(tmp_path):
    m = dataclasses.replace(_city(z_origins=True), crs="EPSG:32631", origin_lon_lat_h=(2.35, 48.85, 80.0))
    path = m.to_json(tmp_path)
    assert path.name == "city.json"
    back = CityManifest.from_json(tmp_path)
    assert back == m and back.cells[3].origin == m.cells[3].origin

    d = json.loads(path.read_text())
    d["cells"][1]["margin"] = "wide"
    path.write_text(json.dumps(d))
    with pytest.raises(SkyfallError, match=r"city\.json \[cells\[1\]\.margin\]"):
        CityManifest.from_json(path)

    d = m.to_dict()
    d["cells"][2]["core"] = [0.0, 50.0, 0.0, 40.0]  # overlaps its eastern neighbour
    with pytest.raises(SkyfallError, match=r"cells\[3\]\.core.*overlaps"):
        CityManifest.from_dict(d, tmp_path / "city.json")
    d = m.to_dict()
    d["cells"] = d["cells"][:3]  # a gap where the fourth core was
    with pytest.raises(SkyfallError, match=r"\[cells\].*without gaps"):
        CityManifest.from_dict(d, "city.json")


def test_seam_mask_on_hand_points():
    m = _city()
    pts = {
        (40.0, 20.0): True,  # on the north-south seam
        (45.0, 20.0): True,  # 5 m off it
        (55.0, 20.0): False,  # 15 m off it
        (20.0, 31.0): True,  # 9 m below the east-west seam
        (20.0, 20.0): False,  # cell interior, 20 m from both seams
        (2.0, 20.0): False,  # near the outer boundary only
        (79.0, 79.0): False,  # outer corner
        (48.0, 48.0): True,
        (52.0, 52.0): False,  # 12 m from both seams
    }
    xy = np.array(list(pts))
    got = seam_mask(m.cells, xy[:, 0], xy[:, 1], distance_m=10.0)
    assert got.tolist() == list(pts.values())
