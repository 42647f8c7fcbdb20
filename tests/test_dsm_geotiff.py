"""Georeferenced DSMs: exact ENU <-> UTM resampling, GeoTIFF export, scoring against a truth GeoTIFF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rasterio")
pytest.importorskip("pyproj")

import rasterio  # noqa: E402

from skyfall.dsm import (  # noqa: E402
    DsmGrid,
    TileFrame,
    enu_to_map,
    read_geotiff,
    render_on_map_grid,
    sample_bilinear,
    utm_epsg,
    utm_grid,
    write_geotiff,
)
from skyfall.eval.geometry import shift_image  # noqa: E402
from skyfall.eval.truth import load_truth, score_truth  # noqa: E402
from skyfall.prepare.geodesy import ENUFrame  # noqa: E402

LON, LAT, H0 = -81.66, 30.31, -25.0  # Jacksonville (DFC2019 JAX), UTM zone 17N
EXTENT = (-100.0, 100.0, -100.0, 100.0)


def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth ENU height field (ENU z, metres): a slope, waves and a 12 m hill."""
    return (
        10.0
        + 0.05 * x
        + 8.0 * np.sin(2 * np.pi * x / 60.0) * np.cos(2 * np.pi * y / 45.0)
        + 12.0 * np.exp(-((x - 30.0) ** 2 + (y + 20.0) ** 2) / (2 * 12.0**2))
    )


def render_field(g: DsmGrid) -> np.ndarray:
    return field(*g.centres())


def exact_heights(frame: ENUFrame, crs: str, e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Ellipsoidal height of the surface ``field`` above map points (E, N), solved analytically."""
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(e, n)
    h = np.full(np.shape(e), frame.h0)
    for _ in range(6):
        enu = frame.from_geodetic(np.asarray(lon), np.asarray(lat), h)
        h = h + field(enu[..., 0], enu[..., 1]) - enu[..., 2]
    return h


def test_utm_zone_from_pyproj():
    assert utm_epsg(LON, LAT) == 32617
    assert utm_epsg(31.13, 29.98) == 32636  # Giza
    assert utm_epsg(151.2, -33.9) == 32756  # Sydney: southern hemisphere


def test_enu_field_exported_to_utm_matches_exact_heights_and_naive_resampling_does_not(tmp_path: Path):
    frame = ENUFrame(LON, LAT, H0)
    epsg, grid = utm_grid(frame, EXTENT, 0.5)
    crs = f"EPSG:{epsg}"
    heights, enu_grid = render_on_map_grid(render_field, grid, frame=frame, crs=crs, extent=EXTENT)
    assert enu_grid.resolution == 0.25
    path = write_geotiff(tmp_path / "dsm.tif", heights, grid, crs)

    with rasterio.open(path) as f:
        assert f.crs.to_epsg() == 32617 and f.nodata == -9999.0 and f.res == (0.5, 0.5)
        data = f.read(1)
        rng = np.random.default_rng(0)
        enu = np.stack([rng.uniform(-95, 95, 200), rng.uniform(-95, 95, 200), np.zeros(200)], 1)
        e, n, _ = enu_to_map(frame, crs, enu)
        rows, cols = rasterio.transform.rowcol(f.transform, e, n)
        ec, nc = rasterio.transform.xy(f.transform, rows, cols)  # the probe cells' centres
        got = data[np.asarray(rows), np.asarray(cols)].astype(np.float64)
    ec, nc = np.asarray(ec), np.asarray(nc)
    want = exact_heights(frame, crs, ec, nc)
    err = np.abs(got - want)
    assert err.max() < 1e-2, err.max()

    # Naive: map offsets from the origin's UTM position taken as ENU x, y (no convergence rotation,
    # no scale factor), ENU z + origin height as the ellipsoidal height.
    e0, n0, _ = enu_to_map(frame, crs, np.zeros(3))
    naive = field(ec - e0, nc - n0) + H0
    assert np.abs(naive - want).max() > 0.2
    # the corners of the UTM bounding box outside the (rotated) AOI are no-data
    assert (data == -9999.0).any() and (data != -9999.0).mean() > 0.98


def test_truth_with_known_shift_and_offset_is_recovered(tmp_path: Path):
    frame = ENUFrame(LON, LAT, H0)
    epsg, aoi_grid = utm_grid(frame, EXTENT, 0.5)
    crs = f"EPSG:{epsg}"
    # the truth tile is larger than the AOI (as DFC2019 truth tiles are): 20 m more on every side
    g = DsmGrid(aoi_grid.x_min - 20, aoi_grid.y_max + 20, 0.5, aoi_grid.width + 80, aoi_grid.height + 80)
    exact = exact_heights(frame, crs, *g.centres())
    truth = shift_image(exact, 2, -3) + 1.5
    write_geotiff(tmp_path / "truth.tif", truth, g, crs)

    t = load_truth(tmp_path / "truth.tif")
    assert t.grid == g and "32617" in t.crs
    score = score_truth(render_field, t, TileFrame(frame, EXTENT), extent=EXTENT)
    m = score.metrics
    assert (m["shift_rows"], m["shift_cols"]) == (2, -3)
    assert m["shift_e_m"] == -1.5 and m["shift_n_m"] == -1.0
    assert m["dz_m"] == pytest.approx(1.5, abs=2e-3)
    assert m["dsm_mae_m"] < 5e-3 and m["dsm_mae_unregistered_m"] > 1.0
    # cropped to the AOI's bounding box, not the whole truth tile
    assert score.grid.width < g.width - 60 and score.grid.height < g.height - 60
    assert m["dsm_completeness"] > 0.97
    assert np.nanmax(np.abs(score.diff)) < 0.05

    # a mask (0 = ignore) removes the west half of the truth from the score
    mask = np.ones((g.height, g.width), np.float32)
    mask[:, : g.width // 2] = 0
    write_geotiff(tmp_path / "mask.tif", mask, g, crs)
    half = score_truth(render_field, load_truth(tmp_path / "truth.tif", tmp_path / "mask.tif"),
                       TileFrame(frame, EXTENT), extent=EXTENT)  # fmt: skip
    assert 0.4 < half.metrics["n_truth_cells"] / m["n_truth_cells"] < 0.6
    assert (half.metrics["shift_rows"], half.metrics["shift_cols"]) == (2, -3)


def test_bilinear_sampling_is_exact_on_planes_and_skips_empty_cells():
    g = DsmGrid(0.0, 4.0, 1.0, 4, 4)
    x, y = g.centres()
    img = 2.0 * x - 3.0 * y
    px, py = np.array([0.7, 2.3, 3.5, 4.6]), np.array([3.2, 1.1, 0.5, 2.0])
    out = sample_bilinear(img, g, px, py)
    np.testing.assert_allclose(out[:3], 2.0 * px[:3] - 3.0 * py[:3], atol=1e-12)
    assert np.isnan(out[3])  # outside the grid
    img[1, 1] = np.nan
    v = sample_bilinear(img, g, np.array([1.5, 1.6, 2.3]), np.array([2.5, 2.5, 2.5]))
    # on the empty cell / 90 % of the weight on it: empty; 20 % on it: the other neighbour alone
    assert np.isnan(v[0]) and np.isnan(v[1]) and v[2] == img[1, 2]


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from skyfall.cli import entrypoint

    try:
        entrypoint(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


EVAL_FAST = ["--no-satellite", "--no-lpips", "--no-clip", "--geometry-views", "0", "--max-views", "1"]


def test_bad_truth_file_exits_2_naming_it(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    bad = tmp_path / "not_a_dsm.tif"
    bad.write_text("hello")
    code, _, err = _cli(["eval", str(tiny_run), "--dsm-truth", str(bad), "--out", str(tmp_path / "e"), *EVAL_FAST],
                        capsys)  # fmt: skip
    assert code == 2 and "not_a_dsm.tif" in err
    code, _, err = _cli(
        ["eval", str(tiny_run), "--dsm-truth", str(tmp_path / "missing.tif"), *EVAL_FAST], capsys
    )
    assert code == 2 and "missing.tif" in err and "not found" in err
    # a UTM truth for a synthetic (local-frame) tile
    utm = write_geotiff(
        tmp_path / "utm.tif", np.zeros((4, 4)), DsmGrid(435000.0, 3354000.0, 0.5, 4, 4), "EPSG:32617"
    )
    code, _, err = _cli(["eval", str(tiny_run), "--dsm-truth", str(utm), *EVAL_FAST], capsys)
    assert code == 2 and "utm.tif [crs]" in err


def test_export_dsm_on_a_synthetic_run_is_in_the_local_frame(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from skyfall.dsm import render_dsm
    from skyfall.export.run import load_run

    out = tmp_path / "d" / "dsm.tif"
    code, stdout, err = _cli(["export", str(tiny_run), "--format", "dsm", "--out", str(out)], capsys)
    assert code == 0, err
    assert "crs=local ENU" in stdout
    half = json.loads((tiny_tile / "synth.json").read_text())["size_m"] / 2
    r = read_geotiff(out)
    assert r.crs is None
    assert (r.grid.x_min, r.grid.y_max, r.grid.resolution) == (-half, half, 0.5)
    assert r.grid.width == r.grid.height == int(2 * half / 0.5)
    want = render_dsm(load_run(tiny_run).scene, r.grid)
    np.testing.assert_allclose(r.heights, want, atol=1e-4)  # float32 file, NaN <-> nodata
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["crs"] == "local ENU" and meta["completeness"] == pytest.approx(np.isfinite(want).mean())
    assert out.with_suffix(".png").stat().st_size > 0


def test_export_dsm_of_a_prepared_tile_is_utm_with_ellipsoidal_heights(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    tile = tmp_path / "tile"
    shutil.copytree(tiny_tile, tile)
    size = json.loads((tile / "synth.json").read_text())["size_m"]
    (tile / "prepare.json").write_text(
        json.dumps(
            {
                "aoi": {"lon": LON, "lat": LAT, "size_m": size},
                "enu_origin": {"lon": LON, "lat": LAT, "alt": H0},
            }
        )
    )
    local = tmp_path / "local.tif"
    assert _cli(["export", str(tiny_run), "--format", "dsm", "--out", str(local)], capsys)[0] == 0
    out = tmp_path / "utm" / "dsm.tif"
    code, stdout, err = _cli(
        ["export", str(tiny_run), "--format", "dsm", "--data", str(tile), "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "crs=EPSG:32617" in stdout
    r, loc = read_geotiff(out), read_geotiff(local)
    with rasterio.open(out) as f:
        assert f.crs.to_epsg() == 32617
    frame = ENUFrame(LON, LAT, H0)
    e0, n0, _ = enu_to_map(frame, "EPSG:32617", np.zeros(3))
    assert r.grid.x_min < e0 < r.grid.x_max and r.grid.y_min < n0 < r.grid.y_max
    # same surface, other frame: probe UTM cells, map their centres to ENU, compare with the local DSM
    ex, ny = r.grid.centres()
    ok = np.isfinite(r.heights)
    enu = frame.from_geodetic(*_lonlat(ex[ok], ny[ok]), r.heights[ok])
    back = sample_bilinear(loc.heights, loc.grid, enu[:, 0], enu[:, 1])
    both = np.isfinite(back)
    assert both.mean() > 0.95
    assert np.median(np.abs(back[both] - enu[both, 2])) < 0.05


def _lonlat(e: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pyproj import Transformer

    lon, lat = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True).transform(e, n)
    return np.asarray(lon), np.asarray(lat)


def test_eval_scores_a_local_truth_geotiff(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """End to end on the synthetic tile: its ground-truth DSM as a CRS-less GeoTIFF, shifted by (2, -3) cells."""
    dsm = np.load(tiny_tile / "gt" / "dsm.npy").astype(np.float64)
    g = DsmGrid.from_json(json.loads((tiny_tile / "gt" / "dsm.json").read_text()))
    truth = write_geotiff(tmp_path / "truth.tif", shift_image(dsm, 2, -3) + 1.5, g)
    out = tmp_path / "eval"
    code, _, err = _cli(
        ["eval", str(tiny_run), "--dsm-truth", str(truth), "--out", str(out), *EVAL_FAST], capsys
    )
    assert code == 0, err
    doc = json.loads((out / "eval.json").read_text())
    t = doc["checkpoints"][0]["geometry"]["truth"]
    assert t["file"] == str(truth) and 0 < t["dsm_completeness"] <= 1 and t["dsm_mae_m"] >= 0
    assert abs(t["shift_rows"]) <= 5 and abs(t["shift_cols"]) <= 5
    label = doc["checkpoints"][0]["label"].replace("@", "_")
    diff = read_geotiff(out / f"dsm_truth_diff_{label}.tif")
    assert diff.crs is None and diff.grid.resolution == g.resolution
    assert np.nanmean(np.abs(diff.heights)) == pytest.approx(t["dsm_mae_m"], rel=1e-4)
    assert (out / f"dsm_truth_diff_{label}.png").is_file()


def test_eval_uses_the_truth_dsm_of_prepare_json_and_recovers_a_known_shift(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """The run's own UTM export, shifted by (2, -3) cells and raised 1.5 m, as the prepared tile's truth."""
    tile = tmp_path / "tile"
    shutil.copytree(tiny_tile, tile)
    size = json.loads((tile / "synth.json").read_text())["size_m"]
    prep = {"aoi": {"size_m": size}, "enu_origin": {"lon": LON, "lat": LAT, "alt": H0}}
    (tile / "prepare.json").write_text(json.dumps(prep))
    exported = tmp_path / "export" / "dsm.tif"
    assert (
        _cli(
            ["export", str(tiny_run), "--format", "dsm", "--data", str(tile), "--out", str(exported)], capsys
        )[0]
        == 0
    )
    r = read_geotiff(exported)
    write_geotiff(tmp_path / "truth.tif", shift_image(r.heights, 2, -3) + 1.5, r.grid, r.crs)
    (tile / "prepare.json").write_text(json.dumps({**prep, "truth_dsm": "../truth.tif"}))
    out = tmp_path / "eval"
    code, _, err = _cli(["eval", str(tiny_run), "--data", str(tile), "--out", str(out), *EVAL_FAST], capsys)
    assert code == 0, err
    t = json.loads((out / "eval.json").read_text())["checkpoints"][0]["geometry"]["truth"]
    assert t["file"] == str(tile / "../truth.tif")
    assert (t["shift_rows"], t["shift_cols"]) == (2, -3)
    assert t["dz_m"] == pytest.approx(1.5, abs=0.02)
    assert t["dsm_mae_m"] < 0.02 and t["dsm_mae_unregistered_m"] > 1.0
    assert t["dsm_completeness"] > 0.98
    diff = read_geotiff(next(out.glob("dsm_truth_diff_*.tif")))
    assert diff.crs is not None and "32617" in diff.crs


def test_eval_scores_the_tiles_stereo_dsm_beside_the_checkpoint(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A tile whose dense heights (dense/field.npz) are the exact DSM: eval's stereo row recovers the
    truth's known shift and offset with no error left, on the same truth as the checkpoint's row."""
    from skyfall.prepare.dense import DenseHeights
    from skyfall.prepare.dense_field import save_field

    tile = tmp_path / "tile"
    shutil.copytree(tiny_tile, tile)
    dsm = np.load(tile / "gt" / "dsm.npy").astype(np.float64)
    g = DsmGrid.from_json(json.loads((tile / "gt" / "dsm.json").read_text()))
    save_field(
        tile / "dense" / "field.npz",
        DenseHeights(dsm, np.ones_like(dsm), g.x_min, g.y_max, g.resolution, 0.1, 9),
    )
    truth = write_geotiff(tmp_path / "truth.tif", shift_image(dsm, 2, -3) + 1.5, g)
    out = tmp_path / "eval"
    # one ENU sample per truth cell: the field is then read at its own cells, without blending
    args = ["eval", str(tiny_run), "--data", str(tile), "--dsm-truth", str(truth), "--dsm-oversample", "1"]
    code, printed, err = _cli([*args, "--out", str(out), *EVAL_FAST], capsys)
    assert code == 0, err
    doc = json.loads((out / "eval.json").read_text())
    s = doc["stereo_dsm"]
    assert s["file"] == str(truth) and "stereo DSM" in s["protocol"]
    assert (s["shift_rows"], s["shift_cols"]) == (2, -3) and s["dz_m"] == pytest.approx(1.5, abs=1e-6)
    assert s["dsm_mae_m"] < 1e-6 and s["dsm_completeness"] > 0.95
    assert doc["checkpoints"][0]["geometry"]["truth"]["dsm_mae_m"] > 10 * s["dsm_mae_m"]
    assert "| prepare | geometry | dsm_stereo |" in printed
    assert "prepare,geometry,dsm_stereo" in (out / "summary.csv").read_text()


def test_dsm_figure_cuts_to_the_common_cells_and_refuses_another_lattice(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dsm_figure", Path(__file__).resolve().parents[1] / "scripts" / "dsm_figure.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    g = DsmGrid(500000.0, 3350000.0, 0.5, 80, 60)
    h = field(*g.centres())
    truth = write_geotiff(tmp_path / "t.tif", h, g, "EPSG:32617")
    inner = g.window(5, 55, 10, 70)  # 50 x 60 cells, on the same lattice
    pred = write_geotiff(tmp_path / "p.tif", field(*inner.centres()) + 2.0, inner, "EPSG:32617")
    cut = mod.common_window([read_geotiff(truth), read_geotiff(pred)])
    assert [c.shape for c in cut] == [(50, 60), (50, 60)]
    np.testing.assert_allclose(cut[1] - cut[0], 2.0, atol=1e-4)
    img = mod.figure(truth, [pred], ["p"])
    assert img.shape == (2 * 50 + 4, 2 * 60 + 4, 3) and img.dtype == np.uint8
    off = DsmGrid(inner.x_min + 0.25, inner.y_max, 0.5, 60, 50)
    bad = write_geotiff(tmp_path / "b.tif", field(*off.centres()), off, "EPSG:32617")
    with pytest.raises(SystemExit, match="not on the grid"):
        mod.common_window([read_geotiff(truth), read_geotiff(bad)])
