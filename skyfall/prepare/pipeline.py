"""``prepare_tile``: satellite images with RPCs -> a skyfall tile (the layout `skyfall.data.tile` reads).

Steps (each documented where it is implemented):

1. Read every view with its RPC (:mod:`skyfall.prepare.raster`).
2. Area of interest: a square of ``size`` metres centred on (lon, lat) (``--aoi``) or the bounding
   square of a GeoJSON geometry; heights from ``--alt-range`` (ellipsoidal metres, like the RPC),
   else the first RPC's ``height_off ± height_scale / 2`` (its validity range, usually much wider
   than the terrain: pass the range when you know it).
3. ENU frame at the AOI centre with its origin ``origin_below`` metres under the lowest AOI height,
   as SatelliteSfM does (its ENU origin altitude is ``min(alt_range) − 20 m``).
4. Crop: every view is cut to one common size around its image of the AOI box (AOI x altitude
   range), optionally box-downsampled; pixels outside the source image are no-data.
5. Pinhole per view fitted to the RPC over a grid of AOI x altitude points
   (:mod:`skyfall.prepare.pinhole`), checked on independent random AOI points.
6. Matching + relative bundle adjustment of the RPCs (:mod:`skyfall.prepare.matching`), which
   also gives the initial points; if matching is disabled or finds too few points, the fallback
   is a plane of points at the middle of the altitude range on a ``fallback_spacing`` grid,
   coloured from view 0: a flat start that Stage 1's densification reshapes, the same role as
   the reference's random-cube fallback but inside the AOI.
7. Write ``images/*.png`` (8-bit RGB, panchromatic replicated; percentile stretch, valid pixels
   mapped to 1..255 so that black stays no-data for tools that use the reference's mask rule),
   ``masks/*.npy``, ``transforms_{train,test}.json`` (test: 0 frames), ``points3D.txt`` and
   ``prepare.json`` (AOI, ENU origin, crops, fit errors, adjustment: everything needed to go back
   to geographic coordinates).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.errors import ConfigError, SkyfallError
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.matching import MatchConfig, match_pair, relative_adjustment, triangulate
from skyfall.prepare.pinhole import PinholeFit, fit_pinhole
from skyfall.prepare.raster import SatelliteImage, read_satellite_image


class AOIError(SkyfallError):
    """The area of interest is invalid or not seen by an image."""


@dataclass
class PrepareConfig:
    """Options of ``skyfall prepare`` (see the module docstring)."""

    aoi: tuple[float, float, float] | None = None
    """Area of interest: centre longitude, latitude (degrees) and side length (metres)."""
    geojson: Path | None = None
    """Area of interest from a GeoJSON file (its bounding square is used) instead of ``aoi``."""
    alt_range: tuple[float, float] | None = None
    """Lowest and highest scene height (metres above the WGS84 ellipsoid, the RPC datum)."""
    downsample: int = 1
    """Integer box-downsampling factor of the written images (cameras are fitted at that size)."""
    stretch: tuple[float, float] = (2.0, 98.0)
    """Percentiles of the valid pixels mapped to 1 and 255 (robust contrast stretch)."""
    match: bool = True
    """Match features between view 0 and the other views (initial points + bundle adjustment)."""
    adjust: bool = True
    """Relative bundle adjustment of the RPCs (image offsets) from the matches."""
    grid_xy: int = 9
    """Fit grid: points per horizontal axis of the AOI."""
    grid_z: int = 5
    """Fit grid: heights across the altitude range."""
    origin_below: float = 20.0
    """ENU origin height below the lowest AOI height (metres; the reference uses 20)."""
    min_points: int = 50
    """Fewer triangulated points than this -> the plane fallback for points3D.txt."""
    fallback_spacing: float = 2.0
    """Grid spacing (metres) of the plane fallback."""
    matcher: MatchConfig = field(default_factory=MatchConfig)
    """Matcher settings."""


@dataclass
class _View:
    image: SatelliteImage
    name: str
    x0: int  # crop window origin in file pixels
    y0: int
    inside: float  # fraction of the AOI's image bbox inside the source image
    rgb: np.ndarray | None = None  # [H, W, 3] uint8
    grey: np.ndarray | None = None  # [H, W] float 0..1
    valid: np.ndarray | None = None  # [H, W] bool
    fit: PinholeFit | None = None
    check: dict[str, float] = field(default_factory=dict)


def parse_aoi(text: str) -> tuple[float, float, float]:
    """``"lon,lat,size_m"`` -> floats (ConfigError on bad input)."""
    try:
        lon, lat, size = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--aoi must be 'lon,lat,size_m' (three numbers), got {text!r}.") from None
    _check_aoi(lon, lat, size, "--aoi")
    return lon, lat, size


def parse_range(text: str, name: str) -> tuple[float, float]:
    """``"a,b"`` -> (a, b) with a < b (ConfigError on bad input)."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be 'min,max' (two numbers), got {text!r}.") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ConfigError(f"{name} must satisfy min < max, got {a:g},{b:g}.")
    return a, b


def _check_aoi(lon: float, lat: float, size: float, where: str) -> None:
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise ConfigError(f"{where}: longitude {lon:g} / latitude {lat:g} out of range.")
    if not (1.0 <= size <= 20000.0):
        raise ConfigError(f"{where}: the AOI size must be 1..20000 m, got {size:g}.")


def aoi_from_geojson(path: str | Path) -> tuple[float, float, float]:
    """(lon, lat, size_m) of the bounding square of all coordinates in a GeoJSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the GeoJSON file ({e}).") from e
    coords: list[tuple[float, float]] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key in ("coordinates", "geometry", "features", "geometries"):
                if key in obj:
                    walk(obj[key])
        elif isinstance(obj, list):
            if len(obj) >= 2 and all(isinstance(v, (int, float)) for v in obj[:2]):
                coords.append((float(obj[0]), float(obj[1])))
            else:
                for v in obj:
                    walk(v)

    walk(data)
    if not coords:
        raise ConfigError(f"{path} [coordinates]: the GeoJSON contains no coordinates.")
    c = np.array(coords)
    lon = 0.5 * (c[:, 0].min() + c[:, 0].max())
    lat = 0.5 * (c[:, 1].min() + c[:, 1].max())
    frame = ENUFrame(lon, lat, 0.0)
    enu = frame.from_geodetic(c[:, 0], c[:, 1], np.zeros(len(c)))
    size = float(max(np.ptp(enu[:, 0]), np.ptp(enu[:, 1]), 1.0))
    _check_aoi(lon, lat, size, str(path))
    return lon, lat, size


def prepare_tile(
    images: list[str | Path],
    out: str | Path,
    cfg: PrepareConfig,
    *,
    rpc_files: list[str | Path] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a tile from satellite images with RPCs (module docstring).

    Args:
        images: the views (>= 1; >= 2 for matching); view 0 is the matching reference.
        out: tile folder to write.
        cfg: options.
        rpc_files: explicit RPC files, one per image (else embedded tags / sidecars).
        overwrite: allow writing into a non-empty ``out``.

    Returns:
        The summary written to ``out/prepare.json``.

    Raises:
        ConfigError, AOIError, RPCError, ImageReadError: bad input (one line naming what is wrong).
    """
    if not images:
        raise ConfigError("give at least one image.")
    if rpc_files is not None and len(rpc_files) != len(images):
        raise ConfigError(f"--rpc needs one file per image ({len(images)}), got {len(rpc_files)}.")
    if cfg.downsample < 1:
        raise ConfigError(f"--downsample must be >= 1, got {cfg.downsample}.")
    lo_p, hi_p = cfg.stretch
    if not 0 <= lo_p < hi_p <= 100:
        raise ConfigError(
            f"--stretch percentiles must satisfy 0 <= low < high <= 100, got {lo_p:g},{hi_p:g}."
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace its tile files.")
    if cfg.aoi is None and cfg.geojson is None:
        raise ConfigError("give the area of interest: --aoi lon,lat,size_m or --geojson FILE.")
    if cfg.aoi is not None and cfg.geojson is not None:
        raise ConfigError("give either --aoi or --geojson, not both.")
    lon, lat, size = aoi_from_geojson(cfg.geojson) if cfg.geojson is not None else cfg.aoi  # type: ignore[misc]
    if cfg.geojson is None:
        _check_aoi(lon, lat, size, "--aoi")

    sats = [
        read_satellite_image(p, None if rpc_files is None else rpc_files[i]) for i, p in enumerate(images)
    ]
    rpc0 = sats[0].rpc
    alt_min, alt_max = cfg.alt_range or (
        rpc0.h_off - 0.5 * abs(rpc0.h_scale),
        rpc0.h_off + 0.5 * abs(rpc0.h_scale),
    )
    frame = ENUFrame(lon, lat, alt_min - cfg.origin_below)
    z_lo, z_hi = cfg.origin_below, alt_max - frame.h0
    half = 0.5 * size

    views = _plan_crops(sats, frame, half, (z_lo, z_hi), cfg.downsample)
    width = max(v.check.pop("w") for v in views)
    height = max(v.check.pop("h") for v in views)
    for v in views:
        _crop(v, width, height, cfg.downsample, cfg.stretch)
        _fit(v, frame, half, (z_lo, z_hi), cfg)

    adjustment: dict[str, Any] = {"done": False}
    points = colors = errors = None
    method = ""
    if cfg.match and len(views) >= 2:
        cams = [(v.fit.K, v.fit.c2w) for v in views]  # type: ignore[union-attr]
        matches = [
            match_pair(
                views[0].grey, views[0].valid, cams[0], v.grey, v.valid, cams[k], (z_lo, z_hi), k, cfg.matcher
            )  # fmt: skip
            for k, v in enumerate(views[1:], start=1)
        ]
        if cfg.adjust:
            adj = relative_adjustment(cams, matches)
            for v, off in zip(views, adj.offsets, strict=True):
                v.fit.K[:2, 2] += off  # type: ignore[union-attr]
            adjustment = {
                "done": True,
                "offsets_px": adj.offsets.tolist(),
                "offsets_rpc_px": (adj.offsets * cfg.downsample).tolist(),
                "matches": adj.n_matches,
                "inliers": int(len(adj.points)),
                "reproj_rms_px": _stat(adj.reproj_px, "rms"),
                "ray_gap_m": {"median": _stat(adj.ray_gap_m, "median"), "p90": _stat(adj.ray_gap_m, "p90")},
                "ray_gap_before_m": {
                    "median": _stat(adj.ray_gap_before_m, "median"),
                    "p90": _stat(adj.ray_gap_before_m, "p90"),
                },
            }
            pts, uv0, errs = adj.points, adj.uv0, adj.reproj_px
        else:
            adjustment = {"done": False, "reason": "disabled (--no-adjust)"}
            pts_l, uv_l, err_l = [], [], []
            for m in matches:
                p, _ = triangulate([cams[0], cams[m.view]], [m.uv0, m.uvk])
                pts_l.append(p)
                uv_l.append(m.uv0)
                err_l.append(np.zeros(len(p)))
            pts, uv0, errs = np.concatenate(pts_l), np.concatenate(uv_l), np.concatenate(err_l)
        inside = (
            (np.abs(pts[:, :2]) <= 1.05 * half).all(1) & (pts[:, 2] >= z_lo - 10) & (pts[:, 2] <= z_hi + 10)
        )
        if inside.sum() >= cfg.min_points:
            points, errors = pts[inside], errs[inside]
            colors = _sample(views[0].rgb, uv0[inside])  # type: ignore[arg-type]
            method = (
                f"NCC matches of view 0 with {len(views) - 1} other view(s), triangulated "
                f"({int(inside.sum())} points in the AOI volume)"
            )
        else:
            method = f"plane fallback: only {int(inside.sum())} triangulated points in the AOI volume"
    else:
        reason = "only one view" if len(views) < 2 else "matching disabled (--no-match)"
        adjustment = {"done": False, "reason": reason}
        method = f"plane fallback: {reason}"
    if points is None:
        points, colors = _plane(views[0], half, 0.5 * (z_lo + z_hi), cfg.fallback_spacing)
        errors = np.zeros(len(points))

    summary = {
        "aoi": {"lon": lon, "lat": lat, "size_m": size, "alt_range": [alt_min, alt_max]},
        "enu_origin": frame.to_dict(),
        "width": width,
        "height": height,
        "downsample": cfg.downsample,
        "views": [
            {
                "name": v.name,
                "source": str(v.image.path),
                "rpc": v.image.rpc_source,
                "crop_file_px": [v.x0, v.y0, width * cfg.downsample, height * cfg.downsample],
                "aoi_inside_image": round(v.inside, 4),
                "fit_rms_px": v.fit.rms_px,  # type: ignore[union-attr]
                "fit_max_px": v.fit.max_px,  # type: ignore[union-attr]
                "skewed_fit_rms_px": v.fit.skewed_rms_px,  # type: ignore[union-attr]
                "skewed_fit_max_px": v.fit.skewed_max_px,  # type: ignore[union-attr]
                "skew": v.fit.skew,  # type: ignore[union-attr]
                **v.check,
            }
            for v in views
        ],
        "bundle_adjustment": adjustment,
        "points3D": {"count": int(len(points)), "method": method},
        "config": _jsonable(asdict(cfg)),
    }
    _write_tile(out, views, width, height, points, colors, errors, summary)  # type: ignore[arg-type]
    return summary


def _stat(x: np.ndarray, kind: str) -> float | None:
    if len(x) == 0:
        return None
    if kind == "rms":
        return float(np.sqrt((x**2).mean()))
    return float(np.median(x) if kind == "median" else np.percentile(x, 90))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def _aoi_box(half: float, z: tuple[float, float]) -> np.ndarray:
    """[27, 3] corners, edge midpoints and centre of the AOI box (ENU)."""
    g = np.array([-half, 0.0, half])
    zz = np.array([z[0], 0.5 * (z[0] + z[1]), z[1]])
    return np.stack(np.meshgrid(g, g, zz, indexing="ij"), -1).reshape(-1, 3)


def _to_file(img: SatelliteImage, frame: ENUFrame, xyz: np.ndarray) -> np.ndarray:
    """ENU points [N, 3] -> file pixel coordinates [N, 2] through the RPC."""
    lon, lat, h = frame.to_geodetic(xyz)
    col, row = img.rpc.project(lon, lat, h)
    return np.stack(img.rpc_to_file(col, row), axis=-1)


def _plan_crops(
    sats: list[SatelliteImage], frame: ENUFrame, half: float, z: tuple[float, float], r: int
) -> list[_View]:
    views, names = [], set()
    for img in sats:
        uv = _to_file(img, frame, _aoi_box(half, z))
        lo, hi = uv.min(0), uv.max(0)
        inter = np.clip(np.minimum(hi, [img.width, img.height]) - np.maximum(lo, 0), 0, None)
        inside = float(inter.prod() / max((hi - lo).prod(), 1e-9))
        if inside <= 0:
            raise AOIError(
                f"{img.path}: the area of interest (lon {frame.lon0:.6f}, lat {frame.lat0:.6f}, "
                f"{2 * half:g} m) is outside the image footprint (it projects to columns "
                f"{lo[0]:.0f}..{hi[0]:.0f}, rows {lo[1]:.0f}..{hi[1]:.0f} of a {img.width}x{img.height} image)."
            )
        name = img.path.stem
        while name in names:
            name += "_"
        names.add(name)
        v = _View(image=img, name=name, x0=0, y0=0, inside=inside)
        centre = 0.5 * (lo + hi)
        v.check = {"w": math.ceil((hi[0] - lo[0]) / r) + 2, "h": math.ceil((hi[1] - lo[1]) / r) + 2}
        v.check["cx"], v.check["cy"] = float(centre[0]), float(centre[1])
        views.append(v)
    return views


def _crop(v: _View, width: int, height: int, r: int, stretch: tuple[float, float]) -> None:
    """Cut, downsample and stretch the view's pixels into its common-size window."""
    img = v.image
    cx, cy = v.check.pop("cx"), v.check.pop("cy")
    v.x0 = int(math.floor(cx - 0.5 * width * r))
    v.y0 = int(math.floor(cy - 0.5 * height * r))
    W, H = width * r, height * r
    c = img.pixels.shape[2]
    buf = np.zeros((H, W, c))
    ok = np.zeros((H, W), bool)
    xs, ys = max(v.x0, 0), max(v.y0, 0)
    xe, ye = min(v.x0 + W, img.width), min(v.y0 + H, img.height)
    if xe > xs and ye > ys:
        buf[ys - v.y0 : ye - v.y0, xs - v.x0 : xe - v.x0] = img.pixels[ys:ye, xs:xe]
        ok[ys - v.y0 : ye - v.y0, xs - v.x0 : xe - v.x0] = img.valid[ys:ye, xs:xe]
    if r > 1:
        buf = buf.reshape(height, r, width, r, c).mean(axis=(1, 3))
        ok = ok.reshape(height, r, width, r).all(axis=(1, 3))  # a pixel is valid only if all its parts are
    if not ok.any():
        raise AOIError(f"{img.path}: no valid (non no-data) pixel inside the area of interest.")
    lo, hi = np.percentile(buf[ok], stretch)
    scaled = np.clip((buf - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    grey = scaled.mean(axis=2)
    rgb8 = (1 + np.round(scaled * 254)).astype(np.uint8)
    rgb8[~ok] = 0
    v.rgb = np.repeat(rgb8, 3, axis=2) if c == 1 else rgb8
    v.grey = np.where(ok, grey, 0.0)
    v.valid = ok


def _fit(v: _View, frame: ENUFrame, half: float, z: tuple[float, float], cfg: PrepareConfig) -> None:
    """Fit the pinhole on the AOI grid and check it on random AOI points (written-image pixels)."""
    g = np.linspace(-half, half, cfg.grid_xy)
    zz = np.linspace(z[0], z[1], cfg.grid_z)
    xyz = np.stack(np.meshgrid(g, g, zz, indexing="ij"), -1).reshape(-1, 3)
    v.fit = fit_pinhole(xyz, _to_output(v, frame, xyz, cfg.downsample))
    rng = np.random.default_rng(0)
    test = rng.uniform([-half, -half, z[0]], [half, half, z[1]], size=(2000, 3))
    err = np.linalg.norm(v.fit.project(test) - _to_output(v, frame, test, cfg.downsample), axis=1)
    v.check = {"check_rms_px": float(np.sqrt((err**2).mean())), "check_max_px": float(err.max())}


def _to_output(v: _View, frame: ENUFrame, xyz: np.ndarray, r: int) -> np.ndarray:
    """ENU [N, 3] -> pixel coordinates of the written (cropped, downsampled) image [N, 2].

    A written pixel j spans file pixels [x0 + j r, x0 + (j + 1) r), so u_out = (u_file − x0) / r.
    """
    uv = _to_file(v.image, frame, xyz)
    return (uv - np.array([v.x0, v.y0])) / r


def _sample(rgb: np.ndarray, uv: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    j = np.clip(np.floor(uv[:, 0]).astype(int), 0, w - 1)
    i = np.clip(np.floor(uv[:, 1]).astype(int), 0, h - 1)
    return rgb[i, j]


def _plane(v: _View, half: float, z: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    n = max(2, int(round(2 * half / spacing)) + 1)
    g = np.linspace(-half, half, n)
    xyz = np.stack(np.meshgrid(g, g, [z], indexing="ij"), -1).reshape(-1, 3)
    uv = v.fit.project(xyz)  # type: ignore[union-attr]
    h, w = v.valid.shape  # type: ignore[union-attr]
    ok = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    return xyz[ok], _sample(v.rgb, uv[ok])  # type: ignore[arg-type]


def _write_tile(
    out: Path, views: list[_View], width: int, height: int,
    points: np.ndarray, colors: np.ndarray, errors: np.ndarray, summary: dict[str, Any],
) -> None:  # fmt: skip
    import torch
    from PIL import Image

    from skyfall.data.cameras import Cameras
    from skyfall.data.tile import transforms_document

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for v in views:
        Image.fromarray(v.rgb).save(out / "images" / f"{v.name}.png")
        np.save(out / "masks" / f"{v.name}.npy", v.valid.astype(np.uint8))  # type: ignore[union-attr]
    cams = Cameras(
        torch.as_tensor(np.stack([v.fit.c2w for v in views])),  # type: ignore[union-attr]
        torch.as_tensor(np.stack([v.fit.K for v in views])),  # type: ignore[union-attr]
        width,
        height,
    )
    doc = transforms_document(cams, [v.name for v in views])
    header = {k: doc[k] for k in ("camera_model", "w", "h")}
    (out / "transforms_train.json").write_text(json.dumps(doc, indent=1))
    (out / "transforms_test.json").write_text(json.dumps({**header, "frames": []}, indent=1))
    with open(out / "points3D.txt", "w", encoding="utf-8") as fh:
        fh.write("# 3D point list: POINT3D_ID X Y Z R G B ERROR (ENU metres, see prepare.json)\n")
        fh.write(f"# method: {summary['points3D']['method']}\n")
        for i, (p, c, e) in enumerate(zip(points, colors, errors, strict=True), start=1):
            fh.write(f"{i} {p[0]:.4f} {p[1]:.4f} {p[2]:.4f} {c[0]} {c[1]} {c[2]} {e:.4f}\n")
    (out / "prepare.json").write_text(json.dumps(summary, indent=1))
