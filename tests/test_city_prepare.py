"""`skyfall city prepare`: RPC images -> a grid of tiles in one city frame (translation-only tiles)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from skyfall.city.folders import CityFolder
from skyfall.city.manifest import CityManifest
from skyfall.city.prepare import SUMMARY_NAME, CellError, bbox_extent, parse_bbox, prepare_city
from skyfall.data.tile import load_tile
from skyfall.dsm import tile_frame
from skyfall.errors import ConfigError
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.pinhole import project_pinhole
from skyfall.prepare.pipeline import AOIError, PrepareConfig, prepare_tile
from skyfall.prepare.raster import read_satellite_image
from skyfall.synth import SyntheticCity
from skyfall.synth.rpc import ANCHOR, write_rpc_set

pytest.importorskip("rasterio")
pytest.importorskip("pyproj")

N_VIEWS = 4  # 'auto' holds one out
TILE, OVERLAP = 96.0, 16.0
ANCHOR_FRAME = ENUFrame(ANCHOR.lon, ANCHOR.lat, ANCHOR.h)


def _bbox(half_m: float = 80.0, east_m: float = 0.0) -> tuple[float, float, float, float]:
    """A box of about 2 half_m metres centred on the synthetic anchor (exactly, in lon/lat), moved east."""
    lon, lat, _ = ANCHOR_FRAME.to_geodetic(np.array([[half_m, half_m, 0.0]]))
    dlon, dlat = float(lon[0]) - ANCHOR.lon, float(lat[0]) - ANCHOR.lat
    shift, _, _ = ANCHOR_FRAME.to_geodetic(np.array([[east_m, 0.0, 0.0]]))
    c = float(shift[0]) if east_m else ANCHOR.lon
    return (c - dlon, ANCHOR.lat - dlat, c + dlon, ANCHOR.lat + dlat)


@pytest.fixture(scope="module")
def rpc_set(tiny_tile: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    root = tmp_path_factory.mktemp("city_rpc") / "tile"
    shutil.copytree(tiny_tile, root)
    meta = write_rpc_set(root, n_views=N_VIEWS, bias_px=2.0)
    return [root / "rpc" / v["image"] for v in meta["views"]], meta


def _cfg(meta: dict) -> PrepareConfig:
    lo, hi = (float(v) for v in meta["prepare"]["alt_range"].split(","))
    # The tiny views are 64 px: a cell's crop is ~26 px, too small to match; the frames are the subject.
    return PrepareConfig(alt_range=(lo, hi), match=False)


@pytest.fixture(scope="module")
def city(
    rpc_set: tuple[list[Path], dict], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, CityManifest]:
    images, meta = rpc_set
    out = tmp_path_factory.mktemp("city") / "CITY"
    m = prepare_city(images, out, _bbox(), TILE, OVERLAP, _cfg(meta), progress=False, log=lambda _: None)
    return out, m


def _camera(tile, name: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    for split in (tile.train, tile.test):
        if name in split.names:
            i = split.names.index(name)
            return split.cameras.Ks[i].double().numpy(), split.cameras.camtoworlds[i].double().numpy()
    raise KeyError(name)


def test_grid_covers_the_bbox(city: tuple[Path, CityManifest], rpc_set) -> None:  # noqa: ANN001
    out, m = city
    assert CityFolder(out).manifest() == m
    assert len(m.cells) == 4 and {(c.row, c.col) for c in m.cells} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert m.crs == "enu" and m.tile_size_m == TILE and m.overlap_m == OVERLAP
    lon, lat, h = m.origin_lon_lat_h
    assert abs(lon - ANCHOR.lon) < 1e-12 and abs(lat - ANCHOR.lat) < 1e-12
    assert h == pytest.approx(-30.0 - 20.0)  # the lowest height minus prepare's origin_below
    # The cores tile a rectangle centred on the box centre that holds the box's ENU rectangle.
    _, _, hx, hy = bbox_extent(_bbox())
    assert 79.9 < hx < 80.1 and 79.9 < hy < 80.1
    assert m.bounds == (-96.0, 96.0, -96.0, 96.0)
    for c in m.cells:
        x0, x1, y0, y1 = c.core
        assert x1 - x0 == TILE and y1 - y0 == TILE
        assert c.origin == (0.5 * (x0 + x1), 0.5 * (y0 + y1), 0.0) and c.margin == OVERLAP


def test_every_cell_is_a_tile_in_the_city_frame(city: tuple[Path, CityManifest]) -> None:
    out, m = city
    folder = CityFolder(out)
    for c in m.cells:
        tile = load_tile(folder.tile(c))
        assert len(tile.train) == N_VIEWS - 1 and len(tile.test) == 1
        prep = json.loads((folder.tile(c) / "prepare.json").read_text())
        assert prep["enu_origin"] == {"lon": m.origin_lon_lat_h[0], "lat": m.origin_lon_lat_h[1],
                                      "alt": m.origin_lon_lat_h[2], "offset": list(c.origin)}  # fmt: skip
        assert prep["aoi"]["size_m"] == TILE + 2 * OVERLAP  # core + margins, not clipped to the city
        assert prep["city_cell"]["name"] == c.name and prep["config"]["shared_frame"]["offset"] == list(
            c.origin
        )
        frame = tile_frame(folder.tile(c))
        assert frame.enu is not None and frame.enu.offset == c.origin
        assert frame.extent == (-64.0, 64.0, -64.0, 64.0)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert set(summary["cells"]) == {c.name for c in m.cells}
    assert all(e["status"] == "prepared" and e["views"] == N_VIEWS for e in summary["cells"].values())
    assert summary["alt_range"] == [-30.0, 32.0] and summary["options"]["match"] is False


def test_a_world_point_differs_between_tiles_by_the_origins(city: tuple[Path, CityManifest], rpc_set) -> None:  # noqa: ANN001
    out, m = city
    images, meta = rpc_set
    folder = CityFolder(out)
    a, b = m.cell("r000c000"), m.cell("r000c001")  # west and east neighbours
    # World points in the strip both tiles hold (x within the overlap of the two tile squares).
    enu = np.random.default_rng(0).uniform([-16, 0, 0], [16, 96, 40], size=(200, 3))
    geo = ANCHOR_FRAME.to_geodetic(enu)
    pa = tile_frame(folder.tile(a)).enu.from_geodetic(*geo)
    pb = tile_frame(folder.tile(b)).enu.from_geodetic(*geo)
    shift = np.subtract(b.origin, a.origin)
    assert np.abs(pa - pb - shift).max() < 1e-6  # translation only, no rotation
    city_frame = ENUFrame(*m.origin_lon_lat_h)
    assert np.abs(pa + a.origin - city_frame.from_geodetic(*geo)).max() < 1e-6
    # Each tile's cameras see the point where the image's RPC puts it (crop offset added back).
    ta, tb = load_tile(folder.tile(a)), load_tile(folder.tile(b))
    prep_a = json.loads((folder.tile(a) / "prepare.json").read_text())
    prep_b = json.loads((folder.tile(b) / "prepare.json").read_text())
    for k, view in enumerate(meta["views"]):
        img = read_satellite_image(images[k])
        want = np.stack(img.rpc_to_file(*img.rpc.project(*geo)), -1)
        for tile, prep, p in ((ta, prep_a, pa), (tb, prep_b, pb)):
            K, c2w = _camera(tile, view["name"])
            got = project_pinhole(K, c2w, p) + np.array(prep["views"][k]["crop_file_px"][:2])
            assert np.abs(got - want).max() < 0.02


def test_camera_centres_differ_by_the_origins(city: tuple[Path, CityManifest], rpc_set) -> None:  # noqa: ANN001
    out, m = city
    _, meta = rpc_set
    folder = CityFolder(out)
    ref = m.cell("r000c000")
    t_ref = load_tile(folder.tile(ref))
    for other in ("r000c001", "r001c000", "r001c001"):
        c = m.cell(other)
        t = load_tile(folder.tile(c))
        shift = np.subtract(c.origin, ref.origin)
        for view in meta["views"]:
            _, c2w_a = _camera(t_ref, view["name"])
            _, c2w_b = _camera(t, view["name"])
            # Same axes: the same rotation; the centre (~500 km away) moves by the origin difference.
            # The synthetic RPCs are exact pinholes, so the fits of two cells agree to ~1 cm there.
            assert np.abs(c2w_a[:3, :3] - c2w_b[:3, :3]).max() < 1e-7
            ca, cb = c2w_a[:3, 3], c2w_b[:3, 3] + shift
            assert np.linalg.norm(ca) > 1e5 and np.linalg.norm(ca - cb) < 0.1


def test_truth_dsm_scores_a_cell_tile_exactly(city: tuple[Path, CityManifest], rpc_set) -> None:  # noqa: ANN001
    from skyfall.eval.truth import load_truth, score_truth

    out, m = city
    images, _ = rpc_set
    synth = SyntheticCity.from_tile(images[0].parents[1])
    cell = m.cell("r001c001")
    frame = tile_frame(CityFolder(out).tile(cell))
    ox, oy, oz = cell.origin
    dz = ANCHOR.h - m.origin_lon_lat_h[2]  # the city frame's origin lies dz below the anchor's (same axes)

    def exact(grid):  # noqa: ANN001, ANN202
        gx, gy = grid.centres()
        return synth.height_at(gx + ox, gy + oy) + dz - oz

    score = score_truth(exact, load_truth(images[0].parent / "dsm.tif"), frame, extent=frame.extent)
    assert score.metrics["shift_rows"] == 0 and score.metrics["shift_cols"] == 0
    assert score.metrics["dsm_completeness"] > 0.95
    # Exact (float32 truth) away from walls, where the bilinear resampling mixes roof and street;
    # ignoring the tile's offset would put the truth 48 m away (several metres of error).
    err = np.abs(score.pred - score.truth)[np.isfinite(score.pred - score.truth)]
    assert np.median(err) < 1e-4 and (err > 0.01).mean() < 0.08


def test_a_second_run_skips_finished_cells(rpc_set, tmp_path: Path) -> None:  # noqa: ANN001
    images, meta = rpc_set
    out = tmp_path / "CITY"
    kw = {"progress": False}
    m = prepare_city(images, out, _bbox(), TILE, OVERLAP, _cfg(meta), log=lambda _: None, **kw)
    folder = CityFolder(out)
    stamps = {c.name: (folder.tile(c) / "prepare.json").stat().st_mtime_ns for c in m.cells}
    # An interrupted cell: its tile folder without the prepare.json that is written last.
    broken = m.cell("r001c000")
    (folder.tile(broken) / "prepare.json").unlink()
    (folder.tile(broken) / "stale.txt").write_text("left over")
    lines: list[str] = []
    m2 = prepare_city(images, out, _bbox(), TILE, OVERLAP, _cfg(meta), log=lines.append, **kw)
    assert m2 == m
    skipped = [ln for ln in lines if "skipped" in ln]
    assert len(skipped) == 3 and not any(ln.startswith("r001c000: skipped") for ln in lines)
    assert (
        not (folder.tile(broken) / "stale.txt").exists() and (folder.tile(broken) / "prepare.json").is_file()
    )
    for c in m.cells:
        if c is not broken:
            assert (folder.tile(c) / "prepare.json").stat().st_mtime_ns == stamps[c.name]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["cells"]["r000c000"]["status"] == "done (earlier run)"
    assert summary["cells"]["r001c000"]["status"] == "prepared"
    # Continuing with other heights would put new tiles on another z origin: refused, named.
    with pytest.raises(ConfigError, match="--alt-range"):
        prepare_city(
            images, out, _bbox(), TILE, OVERLAP, PrepareConfig(alt_range=(-40, 32), match=False), **kw
        )
    with pytest.raises(ConfigError, match="--tile-size 64 differs"):
        prepare_city(images, out, _bbox(), 64.0, OVERLAP, _cfg(meta), **kw)
    with pytest.raises(ConfigError, match="downsample"):
        cfg = _cfg(meta)
        cfg.downsample = 2
        prepare_city(images, out, _bbox(), TILE, OVERLAP, cfg, **kw)


def test_estimated_heights_are_kept_for_the_whole_city(rpc_set, tmp_path: Path) -> None:  # noqa: ANN001
    images, _ = rpc_set
    cfg = PrepareConfig(match=False)  # no --alt-range: estimated once (here: view 0's RPC range)
    rpc = read_satellite_image(images[0]).rpc
    want = [rpc.h_off - abs(rpc.h_scale), rpc.h_off + abs(rpc.h_scale)]
    lines: list[str] = []
    m = prepare_city(images, tmp_path / "C", _bbox(), TILE, OVERLAP, cfg, progress=False, log=lines.append)
    assert (
        m.origin_lon_lat_h[2] == pytest.approx(want[0] - 20.0) and "estimated over the whole box" in lines[0]
    )
    summary = json.loads((tmp_path / "C" / SUMMARY_NAME).read_text())
    assert summary["alt_range"] == pytest.approx(want)
    for c in m.cells:
        prep = json.loads((CityFolder(tmp_path / "C").tile(c) / "prepare.json").read_text())
        assert (
            prep["aoi"]["alt_range"] == pytest.approx(want)
            and prep["enu_origin"]["alt"] == m.origin_lon_lat_h[2]
        )
    lines.clear()
    shutil.rmtree(CityFolder(tmp_path / "C").tile("r000c001"))
    assert (
        prepare_city(images, tmp_path / "C", _bbox(), TILE, OVERLAP, cfg, progress=False, log=lines.append)
        == m
    )
    assert "of the run that started this city" in lines[0]


def test_a_failed_cell_names_itself_and_keeps_the_others(
    rpc_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    import skyfall.city.prepare as cp

    images, meta = rpc_set
    out = tmp_path / "CITY"
    real = cp._prepare_tile

    def failing(sats, tile, cfg, extra):  # noqa: ANN001, ANN202
        if tile.name == "r001c000":
            raise AOIError(f"{sats[2].path}: no valid (non no-data) pixel inside the area of interest.")
        return real(sats, tile, cfg, extra)

    monkeypatch.setattr(cp, "_prepare_tile", failing)
    with pytest.raises(CellError, match=r"city cell r001c000 .*sat_02\.tif: no valid") as e:
        prepare_city(images, out, _bbox(), TILE, OVERLAP, _cfg(meta), progress=False, log=lambda _: None)
    assert "\n" not in str(e.value)
    folder = CityFolder(out)
    assert all((folder.tile(n) / "prepare.json").is_file() for n in ("r000c000", "r000c001"))
    assert not folder.tile("r001c001").exists()
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert (
        summary["cells"]["r001c000"]["status"] == "failed"
        and "sat_02" in summary["cells"]["r001c000"]["error"]
    )
    monkeypatch.setattr(cp, "_prepare_tile", real)
    lines: list[str] = []
    prepare_city(images, out, _bbox(), TILE, OVERLAP, _cfg(meta), progress=False, log=lines.append)
    assert sum("skipped" in ln for ln in lines) == 2
    assert all((folder.tile(c) / "prepare.json").is_file() for c in folder.manifest().cells)


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("1,2,3", "--bbox"),
        ("a,b,c,d", "--bbox"),
        ("-81.65,30.32,-81.66,30.33", "--bbox"),  # west > east
        ("-81.66,95,-81.65,96", "--bbox"),
        ("-81.8,30.2,-81.5,30.5", "--bbox"),  # ~29 x 33 km
    ],
)
def test_bad_bbox_is_one_config_error(text: str, option: str) -> None:
    with pytest.raises(ConfigError, match=option) as e:
        bbox = parse_bbox(text)
        bbox_extent(bbox)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("tile", "overlap", "option"),
    [
        (0.0, 16.0, "--tile-size"),
        (-5.0, 0.0, "--tile-size"),
        (96.0, -1.0, "--overlap"),
        (96.0, 48.0, "--overlap"),
    ],
)
def test_bad_grid_options_are_config_errors(
    rpc_set, tmp_path: Path, tile: float, overlap: float, option: str
) -> None:  # noqa: ANN001
    images, meta = rpc_set
    with pytest.raises(ConfigError, match=option):
        prepare_city(images, tmp_path / "c", _bbox(), tile, overlap, _cfg(meta), progress=False)
    assert not (tmp_path / "c").exists()


def test_bad_folders_and_uncovered_cells_are_refused(rpc_set, tmp_path: Path) -> None:  # noqa: ANN001
    images, meta = rpc_set
    kw = {"progress": False, "log": lambda _: None}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not a city folder"):
            prepare_city(images, other, _bbox(), TILE, OVERLAP, _cfg(meta), overwrite=overwrite, **kw)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="--aoi"):
        cfg = _cfg(meta)
        cfg.aoi = (ANCHOR.lon, ANCHOR.lat, 100.0)
        prepare_city(images, tmp_path / "c1", _bbox(), TILE, OVERLAP, cfg, **kw)
    # A box 2 km east of the images: every cell is outside them, found before anything is written.
    with pytest.raises(AOIError, match=r"sat_00\.tif: city cell r000c000 \(and 3 more"):
        prepare_city(images, tmp_path / "c2", _bbox(east_m=2000.0), TILE, OVERLAP, _cfg(meta), **kw)
    assert not (tmp_path / "c2").exists()


def test_single_tile_prepare_is_unchanged(rpc_set, tmp_path: Path) -> None:  # noqa: ANN001
    images, meta = rpc_set
    cfg = _cfg(meta)
    cfg.aoi = (ANCHOR.lon, ANCHOR.lat, 128.0)
    s = prepare_tile(images, tmp_path / "t", cfg)
    assert set(s["enu_origin"]) == {"lon", "lat", "alt"} and "shared_frame" not in s["config"]
    assert tile_frame(tmp_path / "t").enu.offset is None


def test_cli_command(rpc_set, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    import tyro

    from skyfall.cli.city_prepare import CityPrepare

    images, meta = rpc_set
    b = _bbox()
    args = [*map(str, images), "--out", str(tmp_path / "CITY"), f"--bbox={','.join(f'{v:.9f}' for v in b)}",
            "--tile-size", "96", "--overlap", "16", f"--alt-range={meta['prepare']['alt_range']}",
            "--no-match", "--no-progress"]  # fmt: skip
    cmd = tyro.cli(CityPrepare, args=args)
    assert cmd.tile.match is False and cmd.tile_size == 96.0
    cmd.main()
    out = capsys.readouterr().out
    assert "4 tiles" in out and CityFolder(tmp_path / "CITY").manifest().crs == "enu"
    bad = tyro.cli(CityPrepare, args=[*args[:-1], "--bbox", "1,2,3"])
    with pytest.raises(ConfigError, match="--bbox"):
        bad.main()


def test_prepared_city_trains_on_ray_and_exports_a_utm_mosaic(
    city: tuple[Path, CityManifest], tmp_path: Path
) -> None:
    """The real-imagery chain: `city prepare` -> `city train` (local Ray) -> `city export`: the DSM
    mosaic is a north-up UTM GeoTIFF covering the bbox, and every cell contributes splats."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    from skyfall.dsm import read_geotiff

    src, m = city
    out = tmp_path / "CITY"
    shutil.copytree(src, out)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["city", "train", str(out), "--preset", "tiny", "--stages", "stage1", "--workers", "2",
         "--stage1.pseudo.estimator", "tiny"],
        ["city", "export", str(out)],
    ):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "skyfall", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "export" / "chunks.json").read_text())
    assert sorted(c["cell"] for c in doc["chunks"]) == sorted(c.name for c in m.cells)
    assert all(c["count"] > 0 for c in doc["chunks"]) and not doc["missing"]
    r = read_geotiff(out / "export" / "dsm.tif")
    assert r.crs is not None and "UTM" in r.crs
    x0, x1, y0, y1 = m.bounds
    assert r.grid.width * r.grid.resolution >= 0.95 * (x1 - x0)
    assert r.grid.height * r.grid.resolution >= 0.95 * (y1 - y0)
    assert np.isfinite(r.heights).mean() > 0.9


def test_stereo_mosaic_joins_the_tiles_stereo_dsms(city: tuple[Path, CityManifest]) -> None:
    """CITY/stereo/dsm.tif holds, on the cells each core owns, what that tile's own dense/dsm.tif holds
    there (one field, one resampling), and covers the city without holes."""
    from skyfall.city.merge import in_core
    from skyfall.dsm import enu_footprint, read_geotiff

    out, m = city
    doc = json.loads((out / "city_prepare.json").read_text())
    assert doc["stereo_dsm"]["written"] and doc["stereo_dsm"]["file"] == "stereo/dsm.tif"
    mosaic = read_geotiff(out / "stereo" / "dsm.tif")
    meta = json.loads((out / "stereo" / "dsm.json").read_text())
    assert (
        "UTM zone 17N" in mosaic.crs
        and meta["missing"] == {}
        and set(meta["cells"]) == {c.name for c in m.cells}
    )
    frame = ENUFrame(*m.origin_lon_lat_h)
    fx, fy = enu_footprint(mosaic.grid, frame, mosaic.crs)
    inside = in_core(fx, fy, m.bounds, m.bounds)
    assert np.isfinite(mosaic.heights[inside]).mean() > 0.999
    g = mosaic.grid
    for cell in m.cells:
        own = in_core(fx, fy, cell.core, m.bounds)
        tile = read_geotiff(out / "tiles" / cell.name / "dense" / "dsm.tif")
        r0 = round((tile.grid.y_max - g.y_max) / -g.resolution)
        c0 = round((tile.grid.x_min - g.x_min) / g.resolution)
        # the tile's grid is on the mosaic's lattice (edges on multiples of 0.5 m in one UTM zone)
        assert (
            tile.grid.x_min == g.x_min + c0 * g.resolution and tile.grid.y_max == g.y_max - r0 * g.resolution
        )
        rows, cols = np.nonzero(own)
        sel = (rows >= r0) & (rows < r0 + tile.grid.height) & (cols >= c0) & (cols < c0 + tile.grid.width)
        assert sel.mean() > 0.99, cell.name  # a tile covers its core
        a = mosaic.heights[rows[sel], cols[sel]]
        b = tile.heights[rows[sel] - r0, cols[sel] - c0]
        ok = np.isfinite(a) & np.isfinite(b)
        assert ok.mean() > 0.999
        assert np.abs(a[ok] - b[ok]).max() < 1e-4, cell.name  # float32 rounding of the files
