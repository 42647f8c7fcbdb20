"""A city from real satellite images with RPCs: one tile per cell of a grid (``skyfall city prepare``).

City frame. One local ENU tangent plane at the centre of the bounding box (lon, lat), its origin
``origin_below`` metres under the lowest scene height, as ``skyfall prepare`` places a tile's frame;
x east, y north, z up. The grid (``skyfall.city.manifest.grid``) is centred on that origin and
covers the bounding box's ENU rectangle with ``ceil(extent / tile_size)`` square cores per axis; each
cell's origin is its core's centre at z = 0.

Tiles. Every cell is prepared by ``skyfall.prepare.pipeline.prepare_tile`` over the square of its
core grown by the overlap on every side (not clipped to the city: the images extend beyond the box,
and the merge crops each tile to its core), in the city's tangent plane translated to the cell's
origin (``SharedFrame``). Tile and city frames then share their axes, so tile -> city is the exact
translation ``+ cell.origin`` that ``skyfall.city.merge`` assumes; tiles prepared in their own
tangent planes would be rotated against each other (about 1.6e-4 rad per km). All cells use one
height range (``--alt-range``, or estimated once over the whole box), so every tile's z has the same
origin. The box is limited to 20 km a side: one tangent plane holds a city to decimetres only within
about 10 km of its origin (``docs/city_scale.md``).

Folder (``skyfall.city.folders``): ``CITY/city.json`` (the manifest, written before any tile),
``CITY/tiles/<cell>/`` (a tile; its ``prepare.json``, written last, marks it complete) and
``CITY/city_prepare.json`` (options, height range, one summary per cell; rewritten after every
cell). A second run continues: complete tiles are kept unless ``overwrite``; it must use the same
images, box, grid and options (else a ConfigError says what differs).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.city.folders import CityFolder
from skyfall.city.manifest import CityCell, CityManifest, CityManifestError, grid
from skyfall.errors import ConfigError, SkyfallError
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.pipeline import (
    AOIError,
    PrepareConfig,
    SharedFrame,
    aoi_in_image,
    estimate_alt_range,
    tile_z_range,
)
from skyfall.prepare.raster import SatelliteImage, read_satellite_image

SUMMARY_NAME = "city_prepare.json"
MAX_CITY_M = 20000.0
"""Largest side of a city's box: one ENU tangent plane is exact to decimetres within ~10 km of its origin."""

BBox = tuple[float, float, float, float]  # lon_west, lat_south, lon_east, lat_north (degrees)


class CellError(SkyfallError):
    """Preparing one cell failed; the message names the cell and the cause (e.g. the image)."""


# ------------------------------------------------------------------------------------ options


def parse_bbox(text: str, option: str = "--bbox") -> BBox:
    """``'lon0,lat0,lon1,lat1'`` (west, south, east, north; degrees) -> floats, checked (ConfigError)."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(
            f"{option} must be 'lon0,lat0,lon1,lat1' (west, south, east, north in degrees), got {text!r}."
        )
    check_bbox(values, option)  # type: ignore[arg-type]
    return values  # type: ignore[return-value]


def check_bbox(bbox: Sequence[float], option: str = "--bbox") -> None:
    lon0, lat0, lon1, lat1 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (lon0, lat0, lon1, lat1)):
        raise ConfigError(f"{option}: expected finite numbers, got {list(bbox)}.")
    if not (-180 <= lon0 <= 180 and -180 <= lon1 <= 180 and -85 <= lat0 <= 85 and -85 <= lat1 <= 85):
        raise ConfigError(
            f"{option}: longitudes must be in -180..180 and latitudes in -85..85, got {list(bbox)}."
        )
    if not (lon0 < lon1 and lat0 < lat1):
        raise ConfigError(
            f"{option}: expected west < east and south < north (a box across the antimeridian is not "
            f"supported), got {lon0:g},{lat0:g},{lon1:g},{lat1:g}."
        )


def check_grid_options(tile_size_m: float, overlap_m: float) -> None:
    """ConfigError naming the option for a tile size or overlap no city can use."""
    if not (math.isfinite(tile_size_m) and 0 < tile_size_m <= MAX_CITY_M):
        raise ConfigError(f"--tile-size must be > 0 and at most {MAX_CITY_M:g} m, got {tile_size_m:g}.")
    if not (math.isfinite(overlap_m) and 0 <= overlap_m < tile_size_m / 2):
        raise ConfigError(
            f"--overlap must be >= 0 and below half the tile size ({tile_size_m / 2:g} m), got {overlap_m:g}."
        )


def bbox_extent(bbox: BBox, option: str = "--bbox") -> tuple[float, float, float, float]:
    """(lon, lat) of the box's centre and the half-extents (east, north, metres) of the box in the
    tangent plane there. The box's edges are sampled, since meridians converge and parallels curve
    in the plane; ConfigError when a side exceeds ``MAX_CITY_M``."""
    lon0, lat0, lon1, lat1 = bbox
    lon_c, lat_c = 0.5 * (lon0 + lon1), 0.5 * (lat0 + lat1)
    t = np.linspace(0.0, 1.0, 33)
    lon = np.r_[lon0 + (lon1 - lon0) * t, lon0 + (lon1 - lon0) * t, np.full(33, lon0), np.full(33, lon1)]
    lat = np.r_[np.full(33, lat0), np.full(33, lat1), lat0 + (lat1 - lat0) * t, lat0 + (lat1 - lat0) * t]
    xy = ENUFrame(lon_c, lat_c, 0.0).from_geodetic(lon, lat, np.zeros(len(lon)))[:, :2]
    half_x, half_y = float(np.abs(xy[:, 0]).max()), float(np.abs(xy[:, 1]).max())
    if max(half_x, half_y) * 2 > MAX_CITY_M:
        raise ConfigError(
            f"{option}: the box is {2 * half_x / 1000:.1f} x {2 * half_y / 1000:.1f} km; at most "
            f"{MAX_CITY_M / 1000:g} km a side (10 km from the city's one tangent point the ground lies 8 m "
            "below its plane and the vertical tilts 0.09 deg): split the city into several boxes."
        )
    return lon_c, lat_c, half_x, half_y


def city_grid(bbox: BBox, tile_size_m: float, overlap_m: float, h0: float) -> CityManifest:
    """The manifest of a box: square cores of ``tile_size_m`` covering its ENU rectangle, centred
    on its centre (so the grid overhangs the box by the same amount on opposite sides), in the
    tangent plane at the centre whose origin height is ``h0``."""
    check_grid_options(tile_size_m, overlap_m)
    lon_c, lat_c, half_x, half_y = bbox_extent(bbox)
    # 1e-9: a box that is an exact multiple of the tile size gets no sliver column or row.
    n_cols = max(1, math.ceil(2 * half_x / tile_size_m - 1e-9))
    n_rows = max(1, math.ceil(2 * half_y / tile_size_m - 1e-9))
    return grid(
        n_rows, n_cols, tile_size_m, overlap_m,
        origin=(-0.5 * n_cols * tile_size_m, -0.5 * n_rows * tile_size_m),
        crs="enu", origin_lon_lat_h=(lon_c, lat_c, float(h0)),
    )  # fmt: skip


def cell_frame(manifest: CityManifest, cell: CityCell) -> SharedFrame:
    """The frame (and AOI) ``prepare_tile`` uses for ``cell``: the city's tangent plane translated to
    the cell's origin, the AOI its core grown by the margin (not clipped to the city)."""
    if manifest.origin_lon_lat_h is None:
        raise CityManifestError("<manifest>", "origin_lon_lat_h", "a city prepared from images needs it")
    x0, x1, y0, y1 = cell.tile_bounds()
    lon, lat, h = manifest.origin_lon_lat_h
    return SharedFrame(lon, lat, h, cell.origin, max(x1 - x0, y1 - y0), label=f"city cell {cell.name}")


# ------------------------------------------------------------------------------------ the split


def prepare_city(
    images: Sequence[str | Path],
    out: str | Path,
    bbox: BBox,
    tile_size_m: float,
    overlap_m: float,
    cfg: PrepareConfig,
    *,
    rpc_files: Sequence[str | Path] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CityManifest:
    """Split the box ``bbox`` into cells and prepare one tile per cell from ``images`` (module docstring).

    Args:
        images: the views with RPCs (view 0 is every tile's adjustment gauge).
        out: the city folder (new, empty, or a city folder this function wrote: then continued).
        bbox: (lon_west, lat_south, lon_east, lat_north), degrees.
        tile_size_m, overlap_m: core edge and margin of every cell (metres).
        cfg: per-tile options (no ``aoi``/``geojson``/``shared_frame``: the grid sets the AOIs);
            ``cfg.alt_range`` None estimates the heights once over the whole box.
        rpc_files: explicit RPC files, one per image.
        overwrite: prepare every cell again (and accept other options than the run that started it).
        progress: a tqdm bar over the cells.
        log: receives one line per cell (default: printed above the bar).

    Returns:
        The manifest written to ``out/city.json``.

    Raises:
        ConfigError, AOIError, RPCError, ImageReadError: bad options or input, before any tile is
            written; CellError: a cell failed (the tiles written before it are kept).
    """
    from tqdm import tqdm

    say = log if log is not None else tqdm.write
    t_start = time.perf_counter()
    check_bbox(bbox)
    check_grid_options(tile_size_m, overlap_m)
    if not images:
        raise ConfigError("give at least one image.")
    if rpc_files is not None and len(rpc_files) != len(images):
        raise ConfigError(f"--rpc needs one file per image ({len(images)}), got {len(rpc_files)}.")
    if cfg.aoi is not None or cfg.geojson is not None or cfg.shared_frame is not None:
        raise ConfigError(
            "a city's tiles take their areas from --bbox and the grid: give no --aoi/--geojson."
        )
    lon_c, lat_c, half_x, half_y = bbox_extent(tuple(bbox))  # type: ignore[arg-type]
    folder = CityFolder(out)
    old = _existing_city(folder)
    image_paths = [str(Path(p).resolve()) for p in images]
    options = _options_doc(cfg)
    if old is not None and not overwrite:
        _check_same_inputs(folder, old, image_paths, list(bbox), options)

    sats = [
        read_satellite_image(p, None if rpc_files is None else rpc_files[i]) for i, p in enumerate(images)
    ]
    if cfg.alt_range is not None:
        alt_range, alt_how = (float(cfg.alt_range[0]), float(cfg.alt_range[1])), "--alt-range"
    elif old is not None and old.get("alt_range") is not None and not overwrite:
        # Resuming: the first run's estimate, so that the z origin of every tile stays the same.
        alt_range = (float(old["alt_range"][0]), float(old["alt_range"][1]))
        alt_how = f"{SUMMARY_NAME} of the run that started this city ({old.get('alt_range_chosen_by')})"
    else:
        # One range for all cells, estimated over a square holding every tile (cores + margins).
        side = min(2 * max(half_x, half_y) + tile_size_m + 2 * overlap_m, MAX_CITY_M)
        lo, hi, how = estimate_alt_range(sats, (lon_c, lat_c, side), cfg)
        alt_range, alt_how = (lo, hi), f"estimated over the whole box: {how}"
    manifest = city_grid(tuple(bbox), tile_size_m, overlap_m, alt_range[0] - cfg.origin_below)  # type: ignore[arg-type]
    if old is not None and not overwrite:
        _check_same_grid(folder, old, manifest, alt_range)

    todo = [c for c in manifest.cells if overwrite or not _complete(folder.tile(c), manifest, c)]
    _check_coverage(sats, manifest, todo, alt_range)

    folder.root.mkdir(parents=True, exist_ok=True)
    manifest.to_json(folder.manifest_path)
    cells_doc: dict[str, dict[str, Any]] = {c.name: {"status": "pending"} for c in manifest.cells}
    old_cells = (old or {}).get("cells") or {}
    doc = {
        "version": 1,
        "images": image_paths,
        "rpc_files": None if rpc_files is None else [str(Path(p).resolve()) for p in rpc_files],
        "bbox": list(bbox),
        "tile_size_m": float(tile_size_m),
        "overlap_m": float(overlap_m),
        "grid": {
            "rows": 1 + max(c.row for c in manifest.cells),
            "cols": 1 + max(c.col for c in manifest.cells),
        },
        "city_bounds": list(manifest.bounds),
        "enu_origin": {"lon": lon_c, "lat": lat_c, "alt": manifest.origin_lon_lat_h[2]},  # type: ignore[index]
        "alt_range": list(alt_range),
        "alt_range_chosen_by": alt_how,
        "options": options,
        "cells": cells_doc,
        "seconds": None,
    }
    _write_summary(folder, doc, t_start)  # the heights are on record before the first tile
    x0, x1, y0, y1 = manifest.bounds
    say(
        f"city {folder.root}: {doc['grid']['rows']}x{doc['grid']['cols']} cells of {tile_size_m:g} m "
        f"(+{overlap_m:g} m margin) over {x1 - x0:g} x {y1 - y0:g} m; heights {alt_range[0]:g}..{alt_range[1]:g} m "
        f"({alt_how}); {len(todo)} to prepare, {len(manifest.cells) - len(todo)} already done"
    )
    todo_names = {c.name for c in todo}
    bar = tqdm(manifest.cells, desc="city prepare", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        tile = folder.tile(cell)
        if cell.name not in todo_names:
            before = old_cells.get(cell.name) or {}
            done = before.get("status") in ("prepared", "done (earlier run)")
            entry = dict(before) if done else _cell_entry(_read_json(tile / "prepare.json"), None)
            entry["status"] = "done (earlier run)"
            cells_doc[cell.name] = entry
            say(
                f"{cell.name}: skipped, already prepared ({tile}/prepare.json; --overwrite prepares it again)"
            )
            continue
        if tile.exists():
            # Ours (inside a checked city folder): an interrupted or outdated tile is replaced whole,
            # so that no file of the old one lingers next to the new ones.
            shutil.rmtree(tile)
        t0 = time.perf_counter()
        tile_cfg = replace(cfg, alt_range=alt_range, shared_frame=cell_frame(manifest, cell))
        extra = {"city_cell": {**cell.to_dict(), "manifest": "../../city.json"}}
        try:
            summary = _prepare_tile(sats, tile, tile_cfg, extra)
        except SkyfallError as e:
            cells_doc[cell.name] = {"status": "failed", "error": str(e)}
            _write_summary(folder, doc, t_start)
            kept = sum(1 for v in cells_doc.values() if v["status"] not in ("failed", "pending"))
            raise CellError(
                f"city cell {cell.name} (core x {cell.core[0]:g}..{cell.core[1]:g}, y {cell.core[2]:g}.."
                f"{cell.core[3]:g} m): {e} ({kept} finished cell(s) kept; a new run continues after them)"
            ) from e
        entry = _cell_entry(summary, time.perf_counter() - t0)
        cells_doc[cell.name] = entry
        _write_summary(folder, doc, t_start)
        say(f"{cell.name}: {_cell_line(entry)}")
    if cfg.dense.enabled and cfg.dense.dsm_resolution > 0:
        doc["stereo_dsm"] = _stereo_mosaic(folder, cfg.dense.dsm_resolution, say)
    doc["seconds"] = time.perf_counter() - t_start
    _write_summary(folder, doc, t_start)
    return manifest


def _stereo_mosaic(folder: CityFolder, resolution: float, say: Callable[[str], None]) -> dict[str, Any]:
    """``CITY/stereo/dsm.tif`` from the tiles' dense heights (:mod:`skyfall.city.stereo`); its summary."""
    from skyfall.city.stereo import stereo_mosaic
    from skyfall.errors import MissingDependencyError

    try:
        m = stereo_mosaic(folder, resolution=resolution)
    except MissingDependencyError as e:  # the tiles stand without it
        say(f"stereo DSM mosaic not written: {e}")
        return {"written": False, "reason": str(e)}
    if m is None:
        say("stereo DSM mosaic not written: no tile has dense heights")
        return {"written": False, "reason": "no tile has dense heights"}
    say(
        f"stereo DSM mosaic: {m.path} ({m.grid.width}x{m.grid.height} cells of {m.grid.resolution:g} m, "
        f"{m.crs or 'local ENU'}, completeness {m.completeness:.3f})"
    )
    return {"written": True, "file": str(m.path.relative_to(folder.root)), "completeness": m.completeness}


def _prepare_tile(sats: list[SatelliteImage], tile: Path, cfg: PrepareConfig, extra: dict) -> dict[str, Any]:
    from skyfall.prepare.pipeline import prepare_tile

    summary = prepare_tile(sats, tile, cfg, extra=extra)  # type: ignore[arg-type]
    if summary["dense"].get("done") and cfg.dense.dsm_resolution > 0:
        from skyfall.errors import MissingDependencyError
        from skyfall.export.stereo import write_stereo_dsm

        try:
            write_stereo_dsm(tile, resolution=cfg.dense.dsm_resolution)
        except MissingDependencyError:
            pass  # the city's stereo mosaic says so once, after the last tile
    return summary


# ------------------------------------------------------------------------------------ helpers


def _existing_city(folder: CityFolder) -> dict[str, Any] | None:
    """None for a new or empty folder, else the folder's city_prepare.json (``{}`` without one);
    ConfigError for anything that is not a city folder."""
    root = folder.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory; give a new or empty city folder.")
    if not root.is_dir() or not any(root.iterdir()):
        return None
    if not folder.manifest_path.is_file():
        raise ConfigError(
            f"{root} is not empty and is not a city folder (no city.json); give a new or empty folder."
        )
    return _read_json(root / SUMMARY_NAME) or {}


_AGAIN = "; pass --overwrite to prepare every cell again, or use another folder"


def _check_same_inputs(
    folder: CityFolder, old: dict[str, Any], images: list[str], bbox: list[float], options: dict[str, Any]
) -> None:
    """A continued city must use the images, box and tile options its finished tiles were made with
    (checked before the images are read; ConfigError saying what differs)."""
    where = folder.root / SUMMARY_NAME
    if old.get("images") is not None and old["images"] != images:
        raise ConfigError(f"{where}: the city was started with other images{_AGAIN}.")
    if old.get("bbox") is not None and [float(v) for v in old["bbox"]] != [float(v) for v in bbox]:
        raise ConfigError(f"{where}: the city was started with another --bbox{_AGAIN}.")
    before = old.get("options") or {}
    changed = sorted(k for k in options if k in before and before[k] != options[k])
    if changed:
        what = ", ".join(f"{k}: {before[k]!r} -> {options[k]!r}" for k in changed)
        raise ConfigError(f"{where}: other tile options than the first run ({what}){_AGAIN}.")


def _check_same_grid(
    folder: CityFolder, old: dict[str, Any], manifest: CityManifest, alt_range: tuple[float, float]
) -> None:
    """... and the same heights (the tiles' z origin) and grid."""
    if old.get("alt_range") is not None and [float(v) for v in old["alt_range"]] != list(alt_range):
        raise ConfigError(
            f"{folder.root / SUMMARY_NAME}: --alt-range {alt_range[0]:g},{alt_range[1]:g} differs from the "
            f"heights the city was started with ({old['alt_range'][0]:g},{old['alt_range'][1]:g}: the tiles' "
            f"z origin){_AGAIN}."
        )
    have = folder.manifest()
    if have.to_dict() != manifest.to_dict():
        for option, a, b in (
            ("--tile-size", have.tile_size_m, manifest.tile_size_m),
            ("--overlap", have.overlap_m, manifest.overlap_m),
        ):
            if a != b:
                raise ConfigError(
                    f"{folder.manifest_path}: {option} {b:g} differs from this city's {a:g}{_AGAIN}."
                )
        raise ConfigError(
            f"{folder.manifest_path}: this folder holds another grid or frame (another --bbox or --alt-range)"
            f"{_AGAIN}."
        )


def _options_doc(cfg: PrepareConfig) -> dict[str, Any]:
    """The per-tile options as JSON values, without the ones the city sets per cell."""
    d = json.loads(json.dumps(asdict(cfg), default=str))
    for k in ("aoi", "geojson", "alt_range", "shared_frame", "max_aoi", "truth_dsm"):
        d.pop(k, None)
    # the stereo DSM's cell changes no tile's cameras, points or heights (the mosaic is rebuilt from
    # the fields at the end), so a continued city may change it
    d.get("dense", {}).pop("dsm_resolution", None)
    return d


def _check_coverage(
    sats: list[SatelliteImage], manifest: CityManifest, cells: list[CityCell], alt_range: tuple[float, float]
) -> None:
    """AOIError naming the first cell and image when some cell's tile is outside an image, before
    any tile is written (prepare_tile would find it only when it reaches that cell)."""
    for img in sats:
        outside = []
        for cell in cells:
            sf = cell_frame(manifest, cell)
            frame = sf.enu()
            half = 0.5 * sf.size_m
            if aoi_in_image(img, frame, half, tile_z_range(frame, half, alt_range))[0] <= 0:
                outside.append(cell.name)
        if outside:
            more = (
                f" (and {len(outside) - 1} more of the {len(manifest.cells)} cells)"
                if len(outside) > 1
                else ""
            )
            raise AOIError(
                f"{img.path}: city cell {outside[0]}{more} is outside this image's footprint; every image "
                "must see the --bbox and the --overlap beyond it: shrink the box or leave the image out."
            )


def _complete(tile: Path, manifest: CityManifest, cell: CityCell) -> bool:
    """The tile's prepare.json (written last) exists and puts the tile in this city's frame at ``cell``."""
    doc = _read_json(tile / "prepare.json")
    o = (doc or {}).get("enu_origin")
    if not isinstance(o, dict) or not doc.get("views") or manifest.origin_lon_lat_h is None:  # type: ignore[union-attr]
        return False
    lon, lat, h = manifest.origin_lon_lat_h
    try:
        same = (float(o["lon"]), float(o["lat"]), float(o["alt"])) == (lon, lat, h)
        return same and [float(v) for v in o.get("offset") or []] == list(cell.origin)
    except (KeyError, TypeError, ValueError):
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _cell_entry(summary: dict[str, Any] | None, seconds: float | None) -> dict[str, Any]:
    """One cell's line of city_prepare.json from its prepare.json summary."""
    s = summary or {}
    ba = s.get("bundle_adjustment") or {}
    matches = ba.get("matches")
    return {
        "status": "prepared",
        "views": len(s.get("views") or []),
        "test_views": len((s.get("test_views") or {}).get("indices") or []),
        "matches": int(sum(matches.values())) if isinstance(matches, dict) else None,
        "adjusted": bool(ba.get("done")),
        "adjustment_reason": None if ba.get("done") else ba.get("reason"),
        "reproj_rms_px": ba.get("reproj_rms_px"),
        "points": (s.get("points3D") or {}).get("count"),
        "points_method": (s.get("points3D") or {}).get("method"),
        "seconds": seconds,
    }


def _cell_line(e: dict[str, Any]) -> str:
    parts = [f"{e['views']} views ({e['test_views']} held out)"]
    if e["adjusted"]:
        rms = e["reproj_rms_px"]
        parts.append(f"{e['matches']} matches, adjustment rms {'n/a' if rms is None else f'{rms:.3f}'} px")
    else:
        parts.append(f"no adjustment ({e['adjustment_reason']})")
    method = e["points_method"] or ""
    parts.append(f"{e['points']} points" + (" (plane fallback)" if method.startswith("plane") else ""))
    parts.append(f"{e['seconds']:.1f} s")
    return ", ".join(parts)


def _write_summary(folder: CityFolder, doc: dict[str, Any], t_start: float) -> None:
    """city_prepare.json, replaced atomically so an interrupted run never leaves half a file."""
    doc = {**doc, "seconds": time.perf_counter() - t_start}
    path = folder.root / SUMMARY_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
