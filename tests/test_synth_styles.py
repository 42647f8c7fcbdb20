"""Tests of the synthetic city styles: default identity, style statistics, oriented boxes, transient cars."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rerender_frame

from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.errors import ConfigError, TileFormatError
from skyfall.synth import SyntheticCity, write_synthetic_tile
from skyfall.synth.layout import (
    KIND_BUILDING,
    KIND_EQUIPMENT,
    STYLES,
    Layout,
    generate_layout,
    in_footprint,
    rotate_xy,
)
from skyfall.synth.lighting import Lighting
from skyfall.synth.raycast import Primitives, ShadowGrid, trace_camera
from skyfall.synth.shading import surface_normals

# Checksums of the default city computed before styles existed: the default style must keep them.
DEFAULT_CHECKSUMS = {
    (0, 256.0): "2fa54df86384095d",
    (3, 96.0): "fe486ecbf2fd4d8e",
    (7, 256.0): "bde7662bf5b1e8df",
}


def _layouts(style: str, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Layout]:
    return [generate_layout(s, 256.0, style) for s in seeds]


def _corners_xy(lay: Layout, idx: np.ndarray) -> np.ndarray:
    """[N, 4, 2] exact footprint corners of (turned) boxes ``idx``."""
    lo, hi, yaw = lay.box_lo[idx], lay.box_hi[idx], lay.box_yaw[idx]
    c, h = 0.5 * (lo + hi)[:, None, :2], 0.5 * (hi - lo)[:, None, :2]
    sx = np.array([-1, 1, 1, -1])[None]
    sy = np.array([-1, -1, 1, 1])[None]
    x, y = rotate_xy(sx * h[..., 0], sy * h[..., 1], yaw[:, None])
    return np.stack([x, y], -1) + c


def _prims(lo: list, hi: list, yaw: list) -> Primitives:
    return Primitives(
        box_lo=torch.tensor(lo, dtype=torch.float32),
        box_hi=torch.tensor(hi, dtype=torch.float32),
        ell_c=torch.zeros(0, 3),
        ell_r=torch.zeros(0, 3),
        box_casts_shadow=torch.ones(len(lo), dtype=torch.bool),
        box_yaw=torch.tensor(yaw, dtype=torch.float32),
    )


def _inside(pts: np.ndarray, lo: np.ndarray, hi: np.ndarray, yaw: float) -> np.ndarray:
    """Brute-force membership of points [..., 3] in one turned box."""
    inz = (pts[..., 2] > lo[2]) & (pts[..., 2] < hi[2])
    return inz & in_footprint(pts[..., 0], pts[..., 1], lo, hi, yaw)


def test_default_style_is_the_original_city() -> None:
    for (seed, size), want in DEFAULT_CHECKSUMS.items():
        city = SyntheticCity.generate(seed, size)
        assert city.layout.checksum() == want
        assert city.style == "default" and len(city.dates) == 5
        assert not city.layout.oriented and len(city.layout.transients) == 0
    assert SyntheticCity.generate(0, 256.0, "default").layout.checksum() == DEFAULT_CHECKSUMS[(0, 256.0)]


def test_styles_differ_in_the_intended_direction() -> None:
    stats = {}
    for style in STYLES:
        rows = []
        for lay in _layouts(style):
            b = lay.box_kind == KIND_BUILDING
            h = lay.box_hi[b, 2]
            rows.append((h.mean(), len(lay.ell_center) / lay.size_m**2, (lay.box_yaw[b] != 0).mean(),
                         len(lay.transients), h.min(), h.max()))  # fmt: skip
        stats[style] = np.array(rows)
    height = {s: v[:, 0].mean() for s, v in stats.items()}
    trees = {s: v[:, 1].mean() for s, v in stats.items()}
    assert height["downtown"] > 1.4 * height["default"] > 1.4 * height["suburb"], height
    assert trees["suburb"] > 1.3 * trees["default"] > 1.3 * trees["downtown"], trees
    assert stats["downtown"][:, 5].min() >= 60 and stats["downtown"][:, 5].max() <= 80  # 40-80 m towers
    assert stats["suburb"][:, 4].min() >= 4 and stats["suburb"][:, 5].max() <= 10  # 4-10 m houses
    # Turned buildings and cars only off the default style; "mixed" turns (nearly) every building.
    assert (stats["default"][:, 2:4] == 0).all()
    for style in ("downtown", "suburb", "mixed"):
        assert (stats[style][:, 2] > 0.05).all() and (stats[style][:, 3] > 20).all(), style
    assert stats["mixed"][:, 2].min() > 0.9
    assert [len(SyntheticCity.generate(0, 64.0, s).dates) for s in STYLES] == [5, 4, 3, 5]


def test_turned_buildings_stay_in_their_lots() -> None:
    for style in ("downtown", "suburb", "mixed"):
        for lay in _layouts(style, (0, 1)):
            idx = np.nonzero(np.isin(lay.box_kind, (KIND_BUILDING, KIND_EQUIPMENT)))[0]
            xy = _corners_xy(lay, idx)  # [N, 4, 2]
            assert np.abs(xy).max() <= lay.size_m / 2
            for r in lay.roads:  # no corner on a road or its pavements
                d = np.abs(xy[..., r.axis] - r.centre)
                assert (d >= r.half_width + lay.sidewalk_m - 1e-6).all(), (style, r)
            # L/T/U buildings: several building boxes share one yaw on one lot (2 or 3 wings).
            b = lay.box_kind[idx] == KIND_BUILDING
            _, counts = np.unique(np.round(lay.box_yaw[idx][b], 12), return_counts=True)
            assert counts.max() >= 2


def test_oriented_box_raycast_matches_brute_force() -> None:
    lo, hi, yaw = np.array([-2.0, -1.0, 0.0]), np.array([2.0, 1.0, 3.0]), math.radians(30)
    prims = _prims([lo.tolist()], [hi.tolist()], [yaw])
    cam = Cameras(
        look_at(torch.tensor([9.0, -7.0, 6.0]), torch.tensor([0.0, 0.0, 1.5])),
        intrinsics_from_fov(40, 32, 32),
        32,
        32,
    )
    hits, d, zscale = trace_camera(cam, 0, prims)
    assert 0.1 < hits.mask.float().mean() < 0.9
    # Reference: march every ray in 1 mm steps and take the first sample inside the turned box.
    o = cam.centers[0].numpy()
    ts = np.arange(5.0, 20.0, 1e-3)
    pts = o[None, None] + d.numpy()[:, None] * ts[None, :, None]  # [R, T, 3]
    inside = _inside(pts, lo, hi, yaw)
    ref_hit = inside.any(1)
    ref_t = ts[inside.argmax(1)]
    mask = hits.mask.numpy()
    assert (ref_hit != mask).sum() <= 2  # only rays grazing an edge may disagree
    both = ref_hit & mask
    # The first sample inside lies up to one step (1 mm) past the exact entry.
    np.testing.assert_allclose(hits.t.numpy()[both], ref_t[both], atol=1.5e-3, rtol=0)
    # Normals: the face normals of the turned box (world), pointing back at the camera.
    lay = Layout(1.0, lo[None], hi[None], np.array([KIND_BUILDING]), np.ones((1, 3)), np.ones((1, 3)),
                 np.zeros((1, 4)), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), box_yaw=np.array([yaw]))  # fmt: skip
    n = surface_normals(lay, hits.prim[hits.mask], hits.points[hits.mask]).double()
    c, s = math.cos(yaw), math.sin(yaw)
    faces = torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=torch.float64)
    assert ((n @ faces.T).abs().amax(1) > 1 - 1e-5).all()
    assert ((n * d[hits.mask]).sum(1) < 0).all()


def test_oriented_box_shadows_match_brute_force() -> None:
    lo, hi, yaw = np.array([-3.0, -1.0, 0.0]), np.array([3.0, 1.0, 4.0]), math.radians(-35)
    prims = _prims([lo.tolist()], [hi.tolist()], [yaw])
    sun = torch.tensor(Lighting("s", 250.0, 40.0).sun_dir, dtype=torch.float32)
    g = np.stack(np.meshgrid(np.arange(-15, 15, 0.5), np.arange(-15, 15, 0.5)), -1).reshape(-1, 2)
    pts = np.concatenate([g, np.full((len(g), 1), 0.02)], 1)
    lit = ShadowGrid(prims, sun).visible(torch.tensor(pts, dtype=torch.float32)).numpy()
    ts = np.arange(0.0, 25.0, 1e-2)
    march = pts[:, None] + sun.double().numpy()[None, None] * ts[None, :, None]
    ref_lit = ~_inside(march, lo, hi, yaw).any(1)
    assert 0.02 < (~ref_lit).mean() < 0.5
    assert (lit != ref_lit).sum() <= 4  # only points on the shadow's outline may differ


def test_turned_scene_renders_like_turned_camera() -> None:
    # A box turned by 40 deg seen from a camera turned by 40 deg about the box's axis gives the image of
    # the unturned box: geometry, normals and the facade window grid all live in the box's frame.
    # (A vertical sun and no ground keep the lighting the same under the turn.)
    def city(yaw: float) -> SyntheticCity:
        lay = Layout(30.0, np.array([[-6.0, -4.0, 0.0]]), np.array([[6.0, 4.0, 20.0]]), np.array([KIND_BUILDING]),
                     np.full((1, 3), 0.7), np.full((1, 3), 0.5), np.array([[3.2, 3.0, 0.55, 0.5]]),
                     np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), box_yaw=np.array([yaw]))  # fmt: skip
        return SyntheticCity(lay, [Lighting("up", 0.0, 90.0)])

    yaw = math.radians(40)
    eye = np.array([25.0, -18.0, 12.0])
    ex, ey = rotate_xy(eye[0], eye[1], yaw)
    k = intrinsics_from_fov(60, 48, 40)
    up = torch.tensor([0.0, 0.0, 1.0])
    cam0 = Cameras(look_at(torch.tensor(eye), torch.tensor([0.0, 0.0, 8.0]), up), k, 48, 40)
    cam1 = Cameras(look_at(torch.tensor([ex, ey, eye[2]]), torch.tensor([0.0, 0.0, 8.0]), up), k, 48, 40)
    r0 = city(1e-30).render(cam0)  # 1e-30: the turned-box code path with a null turn
    a, b = city(0.0).render(cam0), city(yaw).render(cam1)
    assert torch.equal(a["mask"], b["mask"]) and a["mask"].float().mean() > 0.2
    torch.testing.assert_close(a["depth"][a["mask"]], b["depth"][b["mask"]], atol=1e-3, rtol=0)
    assert (a["rgb"] - b["rgb"]).abs().amax(-1).gt(0.02).float().mean() < 0.01
    assert a["rgb"].std() > 0.05  # the windows are there
    torch.testing.assert_close(r0["rgb"], a["rgb"], atol=1e-4, rtol=0)


def test_dsm_of_turned_buildings_matches_nadir_depth() -> None:
    city = SyntheticCity.generate(2, 96.0, "mixed")
    assert city.layout.oriented
    dsm, geo = city.dsm(0.5)
    xs = geo["x_min"] + (np.arange(geo["width"]) + 0.5) * 0.5
    ys = geo["y_max"] - (np.arange(geo["height"]) + 0.5) * 0.5
    assert np.array_equal(city.height_at(*np.meshgrid(xs, ys)).astype(np.float32), dsm)
    # A far nadir camera whose pixel centres are the DSM's cell centres sees the DSM (static city).
    dist, n = 1.0e5, 192
    c2w = look_at(torch.tensor([0.0, 0.0, dist], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                  torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # fmt: skip
    k = torch.tensor([[dist / 0.5, 0, n / 2], [0, dist / 0.5, n / 2], [0, 0, 1]], dtype=torch.float64)
    z = dist - city.render(Cameras(c2w, k, n, n))["depth"][0].double().numpy()
    assert dsm.max() > 8.0
    err = np.abs(z - dsm)
    assert np.median(err) < 0.01 and (err > 0.5).mean() < 0.002, ((err > 0.5).mean(), err.mean())


def _car_on_bare_ground(city: SyntheticCity) -> tuple[int, int, int]:
    """A car present on some date and absent on another, on open ground (no tree above it)."""
    t = city.layout.transients
    for i in range(len(t)):
        on = np.nonzero(t.dates[i])[0]
        off = np.nonzero(~t.dates[i])[0]
        cx, cy = 0.5 * (t.lo[i, :2] + t.hi[i, :2])
        xs, ys = np.meshgrid(np.linspace(cx - 3, cx + 3, 7), np.linspace(cy - 3, cy + 3, 7))
        if len(on) and len(off) and (city.height_at(xs, ys) == 0).all():
            return i, int(on[0]), int(off[0])
    raise AssertionError("no car on open ground")


def test_cars_appear_on_their_dates_only() -> None:
    city = SyntheticCity.generate(0, 128.0, "downtown")
    t = city.layout.transients
    assert len(t) > 10 and t.dates.shape == (len(t), 4) and t.dates.any(1).all()
    i, d_on, d_off = _car_on_bare_ground(city)
    cx, cy = 0.5 * (t.lo[i, :2] + t.hi[i, :2])
    # A far nadir camera at 0.25 m/px centred on the car.
    dist = 1.0e4
    c2w = look_at(torch.tensor([cx, cy, dist], dtype=torch.float64), torch.tensor([cx, cy, 0.0], dtype=torch.float64),
                  torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # fmt: skip
    k = torch.tensor([[dist / 0.25, 0, 16.0], [0, dist / 0.25, 16.0], [0, 0, 1]], dtype=torch.float64)
    cam = Cameras(c2w, k, 32, 32)
    top = {d: dist - city.render(cam, date=d)["depth"][0, 14:18, 14:18] for d in (None, d_on, d_off)}
    torch.testing.assert_close(top[d_on], torch.full_like(top[d_on], float(t.hi[i, 2])), atol=1e-2, rtol=0)
    assert top[None].abs().max() < 1e-2 and top[d_off].abs().max() < 1e-2
    # The ground truth (DSM, height_at) is the static city: no car.
    dsm, geo = city.dsm(0.5)
    j, r = int((cx - geo["x_min"]) / 0.5), int((geo["y_max"] - cy) / 0.5)
    assert dsm[r, j] == 0.0 and city.height_at(np.array([cx]), np.array([cy]))[0] == 0.0
    # The car's own colour shows on its date only.
    rgb_on = city.render(cam, date=d_on)["rgb"][0, 16, 16]
    rgb_off = city.render(cam, date=d_off)["rgb"][0, 16, 16]
    assert (rgb_on - rgb_off).abs().max() > 0.01


def test_non_default_tile_round_trip(tmp_path: Path) -> None:
    tile = write_synthetic_tile(tmp_path / "t", preset="tiny", seed=1, style="suburb")
    meta = json.loads((tile / "synth.json").read_text())
    assert meta["style"] == "suburb" and len(meta["dates"]) == 3 and sum(meta["cars_per_date"]) > 0
    city = SyntheticCity.from_tile(tile)
    assert city.style == "suburb" and city.layout.checksum() == meta["scene_checksum"]
    assert city.layout.checksum() != SyntheticCity.generate(1, 256.0).layout.checksum()
    rendered, stored = rerender_frame(city, tile, 2)
    assert np.array_equal(rendered, stored)
    # A synth.json naming a style this version does not know is a tile format error.
    meta["style"] = "venice"
    (tile / "synth.json").write_text(json.dumps(meta))
    with pytest.raises(TileFormatError, match="style"):
        SyntheticCity.from_tile(tile)


def test_unknown_style_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown city style 'venice'"):
        SyntheticCity.generate(0, 64.0, "venice")
    with pytest.raises(ConfigError, match="downtown"):
        write_synthetic_tile(tmp_path / "x", preset="tiny", style="venice")
    assert not (tmp_path / "x").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "skyfall", "synth", str(tmp_path / "t"), "--preset", "tiny", "--style", "venice"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and not (tmp_path / "t").exists()
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "venice" in errors[0] and "suburb" in errors[0], proc.stderr
