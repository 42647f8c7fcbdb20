"""`skyfall prepare` end to end on synthetic multi-view RPC images with known RPC biases.

Four (or five) views of a textured, hilly terrain are rendered through exact RPCs (rational with a
common first-order denominator: far perspective cameras in normalised geodetic coordinates); the
RPC written next to each image has its column/row offset shifted by a known bias, as a delivered
RPC is. ``prepare`` must undo the biases jointly (up to the translation ambiguity no image data
resolves), hold out views, and choose the AOI and the height range itself when not given them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from skyfall.cli.prepare import PrepareOptions, format_summary
from skyfall.errors import ConfigError
from skyfall.prepare import ENUFrame, PrepareConfig, RPCModel, prepare_tile
from skyfall.prepare.dense import DenseConfig
from skyfall.prepare.pipeline import parse_test_views

LON0, LAT0 = 31.13, 29.97
SIZE_PX = 240
GSD = 0.5
# (rotation of the image axes from north-up, off-nadir angle, direction of the parallax) per view,
# degrees. Satellite images of one area are all close to north-up, which NCC matching relies on.
GEOMETRY = [(0, 14, 30), (4, 22, 110), (-3, 11, 250), (6, 26, 320), (-5, 18, 170)]
BIAS = np.array([[0.0, 0.0], [1.6, -0.8], [-1.2, 1.9], [0.7, 1.3], [-1.7, -0.9]])  # (col, row) px


def _terrain(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ellipsoidal height (m) at ENU (x, y) around (LON0, LAT0): 46..54 m hills (slopes up to 0.2)."""
    return 50.0 + 4.0 * np.sin(2 * np.pi * x / 120.0) * np.cos(2 * np.pi * y / 90.0)


def _rpc(azimuth: float, off_nadir: float, parallax_dir: float, bias: np.ndarray) -> RPCModel:
    psi, th, phi = np.radians([azimuth, off_nadir, parallax_dir])
    lon_s, lat_s, h_s = 0.0015, 0.0013, 50.0
    mx = np.radians(lon_s) * 6378137.0 * np.cos(np.radians(LAT0))  # metres per unit L
    my = np.radians(lat_s) * 6378137.0
    scale = SIZE_PX / 2
    px = np.tan(th) * np.array([np.cos(phi), np.sin(phi)]) * h_s
    samp = np.zeros(20)
    line = np.zeros(20)
    samp[1:4] = np.array([np.cos(psi) * mx, np.sin(psi) * my, px[0]]) / (GSD * scale)
    line[1:4] = np.array([np.sin(psi) * mx, -np.cos(psi) * my, px[1]]) / (GSD * scale)
    den = np.zeros(20)
    # ~1e-4 perspective: a camera some 700 km away over a ~300 m scene.
    den[:4] = [1.0, 0.0, 0.0, -6e-5]  # centre above the scene: den = 0 at H = +1 / 6e-5
    return RPCModel(line, den, samp, den.copy(), LON0, lon_s, LAT0, lat_s, 50.0, h_s,
                    scale + bias[1], scale, scale + bias[0], scale)  # fmt: skip


def _rpc_json(rpc: RPCModel) -> dict:
    return {"rpc": {
        "row_offset": rpc.line_off, "col_offset": rpc.samp_off, "lat_offset": rpc.lat_off,
        "lon_offset": rpc.lon_off, "alt_offset": rpc.h_off, "row_scale": rpc.line_scale,
        "col_scale": rpc.samp_scale, "lat_scale": rpc.lat_scale, "lon_scale": rpc.lon_scale,
        "alt_scale": rpc.h_scale, "row_num": rpc.line_num.tolist(), "row_den": rpc.line_den.tolist(),
        "col_num": rpc.samp_num.tolist(), "col_den": rpc.samp_den.tolist()}}  # fmt: skip


def render_views(folder: Path, n_views: int = 4, *, json_sidecars: bool = True) -> list[Path]:
    """Write view_k.tif (float32) with a biased Sat-NeRF RPC JSON sidecar; returns the image paths."""
    rng = np.random.default_rng(0)
    frame = ENUFrame(LON0, LAT0, 0.0)
    tex_res, half = 0.25, 200.0  # texture: 0.25 m cells over +-200 m
    n = int(2 * half / tex_res)
    tex = ndimage.gaussian_filter(rng.normal(size=(n, n)), 4.0)
    tex = (tex - tex.min()) / np.ptp(tex)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_views):
        true = _rpc(*GEOMETRY[k], np.zeros(2))
        col, row = np.meshgrid(np.arange(SIZE_PX, dtype=float), np.arange(SIZE_PX, dtype=float))
        h = np.full(col.shape, 50.0)
        for _ in range(8):  # the pixel's ray meets the terrain where h = terrain(lon(h), lat(h))
            lon, lat = true.localize(col, row, h)
            enu = frame.from_geodetic(lon.ravel(), lat.ravel(), h.ravel())
            h = _terrain(enu[:, 0], enu[:, 1]).reshape(col.shape)
        img = ndimage.map_coordinates(
            tex, [(half - enu[:, 1]) / tex_res, (enu[:, 0] + half) / tex_res], order=1
        )
        path = folder / f"view_{k}.tif"
        tifffile.imwrite(path, (1000 * img.reshape(col.shape) + 100).astype(np.float32))
        rpc = _rpc(*GEOMETRY[k], BIAS[k])
        (folder / f"view_{k}.json").write_text(json.dumps(_rpc_json(rpc)))
        paths.append(path)
    return paths


def _jacobians(summary: dict, tile: Path) -> np.ndarray:
    """[V, 2, 3] image shift (written px) per metre of scene translation, from the written cameras."""
    from skyfall.prepare.pinhole import project_pinhole

    out = []
    for name in ("train", "test"):
        doc = json.loads((tile / f"transforms_{name}.json").read_text())
        for f in doc["frames"]:
            K = np.array([[f["fl_x"], 0, f["cx"]], [0, f["fl_y"], f["cy"]], [0, 0, 1.0]])
            c2w = np.array(f["transform_matrix"])
            p = np.array([[0.0, 0.0, 50.0 - summary["enu_origin"]["alt"]]])
            j = np.stack(
                [(project_pinhole(K, c2w, p + e) - project_pinhole(K, c2w, p))[0] for e in np.eye(3)], 1
            )
            out.append((Path(f["file_path"]).stem, j))
    order = {v["name"]: i for i, v in enumerate(summary["views"])}
    return np.array([j for _, j in sorted(out, key=lambda t: order[t[0]])])


@pytest.fixture(scope="module")
def views4(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return render_views(tmp_path_factory.mktemp("mv") / "in", 4)


@pytest.fixture(scope="module")
def tile4(views4: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mv") / "tile"
    cfg = PrepareConfig(aoi=(LON0, LAT0, 80.0), alt_range=(20.0, 80.0))
    return out, prepare_tile(views4, out, cfg)


def test_joint_adjustment_undoes_the_rpc_biases(tile4: tuple[Path, dict]) -> None:
    out, s = tile4
    ba = s["bundle_adjustment"]
    assert (
        ba["done"]
        and ba["model"] == "offset"
        and set(ba["matches"]) == {"0-1", "0-2", "0-3", "1-2", "1-3", "2-3"}
    )
    assert int(ba["track_length_histogram"].get("4", 0)) > 100
    # The delivered RPCs disagree by the biases; the adjusted ones agree to matching precision.
    assert ba["reproj_rms_tracks3_before_px"] > 0.5
    assert ba["reproj_rms_tracks3_after_px"] <= 0.1
    assert ba["pair_height_spread_m"]["median_before"] > 0.5
    assert ba["pair_height_spread_m"]["median_after"] <= 0.2
    for p in ba["pairs"].values():
        assert abs(p["median_dz_after_m"]) <= 0.1
    # Recovered corrections = −bias − J_k t for one scene translation t (the ambiguity).
    got = np.array(ba["offsets_px"])
    jac = _jacobians(s, out)
    want = -BIAS[:4]
    t, *_ = np.linalg.lstsq(jac.reshape(-1, 3), (got - want).ravel(), rcond=None)
    assert np.linalg.norm(got - want - jac @ t, axis=1).max() < 0.05


def test_guided_pass_and_outlier_test_are_reported(tile4: tuple[Path, dict]) -> None:
    """The first (coarse, pairwise) pass already finds the biases to a fraction of a pixel; the
    second pass is matched in narrow bands around the epipolar lines of those cameras."""
    _, s = tile4
    ba = s["bundle_adjustment"]
    g = ba["guide"]
    assert g["tracks"] > 20 and g["margin_px"] == 1.0 and g["cell"] == 16
    assert np.abs(np.array(g["offsets_px"]) - np.array(ba["offsets_px"])).max() < 0.3
    out = ba["outliers"]
    assert out["dropped"] == ba["observations"] - ba["inliers"]
    assert out["n_sigma"] == 2.0 and 0 < out["sigma_px"] < 0.1


def test_four_views_hold_one_out(tile4: tuple[Path, dict]) -> None:
    from skyfall.data.tile import load_tile

    out, s = tile4
    assert s["test_views"]["indices"] == [2] and s["test_views"]["names"] == ["view_2"]
    assert [v["split"] for v in s["views"]] == ["train", "train", "test", "train"]
    tile = load_tile(out)
    assert len(tile.train) == 3 and len(tile.test) == 1
    # The points lie on the terrain, up to the common height shift the adjustment cannot observe.
    dz = _terrain_offsets(out, s)
    assert len(dz) > 200 and np.median(np.abs(dz - np.median(dz))) < 0.1


def _terrain_offsets(out: Path, s: dict) -> np.ndarray:
    from skyfall.data.tile import load_tile

    o = s["enu_origin"]
    pts = load_tile(out).points.numpy().astype(np.float64)
    lon, lat, h = ENUFrame(o["lon"], o["lat"], o["alt"]).to_geodetic(pts)
    enu = ENUFrame(LON0, LAT0, 0.0).from_geodetic(lon, lat, h)
    return enu[:, 2] - _terrain(enu[:, 0], enu[:, 1])


def test_dense_heights_cover_the_aoi_on_the_terrain(
    tile4: tuple[Path, dict], views4: list[Path], tmp_path: Path
) -> None:
    out, s = tile4
    d = s["dense"]
    assert (
        d["done"] and d["planes"] > 100 and 0.45 < d["resolution_m"] < 0.55 and d["colour_view"] in (0, 1, 3)
    )
    assert s["points3D"]["method"].startswith("dense heights (plane sweep + SGM over 3 training views")
    # the grid actually used (--dense-spacing 2 rounded to whole cells) is what the report names
    assert d["spacing_m"] == pytest.approx(round(2.0 / d["resolution_m"]) * d["resolution_m"])
    assert f"on a {d['spacing_m']:.2f} m grid" in s["points3D"]["method"]
    # An 80 m AOI on a 2 m grid: (80 / 2)² points, all of them trusted on this textured terrain.
    assert s["points3D"]["count"] == d["points"] and d["points"] > 0.95 * 40 * 40
    dense_dz = _terrain_offsets(out, s)
    report = format_summary(s, out)
    w, h = d["cells"][1], d["cells"][0]
    assert (
        160 <= w == h <= 161
        and f"dense heights: {w}x{h} cells of {d['resolution_m']:.2f} m, {d['planes']} planes" in report
    )
    opts = PrepareOptions(dense=False, dense_spacing=1.5).config()
    assert opts.dense.enabled is False and opts.dense.spacing == 1.5
    # Without the dense step points3D.txt holds the matched track points (fewer, and where texture allowed).
    s2 = prepare_tile(
        views4,
        tmp_path / "t",
        PrepareConfig(aoi=(LON0, LAT0, 80.0), alt_range=(20.0, 80.0), dense=DenseConfig(enabled=False)),
    )
    assert s2["dense"] == {"done": False} and "NCC matches" in s2["points3D"]["method"]
    assert s2["points3D"]["count"] < d["points"]
    # Both sit at the terrain up to one common shift, the same one (the cameras are the same).
    match_dz = _terrain_offsets(tmp_path / "t", s2)
    assert abs(np.median(dense_dz) - np.median(match_dz)) < 0.1


@pytest.mark.parametrize(
    ("spec", "n", "want"),
    [("auto", 2, []), ("auto", 3, []), ("auto", 4, [2]), ("auto", 8, [4]), ("auto", 16, [4, 12]),
     ("none", 9, []), ("3,1", 5, [1, 3])],
)  # fmt: skip
def test_parse_test_views(spec: str, n: int, want: list[int]) -> None:
    assert parse_test_views(spec, n)[0] == want


@pytest.mark.parametrize(("spec", "msg"), [("7", "index 7 is not a view"), ("x", "--test-views must be"),
                                           ("0,1", "holds out all 2 views")])  # fmt: skip
def test_bad_test_views(spec: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_test_views(spec, 2)


def test_default_aoi_and_height_range(views4: list[Path], tmp_path: Path) -> None:
    s = prepare_tile(views4, tmp_path / "t", PrepareConfig(downsample=2, max_aoi=60.0, test_views="none"))
    a = s["aoi"]
    assert a["chosen_by"].startswith("largest square inside the common footprint of 4 view(s)")
    assert "capped at 60 m" in a["chosen_by"] and a["size_m"] == 60.0
    # Every view sees the whole AOI box.
    assert all(v["aoi_inside_image"] == 1.0 for v in s["views"])
    # The terrain is 46..54 m; the estimate is its percentiles +- the 10 m margin, far inside the
    # RPC's 0..100 m height range.
    lo, hi = a["alt_range"]
    assert 33.0 <= lo <= 46.5 and 53.5 <= hi <= 67.0, a
    assert a["alt_range_chosen_by"].startswith("1st..99th percentile")
    assert s["test_views"]["indices"] == [] and "none" in s["test_views"]["rule"]


def test_default_aoi_uncapped_is_inside_all_footprints(views4: list[Path]) -> None:
    from skyfall.prepare import read_satellite_image
    from skyfall.prepare.pipeline import default_aoi

    sats = [read_satellite_image(p) for p in views4]
    lon, lat, size, how = default_aoi(sats, (40.0, 60.0), 1000.0)
    assert "capped" not in how and 60.0 < size < 130.0  # 240 px at 0.5 m, rotated, offset views
    frame = ENUFrame(lon, lat, 0.0)
    g = np.linspace(-size / 2, size / 2, 5)
    box = np.stack(np.meshgrid(g, g, [40.0, 60.0], indexing="ij"), -1).reshape(-1, 3)
    blon, blat, bh = frame.to_geodetic(box)
    for im in sats:
        col, row = im.rpc.project(blon, blat, bh)
        assert (
            col.min() >= -0.5
            and row.min() >= -0.5
            and col.max() <= im.width - 0.5
            and row.max() <= im.height - 0.5
        )
    # A second square 5 % larger in place would stick out of some view.
    big = box * np.array([1.05, 1.05, 1.0])
    blon, blat, bh = frame.to_geodetic(big)
    out = []
    for im in sats:
        col, row = im.rpc.project(blon, blat, bh)
        out.append(
            col.min() < -0.5 or row.min() < -0.5 or col.max() > im.width - 0.5 or row.max() > im.height - 0.5
        )
    assert any(out)


def _dfc_root(views: list[Path], root: Path, aoi: str = "JAX_900") -> Path:
    """The flat DFC layout: images/AOI/*.tif, rpcs/AOI/*.json (+ test.txt), truth/AOI_DSM.tif + .txt."""
    import shutil

    (root / "images" / aoi).mkdir(parents=True)
    (root / "rpcs" / aoi).mkdir(parents=True)
    (root / "truth").mkdir()
    for k, v in enumerate(views):
        name = f"{aoi}_{k + 1:03d}_RGB"
        shutil.copy(v, root / "images" / aoi / f"{name}.tif")
        shutil.copy(v.with_suffix(".json"), root / "rpcs" / aoi / f"{name}.json")
    (root / "rpcs" / aoi / "test.txt").write_text(f"{aoi}_002_RGB.json\n")
    tifffile.imwrite(root / "truth" / f"{aoi}_DSM.tif", np.full((4, 4), 50.0, np.float32))
    (root / "truth" / f"{aoi}_DSM.txt").write_text("435000.0\n3350000.0\n2\n0.5\n")
    return root


def test_cli_dfc_layout(views4: list[Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    root = _dfc_root(views4, tmp_path / "dfc")
    out = tmp_path / "tile"
    cmd = [sys.executable, "-m", "skyfall", "prepare", "--out", str(out), "--dfc", str(root), "--aoi-name",
           "JAX_900", "--aoi", f"{LON0},{LAT0},60", "--alt-range", "20,80", "--downsample", "2"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "prepare.json").read_text())
    assert s["truth_dsm"] == str((root / "truth" / "JAX_900_DSM.tif").resolve())
    assert s["test_views"]["names"] == ["JAX_900_002_RGB"]  # from the dataset's test.txt
    assert [Path(v["rpc"]).parent.name for v in s["views"]] == ["JAX_900"] * 4
    assert "truth DSM:" in proc.stdout and "held out: JAX_900_002_RGB" in proc.stdout
    assert "pair 0-1: median height vs all views" in proc.stdout
    from skyfall.dsm import tile_frame

    assert tile_frame(out).truth_dsm == root / "truth" / "JAX_900_DSM.tif"

    # A missing RPC JSON: one line naming the file and the field, exit code 2.
    (root / "rpcs" / "JAX_900" / "JAX_900_003_RGB.json").unlink()
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[skyfall]")]
    assert proc.returncode == 2 and len(lines) == 1
    assert "JAX_900_003_RGB.json [rpc]: missing" in lines[0]


def test_dfc_satnerf_layout_and_missing_truth(views4: list[Path], tmp_path: Path) -> None:
    import shutil

    from skyfall.prepare.dfc import dfc_inputs

    root = tmp_path / "sn"
    img = root / "DFC2019" / "Track3-RGB-crops" / "JAX_901"
    js = root / "root_dir" / "crops_rpcs_ba_v2" / "JAX_901"
    img.mkdir(parents=True)
    js.mkdir(parents=True)
    for k, v in enumerate(views4[:2]):
        shutil.copy(v, img / f"JAX_901_00{k}_RGB.tif")
        shutil.copy(v.with_suffix(".json"), js / f"JAX_901_00{k}_RGB.json")
    with pytest.raises(ConfigError, match=r"no truth DSM for area 'JAX_901'"):
        dfc_inputs(root, "JAX_901")
    truth = root / "DFC2019" / "Track3-Truth"
    truth.mkdir(parents=True)
    (truth / "JAX_901_DSM.tif").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"JAX_901_DSM\.txt \[bounds\]: missing"):
        dfc_inputs(root, "JAX_901")
    (truth / "JAX_901_DSM.txt").write_text("0\n0\n1\n0.5\n")
    images, rpcs, extra, test = dfc_inputs(root, "JAX_901")
    assert [p.name for p in images] == ["JAX_901_000_RGB.tif", "JAX_901_001_RGB.tif"]
    assert [p.parent for p in rpcs] == [js, js] and test is None
    assert extra["truth_dsm"].endswith("Track3-Truth/JAX_901_DSM.tif")
    with pytest.raises(ConfigError, match=r"no image folder for area 'JAX_999'"):
        dfc_inputs(root, "JAX_999")


@pytest.mark.parametrize(
    ("change", "msg"),
    [({"adjust_model": "spline"}, "--adjust-model must be"), ({"gauge": "view9"}, "--gauge must be"),
     ({"max_aoi": 0.0}, "--max-aoi is out of range"), ({"track_merge_px": -1.0}, "--track-merge-px is out of range"),
     ({"test_views": "9"}, "--test-views: index 9")],
)  # fmt: skip
def test_bad_options_are_one_clear_error(views4: list[Path], tmp_path: Path, change: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        prepare_tile(views4, tmp_path / "t", PrepareConfig(**change))
