"""`skyfall prepare` on the real Pléiades Giza pair (../shared/data/phr_gizeh, OSSIM .geom RPCs).

Stated accuracies checked here (full resolution is 0.5 m/px; crops below are downsampled):
pinhole vs RPC over the AOI x altitude range <= 0.05 px max; the two views' rays for matched points
meet within 0.25 m (median) after the joint bundle adjustment, and the adjustment shrinks the gap;
without --aoi / --alt-range the AOI and the height range are chosen from the data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "phr_gizeh"
pytestmark = pytest.mark.skipif(
    not (DATA / "img1.tif").is_file(),
    reason=f"the Pléiades Giza sample is not at {DATA} (shared data folder next to the checkout)",
)
IMAGES = [DATA / "img1.tif", DATA / "img2.tif"]
ALT = (40.0, 220.0)  # Giza plateau ground to pyramid tops, ellipsoidal metres


@pytest.fixture(scope="module")
def aoi() -> tuple[float, float, float]:
    """A 200 m AOI at the geographic position of img1's central pixel (at 100 m height)."""
    from skyfall.prepare import read_satellite_image

    im = read_satellite_image(IMAGES[0])
    a = im.file_from_rpc  # file = a @ (col, row, 1); pure translation for this sample
    lon, lat = im.rpc.localize(im.width / 2 - a[0, 2], im.height / 2 - a[1, 2], 100.0)
    return float(lon), float(lat), 200.0


@pytest.fixture(scope="module")
def giza_tile(tmp_path_factory: pytest.TempPathFactory, aoi: tuple[float, float, float]) -> tuple[Path, dict]:
    from skyfall.prepare import PrepareConfig, prepare_tile

    out = tmp_path_factory.mktemp("giza") / "tile"
    summary = prepare_tile(IMAGES, out, PrepareConfig(aoi=aoi, alt_range=ALT, downsample=4))
    return out, summary


def test_geom_rpc_localize_round_trip_and_crop_offset() -> None:
    from skyfall.prepare import read_satellite_image

    im = read_satellite_image(IMAGES[0])
    # The crop's ModelTransformationTag places it inside the 40000 x 13644 full scene.
    assert im.rpc.samp_off > 10 * im.width and im.file_from_rpc[0, 2] < -im.width
    col = np.array([20500.0, 20900.0, 21299.0])
    row = np.array([5000.0, 5400.0, 5800.0])
    h = np.array([50.0, 120.0, 200.0])
    lon, lat = im.rpc.localize(col, row, h)
    c2, r2 = im.rpc.project(lon, lat, h)
    assert np.abs(c2 - col).max() < 1e-6 and np.abs(r2 - row).max() < 1e-6


def test_geom_rpc_matches_rpcm() -> None:
    rpcm = pytest.importorskip("rpcm", reason="rpcm is an optional cross-check")
    from skyfall.prepare.rpc import read_geom

    ours = read_geom(DATA / "img1.geom")
    d = {k.upper(): v for k, v in (ln.split(":", 1) for ln in (DATA / "img1.geom").read_text().splitlines())}
    theirs = rpcm.RPCModel(
        {
            "LINE_OFF": d["LINE_OFF"], "SAMP_OFF": d["SAMP_OFF"], "LAT_OFF": d["LAT_OFF"],
            "LONG_OFF": d["LONG_OFF"], "HEIGHT_OFF": d["HEIGHT_OFF"], "LINE_SCALE": d["LINE_SCALE"],
            "SAMP_SCALE": d["SAMP_SCALE"], "LAT_SCALE": d["LAT_SCALE"], "LONG_SCALE": d["LONG_SCALE"],
            "HEIGHT_SCALE": d["HEIGHT_SCALE"],
            **{f"{k}_COEFF": " ".join(d[f"{k}_COEFF_{i:02d}"] for i in range(20))
               for k in ("LINE_NUM", "LINE_DEN", "SAMP_NUM", "SAMP_DEN")},
        },
        dict_format="geotiff",
    )  # fmt: skip
    lon, lat, h = np.array([31.13, 31.135]), np.array([29.975, 29.98]), np.array([60.0, 150.0])
    c1, r1 = ours.project(lon, lat, h)
    c2, r2 = theirs.projection(lon, lat, h)
    assert np.abs(c1 - c2).max() < 1e-6 and np.abs(r1 - r2).max() < 1e-6


def test_pinholes_reproduce_rpc_over_aoi(
    giza_tile: tuple[Path, dict], aoi: tuple[float, float, float]
) -> None:
    from skyfall.data.tile import load_tile
    from skyfall.prepare import ENUFrame, read_satellite_image

    out, summary = giza_tile
    for v in summary["views"]:
        assert v["check_max_px"] <= 0.05, v
    # Independent check from the written files: tile cameras vs the RPCs (undoing the BA offsets).
    tile = load_tile(out)
    o = summary["enu_origin"]
    frame = ENUFrame(o["lon"], o["lat"], o["alt"])
    half = aoi[2] / 2
    pts = np.random.default_rng(3).uniform(
        [-half, -half, ALT[0] - o["alt"]], [half, half, ALT[1] - o["alt"]], (500, 3)
    )
    lon, lat, h = frame.to_geodetic(pts)
    r = summary["downsample"]
    for i, (img, v) in enumerate(zip(IMAGES, summary["views"], strict=True)):
        sat = read_satellite_image(img)
        u, w = sat.rpc_to_file(*sat.rpc.project(lon, lat, h))
        want = (np.stack([u, w], -1) - v["crop_file_px"][:2]) / r + summary["bundle_adjustment"][
            "offsets_px"
        ][i]
        K = tile.train.cameras.Ks[i].numpy()
        c2w = tile.train.cameras.camtoworlds[i].numpy()
        from skyfall.prepare.pinhole import project_pinhole

        assert np.abs(project_pinhole(K, c2w, pts) - want).max() < 0.05


def test_matched_rays_meet(giza_tile: tuple[Path, dict]) -> None:
    _, summary = giza_tile
    ba = summary["bundle_adjustment"]
    assert ba["done"] and ba["inliers"] >= 100
    assert ba["ray_gap_m"]["median"] <= 0.25
    assert ba["ray_gap_m"]["median"] < ba["ray_gap_before_m"]["median"]
    assert ba["reproj_rms_px"] <= 0.2


def test_tile_loads_and_points_are_in_the_aoi(
    giza_tile: tuple[Path, dict], aoi: tuple[float, float, float]
) -> None:
    from skyfall.data.tile import load_tile

    out, summary = giza_tile
    tile = load_tile(out)
    assert len(tile.train) == 2 and len(tile.test) == 0
    assert tile.train.images.shape[1:3] == (summary["height"], summary["width"])
    assert tile.train.masks.float().mean() > 0.9
    pts = tile.points.numpy()
    assert len(pts) >= 50 and "NCC matches" in summary["points3D"]["method"]
    assert np.abs(pts[:, :2]).max() <= 1.05 * aoi[2] / 2
    # Heights: Giza ground is ~50-70 m (ellipsoidal); the ENU origin is 20 m under the range's bottom.
    z = pts[:, 2] + summary["enu_origin"]["alt"]
    assert ALT[0] - 10 <= np.median(z) <= ALT[1]
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["aoi"]["alt_range"] == list(ALT)


def test_stage1_tiny_runs_on_prepared_tile(giza_tile: tuple[Path, dict], tmp_path: Path, tiny_config) -> None:
    from skyfall.train.stage1 import train_stage1

    cfg = tiny_config.stage1
    # The tiny preset's pseudo-depth prior reads synthetic ground truth, which a real tile lacks.
    cfg = dataclasses.replace(cfg, steps=20, pseudo=dataclasses.replace(cfg.pseudo, enabled=False))
    summary = train_stage1(cfg, giza_tile[0], tmp_path / "run", progress=False)
    assert summary["stage1"]["steps"] == 20 and summary["num_gaussians"] > 0
    assert sorted((tmp_path / "run" / "ckpts").glob("ckpt_*.pt"))
    train_psnr = [v for k, v in summary["stage1"].items() if "psnr" in k and isinstance(v, float)]
    assert all(np.isfinite(train_psnr))


def test_aoi_outside_footprint_is_one_clear_error(tmp_path: Path) -> None:
    from skyfall.prepare import AOIError, PrepareConfig, prepare_tile

    with pytest.raises(AOIError, match=r"img1\.tif: the area of interest .* outside the image footprint"):
        prepare_tile(IMAGES, tmp_path / "t", PrepareConfig(aoi=(31.3, 29.9, 200.0), alt_range=ALT))


def test_single_view_uses_documented_fallback(tmp_path: Path, aoi: tuple[float, float, float]) -> None:
    from skyfall.prepare import PrepareConfig, prepare_tile

    s = prepare_tile(IMAGES[:1], tmp_path / "t", PrepareConfig(aoi=aoi, alt_range=ALT, downsample=8))
    assert not s["bundle_adjustment"]["done"] and "only one view" in s["bundle_adjustment"]["reason"]
    assert s["points3D"]["method"].startswith("plane fallback") and s["points3D"]["count"] > 100


def test_default_aoi_and_height_range(tmp_path: Path) -> None:
    from skyfall.prepare import PrepareConfig, prepare_tile

    s = prepare_tile(IMAGES, tmp_path / "t", PrepareConfig(downsample=4))
    a = s["aoi"]
    # Two ~400 m x 400 m crops that overlap in part: a square of a few hundred metres, seen by both.
    assert a["chosen_by"].startswith("largest square inside the common footprint of 2 view(s)")
    assert 150.0 <= a["size_m"] <= 400.0
    assert all(v["aoi_inside_image"] == 1.0 for v in s["views"])
    # Ground at ~70 m, pyramid tops at ~215 m (ellipsoidal): the estimate brackets both, far inside
    # the RPC's 10..270 m height range.
    lo, hi = a["alt_range"]
    assert 45.0 <= lo <= 70.0 and 200.0 <= hi <= 235.0, a
    assert a["alt_range_chosen_by"].startswith("1st..99th percentile")
    assert s["bundle_adjustment"]["done"] and s["bundle_adjustment"]["reproj_rms_after_px"] <= 0.1


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, aoi: tuple[float, float, float]) -> dict:
    """The Great Pyramid measured in the stereo DSM of a 1 m/px tile (scripts/giza_pyramid.py)."""
    import importlib.util

    from skyfall.prepare import PrepareConfig, prepare_tile

    pytest.importorskip("rasterio")
    pytest.importorskip("pyproj")
    from skyfall.export.stereo import write_stereo_dsm

    out = tmp_path_factory.mktemp("giza_dsm") / "tile"
    prepare_tile(IMAGES, out, PrepareConfig(aoi=aoi, alt_range=ALT, downsample=2))
    write_stereo_dsm(out)  # what `skyfall prepare` does after the tile
    script = Path(__file__).resolve().parents[1] / "scripts" / "giza_pyramid.py"
    spec = importlib.util.spec_from_file_location("giza_pyramid", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.measure(out / "dense" / "dsm.tif")


def test_stereo_dsm_measures_the_great_pyramid(pyramid: dict) -> None:
    """Real imagery, known geometry: the pyramid stands 138.5 m above its base with faces at 51.84 deg
    facing the cardinal directions (UTM 36N grid north is 0.93 deg east of true north there, so the
    faces fall towards 90.9 and 180.9 deg of grid azimuth). 1 m/px here (2x downsampled): 136.0 m,
    53.0 / 52.4 deg; the 0.5 m/px chain of the README: 134.9 m, 51.6 / 51.8 deg."""
    assert pyramid["height_m"] == pytest.approx(138.5, abs=10.0)
    for face, azimuth in (("east", 90.93), ("south", 180.93)):
        f = pyramid["faces"][face]
        assert f["slope_deg"] == pytest.approx(51.84, abs=2.5), face
        assert f["downhill_azimuth_deg"] == pytest.approx(azimuth, abs=2.5), face
        assert f["residual_mad_m"] < 4.0, face
