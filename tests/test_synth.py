"""Tests of the synthetic city: determinism, tile files, exact geometry, satellite cameras, shadows."""

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
from PIL import Image

from skyfall.data.camera_path import read_camera_path
from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.errors import ConfigError
from skyfall.synth import SyntheticCity, write_synthetic_tile
from skyfall.synth.cameras import CURRICULUM, satellite_cameras
from skyfall.synth.layout import KIND_BUILDING, KIND_GROUND, Layout
from skyfall.synth.lighting import Lighting


@pytest.fixture(scope="module")
def tiny_tile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_tile(tmp_path_factory.mktemp("tiles") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def city() -> SyntheticCity:
    return SyntheticCity.generate(0)


def _scene(boxes: list[tuple], ells: list[tuple], size: float = 100.0, dates: list[Lighting] | None = None):
    """A hand-made city: boxes (lo, hi, kind) and ellipsoids (centre, radii)."""
    nb = len(boxes)
    lay = Layout(
        size_m=size,
        box_lo=np.array([b[0] for b in boxes], dtype=np.float64),
        box_hi=np.array([b[1] for b in boxes], dtype=np.float64),
        box_kind=np.array([b[2] for b in boxes], dtype=np.int64),
        box_albedo=np.full((nb, 3), 0.6),
        box_roof=np.full((nb, 3), 0.6),
        box_params=np.tile([3.0, 3.0, 0.5, 0.5], (nb, 1)),
        ell_center=np.array([e[0] for e in ells], dtype=np.float64).reshape(-1, 3),
        ell_radii=np.array([e[1] for e in ells], dtype=np.float64).reshape(-1, 3),
        ell_albedo=np.full((len(ells), 3), 0.4),
    )
    return SyntheticCity(lay, dates or [Lighting("d0", 135.0, 50.0)])


def _nadir(
    center_xy: tuple[float, float], dist: float, f: float, w: int, h: int, cx: float, cy: float
) -> Cameras:
    eye = torch.tensor([center_xy[0], center_xy[1], dist], dtype=torch.float64)
    tgt = torch.tensor([center_xy[0], center_xy[1], 0.0], dtype=torch.float64)
    c2w = look_at(eye, tgt, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    k = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1]], dtype=torch.float64)
    return Cameras(c2w, k, w, h)


def test_generate_is_deterministic_per_seed() -> None:
    a, b, c = SyntheticCity.generate(7), SyntheticCity.generate(7), SyntheticCity.generate(8)
    assert a.layout.checksum() == b.layout.checksum() != c.layout.checksum()
    assert [d.to_json() for d in a.dates] == [d.to_json() for d in b.dates]
    cams = Cameras(
        look_at(torch.tensor([200.0, -150.0, 180.0]), torch.zeros(3)), intrinsics_from_fov(60, 48, 40), 48, 40
    )
    ra, rb = a.render(cams, date=1), b.render(cams, date=1)
    assert torch.equal(ra["rgb"], rb["rgb"]) and torch.equal(ra["depth"], rb["depth"])
    assert ra["mask"].float().mean() > 0.3


def test_box_and_ellipsoid_depths_are_analytic() -> None:
    # A side view of a box face gives constant camera z (not ray length); an ellipsoid from above
    # matches the closed-form ray-quadric solution.
    scene = _scene(
        [((-2.0, -3.0, 0.0), (2.0, 3.0, 10.0), KIND_BUILDING)], [((0.0, 40.0, 5.0), (3.0, 4.0, 5.0))]
    )
    side = Cameras(
        look_at(torch.tensor([30.0, 0.0, 5.0]), torch.tensor([0.0, 0.0, 5.0])),
        intrinsics_from_fov(10, 32, 32),
        32,
        32,
    )
    r = scene.render(side)
    m = r["mask"][0]
    assert m[16, 16] and m.float().mean() > 0.3
    # The face x = 2 is 28 m in front of the camera at every pixel that sees it (the ellipsoid at
    # x = 20 occludes the middle of the view, at camera z >= 7).
    face = m & (r["depth"][0] > 20)
    assert face.sum() > 50
    torch.testing.assert_close(
        r["depth"][0][face], torch.full_like(r["depth"][0][face], 28.0), atol=1e-3, rtol=0
    )
    assert torch.isinf(r["depth"][0][~m]).all() and (r["rgb"][0][~m] == 0).all()

    top = Cameras(look_at(torch.tensor([0.5, 40.3, 50.0]), torch.tensor([0.0, 40.0, 5.0]), torch.tensor([0.0, 1.0, 0.0])),
                  intrinsics_from_fov(12, 24, 24), 24, 24)  # fmt: skip
    r = scene.render(top)
    uu, vv = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="xy")
    k = top.Ks[0]
    dc = torch.stack([(uu - k[0, 2]) / k[0, 0], (vv - k[1, 2]) / k[1, 1], torch.ones_like(uu)], -1).double()
    d = dc @ top.camtoworlds[0, :3, :3].T  # camera z = 1 per unit of this direction
    o = (top.centers[0] - torch.tensor([0.0, 40.0, 5.0], dtype=torch.float64)) / torch.tensor([3.0, 4.0, 5.0])
    dd = d / torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    a, b, c = (dd * dd).sum(-1), 2 * (o * dd).sum(-1), (o * o).sum() - 1
    disc = b * b - 4 * a * c
    hit = disc > 0
    z = (-b - torch.sqrt(disc.clamp_min(0))) / (2 * a)
    assert torch.equal(r["mask"][0], hit) and hit.sum() > 100
    torch.testing.assert_close(r["depth"][0][hit].double(), z[hit], atol=2e-4, rtol=0)


def test_dsm_matches_nadir_depth(city: SyntheticCity) -> None:
    dsm, geo = city.dsm(0.5)
    assert (
        dsm.shape == (512, 512) and geo["x_min"] == -128 and geo["y_max"] == 128 and geo["resolution"] == 0.5
    )
    # A far straight-down camera whose pixel centres sit on DSM cell centres (rows i0.., cols j0..):
    # pixel (i, j) sees x = -128 + (j0 + j + 0.5) / 2, y = 128 - (i0 + i + 0.5) / 2.
    dist, i0, j0, n = 1.0e5, 150, 180, 160
    cam = _nadir((0.0, 0.0), dist, dist / 0.5, n, n, 256.0 - j0, 256.0 - i0)
    r = city.render(cam)
    assert r["mask"].all()
    z = dist - r["depth"][0].double().numpy()
    ref = dsm[i0 : i0 + n, j0 : j0 + n]
    assert ref.max() > 8.0 and ref.min() < 0.5  # the window holds buildings and ground
    err = np.abs(z - ref)
    assert err.mean() < 0.05, err.mean()
    assert np.median(err) < 0.01


def test_satellite_cameras_put_tile_centre_at_image_centre(city: SyntheticCity) -> None:
    cams, off = satellite_cameras(np.random.default_rng(5), 6, 512, city.size_m / 2, city.layout.max_height)
    uv, z = cams.project(torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(uv[:, 0], torch.full((6, 2), 256.0, dtype=torch.float64), atol=1e-6, rtol=0)
    dist = cams.centers.norm(dim=-1)
    assert ((dist > 4e5) & (dist < 8e5)).all()
    assert ((off >= 5) & (off <= 30)).all()
    gsd = dist / cams.Ks[:, 0, 0]
    assert ((gsd > 0.45) & (gsd < 0.75)).all(), gsd
    # The optical axis points kilometres away from the tile: the principal point is far off-image.
    assert ((cams.Ks[:, 0, 2] - 256).abs().maximum((cams.Ks[:, 1, 2] - 256).abs()) > 1000).all()
    # Tile corners (ground) project inside the image.
    corners = torch.tensor([[x, y, 0.0] for x in (-128, 128) for y in (-128, 128)], dtype=torch.float64)
    uvc, _ = cams.project(corners)
    assert ((uvc > 0) & (uvc < 512)).all()


def test_shadow_darkens_ground_behind_building() -> None:
    west = Lighting("west", 270.0, 30.0)
    east = Lighting("east", 90.0, 30.0)
    scene = _scene(
        [
            ((-50.0, -50.0, -1.0), (50.0, 50.0, 0.0), KIND_GROUND),
            ((-5.0, -5.0, 0.0), (5.0, 5.0, 30.0), KIND_BUILDING),
        ],
        [],
        dates=[west, east],
    )
    # Nadir camera at 0.5 m/px over x in [0, 32], y in [-8, 8]: the ground at x = 12 lies east of the box,
    # so the western sun (rising 4 m over the 7 m gap) puts it in the box's shadow, the eastern one does not.
    cam = _nadir((16.0, 0.0), 1000.0, 2000.0, 64, 32, 32.0, 16.0)
    lit_w = scene.render(cam, date=0)["rgb"][0]
    lit_e = scene.render(cam, date=1)["rgb"][0]
    px = (16, 24)  # row 16 (y = -0.25), col 24 (x = 12.25)
    assert lit_w[px].mean() < 0.75 * lit_e[px].mean()
    far = (0, 24)  # y = 7.75: beside the box's shadow band under both suns
    torch.testing.assert_close(lit_w[far], lit_e[far])


def test_tiny_tile_files(tiny_tile: Path) -> None:
    meta = json.loads((tiny_tile / "synth.json").read_text())
    assert meta["generator"]["name"] == "skyfall.synth" and meta["preset"] == "tiny" and meta["seed"] == 0
    names = sorted(meta["image_dates"])
    assert names == sorted(meta["train"] + meta["test"]) and len(names) == 6 and len(meta["test"]) >= 1
    assert {meta["image_dates"][n] for n in meta["test"]} <= {meta["image_dates"][n] for n in meta["train"]}
    assert len(meta["dates"]) >= 3 and all(
        len(d["sun_dir"]) == 3 and len(d["tint"]) == 3 for d in meta["dates"]
    )
    for split in ("train", "test"):
        doc = json.loads((tiny_tile / f"transforms_{split}.json").read_text())
        assert doc["camera_model"] == "PINHOLE" and doc["w"] == doc["h"] == 64
        assert [f["file_path"] for f in doc["frames"]] == [f"./images/{n}.png" for n in meta[split]]
        for fr in doc["frames"]:
            m = np.array(fr["transform_matrix"])
            assert m.shape == (4, 4) and np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
            assert 1e4 < fr["fl_x"] < 1e7 and abs(fr["fl_y"] / fr["fl_x"] - 1) < 0.01
    for n in names:
        img = np.asarray(Image.open(tiny_tile / "images" / f"{n}.png"))
        mask = np.load(tiny_tile / "masks" / f"{n}.npy")
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        # Black = no data: every hit pixel is lit by at least the ambient term, every miss is black.
        assert np.array_equal(mask.astype(bool), img.max(-1) > 0)
        assert mask[32, 32] == 1 and mask[0].sum() == 0  # tile in the middle, a black margin at the border
    assert (tiny_tile / "contact_sheet.png").is_file()
    dsm = np.load(tiny_tile / "gt" / "dsm.npy")
    geo = json.loads((tiny_tile / "gt" / "dsm.json").read_text())
    assert dsm.dtype == np.float32 and dsm.shape == (geo["height"], geo["width"]) == (512, 512)
    sets = {d.name for d in (tiny_tile / "gt" / "views").iterdir()}
    assert sets == {f"orbit_e{int(e)}_r{int(r)}" for e, r in CURRICULUM} | {"street"}
    for s in sets:
        cams = read_camera_path(tiny_tile / "gt" / "views" / s / "camera_path.json")
        depths = sorted((tiny_tile / "gt" / "views" / s / "depth").glob("*.npy"))
        assert (
            len(depths) == len(cams) == len(list((tiny_tile / "gt" / "views" / s / "images").glob("*.png")))
        )
        d = np.load(depths[0])
        assert d.dtype == np.float32 and d.shape == (cams.height, cams.width) and np.isfinite(d).any()


def test_street_views_stand_on_roads(tiny_tile: Path) -> None:
    cams = read_camera_path(tiny_tile / "gt" / "views" / "street" / "camera_path.json")
    assert torch.allclose(cams.centers[:, 2], torch.full((len(cams),), 1.7, dtype=torch.float64))
    fwd = cams.camtoworlds[:, :3, 2]
    pitch = torch.rad2deg(torch.asin(fwd[:, 2]))
    torch.testing.assert_close(pitch, torch.full_like(pitch, 15.0), atol=1e-6, rtol=0)
    depth = np.load(tiny_tile / "gt" / "views" / "street" / "depth" / "00000.npy")
    assert np.isfinite(depth[-1]).all()  # the bottom row sees the road


def test_points3d_parse(tiny_tile: Path) -> None:
    city = SyntheticCity.from_tile(tiny_tile)
    dsm, geo = city.dsm(0.5)
    rows = [
        ln.split() for ln in (tiny_tile / "points3D.txt").read_text().splitlines() if not ln.startswith("#")
    ]
    assert 300 < len(rows) < 5000
    xyz = np.array([[float(v) for v in r[1:4]] for r in rows])
    rgb = np.array([[int(v) for v in r[4:7]] for r in rows])
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(len(r[8:]) % 2 == 0 and len(r[8:]) >= 4 for r in rows)  # >= 2 (image, point2D) pairs
    assert all(1 <= int(i) <= 6 for r in rows for i in r[8::2])
    assert rgb.min() >= 0 and rgb.max() <= 255 and rgb.max() > 100
    # Points lie on visible surfaces (+0.3 m noise): mostly on roofs or ground, i.e. near the DSM.
    j = np.clip(((xyz[:, 0] - geo["x_min"]) / 0.5).astype(int), 0, 511)
    i = np.clip(((geo["y_max"] - xyz[:, 1]) / 0.5).astype(int), 0, 511)
    dz = np.abs(xyz[:, 2] - dsm[i, j])
    assert np.median(dz) < 0.6 and np.abs(xyz[:, :2]).max() < 140


def test_from_tile_rebuilds_the_same_images(tiny_tile: Path) -> None:
    city = SyntheticCity.from_tile(tiny_tile)
    meta = json.loads((tiny_tile / "synth.json").read_text())
    assert city.layout.checksum() == meta["scene_checksum"]
    rendered, stored = rerender_frame(city, tiny_tile, 1)
    assert np.array_equal(rendered, stored)


def test_overwrite_and_errors(tiny_tile: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preset"):
        write_synthetic_tile(tmp_path / "x", preset="huge")
    with pytest.raises(ConfigError, match="not empty"):
        write_synthetic_tile(tiny_tile, preset="tiny")
    # Re-writing with overwrite reproduces the same bytes of the images (deterministic generation).
    before = {p.name: p.read_bytes() for p in (tiny_tile / "images").glob("*.png")}
    write_synthetic_tile(tiny_tile, preset="tiny", overwrite=True)
    after = {p.name: p.read_bytes() for p in (tiny_tile / "images").glob("*.png")}
    assert before == after
    assert (tiny_tile / "transforms_train.json").is_file()


def test_load_tile_reads_the_tiny_tile(tiny_tile: Path) -> None:
    tile_mod = pytest.importorskip(
        "skyfall.data.tile", reason="skyfall.data.tile (load_tile) is not available yet"
    )
    tile = tile_mod.load_tile(tiny_tile)
    meta = json.loads((tiny_tile / "synth.json").read_text())
    assert tile.train.names == meta["train"] and tile.test.names == meta["test"]
    assert tile.meta["seed"] == 0
    for split in (tile.train, tile.test):
        doc = json.loads(
            (tiny_tile / f"transforms_{'train' if split is tile.train else 'test'}.json").read_text()
        )
        for i, (name, fr) in enumerate(zip(split.names, doc["frames"], strict=True)):
            img = np.asarray(Image.open(tiny_tile / "images" / f"{name}.png"))
            assert np.array_equal(split.images[i].numpy(), img)
            assert np.array_equal(
                split.masks[i].numpy(), np.load(tiny_tile / "masks" / f"{name}.npy").astype(bool)
            )
            c2w = torch.tensor(fr["transform_matrix"], dtype=torch.float64)
            k = torch.tensor(
                [[fr["fl_x"], 0, fr["cx"]], [0, fr["fl_y"], fr["cy"]], [0, 0, 1]], dtype=torch.float64
            )
            torch.testing.assert_close(
                split.cameras.camtoworlds[i], c2w, rtol=1e-9, atol=1e-9 * c2w.abs().max().item()
            )
            torch.testing.assert_close(split.cameras.Ks[i], k, rtol=1e-9, atol=0)
    assert tile.points.shape[0] == meta["n_points"] and tile.colors.dtype == torch.uint8


def test_cli_module_is_light() -> None:
    code = "import sys, skyfall.cli.synth; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_orbit_gt_depth_is_camera_z(tiny_tile: Path) -> None:
    # Reproject the GT depth of the nadir-most orbit view to world points: they lie on the DSM surface
    # where the surface is flat ground (z = 0) for the most part.
    d = tiny_tile / "gt" / "views" / "orbit_e85_r300"
    cams = read_camera_path(d / "camera_path.json")
    depth = torch.from_numpy(np.load(d / "depth" / "00000.npy")).double()
    h, w = depth.shape
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    k = cams.Ks[0]
    pc = torch.stack([(u - k[0, 2]) / k[0, 0] * depth, (v - k[1, 2]) / k[1, 1] * depth, depth], -1)
    ok = torch.isfinite(depth)
    pw = pc[ok] @ cams.camtoworlds[0, :3, :3].T + cams.camtoworlds[0, :3, 3]
    assert ok.float().mean() > 0.3 and pw[:, :2].abs().max() < 131
    assert (pw[:, 2] > -2.01).all() and (pw[:, 2] < 70).all()
    assert (pw[:, 2].abs() < 0.01).float().mean() > 0.3  # much of the view is ground at z = 0
    assert math.isclose(float(cams.centers[0].norm()), 300.0, rel_tol=1e-9)


def test_supersample_box_filters_rgb_and_keeps_centre_depth(city: SyntheticCity) -> None:
    cam = Cameras(
        look_at(torch.tensor([150.0, 120.0, 160.0]), torch.zeros(3)), intrinsics_from_fov(50, 24, 20), 24, 20
    )
    r1 = city.render(cam, date=2)
    r2 = city.render(cam, date=2, supersample=2)
    rh = city.render(cam.scaled(2), date=2)
    torch.testing.assert_close(r2["rgb"][0], rh["rgb"][0].reshape(20, 2, 24, 2, 3).mean((1, 3)))
    assert torch.equal(r2["mask"][0], rh["mask"][0].reshape(20, 2, 24, 2).any(3).any(1))
    assert (r2["mask"] >= r1["mask"]).all() and r1["mask"].float().mean() > 0.2
    assert torch.equal(r2["depth"][r1["mask"]], r1["depth"][r1["mask"]])
    assert torch.isfinite(r2["depth"][r2["mask"]]).all()
