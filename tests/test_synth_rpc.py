"""Synthetic RPC products: RPC fit to the exact cameras, GeoTIFF round trip, biases, UTM DSM, prepare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skyfall.data.tile import load_tile
from skyfall.errors import MissingDependencyError
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.pinhole import project_pinhole
from skyfall.prepare.raster import read_satellite_image
from skyfall.synth import SyntheticCity
from skyfall.synth.rpc import (
    ANCHOR,
    DSM_NODATA,
    FIT_Z_MARGIN_M,
    check_rpc_options,
    fit_view_rpc,
    write_rpc_set,
)

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")

FRAME = ENUFrame(ANCHOR.lon, ANCHOR.lat, ANCHOR.h)
N_VIEWS = 5
MAE_STEREO_MAX = 99.0


@pytest.fixture(scope="module")
def rpc_tile(tiny_tile: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rpc") / "tile"
    shutil.copytree(tiny_tile, root)
    write_rpc_set(root, n_views=N_VIEWS, bias_px=2.0)
    return root


@pytest.fixture(scope="module")
def meta(rpc_tile: Path) -> dict:
    return json.loads((rpc_tile / "rpc" / "rpc.json").read_text())


def _camera(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    return _camera_of(load_tile(root), name)


def _camera_of(tile, name: str) -> tuple[np.ndarray, np.ndarray, int, int]:  # noqa: ANN001
    for split in (tile.train, tile.test):
        if name in split.names:
            i = split.names.index(name)
            cams = split.cameras
            return cams.Ks[i].numpy(), cams.camtoworlds[i].numpy(), cams.width, cams.height
    raise KeyError(name)


def _random_points(domain: dict, n: int, seed: int) -> np.ndarray:
    lo = [domain["x"][0], domain["y"][0], domain["z"][0]]
    hi = [domain["x"][1], domain["y"][1], domain["z"][1]]
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, 3))


def test_rpc_fit_reproduces_the_pinhole(rpc_tile: Path) -> None:
    city = SyntheticCity.from_tile(rpc_tile)
    z_range = (-FIT_Z_MARGIN_M, float(np.ceil(city.layout.max_height)) + FIT_Z_MARGIN_M)
    for name in ("sat_00", "sat_03"):
        K, c2w, w, h = _camera(rpc_tile, name)
        v = fit_view_rpc(K, c2w, w, h, FRAME, z_range, city.size_m / 2)
        assert v.fit_max_px < 1e-6 and v.check_max_px < 1e-6
        # Random points in the domain (not the fit's own check points), through the geodetic chain.
        xyz = _random_points(v.domain, 1000, seed=7)
        col, row = v.rpc.project(*FRAME.to_geodetic(xyz))
        exact = project_pinhole(K, c2w, xyz) - 0.5
        assert np.abs(np.stack([col, row], -1) - exact).max() < 1e-3
        # The domain covers the tile and the whole image footprint at both heights.
        assert v.domain["x"][0] <= -128 and v.domain["x"][1] >= 128
        uv = project_pinhole(K, c2w, np.array([[v.domain["x"][0], 0.0, 0.0], [v.domain["x"][1], 0.0, 0.0]]))
        assert uv[:, 0].min() <= 0 or uv[:, 0].max() >= w


def test_geotiff_reads_back_with_the_biased_rpc(rpc_tile: Path, meta: dict) -> None:
    city = SyntheticCity.from_tile(rpc_tile)
    z_range = (-FIT_Z_MARGIN_M, float(np.ceil(city.layout.max_height)) + FIT_Z_MARGIN_M)
    assert [v["name"] for v in meta["views"]] == [f"sat_{i:02d}" for i in range(N_VIEWS)]
    for k, view in enumerate(meta["views"]):
        img = read_satellite_image(rpc_tile / "rpc" / view["image"])
        assert img.rpc_source.endswith("(embedded)")
        png = np.asarray(Image.open(rpc_tile / view["tile_image"]).convert("RGB"))
        assert np.array_equal(img.pixels.astype(np.uint8), np.where(img.valid[..., None], png, 0))
        assert np.array_equal(img.valid, png.any(-1))
        K, c2w, w, h = _camera(rpc_tile, view["name"])
        mem = fit_view_rpc(K, c2w, w, h, FRAME, z_range, city.size_m / 2, tuple(view["bias_px"]), seed=k)
        xyz = _random_points(view["fit_domain_enu_m"], 500, seed=k)
        geo = FRAME.to_geodetic(xyz)
        got = np.stack(img.rpc.project(*geo), -1)
        assert np.abs(got - np.stack(mem.rpc.project(*geo), -1)).max() < 1e-6
        # In file pixels the RPC is the exact camera moved by the bias.
        u, v = img.rpc_to_file(got[:, 0], got[:, 1])
        want = project_pinhole(K, c2w, xyz) + np.array(view["bias_px"])
        assert np.abs(np.stack([u, v], -1) - want).max() < 1e-6


def test_bias_json_matches_the_rpc_shift(rpc_tile: Path, meta: dict) -> None:
    biases = np.array([v["bias_px"] for v in meta["views"]])
    assert np.array_equal(biases[0], [0.0, 0.0])
    lengths = np.linalg.norm(biases[1:], axis=1)
    assert lengths.min() >= 1.0 - 1e-12 and lengths.max() <= 2.0 + 1e-12
    assert len({tuple(b) for b in biases}) == N_VIEWS
    for view in meta["views"]:
        rpc = read_satellite_image(rpc_tile / "rpc" / view["image"]).rpc
        K, c2w, _, _ = _camera(rpc_tile, view["name"])
        xyz = _random_points(view["fit_domain_enu_m"], 200, seed=3)
        shift = np.stack(rpc.project(*FRAME.to_geodetic(xyz)), -1) - (project_pinhole(K, c2w, xyz) - 0.5)
        assert np.abs(shift - view["bias_px"]).max() < 1e-6
        assert view["check_max_px"] < 1e-6


def test_dsm_geotiff_is_utm_and_exact(rpc_tile: Path, meta: dict) -> None:
    city = SyntheticCity.from_tile(rpc_tile)
    with rasterio.open(rpc_tile / "rpc" / "dsm.tif") as ds:
        assert ds.crs.to_epsg() == 32617 == meta["dsm"]["epsg"]  # UTM 17N contains Jacksonville
        assert ds.res == (0.5, 0.5) and ds.transform.b == 0 and ds.transform.d == 0 and ds.transform.e < 0
        assert ds.nodata == DSM_NODATA
        z = ds.read(1).astype(np.float64)
        transform = ds.transform
    valid = z != DSM_NODATA
    assert not valid[0, 0] and not valid[-1, -1]  # the margin around the tile
    assert abs(valid.sum() / (256 / 0.5) ** 2 - 1) < 0.003  # the tile's area (UTM scale factor 0.9996..)

    # Every cell: (lon, lat of the cell centre, its height) lies on the city's surface in ENU.
    rows, cols = np.nonzero(valid)
    e, n = rasterio.transform.xy(transform, rows, cols)
    to_geo = pyproj.Transformer.from_crs(32617, 4326, always_xy=True)
    lon, lat = to_geo.transform(np.asarray(e), np.asarray(n))
    enu = FRAME.from_geodetic(lon, lat, z[rows, cols])
    gap = np.abs(enu[:, 2] - city.height_at(enu[:, 0], enu[:, 1]))
    # float32 storage: ~2e-6 m. Cells within millimetres of a wall may settle on either side.
    off = gap > 1e-5
    assert off.mean() < 1e-3
    x, y = enu[off, 0], enu[off, 1]
    at_wall = np.zeros(len(x), bool)
    for dx, dy in ((0.01, 0.0), (-0.01, 0.0), (0.0, 0.01), (0.0, -0.01)):
        at_wall |= city.height_at(x + dx, y + dy) != city.height_at(x, y)
    assert at_wall.all()
    # The same check on UTM coordinates taken as ENU offsets from the anchor (no meridian
    # convergence, no scale factor) fails on many cells: the check sees the georeferencing.
    e0, n0 = pyproj.Transformer.from_crs(4326, 32617, always_xy=True).transform(ANCHOR.lon, ANCHOR.lat)
    naive = np.abs(z[rows, cols] - ANCHOR.h - city.height_at(np.asarray(e) - e0, np.asarray(n) - n0))
    assert (naive > 1e-3).mean() > 0.02

    # Probes on roofs: height = anchor height + roof height (+ Earth curvature, < 3 mm here).
    to_utm = pyproj.Transformer.from_crs(4326, 32617, always_xy=True)
    lay = city.layout
    big = np.nonzero((lay.box_kind == 1) & ((lay.box_hi - lay.box_lo)[:, :2].min(1) > 4))[0][:5]
    assert len(big) == 5
    for b in big:
        cx, cy = 0.5 * (lay.box_lo[b, :2] + lay.box_hi[b, :2])
        top = city.height_at(np.array(cx), np.array(cy))
        plon, plat, _ = FRAME.to_geodetic(np.array([cx, cy, top]))
        pe, pn = to_utm.transform(plon, plat)
        r, c = rasterio.transform.rowcol(transform, pe, pn)
        assert abs(z[r, c] - (ANCHOR.h + top)) < 5e-3
        clon, clat = to_geo.transform(*rasterio.transform.xy(transform, r, c))
        p = FRAME.from_geodetic(clon, clat, z[r, c])
        assert abs(p[2] - top) < 1e-3 and abs(city.height_at(p[0], p[1]) - top) < 1e-9


@pytest.fixture(scope="module")
def prepared(rpc_tile: Path, meta: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tile as `skyfall prepare --dsm-truth` makes it: prepare_tile, then the CLI's stereo DSM
    step (its result under the summary's ``"stereo"``)."""
    from skyfall.cli.prepare import stereo_outputs
    from skyfall.prepare import PrepareConfig, prepare_tile
    from skyfall.prepare.pipeline import parse_aoi, parse_range

    cfg = PrepareConfig(
        aoi=parse_aoi(meta["prepare"]["aoi"]),
        alt_range=parse_range(meta["prepare"]["alt_range"], "x"),
        match=False,
        truth_dsm=rpc_tile / "rpc" / "dsm.tif",
    )
    images = [rpc_tile / "rpc" / v["image"] for v in meta["views"]]
    out = tmp_path_factory.mktemp("prep") / "prep"
    summary = prepare_tile(images, out, cfg)
    return out, {**summary, "stereo": stereo_outputs(out, summary, 0.5)}


def test_prepare_recovers_the_exact_cameras(rpc_tile: Path, meta: dict, prepared: tuple[Path, dict]) -> None:
    out, summary = prepared
    prep = load_tile(out)
    # prepare's ENU frame shares the anchor's tangent plane, its origin lower by dz along the normal.
    dz = ANCHOR.h - summary["enu_origin"]["alt"]
    assert dz == pytest.approx(25.0)
    xyz = np.random.default_rng(0).uniform([-128, -128, 0], [128, 128, 50], size=(300, 3))
    for view, vs in zip(meta["views"], summary["views"], strict=True):
        K, c2w, _, _ = _camera(rpc_tile, view["name"])
        K2, c2w2, _, _ = _camera_of(prep, view["name"])
        want = project_pinhole(K, c2w, xyz) + np.array(view["bias_px"]) - np.array(vs["crop_file_px"][:2])
        got = project_pinhole(K2, c2w2, xyz + [0.0, 0.0, dz])
        assert np.abs(got - want).max() < 1e-4


def test_prepare_writes_a_stereo_dsm_scored_against_the_truth(
    rpc_tile: Path, prepared: tuple[Path, dict]
) -> None:
    """The dense heights come out as a UTM DSM on the truth's own 0.5 m lattice, scored like `eval
    --dsm-truth` would; the truth is recorded in prepare.json as eval's default."""
    from skyfall.cli.prepare import format_summary
    from skyfall.dsm import read_geotiff, tile_frame
    from skyfall.eval.geometry import dsm_metrics

    out, summary = prepared
    d = summary["stereo"]
    assert d["written"] and d["file"] == "dsm.tif" and d["completeness"] > 0.99
    assert summary["dense"]["field"] == "dense/field.npz"
    dsm = read_geotiff(out / "dense" / d["file"])
    truth = read_geotiff(rpc_tile / "rpc" / "dsm.tif")
    assert "UTM zone 17N" in dsm.crs and dsm.grid.resolution == 0.5
    t = d["truth"]
    # 64² views (4 m pixels) are too coarse for the heights to mean much (the README chain's 442²
    # ones: 1.5-2.2 m); what is checked here is that the figure is the file's.
    assert t["dsm_completeness"] > 0.95 and t["n_truth_cells"] > 0.9 * dsm.heights.size
    assert tile_frame(out).truth_dsm == (rpc_tile / "rpc" / "dsm.tif").resolve()
    # The written file against the truth cell for cell (both on 0.5 m UTM grids with edges on
    # multiples of 0.5 m): no ENU frame in between, the same figure.
    assert truth.grid.resolution == dsm.grid.resolution == t["resolution_m"]
    r = dsm.grid.resolution
    c0, r0 = round((dsm.grid.x_min - truth.grid.x_min) / r), round((truth.grid.y_max - dsm.grid.y_max) / r)
    assert c0 >= 0 and r0 >= 0
    gt = truth.heights[r0 : r0 + dsm.grid.height, c0 : c0 + dsm.grid.width]
    direct = dsm_metrics(dsm.heights[: gt.shape[0], : gt.shape[1]], gt, radius=5, pyramid=False)
    assert direct["dsm_mae_m"] == pytest.approx(t["dsm_mae_m"], abs=0.02)
    line = format_summary(summary, out, d)
    assert f"stereo DSM: {out / 'dense/dsm.tif'}" in line and f"MAE {t['dsm_mae_m']:.3f} m" in line


def test_cli_rejects_bad_rpc_options_before_rendering(tmp_path: Path) -> None:
    for opts, field in ((["--rpc-views", "7"], "--rpc-views"), (["--rpc-bias-px", "-1"], "--rpc-bias-px")):
        proc = subprocess.run(
            [sys.executable, "-m", "skyfall", "synth", str(tmp_path / "t"), "--preset", "tiny", "--rpc", *opts],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and field in proc.stderr + proc.stdout
        assert not (tmp_path / "t").exists()


def test_height_at_is_the_dsm_rule() -> None:
    city = SyntheticCity.generate(3, 96.0)
    dsm, g = city.dsm(0.5)
    xs = g["x_min"] + (np.arange(g["width"]) + 0.5) * 0.5
    ys = g["y_max"] - (np.arange(g["height"]) + 0.5) * 0.5
    assert np.array_equal(city.height_at(*np.meshgrid(xs, ys)).astype(np.float32), dsm)
    assert np.isnan(city.height_at(np.array([60.0]), np.array([0.0])))[0]


def test_missing_geo_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "skyfall\[geo\]"'):
        check_rpc_options("tiny", 3, 2.0)


def test_info_reports_what_prepare_made(prepared: tuple[Path, dict]) -> None:
    from skyfall.cli.info import summarize

    out, summary = prepared
    lines = summarize(load_tile(out))
    a = summary["aoi"]
    assert f"prepared     AOI {a['lon']:.6f},{a['lat']:.6f} {a['size_m']:g} m, heights" in "\n".join(lines)
    t = summary["stereo"]["truth"]
    assert f"stereo DSM   {out / 'dense/dsm.tif'} (0.5 m cells" in "\n".join(lines)
    assert f"MAE {t['dsm_mae_m']:.3f} m" in lines[-2] and lines[-1] == f"truth DSM    {summary['truth_dsm']}"


def test_overwriting_without_dense_heights_leaves_no_stale_stereo_dsm(
    rpc_tile: Path, meta: dict, prepared: tuple[Path, dict], tmp_path: Path
) -> None:
    from skyfall.prepare import PrepareConfig, prepare_tile
    from skyfall.prepare.dense import DenseConfig
    from skyfall.prepare.dense_field import load_field
    from skyfall.prepare.pipeline import parse_aoi, parse_range

    out = tmp_path / "tile"
    shutil.copytree(prepared[0], out)
    assert load_field(out) is not None
    cfg = PrepareConfig(
        aoi=parse_aoi(meta["prepare"]["aoi"]),
        alt_range=parse_range(meta["prepare"]["alt_range"], "x"),
        match=False,
        dense=DenseConfig(enabled=False),
    )
    summary = prepare_tile([rpc_tile / "rpc" / v["image"] for v in meta["views"]], out, cfg, overwrite=True)
    assert summary["dense"] == {"done": False} and not (out / "dense").exists() and load_field(out) is None
