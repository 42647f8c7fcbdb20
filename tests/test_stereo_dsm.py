"""The stereo DSM of a prepared tile: its dense heights on disk (`skyfall.prepare.dense_field`), as
GeoTIFFs (`skyfall.export.stereo`), scored against a truth (`skyfall.eval.stereo`), in the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skyfall.dsm import DsmGrid, map_to_enu, read_geotiff, sample_bilinear, write_geotiff
from skyfall.prepare.dense import DenseHeights
from skyfall.prepare.geodesy import ENUFrame

pytest.importorskip("rasterio")
pytest.importorskip("pyproj")

from skyfall.dsm import field_grid, field_sampler  # noqa: E402
from skyfall.eval.stereo import score_stereo  # noqa: E402
from skyfall.export.stereo import write_stereo_dsm  # noqa: E402
from skyfall.prepare.dense_field import field_path, load_field, save_field  # noqa: E402

# Jacksonville, like the synthetic RPC city; the tile's origin 20 m below the ground.
FRAME = ENUFrame(-81.66, 30.32, -10.0)
HALF = 32.0


def _field(res: float = 0.5) -> DenseHeights:
    """A 12 m high block (x in [-10, 6], y in [-4, 14]) on ground at z 20 with a gentle slope, the
    block matched well (score 0.9) and the ground poorly (0.2)."""
    n = int(2 * HALF / res)
    x = -HALF + (np.arange(n) + 0.5) * res
    y = HALF - (np.arange(n) + 0.5) * res
    xx, yy = np.meshgrid(x, y)
    block = (xx >= -10) & (xx <= 6) & (yy >= -4) & (yy <= 14)
    heights = 20.0 + 0.02 * xx - 0.01 * yy + np.where(block, 12.0, 0.0)
    score = np.where(block, 0.9, 0.2)
    return DenseHeights(heights, score, -HALF, HALF, res, res / 2, 100)


def _tile(root: Path, f: DenseHeights) -> Path:
    """A tile folder as far as the stereo DSM needs it: prepare.json's frame and AOI, the field."""
    root.mkdir(parents=True, exist_ok=True)
    prep = {"aoi": {"size_m": 2 * HALF}, "enu_origin": FRAME.to_dict()}
    (root / "prepare.json").write_text(json.dumps(prep))
    save_field(field_path(root), f)
    return root


def test_sampler_reads_the_field_at_its_cells_and_nothing_outside() -> None:
    f = _field()
    g = field_grid(f)
    assert (g.x_min, g.y_max, g.width, g.height) == (-HALF, HALF, 128, 128)
    np.testing.assert_array_equal(field_sampler(f)(g), f.heights)
    outside = DsmGrid(HALF + 5, HALF, 0.5, 4, 4)
    assert np.isnan(field_sampler(f)(outside)).all()


def test_dsm_cells_lie_on_the_field_in_the_enu_frame(tmp_path: Path) -> None:
    """Every written cell, taken back from (easting, northing, ellipsoidal height) to ENU, is a point of
    the field's surface: the map grid's cells land where the field says, at the field's height."""
    f = _field()
    meta = write_stereo_dsm(_tile(tmp_path, f), resolution=0.5)
    dsm = read_geotiff(tmp_path / "dense" / "dsm.tif")
    assert meta["crs"] == "EPSG:32617" and "UTM zone 17N" in dsm.crs
    assert dsm.grid.resolution == 0.5 and meta["grid"] == dsm.grid.to_json()
    x, y = dsm.grid.centres()
    ok = np.isfinite(dsm.heights)
    enu = map_to_enu(FRAME, meta["crs"], x[ok], y[ok], dsm.heights[ok])
    want = sample_bilinear(f.heights, field_grid(f), enu[:, 0], enu[:, 1])
    # away from the block's walls (each bilinear step spreads a wall over a cell either way)
    ex, ey = enu[:, 0], enu[:, 1]
    near = lambda v, edges: np.min([np.abs(v - e) for e in edges], axis=0) < 1.5  # noqa: E731
    wall = (near(ex, (-10, 6)) & (ey > -5.5) & (ey < 15.5)) | (near(ey, (-4, 14)) & (ex > -11.5) & (ex < 7.5))
    flat = ~wall
    assert flat.mean() > 0.9
    np.testing.assert_allclose(enu[flat, 2], want[flat], atol=2e-3)
    # heights above the ellipsoid: the ENU origin's height plus the field's z, to the curvature drop
    assert np.nanmin(dsm.heights) == pytest.approx(FRAME.h0 + 20 - 0.02 * HALF - 0.01 * HALF, abs=0.1)
    assert np.nanmax(dsm.heights) == pytest.approx(FRAME.h0 + 32 + 0.02 * 6 + 0.01 * 4, abs=0.1)
    # the AOI square is rotated against UTM north by the meridian convergence: corners are no-data
    assert meta["completeness"] == pytest.approx(1.0, abs=2e-3) and not ok.all()
    assert json.loads((tmp_path / "dense" / "dsm.json").read_text())["completeness"] == meta["completeness"]
    assert (tmp_path / "dense" / "dsm.png").stat().st_size > 0


def test_score_raster_follows_the_cells_it_was_matched_in(tmp_path: Path) -> None:
    f = _field()
    write_stereo_dsm(_tile(tmp_path, f))
    dsm = read_geotiff(tmp_path / "dense" / "dsm.tif")
    score = read_geotiff(tmp_path / "dense" / "score.tif")
    assert score.grid == dsm.grid
    ok = np.isfinite(dsm.heights)
    assert np.array_equal(np.isfinite(score.heights), ok)
    assert set(np.unique(score.heights[ok]).round(6)) == {0.2, 0.9}
    # high cells are the block's, matched at 0.9 (nearest cell: no blend at the walls)
    roof = dsm.heights[ok] > FRAME.h0 + 26
    assert np.isclose(score.heights[ok][roof], 0.9).mean() > 0.97
    assert np.isclose(score.heights[ok][~roof], 0.2).mean() > 0.97


def test_truth_scores_register_a_shift_and_a_datum_offset(tmp_path: Path) -> None:
    """A truth that is the field moved 1 m east and 3 m up scores MAE ~0 after the registration, which
    reports the shift and the offset."""
    f = _field(res=0.25)
    tile = _tile(tmp_path / "tile", f)
    write_stereo_dsm(tile)
    dsm = read_geotiff(tile / "dense" / "dsm.tif")
    g = dsm.grid
    moved = DsmGrid(g.x_min + 1.0, g.y_max, g.resolution, g.width, g.height)
    truth = write_geotiff(tmp_path / "truth.tif", dsm.heights + 3.0, moved, dsm.crs)
    t = score_stereo(tile, truth)
    assert t["file"] == str(truth)
    assert t["shift_e_m"] == pytest.approx(1.0) and t["shift_n_m"] == 0.0
    assert t["dz_m"] == pytest.approx(3.0, abs=0.02)
    assert t["dsm_mae_m"] < 0.02 and t["dsm_mae_unregistered_m"] > 2.0
    assert t["dsm_completeness"] > 0.95
    write_stereo_dsm(tile, truth_scores=t)
    assert json.loads((tile / "dense" / "dsm.json").read_text())["truth"] == t


def test_a_truth_elsewhere_is_reported_not_raised(tmp_path: Path) -> None:
    f = _field()
    far = DsmGrid(500000.0, 4000000.0, 1.0, 8, 8)
    truth = write_geotiff(tmp_path / "far.tif", np.full((8, 8), 5.0), far, "EPSG:32617")
    tile = _tile(tmp_path / "tile", f)
    assert "does not overlap the tile" in score_stereo(tile, truth)["error"]
    assert score_stereo(tmp_path, truth) is None  # no dense heights there


def test_cli_names_an_unreadable_truth_before_reading_images(tmp_path: Path) -> None:
    bad = tmp_path / "truth.tif"
    bad.write_text("not a tiff")
    proc = subprocess.run(
        [sys.executable, "-m", "skyfall", "prepare", str(tmp_path / "no_image.tif"), "--out",
         str(tmp_path / "tile"), "--dsm-truth", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "cannot read as a GeoTIFF DSM" in proc.stderr
    assert not (tmp_path / "tile").exists()


def test_negative_dsm_cell_is_one_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "skyfall", "prepare", str(tmp_path / "no_image.tif"), "--out",
         str(tmp_path / "tile"), "--dense-dsm", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "dense.dsm_resolution must be >= 0" in proc.stderr


def test_field_file_round_trips_and_a_bad_one_names_itself(tmp_path: Path) -> None:
    from skyfall.errors import TileFormatError

    assert load_field(tmp_path) is None  # a tile without dense heights
    f = _field()
    f.lowered = 0.25
    save_field(tmp_path / "dense" / "field.npz", f)
    back = load_field(tmp_path)
    np.testing.assert_allclose(back.heights, f.heights, rtol=1e-6)  # stored as float32
    np.testing.assert_allclose(back.score, f.score, rtol=1e-6)
    assert (back.x0, back.y1, back.resolution, back.step, back.planes, back.lowered) == (
        f.x0, f.y1, f.resolution, f.step, f.planes, 0.25,
    )  # fmt: skip
    (tmp_path / "dense" / "field.npz").write_bytes(b"garbage")
    with pytest.raises(TileFormatError, match="field.npz.*not a dense height field"):
        load_field(tmp_path)


def test_prepare_without_the_geo_extra_keeps_the_tile_and_says_why(monkeypatch, tmp_path: Path) -> None:
    """rasterio / pyproj are optional: the CLI reports why no stereo DSM was written, and goes on."""
    import skyfall.export.stereo as es
    from skyfall.cli.prepare import dsm_summary, stereo_outputs
    from skyfall.errors import MissingDependencyError

    def missing(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise MissingDependencyError('GeoTIFF output needs rasterio: pip install "skyfall[geo]"')

    monkeypatch.setattr(es, "write_stereo_dsm", missing)
    tile = _tile(tmp_path, _field())
    got = stereo_outputs(tile, {"dense": {"done": True}}, 0.5)
    assert got == {"written": False, "reason": 'GeoTIFF output needs rasterio: pip install "skyfall[geo]"'}
    assert dsm_summary(got, tmp_path) == f"not written: {got['reason']}"
    assert stereo_outputs(tile, {"dense": {"done": True}}, 0.0) is None  # --dense-dsm 0
    assert stereo_outputs(tile, {"dense": {"done": False}}, 0.5) is None


def test_a_tile_without_dense_heights_or_frame_is_named(tmp_path: Path) -> None:
    from skyfall.errors import TileFormatError

    with pytest.raises(TileFormatError, match="field.npz.*no dense heights"):
        write_stereo_dsm(tmp_path)
    save_field(field_path(tmp_path), _field())
    with pytest.raises(TileFormatError, match="prepare.json"):
        write_stereo_dsm(tmp_path)
