"""``skyfall export-views RUN --out DIR``: co-registered views of a reconstruction on an altitude ladder.

AerialMegaDepth (Vuong et al., CVPR 2025) trains DUSt3R/MASt3R on pairs of ground-level and aerial
views of one place with known depth and poses. This export renders such views from a run: cameras
placed by ``skyfall.data.ladder`` (altitudes 1.7 m to 350 m above the ground, around a grid of
look-at targets; heights from the run's rendered DSM), written in the layout of DUSt3R's processed
MegaDepth, which AerialMegaDepth's loader reads too (``dust3r/datasets/megadepth.py``,
``aerial-megadepth/data_generation/misc/megadepth_aerial.py``)::

    DIR/NAME.jpg          RGB, JPEG quality 95
    DIR/NAME.npy          depth, float32 [H, W]: camera-space z in metres, 0 where invalid
    DIR/NAME_mask.png     validity mask, uint8 {0, 255} (alpha >= threshold and depth > 0)
    DIR/NAME.npz          intrinsics (3x3 float64, DUSt3R's pixel convention, below), cam2world (4x4
                          float64, OpenCV: x right, y down, z forward)
    DIR/views.json        every view: name, target, altitude_m, band, azimuth, pitch, K, c2w, ...
    DIR/sparse/           COLMAP text model: cameras.txt (one PINHOLE camera), images.txt,
                          points3D.txt (a subsample of unprojected depth, no tracks)
    DIR/covisibility.npy  [N, N] co-visibility of the views (with pairs)
    DIR/pairs.csv         ranked view pairs (with pairs)
    DIR/README.md         frame, conventions, how to load

The processed MegaDepth stores depth as ``NAME.exr`` (OpenEXR, read with OpenCV). We write ``.npy``:
the same float32 values, lossless, read with numpy alone, without OpenCV's OpenEXR codec (disabled by
default in opencv-python builds) as a dependency; a DUSt3R loader reads it with ``np.load(NAME +
".npy")`` in place of ``imread_cv2(NAME + ".exr")``.

Pixel conventions: DUSt3R unprojects pixel (row v, column u) at integer coordinates
(``depthmap_to_camera_coordinates``: the top-left pixel's centre is (0, 0), OpenCV's convention),
while skyfall (gsplat) and COLMAP put it at (0.5, 0.5). So ``intrinsics`` in NAME.npz has
``cx, cy`` half a pixel less than ``K`` in views.json and sparse/cameras.txt; each is exact in its
own convention.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfall.data import ladder as lad
from skyfall.data.cameras import Cameras
from skyfall.data.guidance import world_points
from skyfall.errors import ConfigError, SkyfallError
from skyfall.export.upaxis import rotmat_to_quat
from skyfall.storage.atomic import atomic_write, atomic_write_text

DSM_MARGIN_M = 5.0
_OWNED = ("views.json", "README.md", "sparse", "covisibility.npy", "pairs.csv")
_VIEW_SUFFIXES = (".jpg", ".npy", "_mask.png", ".npz")


# ------------------------------------------------------------------------------------- options


def check_options(
    *,
    altitudes: tuple[float, ...],
    targets: int,
    azimuths: int,
    fov: float,
    size: int,
    alpha_threshold: float,
    standoff: float,
    dsm_resolution: float,
    min_overlap: float,
    points_per_view: int,
) -> tuple[float, ...]:
    """One ConfigError naming the option for a value no export could use; returns the altitudes."""
    try:
        alts = lad.check_altitudes(altitudes)
    except ValueError as e:
        raise ConfigError(f"--altitudes: {e}") from None
    checks = (
        ("--targets", targets, isinstance(targets, int) and 1 <= targets <= 64, "an integer 1..64"),
        ("--azimuths", azimuths, isinstance(azimuths, int) and 1 <= azimuths <= 360, "an integer 1..360"),
        ("--fov", fov, math.isfinite(fov) and 1.0 <= fov <= 170.0, "degrees in 1..170"),
        ("--size", size, isinstance(size, int) and 16 <= size <= 8192, "pixels in 16..8192"),
        ("--alpha-threshold", alpha_threshold, math.isfinite(alpha_threshold) and 0 < alpha_threshold <= 1,
         "in (0, 1]"),
        ("--standoff", standoff, math.isfinite(standoff) and standoff > 0, "metres > 0"),
        ("--dsm-resolution", dsm_resolution, math.isfinite(dsm_resolution) and 0.05 <= dsm_resolution <= 10,
         "metres in 0.05..10"),
        ("--min-overlap", min_overlap, math.isfinite(min_overlap) and 0 <= min_overlap <= 1, "in [0, 1]"),
        ("--points-per-view", points_per_view, isinstance(points_per_view, int) and points_per_view >= 0,
         "an integer >= 0"),
    )  # fmt: skip
    for flag, value, ok, want in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {want}, got {value}")
    return alts


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out}: not empty; pass --overwrite to replace an earlier export there")
        if not (out / "views.json").is_file():
            raise ConfigError(
                f"--out {out}: not empty and holds no views.json (not an export-views folder); "
                "--overwrite only replaces an earlier export"
            )


def _clear_previous(out: Path) -> None:
    """Remove what an earlier export wrote in ``out`` (the files its views.json lists), nothing else."""
    try:
        names = [v["name"] for v in json.loads((out / "views.json").read_text())["views"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    for name in names:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            continue
        for suffix in _VIEW_SUFFIXES:
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    for owned in _OWNED:
        p = out / owned
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ geometry


def opencv_intrinsics(k: np.ndarray) -> np.ndarray:
    """``K`` with the top-left pixel's centre at (0, 0) (DUSt3R, OpenCV) from skyfall's (0.5, 0.5)."""
    out = np.array(k, np.float64, copy=True)
    out[0, 2] -= 0.5
    out[1, 2] -= 0.5
    return out


def height_field(scene: Any, extent: tuple[float, float, float, float], resolution: float = 1.0,
                 *, progress: bool = False) -> lad.HeightField:  # fmt: skip
    """The scene's rendered DSM (median depth) over ``extent`` plus a margin, as a ``HeightField``."""
    from skyfall.dsm import DsmGrid, render_dsm

    x0, x1, y0, y1 = extent
    m = DSM_MARGIN_M
    grid = DsmGrid.covering(x0 - m, x1 + m, y0 - m, y1 + m, resolution)
    heights = render_dsm(scene, grid, depth="median", progress=progress)
    return lad.HeightField(heights, grid.x_min, grid.y_max, grid.resolution)


def run_extent(
    run: str | Path, scene: Any, data: str | Path | None = None
) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) the ladder covers: the run's tile (``data`` or its config.yml), else the scene's
    own extent."""
    from skyfall.dsm import TileFrame, scene_extent, tile_frame
    from skyfall.export.dsm import run_tile

    tile = run_tile(run, data)
    frame = tile_frame(tile) if tile is not None else TileFrame(None, None)
    return frame.extent or scene_extent(scene)


def ladder_cameras(
    scene: Any,
    extent: tuple[float, float, float, float],
    *,
    altitudes: tuple[float, ...] = lad.DEFAULT_ALTITUDES_M,
    targets: int = 2,
    azimuths: int = 4,
    fov: float = 60.0,
    size: int = 512,
    standoff: float = lad.STANDOFF_M,
    dsm_resolution: float = 1.0,
    progress: bool = False,
) -> tuple[lad.Ladder, lad.HeightField]:
    """Ladder cameras of a reconstruction: ``skyfall.data.ladder.place_ladder`` on its rendered DSM.

    Returns the ladder and the height field it was placed on.
    """
    hf = height_field(scene, extent, dsm_resolution, progress=progress)
    ladder = lad.place_ladder(
        hf, extent, altitudes=altitudes, n_targets=targets, n_azimuths=azimuths, fov_deg=fov, size=size,
        standoff_m=standoff,
    )  # fmt: skip
    return ladder, hf


# -------------------------------------------------------------------------------------- writing


def _save_image(path: Path, array: np.ndarray, fmt: str, **kw: Any) -> None:
    from PIL import Image

    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format=fmt, **kw)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_colmap_text(
    folder: Path, names: list[str], cameras: Cameras, xyz: np.ndarray, rgb: np.ndarray
) -> None:
    """COLMAP text model: one shared PINHOLE camera (all views share K), one image per view (no 2D
    points), and ``xyz``/``rgb`` as points without tracks."""
    k = cameras.Ks[0].numpy()
    cams = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        "# Number of cameras: 1",
        f"1 PINHOLE {cameras.width} {cameras.height} {k[0, 0]:.17g} {k[1, 1]:.17g} {k[0, 2]:.17g} {k[1, 2]:.17g}",
    ]
    imgs = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(names)}, mean observations per image: 0",
    ]
    w2c = cameras.viewmats.numpy()
    for i, name in enumerate(names):
        q = rotmat_to_quat(w2c[i, :3, :3])  # wxyz, w >= 0: COLMAP's order and sign
        t = w2c[i, :3, 3]
        imgs.append(f"{i + 1} " + " ".join(f"{v:.17g}" for v in (*q, *t)) + f" 1 {name}.jpg")
        imgs.append("")
    pts = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(xyz)}, mean track length: 0",
    ]
    pts += [
        f"{p + 1} {x:.6f} {y:.6f} {z:.6f} {r} {g} {b} 0"
        for p, ((x, y, z), (r, g, b)) in enumerate(zip(xyz.tolist(), rgb.tolist(), strict=True))
    ]
    for fname, lines in (("cameras.txt", cams), ("images.txt", imgs), ("points3D.txt", pts)):
        atomic_write_text(folder / fname, "\n".join(lines) + "\n")


def compute_pairs(
    depths: np.ndarray,
    valid: np.ndarray,
    cameras: Cameras,
    altitudes: list[float],
    *,
    min_overlap: float,
    cross_band_only: bool,
    one_way: bool = False,
) -> tuple[np.ndarray, list[tuple]]:
    """Co-visibility matrix [N, N] and ranked pairs ``(i, j, c_ij, c_ji, score)`` from
    ``skyfall.data.covisibility``, bands split at ``skyfall.data.ladder.BAND_EDGES_M``."""
    from skyfall.data.covisibility import covisibility, rank_pairs

    stride = max(1, cameras.width // 128)
    cov = covisibility(
        torch.from_numpy(depths), torch.from_numpy(valid), cameras.Ks, cameras.camtoworlds, stride=stride
    )
    ranked = rank_pairs(
        cov, altitudes=altitudes, bands=lad.BAND_EDGES_M, min_overlap=min_overlap,
        cross_band_only=cross_band_only, one_way=one_way,
    )  # fmt: skip
    return cov.detach().cpu().numpy(), list(ranked)


def _readme(doc: dict) -> str:
    w, h = doc["width"], doc["height"]
    return f"""# Co-registered multi-altitude views (skyfall export-views)

{len(doc["views"])} views of the reconstruction `{doc["run"]}` (checkpoint `{doc["checkpoint"]}`, step
{doc["step"]}), rendered {w}x{h} px with a {doc["fov_deg"]:g} deg horizontal field of view at
altitudes {", ".join(f"{a:g}" for a in doc["altitudes_m"])} m above the local ground, around
{doc["n_targets"]} look-at targets, appearance embedding `{doc["embedding"]}`.
{doc["skipped_count"]} cameras of the ladder were skipped: no position outside buildings (or, at street level, none
that sees the target) along their azimuth circle.

## Frame

World coordinates are the tile's local ENU frame in metres: x east, y north, z up (the frame of
the run's tile; tiles made by `skyfall prepare` record its geodetic origin in `prepare.json`).

## Camera rule

{doc["camera_rule"]}

## Files

| file | content |
| --- | --- |
| `NAME.jpg` | RGB, JPEG quality 95 |
| `NAME.npy` | depth, float32 [{h}, {w}]: camera-space z in metres (not ray length); 0 = invalid |
| `NAME_mask.png` | uint8, 255 where the depth is valid (rendered alpha >= {doc["alpha_threshold"]:g}) |
| `NAME.npz` | `intrinsics` (3x3), `cam2world` (4x4), float64 |
| `views.json` | every view: `name`, `target`, `altitude_m`, `band`, `azimuth_deg`, `pitch_deg`, `K`, `c2w` |
| `sparse/` | COLMAP text model: `cameras.txt` (one PINHOLE camera), `images.txt` (no 2D points), `points3D.txt` ({doc["points3D"]}) |
| `covisibility.npy`, `pairs.csv` | co-visibility [N, N] (views in `views.json` order) and ranked pairs, when written |

## Conventions

- Cameras are OpenCV: x right, y down, z forward; `cam2world` / `c2w` map camera to world
  coordinates. Depth is the camera-space z of the surface seen through the pixel centre.
- `K` in `views.json` and `sparse/cameras.txt`: the top-left pixel's centre is at (0.5, 0.5)
  (COLMAP, gsplat): a camera point projects to `u = fx x / z + cx` and pixel column `j` spans
  `[j, j + 1)`.
- `intrinsics` in `NAME.npz`: DUSt3R's convention, the top-left pixel's centre at (0, 0)
  (OpenCV): `intrinsics = K` with `cx`, `cy` less 0.5. DUSt3R's `depthmap_to_camera_coordinates`
  unprojects pixel (v, u) at integer (u, v) with it, exactly.
- Depth is `.npy`, not MegaDepth's `.exr`: the same float32 values, lossless, read without OpenCV.

## Loading (DUSt3R / MASt3R MegaDepth layout)

```python
import numpy as np
from PIL import Image

image = np.asarray(Image.open(f"{{name}}.jpg").convert("RGB"))
depth = np.load(f"{{name}}.npy")  # DUSt3R's loader: imread_cv2(name + ".exr") -> np.load(name + ".npy")
params = np.load(f"{{name}}.npz")
intrinsics = np.float32(params["intrinsics"])
cam2world = np.float32(params["cam2world"])
# world points as DUSt3R computes them:
v, u = np.mgrid[: depth.shape[0], : depth.shape[1]]
x = (u - intrinsics[0, 2]) * depth / intrinsics[0, 0]
y = (v - intrinsics[1, 2]) * depth / intrinsics[1, 1]
pts = np.stack([x, y, depth], -1) @ cam2world[:3, :3].T + cam2world[:3, 3]
valid = depth > 0
```
"""


# --------------------------------------------------------------------------------------- export


@dataclass
class ViewsExport:
    """What ``export_views`` wrote."""

    out: Path
    n_views: int
    skipped: int
    moved: int
    pairs: int | None  # ranked pairs written; None: no pairs asked for
    seconds: float
    embedding: str
    views: list[dict] = field(default_factory=list)


def export_views(
    run: str | Path,
    out: str | Path,
    *,
    altitudes: tuple[float, ...] = lad.DEFAULT_ALTITUDES_M,
    targets: int = 2,
    azimuths: int = 4,
    fov: float = 60.0,
    size: int = 512,
    embedding: str | int | None = None,
    alpha_threshold: float = 0.5,
    standoff: float = lad.STANDOFF_M,
    dsm_resolution: float = 1.0,
    data: str | Path | None = None,
    pairs: bool = True,
    min_overlap: float = 0.1,
    cross_band_only: bool = False,
    one_way_pairs: bool = False,
    points_per_view: int = 500,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> ViewsExport:
    """Render RUN's latest checkpoint on the altitude ladder and write the views (module docstring).

    Every option, the run, its embedding and the output folder are checked, and the cameras placed,
    before anything is written.

    Raises:
        ConfigError / SkyfallError: a bad option, no checkpoint, a non-empty ``out`` without
            ``overwrite``, or no camera of the ladder with a valid position.
    """
    from tqdm import tqdm

    from skyfall.export.run import load_run

    t0 = time.perf_counter()
    alts = check_options(
        altitudes=altitudes, targets=targets, azimuths=azimuths, fov=fov, size=size,
        alpha_threshold=alpha_threshold, standoff=standoff, dsm_resolution=dsm_resolution,
        min_overlap=min_overlap, points_per_view=points_per_view,
    )  # fmt: skip
    out = Path(out)
    _check_out(out, overwrite)
    from skyfall.devices import resolve_device

    device = str(resolve_device(device, "--device"))
    loaded = load_run(run, device)
    scene = loaded.scene
    rule = str(loaded.default_embedding if embedding is None else embedding)
    emb = scene.novel_embedding(rule, None if embedding is None else "--embedding")
    extent = run_extent(run, scene, data)
    ladder, _ = ladder_cameras(
        scene, extent, altitudes=alts, targets=targets, azimuths=azimuths, fov=fov, size=size,
        standoff=standoff, dsm_resolution=dsm_resolution, progress=progress,
    )  # fmt: skip
    if not ladder.views:
        raise SkyfallError(
            f"no camera of the ladder has a valid position ({ladder.summary()}); the rendered DSM of "
            f"{loaded.checkpoint} is empty or covered everywhere; nothing was written"
        )

    if out.is_dir() and any(out.iterdir()):
        _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    cams = ladder.cameras
    n, hgt, wid = len(cams), cams.height, cams.width
    depths = np.zeros((n, hgt, wid), np.float32)
    valid = np.zeros((n, hgt, wid), bool)
    rng = np.random.default_rng(0)
    pts_xyz: list[np.ndarray] = []
    pts_rgb: list[np.ndarray] = []
    records: list[dict] = []
    bar = tqdm(range(n), desc="export-views", unit="view", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for i in bar:
            v = ladder.views[i]
            r = scene.render(cams[i].to(device), emb, absgrad=False)
            rgb = (r.colors[0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
            alpha = r.alphas[0, ..., 0].cpu().numpy()
            z = r.expected_depths[0, ..., 0].cpu().numpy().astype(np.float32)
            ok = (alpha >= alpha_threshold) & np.isfinite(z) & (z > 0)
            depth = np.where(ok, z, np.float32(0.0)).astype(np.float32)
            depths[i], valid[i] = depth, ok
            k = cams.Ks[i].numpy()
            c2w = cams.camtoworlds[i].numpy()
            _save_image(out / f"{v.name}.jpg", rgb, "JPEG", quality=95)
            _save_npy(out / f"{v.name}.npy", depth)
            _save_image(out / f"{v.name}_mask.png", (ok * 255).astype(np.uint8), "PNG")
            _save_npz(out / f"{v.name}.npz", intrinsics=opencv_intrinsics(k), cam2world=c2w)
            if points_per_view > 0 and ok.any():
                idx = np.flatnonzero(ok)
                pick = np.sort(rng.choice(idx, size=min(points_per_view, len(idx)), replace=False))
                rows, cols = pick // wid, pick % wid
                pts_xyz.append(world_points(torch.from_numpy(depth), cams[i]).numpy()[rows, cols])
                pts_rgb.append(rgb[rows, cols])
            records.append(
                {
                    "name": v.name,
                    "target_index": v.target_index,
                    "target": list(v.target),
                    "altitude_m": v.altitude_m,
                    "band": v.band,
                    "azimuth_index": v.azimuth_index,
                    "azimuth_deg": v.azimuth_deg,
                    "requested_azimuth_deg": v.requested_azimuth_deg,
                    "pitch_deg": v.pitch_deg,
                    "eye": list(v.eye),
                    "K": k.tolist(),
                    "c2w": c2w.tolist(),
                    "valid_fraction": float(ok.mean()),
                }
            )
    xyz = np.concatenate(pts_xyz) if pts_xyz else np.zeros((0, 3))
    prgb = np.concatenate(pts_rgb) if pts_rgb else np.zeros((0, 3), np.uint8)
    write_colmap_text(out / "sparse", [v.name for v in ladder.views], cams, xyz, prgb)

    n_pairs = None
    if pairs:
        cov, ranked = compute_pairs(
            depths, valid, cams, [v.altitude_m for v in ladder.views], min_overlap=min_overlap,
            cross_band_only=cross_band_only, one_way=one_way_pairs,
        )  # fmt: skip
        _save_npy(out / "covisibility.npy", cov.astype(np.float32))
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["i", "j", "name_i", "name_j", "c_ij", "c_ji", "score"])
        for i, j, cij, cji, score in ranked:
            i, j = int(i), int(j)
            wr.writerow([i, j, ladder.views[i].name, ladder.views[j].name, f"{float(cij):.6f}",
                         f"{float(cji):.6f}", f"{float(score):.6f}"])  # fmt: skip
        atomic_write_text(out / "pairs.csv", buf.getvalue())
        n_pairs = len(ranked)

    pairs_doc = None
    if n_pairs is not None:
        pairs_doc = {
            "n": n_pairs, "min_overlap": min_overlap, "cross_band_only": cross_band_only, "one_way": one_way_pairs,
        }  # fmt: skip
    doc = {
        "run": str(run),
        "checkpoint": loaded.checkpoint.name,
        "step": loaded.step,
        "embedding": rule,
        "frame": "the tile's local ENU frame, metres (x east, y north, z up)",
        "camera": "OpenCV (x right, y down, z forward); c2w = camera-to-world",
        "K_convention": "top-left pixel centre at (0.5, 0.5) (COLMAP, gsplat); NAME.npz intrinsics: at (0, 0)",
        "depth": "camera-space z in metres, float32 NAME.npy, 0 = invalid (alpha < alpha_threshold)",
        "camera_rule": _rule_text(standoff),
        "extent": list(extent),
        "altitudes_m": list(alts),
        "bands": {b: [a for a in alts if lad.band_of(a) == b] for b in lad.BANDS},
        "n_targets": targets * targets,
        "n_azimuths": azimuths,
        "standoff_m": standoff,
        "fov_deg": fov,
        "width": wid,
        "height": hgt,
        "alpha_threshold": alpha_threshold,
        "dsm_resolution_m": dsm_resolution,
        "points3D": f"{len(xyz)} points: up to {points_per_view} unprojected valid depth pixels per view, no tracks"
        if len(xyz)
        else "empty",
        "pairs": pairs_doc,
        "moved_count": ladder.moved,
        "skipped_count": len(ladder.skipped),
        "skipped": ladder.skipped,
        "views": records,
    }
    atomic_write_text(out / "views.json", json.dumps(doc, indent=1))
    atomic_write_text(out / "README.md", _readme(doc))
    return ViewsExport(
        out, n, len(ladder.skipped), ladder.moved, n_pairs, time.perf_counter() - t0, rule, records
    )


def _rule_text(standoff: float) -> str:
    return (
        f"For each target (an N x N grid over the central half of the tile, moved to open ground within "
        f"{lad.TARGET_SNAP_M:g} m, z = local ground), altitude a and azimuth phi (counter-clockwise from east, "
        f"target -> camera): the eye is {standoff:g} m from the target horizontally, at ground(x, y) + a, "
        f"looking at the target (image centre), world up +z; the pitch is atan((z_eye - z_target) / {standoff:g}). "
        f"Ground = the lowest surface of the rendered DSM within {lad.GROUND_RADIUS_M:g} m (robustly: the "
        f"{lad.GROUND_PERCENTILE:g}th percentile of {lad.GROUND_CELL_M:g} m block medians, so that floaters below "
        "the ground do not sink it). A camera below 10 m is "
        f"valid where the DSM within {lad.CLEARANCE_RADIUS_M:g} m is within {lad.GROUND_TOLERANCE_M:g} m of the "
        f"ground and it sees the target; a higher one needs {lad.AERIAL_CLEARANCE_M:g} m of clearance. Invalid "
        f"cameras move along their azimuth circle in {lad.AZIMUTH_STEP_DEG:g} deg steps (short of halfway to "
        "the next azimuth), else are skipped. Bands: ground (< 10 m), low (10-100 m), high (>= 100 m)."
    )
