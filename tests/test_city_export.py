"""`skyfall city export`: merged splats and chunks, one common appearance, the DSM mosaic (local and
UTM), the seam report, missing runs. Test cities are 2x2 grids of 64 m cores whose four runs are
copies of the session's `tiny_run` (its Gaussians cover 256 m, so every tile covers its core and
margin); tile z origins differ so that every shift is checked in 3D."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from skyfall.city.export import (
    CityExport,
    MissingRunError,
    dsm_seam_report,
    export_city,
    resolve_embedding,
)
from skyfall.city.folders import CityFolder
from skyfall.city.manifest import CityManifest, grid
from skyfall.city.merge import in_core, seam_mask
from skyfall.dsm import DsmGrid, enu_footprint, read_geotiff, render_dsm, sample_bilinear
from skyfall.errors import ConfigError, SkyfallError
from skyfall.export import read_ply, read_spz, to_up_axis
from skyfall.export.run import baked_splats, load_run
from skyfall.export.upaxis import Z_UP_TO_NEG_Y_UP

S = 64.0  # core edge (m)
OV = 16.0  # tile margin (m)
RES = 1.0  # DSM cell (m)


def _manifest(**kw) -> CityManifest:
    m = grid(2, 2, S, OV, origin=(-S, -S), **kw)
    cells = [
        dataclasses.replace(c, origin=(c.origin[0], c.origin[1], 1.5 * (i + 1)))
        for i, c in enumerate(m.cells)
    ]
    return dataclasses.replace(m, cells=tuple(cells))


def _city(root: Path, run: Path, **kw) -> CityFolder:
    folder = CityFolder(root)
    m = _manifest(**kw)
    m.to_json(folder.manifest_path)
    for c in m.cells:
        shutil.copytree(run, folder.run(c))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[CityFolder, CityExport]:
    folder = _city(tmp_path_factory.mktemp("city") / "city", tiny_run)
    # An exact "truth" of 0 m everywhere: the seam report is then the mosaic's own mean |height|.
    folder.gt_dir.mkdir()
    np.save(folder.gt_dir / "dsm.npy", np.zeros((288, 288), np.float32))
    gt = {"x_min": -72.0, "y_max": 72.0, "resolution": 0.5, "width": 288, "height": 288, "crs": "local ENU"}
    (folder.gt_dir / "dsm.json").write_text(json.dumps(gt))
    return folder, export_city(folder.root, dsm_resolution=RES, progress=False)


def _expected(folder: CityFolder, cell, index, up: str = "y"):
    """A cell's owned splats, computed here from the run: bake, crop, + origin, rotate."""
    m = folder.manifest()
    splats, _ = baked_splats(load_run(folder.run(cell)), index, option="--embedding")
    ox, oy, _ = cell.origin
    own = splats.subset(in_core(splats.means[:, 0] + ox, splats.means[:, 1] + oy, cell.core, m.bounds))
    enu = own.means.astype(np.float64) + np.asarray(cell.origin)
    return own, enu, to_up_axis(own, up)


def test_merged_splats_are_each_cells_owned_gaussians_in_the_city_frame(exported):
    folder, r = exported
    m = folder.manifest()
    index = json.loads(r.chunks_json.read_text())
    assert index["count"] == r.total == sum(r.counts.values()) > 0
    assert [c["cell"] for c in index["chunks"]] == [c.name for c in m.cells] and index["missing"] == []
    assert index["up_rotation"] == Z_UP_TO_NEG_Y_UP.tolist() and index["format"] == "ply"
    chunks = []
    for cell, entry in zip(m.cells, index["chunks"], strict=True):
        path = r.export_dir / entry["file"]
        assert path == r.chunks[cell.name] and entry["bytes"] == path.stat().st_size
        got = read_ply(path)
        assert len(got) == entry["count"] == r.counts[cell.name] > 50
        assert entry["core"] == list(cell.core)
        own, enu, rotated = _expected(folder, cell, 0)
        # position = R (tile position + origin), computed in float64 and stored once as float32
        np.testing.assert_array_equal(got.means, (enu @ Z_UP_TO_NEG_Y_UP.T).astype(np.float32))
        np.testing.assert_allclose(got.sh, rotated.sh, atol=1e-6)
        np.testing.assert_allclose(got.quats, rotated.quats, atol=1e-6)
        np.testing.assert_array_equal(got.scales, own.scales)
        np.testing.assert_array_equal(got.opacities, own.opacities)
        assert np.allclose(entry["bounds_enu"]["min"], enu.min(0)) and np.allclose(
            entry["bounds_enu"]["max"], enu.max(0)
        )
        assert np.allclose(entry["bounds"]["min"], got.means.min(0)) and np.allclose(
            entry["bounds"]["max"], got.means.max(0)
        )
        chunks.append(got)
    # the single file is the chunks, row for row, and every Gaussian lies in exactly one core
    merged = read_ply(r.single)
    assert r.single.name == "city.ply" and index["single_file"] == "city.ply" and len(merged) == r.total
    np.testing.assert_array_equal(merged.means, np.concatenate([c.means for c in chunks]))
    np.testing.assert_array_equal(merged.sh, np.concatenate([c.sh for c in chunks]))
    enu = merged.means.astype(np.float64) @ Z_UP_TO_NEG_Y_UP  # R^T p, row-wise
    owners = sum(in_core(enu[:, 0], enu[:, 1], c.core, m.bounds).astype(int) for c in m.cells)
    assert np.all(owners == 1)


def test_default_embedding_is_the_first_image_every_tile_has(exported):
    _, r = exported
    assert r.embedding == "sat_00" and r.embedding_default
    assert r.embedding_indices == {f"r00{i}c00{j}": 0 for i in range(2) for j in range(2)}
    index = json.loads(r.chunks_json.read_text())
    assert index["embedding"] == {"name": "sat_00", "default": True, "indices": r.embedding_indices}


def test_dsm_mosaic_is_each_tiles_dsm_shifted_by_its_origin(exported):
    folder, r = exported
    m = folder.manifest()
    d = r.dsm
    assert d.crs is None and d.grid == DsmGrid(-S, S, RES, 128, 128)
    tif = read_geotiff(d.path)
    assert tif.crs is None and tif.grid == d.grid
    np.testing.assert_array_equal(tif.heights, d.heights.astype(np.float32))
    for cell in m.cells:
        x0, x1, y0, y1 = cell.core
        c0, c1, r0, r1 = int(x0 + S), int(x1 + S), int(S - y1), int(S - y0)
        ox, oy, oz = cell.origin
        tile_grid = DsmGrid(x0 - ox, y1 - oy, RES, c1 - c0, r1 - r0)
        own = render_dsm(load_run(folder.run(cell)).scene, tile_grid).astype(np.float64) + oz
        np.testing.assert_array_equal(d.heights[r0:r1, c0:c1], own)
    meta = json.loads(d.meta.read_text())
    assert DsmGrid.from_json(meta) == d.grid and meta["crs"] == "local ENU"
    assert meta["completeness"] == d.completeness > 0.95
    assert set(meta["cells"]) == {c.name for c in m.cells}
    assert (r.export_dir / "dsm.png").is_file()
    # truth 0 m: every statistic is the mosaic's own |height|, split by the seam band
    rep = json.loads(r.seams_path.read_text())
    assert rep == r.seams
    gx, gy = d.grid.centres()
    seam = seam_mask(m.cells, gx, gy, 10.0)
    fin = np.isfinite(d.heights)
    assert rep["seam"]["count"] == int((seam & fin).sum()) and rep["interior"]["count"] == int(
        (~seam & fin).sum()
    )
    assert rep["seam"]["mae_m"] == pytest.approx(np.abs(d.heights[seam & fin]).mean())
    assert rep["all"]["mae_m"] == pytest.approx(np.abs(d.heights[fin]).mean())


def test_seam_report_on_known_errors(tmp_path):
    folder = CityFolder(tmp_path / "city")
    m = _manifest()
    m.to_json(folder.manifest_path)
    g = DsmGrid(-S, S, RES, 128, 128)
    gx, gy = g.centres()
    mosaic = 10.0 + 0.1 * gx - 0.05 * gy
    seam = seam_mask(m.cells, gx, gy, 10.0)
    # 20 columns and 20 rows of 1 m cells lie within 10 m of the two interior borders
    assert seam.sum() == 2 * 20 * 128 - 20 * 20
    truth_1m = mosaic + np.where(seam, 2.0, 0.5)
    mosaic[100:102, 100:105] = np.nan  # a hole in the interior: left out of the statistics
    # truth on a 0.5 m grid reaching 4 m beyond the city (values there never sampled)
    truth = np.pad(np.kron(truth_1m, np.ones((2, 2))), 8, constant_values=1e4)
    folder.gt_dir.mkdir()
    np.save(folder.gt_dir / "dsm.npy", truth.astype(np.float32).astype(np.float64))
    (folder.gt_dir / "dsm.json").write_text(
        json.dumps({"x_min": -68.0, "y_max": 68.0, "resolution": 0.5, "width": 272, "height": 272})
    )
    rep = dsm_seam_report(folder, (mosaic, g), 10.0)
    assert rep["seam"]["count"] == 4720 and rep["interior"]["count"] == 128 * 128 - 4720 - 10
    assert rep["seam"]["mae_m"] == pytest.approx(2.0, abs=1e-4)
    assert rep["seam"]["median_abs_m"] == pytest.approx(2.0, abs=1e-4)
    assert rep["seam"]["mean_error_m"] == pytest.approx(-2.0, abs=1e-4)
    assert rep["interior"]["mae_m"] == pytest.approx(0.5, abs=1e-4)
    assert rep["interior"]["coverage"] == pytest.approx(1 - 10 / (128 * 128 - 4720))
    assert rep["seam_penalty_m"] == pytest.approx(1.5, abs=1e-4)
    assert rep["all"]["mae_m"] == pytest.approx(
        (4720 * 2.0 + (128 * 128 - 4730) * 0.5) / (128 * 128 - 10), abs=1e-4
    )
    assert json.loads((folder.export_dir / "dsm_errors.json").read_text()) == rep
    shutil.rmtree(folder.gt_dir)
    with pytest.raises(ConfigError, match=r"gt/dsm\.npy"):
        dsm_seam_report(folder, (mosaic, g))


def test_missing_runs_stop_the_export_unless_allowed(tmp_path, tiny_run):
    folder = _city(tmp_path / "city", tiny_run)
    shutil.rmtree(folder.run("r000c001"))
    summary = json.loads((folder.run("r001c000") / "summary.json").read_text())
    del summary["stage1"]  # as a run killed before Stage 1 ended
    (folder.run("r001c000") / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(MissingRunError) as e:
        export_city(folder.root, dsm=False, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, SkyfallError) and "--allow-missing" in msg
    assert f"r000c001 ({folder.run('r000c001')}: no run folder)" in msg
    assert f"r001c000 ({folder.run('r001c000')}: Stage 1 has not finished" in msg
    assert not folder.export_dir.exists() or not any(folder.export_dir.rglob("*.ply"))

    stale = folder.export_dir / "chunks" / "r000c001.ply"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier export")
    r = export_city(folder.root, dsm_resolution=2.0, allow_missing=True, progress=False)
    assert set(r.counts) == {"r000c000", "r001c001"} and set(r.missing) == {"r000c001", "r001c000"}
    assert not stale.exists()
    index = json.loads(r.chunks_json.read_text())
    assert [c["cell"] for c in index["missing"]] == ["r000c001", "r001c000"]
    assert index["missing"][0]["run"] == "../runs/r000c001"
    h = r.dsm.heights  # 64 x 64 cells of 2 m: north-east and south-west quadrants are holes
    assert np.isnan(h[:32, 32:]).all() and np.isnan(h[32:, :32]).all()
    assert np.isfinite(h[:32, :32]).mean() > 0.95 and np.isfinite(h[32:, 32:]).mean() > 0.95
    assert r.dsm.completeness == pytest.approx(np.isfinite(h).mean())


def test_single_file_skipped_over_single_max(tmp_path, tiny_run):
    folder = _city(tmp_path / "city", tiny_run)
    stale = folder.export_dir / "city.spz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    r = export_city(folder.root, fmt="spz", up="z", single_max=100, dsm=False, progress=False)
    assert r.total > 100 and r.single is None and "--single-max 100" in r.single_skipped
    assert not stale.exists() and r.dsm is None and r.seams is None
    index = json.loads(r.chunks_json.read_text())
    assert index["single_file"] is None and index["single_file_skipped"] == r.single_skipped
    assert index["up"] == "z" and index["extension"] == ".spz"
    m = folder.manifest()
    for cell, entry in zip(m.cells, index["chunks"], strict=True):
        got = read_spz(r.export_dir / entry["file"])
        _, enu, _ = _expected(folder, cell, 0, up="z")
        assert len(got) == entry["count"] == len(enu)
        np.testing.assert_allclose(got.means, enu, atol=2e-3)  # .spz: 24-bit fixed point
        np.testing.assert_allclose(entry["bounds"]["min"], enu.astype(np.float32).min(0))


def test_embedding_names_resolve_per_tile(tmp_path, tiny_run, tiny_tile):
    folder = _city(tmp_path / "city", tiny_run)
    # r001c001 trained on a tile whose images come in another order and that lacks sat_00
    odd = folder.tile("r001c001")
    odd.mkdir(parents=True)
    doc = json.loads((tiny_tile / "transforms_train.json").read_text())
    doc["frames"] = doc["frames"][::-1]
    doc["frames"][-1]["file_path"] = "./images/sat_99.png"
    (odd / "transforms_train.json").write_text(json.dumps(doc))
    cfg_path = folder.run("r001c001") / "config.yml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"], cfg["data_relative"] = str(odd), "../../tiles/r001c001"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cells = list(folder.manifest().cells)

    name, idx, _ = resolve_embedding(folder, cells, None)
    assert name == "sat_01" and idx == {"r000c000": 1, "r000c001": 1, "r001c000": 1, "r001c001": 3}
    assert resolve_embedding(folder, cells, "sat_03")[1]["r001c001"] == 1
    assert resolve_embedding(folder, cells, "mean")[1] == {c.name: "mean" for c in cells}
    with pytest.raises(
        ConfigError, match=r"--embedding sat_00: cell r001c001 has no training image 'sat_00'"
    ):
        export_city(folder.root, embedding="sat_00", dsm=False, progress=False)
    with pytest.raises(ConfigError, match=r"--embedding 2: .*not an index"):
        export_city(folder.root, embedding="2", dsm=False, progress=False)

    r = export_city(folder.root, dsm=False, progress=False)
    assert r.embedding == "sat_01" and r.embedding_indices["r001c001"] == 3
    cell = folder.manifest().cell("r001c001")
    _, _, want = _expected(folder, cell, 3)  # the odd tile's sat_01 is its embedding 3
    np.testing.assert_allclose(read_ply(r.chunks["r001c001"]).sh, want.sh, atol=1e-6)
    r = export_city(folder.root, embedding="mean", dsm=False, progress=False)
    assert json.loads(r.chunks_json.read_text())["embedding"]["name"] == "mean" and not r.embedding_default


def test_georeferenced_city_dsm_is_a_utm_geotiff(tmp_path, tiny_run, exported):
    pytest.importorskip("pyproj")
    lla = (-81.66, 30.32, 12.0)
    folder = _city(tmp_path / "city", tiny_run, crs="enu", origin_lon_lat_h=lla)
    r = export_city(folder.root, dsm_resolution=2.0, progress=False)
    d = r.dsm
    assert d.crs == "EPSG:32617" and r.seams is None  # UTM zone 17N
    tif = read_geotiff(d.path)
    assert "32617" in tif.crs and tif.grid == d.grid and d.grid.x_min % 2.0 == 0.0
    assert json.loads(d.meta.read_text())["crs"] == "EPSG:32617"
    assert d.completeness > 0.95
    # The same surface as the local mosaic: sampled at each UTM cell's ENU footprint, + the origin height
    local = exported[1].dsm
    from skyfall.prepare.geodesy import ENUFrame

    fx, fy = enu_footprint(d.grid, ENUFrame(*lla), d.crs)
    want = sample_bilinear(local.heights, local.grid, fx, fy) + lla[2]
    both = np.isfinite(want) & np.isfinite(d.heights)
    assert both.sum() > 0.9 * 64 * 64
    # both render the same ENU cells (1 m, on whole metres); the map <-> ENU round trip costs < 1 mm
    assert np.median(np.abs(d.heights[both] - want[both])) < 0.01


def test_bad_options_name_the_option(tmp_path, tiny_run):
    folder = CityFolder(tmp_path / "city")
    _manifest().to_json(folder.manifest_path)
    with pytest.raises(ConfigError, match="--format 'raw-ply'"):
        export_city(folder.root, fmt="raw-ply")
    with pytest.raises(ConfigError, match="--up"):
        export_city(folder.root, up="x")
    with pytest.raises(ConfigError, match="--dsm-resolution"):
        export_city(folder.root, dsm_resolution=0)
    with pytest.raises(MissingRunError, match="4 of 4 cells have no finished run.*no cell has"):
        export_city(folder.root, allow_missing=True)


def test_cli_prints_the_embedding_and_files(tmp_path, tiny_run, capsys):
    import tyro

    from skyfall.cli.city_export import CityExportCommand

    folder = _city(tmp_path / "city", tiny_run)
    cmd = tyro.cli(CityExportCommand, args=[str(folder.root), "--no-dsm", "--single-max", "10"])
    assert cmd.dsm is False and cmd.single_max == 10
    cmd.main()
    out = capsys.readouterr().out
    assert "appearance: image sat_00 (the first training image common to every tile)" in out
    assert "chunks.json: 4 chunks" in out and "no single file" in out
    # help without heavy imports
    code = "import sys, skyfall.cli.city_export; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_synthetic_city_end_to_end(tmp_path, tiny_config):
    """`skyfall synth CITY --city 2x2` tiles trained with the tiny preset: the exported mosaic meets
    the city's exact DSM (frames, origins and the truth's grid agree), seams reported apart."""
    from skyfall.city.synth import write_synthetic_city
    from skyfall.train.stage1 import train_stage1

    root = tmp_path / "city"
    m = write_synthetic_city(root, 2, 2, tile_size_m=S, overlap_m=OV, preset="tiny", progress=False)
    folder = CityFolder(root)
    for c in m.cells:
        train_stage1(tiny_config.stage1, folder.tile(c), folder.run(c), progress=False)
    r = export_city(root, dsm_resolution=RES, progress=False)
    assert r.embedding == "sat_00" and set(r.counts) == {c.name for c in m.cells}
    assert r.dsm.completeness > 0.99
    rep = json.loads((root / "export" / "dsm_errors.json").read_text())
    assert (
        rep["seam"]["count"] == 4720
        and rep["seam"]["count"] + rep["interior"]["count"] == rep["all"]["count"]
    )
    # A frame or origin mistake puts whole buildings metres off (MAE >> 10 m); 60 tiny steps give ~3 m.
    assert rep["all"]["mae_m"] < 6.0 and abs(rep["seam_penalty_m"]) < 3.0
