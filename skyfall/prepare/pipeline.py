"""``prepare_tile``: satellite images with RPCs -> a skyfall tile (the layout `skyfall.data.tile` reads).

Steps (each documented where it is implemented):

1. Read every view with its RPC (:mod:`skyfall.prepare.raster`).
2. Area of interest: a square of ``size`` metres centred on (lon, lat) (``--aoi``), the bounding
   square of a GeoJSON geometry, or by default the largest square inside every view's footprint
   (:func:`default_aoi`, at most ``max_aoi`` metres). Heights from ``--alt-range`` (ellipsoidal
   metres, like the RPC), else estimated from points triangulated on a coarse preview of the AOI
   (:func:`estimate_alt_range`).
3. ENU frame at the AOI centre with its origin ``origin_below`` metres under the lowest AOI height,
   as SatelliteSfM does (its ENU origin altitude is ``min(alt_range) − 20 m``). A tile of a city
   (``PrepareConfig.shared_frame``) is instead prepared in the city's tangent plane translated to
   the cell's origin, its AOI the square of ``size_m`` centred there (:class:`SharedFrame`).
4. Crop: every view is cut to one common size around its image of the AOI box (AOI x altitude
   range), optionally box-downsampled; pixels outside the source image are no-data.
5. Pinhole per view fitted to the RPC over a grid of AOI x altitude points
   (:mod:`skyfall.prepare.pinhole`), checked on independent random AOI points.
6. Matching of every pair of views (:mod:`skyfall.prepare.matching`), tracks and the joint bundle
   adjustment of all RPCs (:mod:`skyfall.prepare.adjust`), in two passes (:func:`match_and_adjust`:
   a coarse pairwise pass whose adjustment guides a multi-view pass), which also gives the initial points
   (each track's point, coloured from its first training view); if matching is disabled or finds
   too few points, the fallback is a plane of points at the middle of the altitude range on a
   ``fallback_spacing`` grid, coloured from the first training view: a flat start that Stage 1's
   densification reshapes, the same role as the reference's random-cube fallback but inside the AOI.
   Then, unless disabled, dense heights over the AOI from the adjusted training views (plane sweep
   + semi-global matching, :mod:`skyfall.prepare.dense`) replace those points with a height field
   on a ``dense.spacing`` grid, coloured from the view closest to nadir.
7. Held-out views (:func:`parse_test_views`) go to ``transforms_test.json``, the others to
   ``transforms_train.json``; all views take part in the adjustment (their cameras must agree).
8. Write ``images/*.png`` (8-bit RGB, panchromatic replicated; percentile stretch, valid pixels
   mapped to 1..255 so that black stays no-data for tools that use the reference's mask rule),
   ``masks/*.npy``, ``transforms_{train,test}.json``, ``points3D.txt`` and ``prepare.json`` (AOI
   and how it was chosen, ENU origin, crops, fit errors, held-out views, adjustment statistics:
   everything needed to go back to geographic coordinates).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.errors import ConfigError, SkyfallError, TileFormatError
from skyfall.prepare.adjust import (
    Correction,
    JointAdjustment,
    Tracks,
    build_tracks,
    joint_adjustment,
    triangulate_tracks,
)
from skyfall.prepare.dense import DenseConfig
from skyfall.prepare.dense_field import DENSE_DIR, FIELD_FILE, field_path, save_field
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.matching import MatchConfig, Matches, match_multiview, match_pair
from skyfall.prepare.pinhole import PinholeFit, fit_pinhole
from skyfall.prepare.raster import SatelliteImage, read_satellite_image


class AOIError(SkyfallError):
    """The area of interest is invalid or not seen by an image."""


@dataclass(frozen=True)
class SharedFrame:
    """A tile prepared in a frame shared with other tiles (a city's, ``skyfall city prepare``).

    The tile's frame is the ENU tangent plane at (``lon``, ``lat``, ``h``) translated by ``offset``
    (the tile origin in that plane, metres): tile point p is shared-frame point p + offset, exactly,
    because both frames have the same axes. The AOI is the ``size_m`` square centred on the tile
    origin, axis-aligned in the shared frame. ``prepare.json`` records the frame as ``enu_origin``
    ``{lon, lat, alt, offset}``.
    """

    lon: float
    lat: float
    h: float
    offset: tuple[float, float, float]
    size_m: float
    label: str = ""
    """What the tile is (e.g. 'city cell r000c001'), for prepare.json's ``aoi.chosen_by``."""

    def enu(self) -> ENUFrame:
        return ENUFrame(self.lon, self.lat, self.h, offset=self.offset)


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
    """Match features between all pairs of views (initial points + bundle adjustment)."""
    adjust: bool = True
    """Joint bundle adjustment of the RPCs (image corrections) from the tracks."""
    adjust_model: str = "offset"
    """Image correction per view: 'offset' (2 parameters) or 'affine' (6)."""
    gauge: str = "view0"
    """Adjustment gauge: 'view0' (view 0's RPC is kept) or 'mean' (all views move, smallest corrections)."""
    track_merge_px: float = 0.0
    """Observations of one view closer than this (px) are one track node (chains matches made from
    different reference views; 0: tracks are one reference keypoint and its matches)."""
    outlier_sigma: float = 2.0
    """Adjustment outlier test: observations whose studentized residual exceeds this many robust
    sigmas are left out (:func:`skyfall.prepare.adjust.standardized_inliers`; 0: none). Below the
    usual 3 because matching errors are heavy-tailed and partly systematic (shadow edges that move
    between acquisition dates, windows across depth edges): on the synthetic RPC cities 3 leaves
    ~0.065 px of error in the recovered RPC biases, 2 ~0.04 px, keeping ~2/3 of the tracks
    (scripts/bench_matches.py)."""
    test_views: str = "auto"
    """Held-out views: 'auto' (one in eight, at least one from 4 views, none below), 'none' or indices '2,5'."""
    max_aoi: float = 1000.0
    """Side cap (metres) of the default AOI (the largest square inside all views' common footprint)."""
    alt_margin: float = 10.0
    """Metres added on both sides of the estimated altitude range (1st..99th percentile of the
    heights triangulated on a coarse preview)."""
    preview_px: int = 256
    """Longest side (pixels) of the coarse preview used to estimate the altitude range."""
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
    dense: DenseConfig = field(default_factory=DenseConfig)
    """Dense heights (plane sweep + semi-global matching over the training views) for points3D.txt."""
    truth_dsm: Path | None = None
    """A ground-truth DSM GeoTIFF of the area (any CRS, heights above the WGS84 ellipsoid): recorded in
    ``prepare.json`` as ``truth_dsm`` (``skyfall eval``'s default ``--dsm-truth``; ``skyfall prepare``
    scores the stereo DSM against it)."""
    shared_frame: SharedFrame | None = None
    """Prepare in a frame shared with other tiles (a city's) instead of one at the AOI centre; the
    AOI is then the frame's square (``aoi`` and ``geojson`` must be None)."""


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
    images: list[str | Path | SatelliteImage],
    out: str | Path,
    cfg: PrepareConfig,
    *,
    rpc_files: list[str | Path] | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a tile from satellite images with RPCs (module docstring).

    Args:
        images: the views (>= 1; >= 2 for matching); view 0 is the adjustment's gauge. Views
            already read (``SatelliteImage``) are used as they are, so that many tiles of one city
            read each image once.
        out: tile folder to write.
        cfg: options.
        rpc_files: explicit RPC files, one per image (else embedded tags / sidecars).
        overwrite: allow writing into a non-empty ``out``.
        extra: entries added to ``prepare.json`` (e.g. ``truth_dsm``).

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
    if cfg.adjust_model not in ("offset", "affine"):
        raise ConfigError(f"--adjust-model must be 'offset' or 'affine', got {cfg.adjust_model!r}.")
    if cfg.gauge not in ("view0", "mean"):
        raise ConfigError(f"--gauge must be 'view0' or 'mean', got {cfg.gauge!r}.")
    for name, value, ok in (
        ("--track-merge-px", cfg.track_merge_px, cfg.track_merge_px >= 0),
        ("outlier_sigma", cfg.outlier_sigma, cfg.outlier_sigma >= 0),
        ("--max-aoi", cfg.max_aoi, 1.0 <= cfg.max_aoi <= 20000.0),
        ("--alt-margin", cfg.alt_margin, cfg.alt_margin >= 0),
    ):
        if not (ok and math.isfinite(value)):
            raise ConfigError(f"{name} is out of range: {value:g}.")
    cfg.dense.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace its tile files.")
    if cfg.aoi is not None and cfg.geojson is not None:
        raise ConfigError("give either --aoi or --geojson, not both.")
    if cfg.shared_frame is not None and (cfg.aoi is not None or cfg.geojson is not None):
        raise ConfigError("a tile in a shared frame takes its AOI from the frame: give no --aoi/--geojson.")
    test_idx, test_rule = parse_test_views(cfg.test_views, len(images))
    extra = dict(extra or {})
    if cfg.truth_dsm is not None:
        if not Path(cfg.truth_dsm).is_file():
            raise TileFormatError(cfg.truth_dsm, None, "truth DSM GeoTIFF not found")
        extra["truth_dsm"] = str(Path(cfg.truth_dsm).resolve())

    sats = [
        p
        if isinstance(p, SatelliteImage)
        else read_satellite_image(p, None if rpc_files is None else rpc_files[i])
        for i, p in enumerate(images)
    ]
    sf = cfg.shared_frame
    if sf is not None:
        frame = sf.enu()
        size = float(sf.size_m)
        _check_aoi(sf.lon, sf.lat, size, "shared frame")
        c_lon, c_lat, _ = frame.to_geodetic(np.zeros(3))
        lon, lat = float(c_lon), float(c_lat)
        ox, oy, oz = frame.offset  # type: ignore[misc]
        aoi_how = (
            f"{size:g} m square centred on ({ox:.3f}, {oy:.3f}, {oz:.3f}) m of the shared ENU frame at "
            f"{sf.lon:.6f}, {sf.lat:.6f}, {sf.h:.3f} m" + (f" ({sf.label})" if sf.label else "")
        )
    elif cfg.geojson is not None:
        lon, lat, size = aoi_from_geojson(cfg.geojson)
        aoi_how = f"bounding square of {cfg.geojson}"
    elif cfg.aoi is not None:
        lon, lat, size = cfg.aoi
        _check_aoi(lon, lat, size, "--aoi")
        aoi_how = "--aoi"
    else:
        lon, lat, size, aoi_how = default_aoi(sats, cfg.alt_range, cfg.max_aoi)
    if cfg.alt_range is not None:
        alt_min, alt_max = cfg.alt_range
        alt_how = "--alt-range"
    else:
        alt_min, alt_max, alt_how = estimate_alt_range(sats, (lon, lat, size), cfg)
    half = 0.5 * size
    if sf is None:
        frame = ENUFrame(lon, lat, alt_min - cfg.origin_below)
        z_lo, z_hi = cfg.origin_below, alt_max - frame.h0
    else:
        z_lo, z_hi = tile_z_range(frame, half, (alt_min, alt_max))
    views, width, height = _build_views(sats, frame, half, (z_lo, z_hi), cfg.downsample, cfg)
    train_idx = [i for i in range(len(views)) if i not in test_idx]

    adjustment: dict[str, Any] = {"done": False}
    points = colors = errors = None
    method = ""
    if cfg.match and len(views) >= 2:
        cams = [(v.fit.K, v.fit.c2w) for v in views]  # type: ignore[union-attr]
        matches, tracks, adj, guide = match_and_adjust(views, cams, (z_lo, z_hi), cfg, (width, height))
        n_matches = {f"{m.ref}-{m.view}": int(len(m.uv0)) for m in matches}
        if adj is not None:
            corr = adj.correction
            for k, v in enumerate(views):
                if cfg.adjust_model == "offset":
                    # The offset is added to every projected pixel: exactly a principal-point shift.
                    v.fit.K[:2, 2] += corr.offset[k]  # type: ignore[union-attr]
                else:
                    _fit(
                        v, frame, half, (z_lo, z_hi), cfg, lambda uv, k=k: corr.apply(np.full(len(uv), k), uv)
                    )
            stats = adj.summary(len(views))
            adjustment = {
                "done": True,
                **guide,
                "offsets_px": corr.offset.tolist(),
                "offsets_rpc_px": (corr.offset * cfg.downsample).tolist(),
                "matches": n_matches,
                "reproj_rms_px": stats["reproj_rms_after_px"],
                "ray_gap_m": {
                    "median": _stat(adj.ray_gap_after_m, "median"),
                    "p90": _stat(adj.ray_gap_after_m, "p90"),
                },
                "ray_gap_before_m": {
                    "median": _stat(adj.ray_gap_before_m, "median"),
                    "p90": _stat(adj.ray_gap_before_m, "p90"),
                },
                **stats,
            }
            pts, keep, err_obs = adj.points, adj.inlier, adj.err_after
        else:
            reason = "disabled (--no-adjust)" if not cfg.adjust else f"only {tracks.n_tracks} tracks"
            adjustment = {"done": False, "reason": reason, "matches": n_matches}
            keep = np.ones(len(tracks.view), bool)
            zero = Correction.zero(len(views), np.array([width, height]) / 2)
            pts = triangulate_tracks(cams, tracks, zero, keep)
            err_obs = np.zeros(len(tracks.view))
        pts, uv_first, view_first, errs = _track_points(tracks, pts, keep, err_obs, train_idx)
        inside = (
            (np.abs(pts[:, :2]) <= 1.05 * half).all(1) & (pts[:, 2] >= z_lo - 10) & (pts[:, 2] <= z_hi + 10)
        )
        if inside.sum() >= cfg.min_points:
            points, errors = pts[inside], errs[inside]
            colors = np.zeros((int(inside.sum()), 3), np.uint8)
            for k in np.unique(view_first[inside]):
                sel = view_first[inside] == k
                colors[sel] = _sample(views[k].rgb, uv_first[inside][sel])  # type: ignore[arg-type]
            how = "multi-view NCC matches" if guide else f"NCC matches of all {len(matches)} view pairs"
            method = (
                f"{how} chained into {tracks.n_tracks} tracks, "
                f"triangulated ({int(inside.sum())} points in the AOI volume)"
            )
        else:
            method = f"plane fallback: only {int(inside.sum())} triangulated points in the AOI volume"
    else:
        reason = "only one view" if len(views) < 2 else "matching disabled (--no-match)"
        adjustment = {"done": False, "reason": reason}
        method = f"plane fallback: {reason}"
    dense: dict[str, Any] = {"done": False}
    # dense/ is written by this step alone: an earlier tile's stereo DSM must not outlive it (eval would
    # score it as this tile's)
    shutil.rmtree(out / DENSE_DIR, ignore_errors=True)
    if cfg.dense.enabled and len(train_idx) >= 2:
        dense, dense_pts, field = _dense_points(views, train_idx, width, height, half, (z_lo, z_hi), cfg)
        save_field(field_path(out), field)
        dense["field"] = f"{DENSE_DIR}/{FIELD_FILE}"
        if len(dense_pts) >= cfg.min_points:
            points, errors = dense_pts, np.zeros(len(dense_pts))
            cv = views[dense["colour_view"]]
            colors = _sample(cv.rgb, cv.fit.project(points))  # type: ignore[arg-type, union-attr]
            method = (
                f"dense heights (plane sweep + SGM over {len(train_idx)} training views, {dense['resolution_m']:.2f} m "
                f"cells, {dense['planes']} planes) on a {dense['spacing_m']:.2f} m grid"
                + (f", {dense['ground_points']} of them a ground layer" if dense.get("ground_points") else "")
                + (f"; cameras from {method}" if method and not method.startswith("plane fallback") else "")
            )
        else:
            dense["note"] = f"only {len(dense_pts)} trusted cells; points3D.txt keeps the matched points"
    elif cfg.dense.enabled:
        dense["reason"] = "fewer than two training views"
    if points is None:
        points, colors = _plane(views[train_idx[0]], half, 0.5 * (z_lo + z_hi), cfg.fallback_spacing)
        errors = np.zeros(len(points))

    summary = {
        "aoi": {
            "lon": lon,
            "lat": lat,
            "size_m": size,
            "alt_range": [alt_min, alt_max],
            "chosen_by": aoi_how,
            "alt_range_chosen_by": alt_how,
        },  # fmt: skip
        "enu_origin": frame.to_dict(),
        "width": width,
        "height": height,
        "downsample": cfg.downsample,
        "views": [
            {
                "name": v.name,
                "source": str(v.image.path),
                "rpc": v.image.rpc_source,
                "split": "test" if i in test_idx else "train",
                "crop_file_px": [v.x0, v.y0, width * cfg.downsample, height * cfg.downsample],
                "aoi_inside_image": round(v.inside, 4),
                "fit_rms_px": v.fit.rms_px,  # type: ignore[union-attr]
                "fit_max_px": v.fit.max_px,  # type: ignore[union-attr]
                "skewed_fit_rms_px": v.fit.skewed_rms_px,  # type: ignore[union-attr]
                "skewed_fit_max_px": v.fit.skewed_max_px,  # type: ignore[union-attr]
                "skew": v.fit.skew,  # type: ignore[union-attr]
                **v.check,
            }
            for i, v in enumerate(views)
        ],
        "test_views": {"indices": test_idx, "names": [views[i].name for i in test_idx], "rule": test_rule},
        "bundle_adjustment": adjustment,
        "points3D": {"count": int(len(points)), "method": method},
        "dense": dense,
        "config": _config_dict(cfg),
        **extra,
    }
    _write_tile(out, views, width, height, points, colors, errors, summary, test_idx)  # type: ignore[arg-type]
    return summary


def tile_z_range(frame: ENUFrame, half: float, alt_range: tuple[float, float]) -> tuple[float, float]:
    """ENU z range of the heights ``alt_range`` (ellipsoidal) over the square [-half, half]² of ``frame``.

    In a shared tangent plane a tile away from the tangent point sees the ellipsoid drop away
    (d² / 2R below the plane at distance d: 2 m at 5 km), so one height maps to a z that varies over
    the tile. z falls with d, so the lowest z is at a corner and the highest at the square's point
    nearest the tangent point; both are sampled (with the edge midpoints and the centre).
    """
    g = np.array([-half, 0.0, half])
    xy = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    if frame.offset is not None:
        xy = np.r_[xy, [np.clip(-np.asarray(frame.offset[:2]), -half, half)]]
    lon, lat, _ = frame.to_geodetic(np.c_[xy, np.zeros(len(xy))])
    lo = frame.from_geodetic(lon, lat, np.full(len(xy), alt_range[0]))[:, 2]
    hi = frame.from_geodetic(lon, lat, np.full(len(xy), alt_range[1]))[:, 2]
    return float(lo.min()), float(hi.max())


def _config_dict(cfg: PrepareConfig) -> dict[str, Any]:
    """``cfg`` for prepare.json; without ``shared_frame`` when unset, so single tiles' files are unchanged."""
    d = _jsonable(asdict(cfg))
    if cfg.shared_frame is None:
        d.pop("shared_frame")
    return d


def parse_test_views(spec: str, n_views: int) -> tuple[list[int], str]:
    """Held-out view indices from ``--test-views`` ('auto', 'none' or comma-separated indices) and the rule.

    'auto': one view in eight (rounded, at least one) when there are four or more views, none
    below four; the held-out views are spread evenly over the input order and never view 0.
    """
    spec = spec.strip().lower()
    if spec == "none":
        return [], "none (--test-views none)"
    if spec == "auto":
        if n_views < 4:
            return [], f"auto: none held out below 4 views ({n_views} given)"
        k = max(1, round(n_views / 8))
        idx = sorted({min(n_views - 1, max(1, int((i + 0.5) * n_views / k))) for i in range(k)})
        return idx, f"auto: {len(idx)} of {n_views} views (one in eight, at least one from 4 views)"
    try:
        idx = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(
            f"--test-views must be 'auto', 'none' or view indices like '2,5', got {spec!r}."
        ) from None
    bad = [i for i in idx if not 0 <= i < n_views]
    if bad:
        raise ConfigError(f"--test-views: index {bad[0]} is not a view (0..{n_views - 1}).")
    if len(idx) >= n_views:
        raise ConfigError(f"--test-views holds out all {n_views} views; keep at least one for training.")
    return idx, f"explicit: {','.join(map(str, idx))}"


def default_aoi(
    sats: list[SatelliteImage], alt_range: tuple[float, float] | None, max_size: float
) -> tuple[float, float, float, str]:
    """The largest north-up square inside every view's footprint at every height, capped at ``max_size``.

    Footprints are the image corners localised through the RPC at both ends of the altitude range
    (``alt_range``, else each view's RPC height range ``h_off ± h_scale``): convex quadrilaterals in the ENU plane of
    view 0's centre. The square (maximised by a linear programme over centre and side) is shrunk by
    2 % for the footprints' curvature. Returns (lon, lat, side, a sentence saying how it was chosen).
    """
    from scipy.optimize import linprog

    r0 = sats[0].rpc
    lon0, lat0 = r0.localize(np.array([r0.samp_off]), np.array([r0.line_off]), np.array([r0.h_off]))
    frame = ENUFrame(float(lon0[0]), float(lat0[0]), 0.0)
    a_ub, b_ub = [], []
    for img in sats:
        rpc = img.rpc
        hs = alt_range or (rpc.h_off - abs(rpc.h_scale), rpc.h_off + abs(rpc.h_scale))
        a = np.r_[img.file_from_rpc, [[0.0, 0.0, 1.0]]]
        corners = np.array([[0, 0], [img.width, 0], [img.width, img.height], [0, img.height]], float)
        colrow = (np.c_[corners, np.ones(4)] @ np.linalg.inv(a).T)[:, :2]
        for h in hs:
            lon, lat = rpc.localize(colrow[:, 0], colrow[:, 1], np.full(4, h))
            xy = frame.from_geodetic(np.asarray(lon), np.asarray(lat), np.full(4, h))[:, :2]
            e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
            sign = np.sign(e1[0] * e2[1] - e1[1] * e2[0])  # the quad's orientation
            for i in range(4):
                p, q = xy[i], xy[(i + 1) % 4]
                n = sign * np.array([q[1] - p[1], p[0] - q[0]])  # outward normal: n . x <= n . p inside
                # All four corners (cx +- s/2, cy +- s/2) inside: n.c + (|nx| + |ny|) s / 2 <= n.p.
                a_ub.append([n[0], n[1], 0.5 * (abs(n[0]) + abs(n[1]))])
                b_ub.append(float(n @ p))
    res = linprog([0, 0, -1.0], A_ub=np.array(a_ub), b_ub=np.array(b_ub),
                  bounds=[(None, None), (None, None), (0, None)])  # fmt: skip
    if res.status != 0 or res.x[2] < 1.0:
        raise AOIError(
            f"{sats[0].path}: the {len(sats)} views have no common footprint; give the area of interest with --aoi."
        )
    cx, cy, side = res.x
    side_max = 0.98 * side
    size = min(side_max, max_size)
    lon, lat, _ = frame.to_geodetic(np.array([[cx, cy, 0.0]]))
    how = (
        f"largest square inside the common footprint of {len(sats)} view(s) "
        f"({side_max:.0f} m{f', capped at {max_size:g} m' if side_max > max_size else ''})"
    )
    return float(lon[0]), float(lat[0]), float(size), how


def estimate_alt_range(
    sats: list[SatelliteImage], aoi: tuple[float, float, float], cfg: PrepareConfig
) -> tuple[float, float, str]:
    """Altitude range from heights triangulated on a coarse preview (1st..99th percentile ± ``alt_margin``).

    The preview crops the AOI over view 0's RPC height normalisation range (``h_off ± h_scale``,
    where the RPC is valid) at a downsampling that makes its longest side about ``preview_px``,
    matches all pairs and triangulates the tracks with the RPCs as delivered (their bias, a few
    full-resolution pixels, is far inside the margin). Without two views, matching, or 20 points,
    that normalisation range is returned.
    """
    rpc0 = sats[0].rpc
    lo, hi = rpc0.h_off - abs(rpc0.h_scale), rpc0.h_off + abs(rpc0.h_scale)
    validity = (
        "view 0's RPC height range h_off +- h_scale (no {}: pass --alt-range when you know the terrain)"
    )
    if len(sats) < 2 or not cfg.match:
        return lo, hi, validity.format("second view" if len(sats) < 2 else "matching")
    lon, lat, size = aoi
    frame = ENUFrame(lon, lat, lo - cfg.origin_below)
    z = (cfg.origin_below, hi - frame.h0)
    plan = _plan_crops(sats, frame, 0.5 * size, z, 1)
    longest = max(max(v.check["w"], v.check["h"]) for v in plan)
    r = max(1, math.ceil(longest / cfg.preview_px))
    views, width, height = _build_views(sats, frame, 0.5 * size, z, r, cfg)
    cams = [(v.fit.K, v.fit.c2w) for v in views]  # type: ignore[union-attr]
    tracks = build_tracks(_match_all(views, cams, z, cfg.matcher))
    pts = triangulate_tracks(cams, tracks, Correction.zero(len(views), np.array([width, height]) / 2))
    # Matches forced to an end of their search segment are usually wrong: keep the inner 96 %.
    pad = 0.02 * (z[1] - z[0])
    ok = np.isfinite(pts[:, 0]) & (np.abs(pts[:, :2]) <= 0.5 * size).all(1)
    ok &= (pts[:, 2] >= z[0] + pad) & (pts[:, 2] <= z[1] - pad)
    if ok.sum() < 20:
        return lo, hi, validity.format(f"20 preview points, {int(ok.sum())} found")
    h = pts[ok, 2] + frame.h0
    p1, p99 = np.percentile(h, [1, 99])
    a, b = max(lo, p1 - cfg.alt_margin), min(hi, p99 + cfg.alt_margin)
    how = (
        f"1st..99th percentile {p1:.1f}..{p99:.1f} m of {int(ok.sum())} points triangulated on a "
        f"1/{r} preview, +- {cfg.alt_margin:g} m"
    )
    return float(a), float(b), how


def _build_views(
    sats: list[SatelliteImage],
    frame: ENUFrame,
    half: float,
    z: tuple[float, float],
    r: int,
    cfg: PrepareConfig,
) -> tuple[list[_View], int, int]:
    """Crop every view to a common size around the AOI box and fit its pinhole."""
    views = _plan_crops(sats, frame, half, z, r)
    width = max(v.check.pop("w") for v in views)
    height = max(v.check.pop("h") for v in views)
    for v in views:
        _crop(v, width, height, r, cfg.stretch)
        _fit(v, frame, half, z, cfg, r=r)
    return views, width, height


def _match_all(
    views: list[_View], cams: list[tuple[np.ndarray, np.ndarray]], z: tuple[float, float], mcfg: MatchConfig
) -> list[Matches]:
    """Keypoints of view i matched in every view j > i."""
    return [
        match_pair(
            views[i].grey, views[i].valid, cams[i], views[j].grey, views[j].valid, cams[j], z, j, mcfg, ref=i
        )  # type: ignore[arg-type]
        for i in range(len(views))
        for j in range(i + 1, len(views))
    ]


def match_and_adjust(
    views: list[_View], cams: list[tuple[np.ndarray, np.ndarray]], z: tuple[float, float], cfg: PrepareConfig,
    size: tuple[int, int],
) -> tuple[list[Matches], Tracks, JointAdjustment | None, dict[str, Any]]:  # fmt: skip
    """Matches, tracks and the joint adjustment of step 6 (None without ``cfg.adjust`` or 3 tracks).

    With ``cfg.matcher.guided`` (and the adjustment on), a first pass matches every pair on a coarse
    keypoint grid and its adjustment (offset model) corrects the cameras; the second pass matches
    every view's keypoints in all later views at once (:func:`match_multiview`) in a narrow band
    around the corrected epipolar segments, and its tracks are adjusted from the delivered cameras
    (so that "before" figures are the delivered RPCs'). If the first pass finds under 3 tracks, one
    pairwise pass is made at the full keypoint density. Returns (matches, tracks, adjustment,
    entries for prepare.json about the guiding pass).
    """
    mcfg = cfg.matcher
    if mcfg.sweep_views not in ("later", "all"):
        raise ConfigError(f"sweep_views must be 'later' or 'all', got {mcfg.sweep_views!r}.")

    def adjust(tracks: Tracks) -> JointAdjustment | None:
        if not cfg.adjust or tracks.n_tracks < 3:
            return None
        return joint_adjustment(
            cams, tracks, size, model=cfg.adjust_model, gauge=cfg.gauge, outlier_sigma=cfg.outlier_sigma
        )

    if cfg.adjust and mcfg.guided and len(views) >= 2:
        first = _match_all(views, cams, z, replace(mcfg, cell=mcfg.coarse_cell))
        t1 = build_tracks(first, cfg.track_merge_px)
        if t1.n_tracks >= 3:
            a1 = joint_adjustment(
                cams, t1, size, model="offset", gauge=cfg.gauge, outlier_sigma=cfg.outlier_sigma
            )
            guide = []
            for (K, c2w), o in zip(cams, a1.correction.offset, strict=True):
                K = K.copy()
                K[:2, 2] += o
                guide.append((K, c2w))
            imgs = [v.grey for v in views]
            valids = [v.valid for v in views]
            n = len(views)
            searched = [
                [j for j in range(n) if j > i or (mcfg.sweep_views == "all" and j != i)] for i in range(n)
            ]
            matches = [
                m
                for i in range(n)
                if searched[i]
                for m in match_multiview(imgs, valids, guide, z, i, searched[i], mcfg, mcfg.guided_margin)  # type: ignore[arg-type]
            ]
            tracks = build_tracks(matches, cfg.track_merge_px)
            info = {
                "guide": {
                    "offsets_px": a1.correction.offset.tolist(),
                    "tracks": int(a1.good_tracks().sum()),
                    "inliers": int(a1.inlier.sum()),
                    "margin_px": mcfg.guided_margin,
                    "cell": mcfg.coarse_cell,
                }
            }
            return matches, tracks, adjust(tracks), info
    matches = _match_all(views, cams, z, mcfg)
    tracks = build_tracks(matches, cfg.track_merge_px)
    return matches, tracks, adjust(tracks), {}


def _track_points(
    tracks: Tracks, pts: np.ndarray, keep: np.ndarray, err_obs: np.ndarray, train_idx: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Finite track points with the pixel of their first training-view observation (for colours) and RMS error."""
    ok_obs = keep & np.isin(tracks.view, train_idx)
    ok_obs &= np.isfinite(pts[tracks.track, 0])
    order = np.lexsort((tracks.view, tracks.track))
    order = order[ok_obs[order]]
    tr = tracks.track[order]
    first = order[np.r_[True, tr[1:] != tr[:-1]]] if len(order) else order
    t_ids = tracks.track[first]
    sq = np.bincount(tracks.track[keep], weights=err_obs[keep] ** 2, minlength=tracks.n_tracks)
    cnt = np.maximum(np.bincount(tracks.track[keep], minlength=tracks.n_tracks), 1)
    rms = np.sqrt(sq / cnt)
    return pts[t_ids], tracks.uv[first], tracks.view[first], rms[t_ids]


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


def aoi_in_image(
    img: SatelliteImage, frame: ENUFrame, half: float, z: tuple[float, float]
) -> tuple[float, np.ndarray, np.ndarray]:
    """How much of the AOI box ([-half, half]² x ``z`` of ``frame``) an image sees: (fraction of the
    box's image bounding box inside the image, its min and max file pixel (u, v))."""
    uv = _to_file(img, frame, _aoi_box(half, z))
    lo, hi = uv.min(0), uv.max(0)
    inter = np.clip(np.minimum(hi, [img.width, img.height]) - np.maximum(lo, 0), 0, None)
    return float(inter.prod() / max((hi - lo).prod(), 1e-9)), lo, hi


def _plan_crops(
    sats: list[SatelliteImage], frame: ENUFrame, half: float, z: tuple[float, float], r: int
) -> list[_View]:
    views, names = [], set()
    for img in sats:
        inside, lo, hi = aoi_in_image(img, frame, half, z)
        if inside <= 0:
            # The AOI centre, not the frame's tangent point: they differ for a tile in a shared frame.
            c_lon, c_lat, _ = frame.to_geodetic(np.zeros(3))
            raise AOIError(
                f"{img.path}: the area of interest (lon {float(c_lon):.6f}, lat {float(c_lat):.6f}, "
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


def _fit(
    v: _View, frame: ENUFrame, half: float, z: tuple[float, float], cfg: PrepareConfig,
    corr: Callable[[np.ndarray], np.ndarray] | None = None, r: int | None = None,
) -> None:  # fmt: skip
    """Fit the pinhole on the AOI grid and check it on random AOI points (written-image pixels).

    ``corr`` maps RPC pixels to corrected pixels (the adjustment's affine correction) before fitting.
    """
    r = cfg.downsample if r is None else r
    target = (lambda uv: uv) if corr is None else corr
    g = np.linspace(-half, half, cfg.grid_xy)
    zz = np.linspace(z[0], z[1], cfg.grid_z)
    xyz = np.stack(np.meshgrid(g, g, zz, indexing="ij"), -1).reshape(-1, 3)
    v.fit = fit_pinhole(xyz, target(_to_output(v, frame, xyz, r)))
    rng = np.random.default_rng(0)
    test = rng.uniform([-half, -half, z[0]], [half, half, z[1]], size=(2000, 3))
    err = np.linalg.norm(v.fit.project(test) - target(_to_output(v, frame, test, r)), axis=1)
    v.check = {"check_rms_px": float(np.sqrt((err**2).mean())), "check_max_px": float(err.max())}


def _to_output(v: _View, frame: ENUFrame, xyz: np.ndarray, r: int) -> np.ndarray:
    """ENU [N, 3] -> pixel coordinates of the written (cropped, downsampled) image [N, 2].

    A written pixel j spans file pixels [x0 + j r, x0 + (j + 1) r), so u_out = (u_file − x0) / r.
    """
    uv = _to_file(v.image, frame, xyz)
    return (uv - np.array([v.x0, v.y0])) / r


def _dense_points(
    views: list[_View],
    train_idx: list[int],
    width: int,
    height: int,
    half: float,
    z_range: tuple[float, float],
    cfg: PrepareConfig,
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Dense heights over the AOI from the (adjusted) training views, the points they give and the
    field itself (``DenseHeights``).

    Only training views take part, so the held-out views stay unseen by the start of Stage 1. The
    points are coloured from the view closest to nadir (it sees the most of the ground)."""
    import time

    import torch

    from skyfall.data.cameras import Cameras
    from skyfall.prepare.dense import block_cells, dense_heights, field_points, nadir_view

    t0 = time.perf_counter()
    tv = [views[i] for i in train_idx]
    cams = Cameras(
        torch.from_numpy(np.stack([v.fit.c2w for v in tv])),  # type: ignore[union-attr]
        torch.from_numpy(np.stack([v.fit.K for v in tv])),  # type: ignore[union-attr]
        width,
        height,
    )
    grey = torch.from_numpy(np.stack([v.grey for v in tv])).float()  # type: ignore[misc]
    valid = torch.from_numpy(np.stack([v.valid for v in tv]))  # type: ignore[misc]
    # Ground sampling distance: metres per pixel at the AOI centre in the sharpest view.
    zc = 0.5 * (z_range[0] + z_range[1])
    probe = torch.tensor([[0.0, 0.0, zc], [1.0, 0.0, zc], [0.0, 1.0, zc]], dtype=torch.float64)
    uv, _ = cams.project(probe)
    px_per_m = 0.5 * ((uv[:, 1] - uv[:, 0]).norm(dim=-1) + (uv[:, 2] - uv[:, 0]).norm(dim=-1))
    gsd = float((1.0 / px_per_m).min())
    field = dense_heights(grey, valid, cams, (-half, half, -half, half), z_range, cfg.dense, gsd=gsd)
    top, ground = field_points(
        field,
        cfg.dense.spacing,
        cfg.dense.min_score,
        cfg.dense.ground_window,
        cfg.dense.ground_rise,
        quantile=cfg.dense.point_quantile,
        step_jump=cfg.dense.step_jump,
    )
    pts = np.concatenate([top, ground])
    info = {
        "done": True,
        "resolution_m": field.resolution,
        "step_m": field.step,
        "planes": field.planes,
        "cells": list(field.heights.shape),
        # the point grid actually used: --dense-spacing rounded to whole cells
        "spacing_m": block_cells(cfg.dense.spacing, field.resolution) * field.resolution,
        "median_score": float(np.median(field.score)),
        "free_space_lowered": round(field.lowered, 4),
        "points": int(len(top)),
        "ground_points": int(len(ground)),
        "colour_view": train_idx[nadir_view(cams)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return info, pts, field


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
    points: np.ndarray, colors: np.ndarray, errors: np.ndarray, summary: dict[str, Any], test_idx: list[int],
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
    for split, sel in (
        ("train", [v for i, v in enumerate(views) if i not in test_idx]),
        ("test", [views[i] for i in test_idx]),
    ):
        if not sel:
            header = {"camera_model": "PINHOLE", "w": width, "h": height}
            (out / f"transforms_{split}.json").write_text(json.dumps({**header, "frames": []}, indent=1))
            continue
        cams = Cameras(
            torch.as_tensor(np.stack([v.fit.c2w for v in sel])),  # type: ignore[union-attr]
            torch.as_tensor(np.stack([v.fit.K for v in sel])),  # type: ignore[union-attr]
            width,
            height,
        )
        doc = transforms_document(cams, [v.name for v in sel])
        (out / f"transforms_{split}.json").write_text(json.dumps(doc, indent=1))
    with open(out / "points3D.txt", "w", encoding="utf-8") as fh:
        fh.write("# 3D point list: POINT3D_ID X Y Z R G B ERROR (ENU metres, see prepare.json)\n")
        fh.write(f"# method: {summary['points3D']['method']}\n")
        for i, (p, c, e) in enumerate(zip(points, colors, errors, strict=True), start=1):
            fh.write(f"{i} {p[0]:.4f} {p[1]:.4f} {p[2]:.4f} {c[0]} {c[1]} {c[2]} {e:.4f}\n")
    (out / "prepare.json").write_text(json.dumps(summary, indent=1))
