"""``skyfall city export CITY``: one scene from a city's per-tile runs (issue #19, "Merge").

What it writes (``CITY/export/``)::

    city<ext>              every owned Gaussian of every cell in one file (only up to ``single_max``
                           splats: one file stops loading in a browser long before a city ends)
    chunks/<cell><ext>     always: each cell's owned Gaussians, in the same frame as city<ext>
    chunks.json            the chunk index (below): what a viewer page or a script streams from
    dsm.tif, dsm.png       the city DSM mosaic (GeoTIFF + preview) and dsm.json (grid, crs, completeness)
    dsm_errors.json        synthetic cities (CITY/gt/dsm.npy): DSM error near the seams vs the interior

Splats. Every cell's run is loaded (latest checkpoint), baked as ``skyfall export`` bakes a run (3D
filter and appearance model, non-finite rows dropped: ``skyfall.export.run.baked_splats``), cropped
to the Gaussians whose centres the cell owns (``skyfall.city.merge.ownership_mask``, half-open
cores, decided in float64), translated into the city frame in float64 (``+ cell.origin``; tile and
city frames share their ENU axes) and rotated to the export up axis exactly as a single-run export
(``skyfall.export.upaxis.to_up_axis``: the rotation acts on each Gaussian alone, so rotating each
cell's set is the rotation of the merged set; ``city<ext>`` is the concatenation of the chunks, row
for row). Positions are stored as float32 like every splat file: a Gaussian within float32 rounding
of a shared core edge (micrometres near the origin, a millimetre 10 km out) may land on the edge.

Appearance. Neighbouring tiles learned independent appearance embeddings, so colours only match at
a seam if every tile bakes the embedding of the same acquisition. ``embedding`` is therefore an
image *name* (``sat_03``: tiles cut from one set of images share their names, as the synthetic
city's tiles do), resolved per tile to its index among that run's training images (the frames of
the run's ``transforms_train.json``, in order), or 'mean'. The default is the first training image
name common to every tile. (The per-run rule of ``skyfall export --embedding INDEX`` is untouched:
an index means different acquisitions in different tiles.)

chunks.json (version 1), paths relative to its folder::

    {"version": 1, "format": "ply", "extension": ".ply", "up": "y",
     "up_rotation": [[1, 0, 0], [0, 0, -1], [0, 1, 0]],      # ENU (city frame) -> file frame
     "crs": "local-enu", "origin_lon_lat_h": null,           # the city frame (city.json)
     "embedding": {"name": "sat_00", "indices": {"r000c000": 0, ...}},
     "count": N, "single_file": "city.ply" | null, "single_file_skipped": null | "why",
     "bounds": {"min": [x, y, z], "max": [...]},             # file frame (after the up rotation)
     "bounds_enu": {"min": [...], "max": [...]},             # city ENU frame
     "chunks": [{"cell": "r000c000", "row": 0, "col": 0, "file": "chunks/r000c000.ply",
                 "count": n, "bytes": b, "sh_degree": 1, "core": [x0, x1, y0, y1],
                 "bounds": {...}, "bounds_enu": {...}, "checkpoint": "...", "step": s,
                 "dropped": d}, ...],
     "missing": [{"cell": "r001c001", "run": "runs/r001c001", "reason": "no checkpoint ..."}]}

How it maps onto what web viewers stream today (no new binary format is invented here):

* Spark 2.x (three.js): one ``SplatMesh({url: chunk.file})`` per chunk (.ply, .spz and .splat are
  chosen by extension). Spark sorts all splat meshes of a scene together, so neighbouring chunks
  blend without a seam; a page adds the chunks whose ``bounds`` are near the camera first and
  disposes of far ones, and each mesh can use Spark's on-demand level of detail (``lod: true``).
  Spark's own streamed format (``.rad``: precomputed LoD trees fetched by HTTP range requests) is
  built from splat files like these by Spark's tools, not by skyfall.
* PlayCanvas engine / SuperSplat: each chunk loads as a ``gsplat`` asset (.ply and .compressed.ply;
  the engine has no .splat reader). The engine's streaming format is Streamed SOG (``lod-meta.json``:
  a spatial tree whose nodes name, per LOD, a SOG chunk file and the count of splats in it, over
  unbundled SOG chunks; the engine loads chunks by camera distance within a splat budget).
  PlayCanvas's ``splat-transform`` builds it from splat files tagged as LOD levels (``-l 0`` after
  each chunk file or after ``city.ply``; decimated copies, ``-d``, as the coarser levels), and
  SuperSplat's publishing does the same for large scenes. chunks.json is the step before: per-cell
  LOD-0 files with their bounds, which a page can stream as they are or feed to that tool. Files are -Y-up (``--up y``) like single-run exports, so the
  engine's usual 180° about Z applies to every chunk alike.
* A script: ``chunks.json`` gives each chunk's count, bytes and bounds without opening the files.

DSM mosaic. Each cell's model is rendered (``skyfall.dsm.render_dsm``, median depth) on the cells of
the city grid it owns, and the parts are joined by ownership (``merge.mosaic_dsm``). A city in a
local frame (``crs`` "local-enu", e.g. synthetic) gives a north-up grid of the city frame from the
city's north-west corner, heights = city ENU z, a GeoTIFF without CRS (as ``skyfall export --format
dsm`` writes synthetic tiles). A georeferenced city (``origin_lon_lat_h`` in city.json: every tile
frame is the city's tangent plane at that origin translated by ``cell.origin``) gives a north-up
grid of the origin's UTM zone with heights above the WGS84 ellipsoid: each cell renders an ENU
raster over the UTM cells whose footprint its core owns and resamples it exactly
(``skyfall.dsm.render_on_map_grid``).

Seams. ``dsm_seam_report`` compares the mosaic with the exact city DSM of a synthetic city on the
same grid cells, within ``distance_m`` of an interior core border (``merge.seam_mask``) and apart
from it: ``seam_penalty_m`` = seam MAE - interior MAE is the price of tiling.

Missing or unfinished runs stop the export with one line naming the cells and their run folders
(``MissingRunError``, exit 2), unless ``allow_missing``: the other cells are exported, the DSM has
NaN holes, and chunks.json lists the missing cells with the reason.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from skyfall.city.folders import CityFolder
from skyfall.city.manifest import Bounds, CityCell, CityManifest
from skyfall.city.merge import in_core, mosaic_dsm, mosaic_grid, ownership_mask, seam_mask
from skyfall.dsm import DsmGrid
from skyfall.errors import ConfigError, SkyfallError, TileFormatError
from skyfall.export.bake import Splats
from skyfall.storage.atomic import atomic_write_text

CHUNKS_JSON = "chunks.json"
CHUNKS_VERSION = 1
SINGLE_MAX = 4_000_000
CITY_FORMATS = ("ply", "ply-compressed", "spz", "splat")
LOCAL_CRS = "local-enu"


class MissingRunError(SkyfallError):
    """Cells of the city without a finished run (the message names each cell and its run folder)."""


# ------------------------------------------------------------------------------------ results


@dataclass
class CityDsm:
    """A city DSM mosaic: heights on a north-up grid (NaN = no data).

    ``crs`` None: the grid is in the city's local frame (heights = city ENU z); else an EPSG code
    string (UTM, heights above the WGS84 ellipsoid). ``cells``: completeness of each exported cell's
    owned grid cells.
    """

    heights: np.ndarray
    grid: DsmGrid
    crs: str | None
    completeness: float
    cells: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    preview: Path | None = None
    meta: Path | None = None


@dataclass
class CityExport:
    """What ``export_city`` wrote and counted."""

    export_dir: Path
    format: str
    up: str
    embedding: str
    """The bake rule: an image name common to the tiles, 'mean', or 'none' (no appearance model)."""
    embedding_default: bool
    """Whether ``embedding`` was chosen by default (the first training image common to every tile)."""
    embedding_indices: dict[str, int | str]
    counts: dict[str, int]
    """Owned (exported) Gaussians per exported cell."""
    dropped: dict[str, int]
    """Non-finite Gaussians dropped per exported cell (before ownership)."""
    chunks: dict[str, Path | None]
    """Chunk file per exported cell (None: the cell owns no Gaussian)."""
    chunks_json: Path
    single: Path | None
    single_skipped: str | None
    missing: dict[str, str]
    """Cells left out (``allow_missing``) -> why."""
    dsm: CityDsm | None
    seams: dict | None
    seams_path: Path | None
    seconds: float

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))


# ------------------------------------------------------------------------------------ runs


def run_problem(run: str | Path) -> str | None:
    """Why a run folder cannot be exported as a finished run, or None when it can.

    Finished: a checkpoint exists and, if config.yml has a ``stage2`` section, summary.json lists
    every episode of its curriculum; else summary.json has the Stage 1 entry (written when Stage 1
    ends) and the newest checkpoint reached config.yml's ``stage1.steps``.
    """
    from skyfall.config.training import parse_curriculum
    from skyfall.storage.checkpoints import checkpoint_step, latest_checkpoint
    from skyfall.storage.run_dir import RunDir

    rd = RunDir(run)
    if not rd.root.is_dir():
        return "no run folder"
    last = latest_checkpoint(rd.ckpts) if rd.ckpts.is_dir() else None
    if last is None:
        return "no checkpoint in ckpts/ (not trained yet)"
    try:
        cfg = rd.load_config()
        summary = rd.read_summary()
    except (OSError, ValueError) as e:  # yaml's and json's errors are ValueErrors
        return f"config.yml or summary.json unreadable: {e}"
    cfg = cfg if isinstance(cfg, dict) else {}
    step = checkpoint_step(last)
    s2 = cfg.get("stage2")
    if isinstance(s2, dict):
        try:
            _, episodes = parse_curriculum(str(s2.get("curriculum", "jax_v1")))
        except ConfigError as e:
            return f"config.yml [stage2.curriculum]: {e}"
        n = len(episodes)
        if s2.get("max_episodes") is not None:
            n = min(n, int(s2["max_episodes"]))
        done = len(((summary.get("stage2") or {}).get("episodes")) or [])
        return None if done >= n else f"Stage 2 has finished {done} of {n} episodes"
    want = (cfg.get("stage1") or {}).get("steps")
    of = f" of {want}" if want is not None else ""
    if not summary.get("stage1"):
        return f"Stage 1 has not finished (newest checkpoint at step {step}{of})"
    if want is not None and step < int(want):
        return f"Stage 1 at step {step}{of}"
    return None


def training_image_names(tile: str | Path) -> list[str]:
    """Names of a tile's training images in the order of ``transforms_train.json`` (the order of the
    appearance embeddings of a run on it), read without loading any image."""
    from skyfall.data.tile import TRAIN_FILE

    root = Path(tile)
    f = root / TRAIN_FILE
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError as e:
        raise TileFormatError(f, None, "not found") from e
    except (OSError, ValueError) as e:
        raise TileFormatError(f, None, f"cannot read JSON: {e}") from e
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, list):
        raise TileFormatError(f, "frames", "expected a list of frames")
    names = []
    for i, fr in enumerate(frames):
        rel = fr.get("file_path") if isinstance(fr, dict) else None
        if not isinstance(rel, str) or not rel:
            raise TileFormatError(f, f"frames[{i}].file_path", "expected a non-empty string path")
        # load_tile names a frame by its image's stem, adding '.png' when the path omits it
        if not (root / rel).is_file() and (root / (rel + ".png")).is_file():
            names.append(PurePosixPath(rel).name)
        else:
            names.append(PurePosixPath(rel).stem)
    return names


def _run_tile(folder: CityFolder, cell: CityCell) -> Path | None:
    """The tile a cell's run trained on: the run's config.yml, else CITY/tiles/<cell>."""
    from skyfall.storage.run_dir import RunDir

    rd = RunDir(folder.run(cell))
    try:
        tile = rd.tile_dir()
    except (OSError, ValueError):
        tile = None
    if tile is None and folder.tile(cell).is_dir():
        tile = folder.tile(cell)
    return tile


def resolve_embedding(
    folder: CityFolder, cells: list[CityCell], embedding: str | None, option: str = "--embedding"
) -> tuple[str, dict[str, int | str], dict[str, list[str]]]:
    """One acquisition for every tile: ``(name, {cell: index or 'mean'}, {cell: training image names})``.

    ``embedding`` 'mean' bakes each tile's mean embedding; a name is looked up among each tile's
    training images; None picks the first name of the first tile's training images that every tile
    has. ConfigError naming the cell and ``option`` when a tile lacks the name.
    """
    if embedding == "mean":
        return "mean", {c.name: "mean" for c in cells}, {}
    names: dict[str, list[str]] = {}
    for c in cells:
        tile = _run_tile(folder, c)
        if tile is None:
            raise ConfigError(
                f"{option}: cell {c.name}: the tile its run trained on is not found ({folder.run(c)}/config.yml "
                f"[data], nor {folder.tile(c)}), so its image names are unknown; pass {option} mean"
            )
        names[c.name] = training_image_names(tile)
    if embedding is None:
        first = names[cells[0].name]
        common = [n for n in first if all(n in names[c.name] for c in cells[1:])]
        if not common:
            raise ConfigError(
                f"{option}: no training image name is common to every tile (cell {cells[0].name} has "
                f"{_shown(first)}); pass {option} mean"
            )
        rule = common[0]
    else:
        rule = str(embedding)
        for c in cells:
            if rule not in names[c.name]:
                hint = (
                    " (an image name, not an index: indices differ between tiles)" if rule.isdigit() else ""
                )
                raise ConfigError(
                    f"{option} {rule}: cell {c.name} has no training image {rule!r}{hint}; its run "
                    f"{folder.run(c)} trained on {_shown(names[c.name])}"
                )
    return rule, {c: n.index(rule) for c, n in names.items()}, names


def _shown(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} images)" if len(names) > k else "")


# ------------------------------------------------------------------------------------ export


def export_city(
    city: str | Path | CityFolder,
    *,
    fmt: str = "ply",
    up: str = "y",
    embedding: str | None = None,
    single_max: int = SINGLE_MAX,
    dsm: bool = True,
    dsm_resolution: float = 0.5,
    dsm_oversample: int = 2,
    seam_distance_m: float = 10.0,
    allow_missing: bool = False,
    progress: bool = True,
) -> CityExport:
    """Merge a city's per-tile runs into CITY/export/ (see the module docstring for the files).

    Args:
        city: the city folder (``CITY/city.json``, ``CITY/runs/<cell>/``).
        fmt: 'ply' (default), 'ply-compressed', 'spz' or 'splat'.
        up: 'y' (-Y up, what web viewers expect) or 'z' (ENU).
        embedding: an image name common to the tiles, 'mean', or None for the first common name.
        single_max: write ``city<ext>`` only when the merged count is at most this.
        dsm: write the DSM mosaic (needs rasterio; pyproj for a georeferenced city).
        dsm_resolution: DSM cell size in metres.
        dsm_oversample: georeferenced cities: ENU render cells per UTM cell along each axis.
        seam_distance_m: the seam band of ``dsm_seam_report`` (synthetic cities).
        allow_missing: export the cells that have a finished run and leave the others as holes.
        progress: a tqdm bar over the cells.

    Raises:
        ConfigError: a bad option (named), or an embedding name missing in a tile (cell named).
        MissingRunError: cells without a finished run (named with their run folders), unless
            ``allow_missing`` and at least one cell has one.
    """
    from tqdm import tqdm

    from skyfall.export.formats import FORMATS
    from skyfall.export.run import load_run
    from skyfall.export.upaxis import up_rotation

    t0 = time.perf_counter()
    if fmt not in CITY_FORMATS:
        raise ConfigError(f"--format {fmt!r}: a city exports one of {', '.join(CITY_FORMATS)}")
    rot = up_rotation(up)  # ConfigError naming --up
    if isinstance(single_max, bool) or not isinstance(single_max, int) or single_max < 0:
        raise ConfigError(f"--single-max must be an integer >= 0, got {single_max!r}")
    if not (
        isinstance(dsm_resolution, (int, float)) and math.isfinite(dsm_resolution) and dsm_resolution > 0
    ):
        raise ConfigError(f"--dsm-resolution must be > 0, got {dsm_resolution}")
    if dsm_oversample < 1:
        raise ConfigError(f"--dsm-oversample must be >= 1, got {dsm_oversample}")
    if not seam_distance_m > 0:
        raise ConfigError(f"--seam-distance must be > 0, got {seam_distance_m}")
    folder = city if isinstance(city, CityFolder) else CityFolder(city)
    manifest = folder.manifest()
    bounds = manifest.bounds
    georef = None
    if dsm:
        from skyfall.dsm import require_pyproj, require_rasterio

        georef = georeference(manifest)
        require_rasterio()  # before hours of baking, not after
        if georef is not None:
            require_pyproj()

    problems = {c.name: p for c in manifest.cells if (p := run_problem(folder.run(c))) is not None}
    if problems and (not allow_missing or len(problems) == len(manifest.cells)):
        listed = "; ".join(f"{name} ({folder.run(name)}: {why})" for name, why in problems.items())
        tail = (
            "no cell has a finished run"
            if len(problems) == len(manifest.cells)
            else "train them, or pass --allow-missing to export the others with holes"
        )
        raise MissingRunError(
            f"{folder.root}: {len(problems)} of {len(manifest.cells)} cells have no finished run: {listed}; {tail}"
        )
    cells = [c for c in manifest.cells if c.name not in problems]
    rule, indices, names = resolve_embedding(folder, cells, embedding)

    out = folder.export_dir
    chunk_dir = out / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[fmt]
    dsm_state = DsmMosaic(manifest, dsm_resolution, georef, dsm_oversample) if dsm else None

    counts: dict[str, int] = {}
    dropped: dict[str, int] = {}
    chunk_files: dict[str, Path | None] = {}
    entries: list[dict[str, Any]] = []
    kept: list[Splats] | None = []  # the merged set, while it stays under single_max
    any_appearance = False
    total = 0
    bar = tqdm(cells, desc="[city export] tiles", unit="tile", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        loaded = load_run(folder.run(cell))
        app = loaded.scene.appearance
        if app is not None:
            any_appearance = True
            if cell.name in names and app.n_images != len(names[cell.name]):
                raise SkyfallError(
                    f"cell {cell.name}: the run {folder.run(cell)} has {app.n_images} appearance embeddings but "
                    f"its tile lists {len(names[cell.name])} training images; the image name {rule!r} cannot be "
                    "mapped to an embedding (pass --embedding mean)"
                )
        splats, enu_lo, enu_hi, n_dropped = _cell_splats(loaded, cell, bounds, indices[cell.name], up)
        counts[cell.name] = len(splats)
        dropped[cell.name] = n_dropped
        total += len(splats)
        path = chunk_dir / f"{cell.name}{ext}"
        baked = rule if app is not None else "none"
        comment = f"skyfall city cell={cell.name} step={loaded.step} embedding={baked} up={up} baked"
        if len(splats):
            _write(path, splats, fmt, comment)
            chunk_files[cell.name] = path
        else:  # nothing owned: no file (an empty splat file shows as a black page)
            path.unlink(missing_ok=True)
            chunk_files[cell.name] = None
        entries.append(
            {
                "cell": cell.name,
                "row": cell.row,
                "col": cell.col,
                "file": None if not len(splats) else path.relative_to(out).as_posix(),
                "count": len(splats),
                "bytes": path.stat().st_size if len(splats) else 0,
                "sh_degree": splats.sh_degree,
                "core": list(cell.core),
                "bounds": _bounds(splats.means),
                "bounds_enu": None if not len(splats) else {"min": enu_lo.tolist(), "max": enu_hi.tolist()},
                "checkpoint": str(loaded.checkpoint),
                "step": loaded.step,
                "dropped": n_dropped,
            }
        )
        if kept is not None and total <= single_max:
            kept.append(splats)
        else:
            kept = None  # over single_max: free what was kept, the single file is skipped
        if dsm_state is not None:
            dsm_state.add(cell, partial(_render_heights, loaded.scene))
        del loaded
    bar.close()
    if total == 0:
        raise SkyfallError(
            f"{folder.root}: no cell owns any Gaussian (every run empty or its Gaussians outside its core); "
            "nothing to export"
        )
    if not any_appearance:
        rule, indices = "none", {c.name: "none" for c in cells}

    for name in problems:  # a chunk of an earlier export must not pass for this one's
        (chunk_dir / f"{name}{ext}").unlink(missing_ok=True)
    single = out / f"city{ext}"
    skipped = None
    if kept is not None:
        _write(single, _concat(kept), fmt, f"skyfall city cells={len(cells)} embedding={rule} up={up} baked")
    else:
        skipped = (
            f"{total:,} splats exceed --single-max {single_max:,}: one file would not load in a web viewer; "
            "stream chunks.json instead"
        )
        single.unlink(missing_ok=True)
        single = None
    del kept

    enu = [e["bounds_enu"] for e in entries if e["bounds_enu"] is not None]
    fr = [e["bounds"] for e in entries if e["bounds"] is not None]
    index = {
        "version": CHUNKS_VERSION,
        "generator": "skyfall city export",
        "format": fmt,
        "extension": ext,
        "up": up,
        "up_rotation": rot.tolist(),
        "crs": manifest.crs,
        "origin_lon_lat_h": None if manifest.origin_lon_lat_h is None else list(manifest.origin_lon_lat_h),
        "embedding": {"name": rule, "default": embedding is None, "indices": indices},
        "count": total,
        "single_file": None if single is None else single.name,
        "single_file_skipped": skipped,
        "bounds": _union(fr),
        "bounds_enu": _union(enu),
        "city_bounds": list(bounds),
        "chunks": entries,
        "missing": [
            {"cell": n, "run": os.path.relpath(folder.run(n), out), "reason": why}
            for n, why in problems.items()
        ],
    }
    chunks_json = out / CHUNKS_JSON
    atomic_write_text(chunks_json, json.dumps(index, indent=1) + "\n")

    mosaic = seams = seams_path = None
    if dsm_state is not None:
        mosaic = dsm_state.write(out, {"embedding": rule, "missing": problems})
        if mosaic.crs is None and (folder.gt_dir / "dsm.npy").is_file():
            seams = dsm_seam_report(folder, mosaic, seam_distance_m)
            seams_path = out / "dsm_errors.json"
    return CityExport(
        export_dir=out,
        format=fmt,
        up=up,
        embedding=rule,
        embedding_default=embedding is None and rule != "none",
        embedding_indices=indices,
        counts=counts,
        dropped=dropped,
        chunks=chunk_files,
        chunks_json=chunks_json,
        single=single,
        single_skipped=skipped,
        missing=problems,
        dsm=mosaic,
        seams=seams,
        seams_path=seams_path,
        seconds=time.perf_counter() - t0,
    )


def _cell_splats(
    loaded: Any, cell: CityCell, bounds: Bounds, embedding: int | str, up: str
) -> tuple[Splats, np.ndarray, np.ndarray, int]:
    """A cell's owned, baked splats in the export frame (float32), their ENU min/max (float64) and
    the count of non-finite rows dropped by the bake."""
    from skyfall.export.run import baked_splats
    from skyfall.export.upaxis import to_up_axis

    splats, n_dropped = baked_splats(loaded, embedding, option="--embedding")
    own = splats.subset(np.asarray(ownership_mask(splats.means, cell, bounds)))
    enu = own.means.astype(np.float64) + np.asarray(cell.origin, np.float64)
    # float64 city-frame positions go through the rotation unrounded; only the result is float32
    out = to_up_axis(replace(own, means=enu), up)
    out = replace(out, means=np.ascontiguousarray(out.means, dtype=np.float32))
    lo = enu.min(0) if len(enu) else np.zeros(3)
    hi = enu.max(0) if len(enu) else np.zeros(3)
    return out, lo, hi, n_dropped


def _write(path: Path, splats: Splats, fmt: str, comment: str) -> Path:
    from skyfall.export.formats import write_ply, write_splats

    if fmt == "ply":
        return write_ply(path, splats, comment=comment)
    return write_splats(path, splats, fmt)


def _concat(parts: list[Splats]) -> Splats:
    """Rows of every part in order; SH bands missing in a part (a lower active degree) are zero,
    which renders exactly as the part alone."""
    k = max(p.sh.shape[1] for p in parts)
    sh = [np.pad(p.sh, ((0, 0), (0, k - p.sh.shape[1]), (0, 0))) for p in parts]
    return Splats(
        np.concatenate([p.means for p in parts]),
        np.concatenate([p.quats for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.opacities for p in parts]),
        np.concatenate(sh),
        None,
    )


def _bounds(means: np.ndarray) -> dict[str, list[float]] | None:
    if not len(means):
        return None
    m = means.astype(np.float64)
    return {"min": m.min(0).tolist(), "max": m.max(0).tolist()}


def _union(boxes: list[dict[str, list[float]]]) -> dict[str, list[float]] | None:
    if not boxes:
        return None
    lo = np.min([b["min"] for b in boxes], axis=0)
    hi = np.max([b["max"] for b in boxes], axis=0)
    return {"min": lo.tolist(), "max": hi.tolist()}


# ------------------------------------------------------------------------------------ DSM mosaic


def _render_heights(scene: Any, g: DsmGrid) -> np.ndarray:
    from skyfall.dsm import render_dsm

    return render_dsm(scene, g).astype(np.float64)


def georeference(manifest: CityManifest) -> tuple[float, float, float] | None:
    """The city's geodetic origin when its frame is georeferenced, None for a local frame."""
    if manifest.origin_lon_lat_h is not None:
        return manifest.origin_lon_lat_h
    if manifest.crs != LOCAL_CRS:
        raise ConfigError(
            f"{manifest.where} [origin_lon_lat_h]: the city frame {manifest.crs!r} is not local, but city.json "
            "gives no geodetic origin to georeference it"
        )
    return None


def core_window(grid: DsmGrid, cell: CityCell, bounds: Bounds) -> tuple[int, int, int, int] | None:
    """Rows [r0, r1) and columns [c0, c1) of a local city grid whose cell centres ``cell`` owns."""
    x = grid.x_min + (np.arange(grid.width) + 0.5) * grid.resolution
    y = grid.y_max - (np.arange(grid.height) + 0.5) * grid.resolution
    x0, _, y0, _ = cell.core
    # a core is a rectangle: its owned centres are the product of the owned columns and rows
    cols = np.nonzero(in_core(x, np.full(x.shape, y0), cell.core, bounds))[0]
    rows = np.nonzero(in_core(np.full(y.shape, x0), y, cell.core, bounds))[0]
    if not len(cols) or not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class DsmMosaic:
    """Collects per-cell DSM parts while the export walks the cells (each model is loaded once); the
    parts come from any tile-frame height function (a model's render, or a tile's stereo heights)."""

    def __init__(
        self,
        manifest: CityManifest,
        resolution: float,
        georef: tuple[float, float, float] | None,
        oversample: int,
    ):
        self.manifest = manifest
        self.bounds = manifest.bounds
        self.res = float(resolution)
        self.oversample = int(oversample)
        self.cells: dict[str, float] = {}
        self.t = 0.0
        if georef is None:
            self.frame = None
            self.crs: str | None = None
            self.grid = mosaic_grid(self.bounds, self.res)
            self.parts: list[tuple[CityCell, np.ndarray, tuple[float, float, float]]] = []
        else:
            from skyfall.dsm import enu_footprint, utm_grid
            from skyfall.prepare.geodesy import ENUFrame

            self.frame = ENUFrame(*georef)
            epsg, self.grid = utm_grid(self.frame, self.bounds, self.res)
            self.crs = f"EPSG:{epsg}"
            # each map cell belongs to the core holding its footprint (at the origin's height)
            self.fx, self.fy = enu_footprint(self.grid, self.frame, self.crs)
            self.heights = np.full((self.grid.height, self.grid.width), np.nan)

    def add(self, cell: CityCell, render_tile: Callable[[DsmGrid], np.ndarray]) -> None:
        """The cell's part: ``render_tile(g)`` gives tile-frame ENU heights on a tile-frame grid."""
        t0 = time.perf_counter()
        ox, oy, oz = cell.origin

        def render_city(g: DsmGrid) -> np.ndarray:
            """City-frame ENU heights on a city-frame grid (tile -> city: + origin)."""
            g_tile = DsmGrid(g.x_min - ox, g.y_max - oy, g.resolution, g.width, g.height)
            return render_tile(g_tile) + oz

        if self.frame is None:
            win = core_window(self.grid, cell, self.bounds)
            if win is not None:
                r0, r1, c0, c1 = win
                g = self.grid.window(r0, r1, c0, c1)
                h = render_city(g) - oz  # mosaic_dsm adds the tile's z origin itself
                self.parts.append((cell, h, (g.x_min - ox, g.y_max - oy, g.resolution)))
                self.cells[cell.name] = float(np.isfinite(h).mean())
        else:
            self._add_georeferenced(cell, render_city)
        self.t += time.perf_counter() - t0

    def _add_georeferenced(self, cell: CityCell, render_city: Any) -> None:
        from skyfall.dsm import render_on_map_grid

        own = in_core(self.fx, self.fy, cell.core, self.bounds)
        if not own.any():
            return
        rows, cols = np.nonzero(own.any(1))[0], np.nonzero(own.any(0))[0]
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        sub = self.grid.window(r0, r1, c0, c1)
        # The ENU render reaches a little beyond the core (inside the tile, where the model is still
        # constrained): a surface point's ENU position drifts from its footprint with its height.
        grow = max(2.0, 2.0 * self.res)
        tb = self.manifest.tile_bounds(cell)
        x0, x1, y0, y1 = cell.core
        extent = (max(x0 - grow, tb[0]), min(x1 + grow, tb[1]), max(y0 - grow, tb[2]), min(y1 + grow, tb[3]))
        h, _ = render_on_map_grid(
            render_city, sub, frame=self.frame, crs=self.crs, extent=extent, oversample=self.oversample
        )
        o = own[r0:r1, c0:c1]
        self.heights[r0:r1, c0:c1][o] = h[o]
        self.cells[cell.name] = float(np.isfinite(h[o]).mean())

    def mosaic(self) -> CityDsm:
        if self.frame is None:
            if self.parts:
                h, x_min, y_max = mosaic_dsm(self.parts, self.res, city_bounds=self.bounds)
                assert (x_min, y_max, h.shape) == (
                    self.grid.x_min,
                    self.grid.y_max,
                    (self.grid.height, self.grid.width),
                )
            else:
                h = np.full((self.grid.height, self.grid.width), np.nan)
            inside = np.ones(h.shape, dtype=bool)
        else:
            h = self.heights
            # the UTM box's corners outside the (rotated) city are no-data by construction
            inside = in_core(self.fx, self.fy, self.bounds, self.bounds)
        completeness = float(np.isfinite(h)[inside].mean()) if inside.any() else 0.0
        return CityDsm(h, self.grid, self.crs, completeness, dict(self.cells))

    def write(self, out: Path, extra: dict[str, Any]) -> CityDsm:
        """``out/dsm.tif``, ``dsm.png`` and ``dsm.json``."""
        from skyfall.dsm import write_geotiff, write_preview

        m = self.mosaic()
        path = out / "dsm.tif"
        if self.frame is None:
            crs_label = "local ENU"
            vertical = "metres, ENU z of the city's local frame"
        else:
            crs_label = str(self.crs)
            vertical = "metres above the WGS84 ellipsoid"
        tags = {"SKYFALL_CRS": crs_label, "SKYFALL_HEIGHTS": vertical, "SKYFALL_CITY": str(out.parent)}
        if self.frame is not None:
            tags["SKYFALL_ENU_ORIGIN"] = json.dumps(self.frame.to_dict())
        write_geotiff(path, m.heights, m.grid, self.crs, tags=tags)
        # PIL writes in place: write a temporary PNG and rename it, as every other file here
        tmp = out / ".dsm.png.tmp.png"
        write_preview(tmp, m.heights)
        os.replace(tmp, out / "dsm.png")
        meta = {
            "file": path.name,
            **m.grid.to_json(),
            "crs": crs_label,
            "heights": vertical,
            "nodata": -9999.0,
            "completeness": m.completeness,
            "cells": m.cells,
            "missing": extra.get("missing", {}),
            "city_bounds": list(self.bounds),
            "origin_lon_lat_h": None
            if self.manifest.origin_lon_lat_h is None
            else list(self.manifest.origin_lon_lat_h),
            "oversample": self.oversample if self.frame is not None else 1,
            "render_seconds": self.t,
        }
        meta_path = out / "dsm.json"
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        m.path, m.preview, m.meta = path, out / "dsm.png", meta_path
        return m


# ------------------------------------------------------------------------------------ seams


def dsm_seam_report(
    city: str | Path | CityFolder,
    mosaic: CityDsm | tuple[np.ndarray, DsmGrid] | None = None,
    distance_m: float = 10.0,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """DSM error of a city mosaic against the exact city DSM (``CITY/gt``), near the seams and apart.

    ``mosaic``: a ``CityDsm``, ``(heights, grid)`` in the city frame, or None to read
    ``CITY/export/dsm.tif``. The truth is sampled at every mosaic cell centre (the truth cell holding
    it: nearest centre). Cells within ``distance_m`` of an interior core border (``merge.seam_mask``)
    are the seam band, the rest the interior; each gets MAE, median absolute and mean signed error
    (metres) and its count of cells where both are finite, plus coverage (finite mosaic share where
    the truth is finite). ``seam_penalty_m`` = seam MAE - interior MAE. Written to
    ``CITY/export/dsm_errors.json`` when ``write``.

    Raises:
        ConfigError: no ``CITY/gt/dsm.npy`` (real cities have no exact truth), or a georeferenced mosaic.
        TileFormatError: truth files that do not match.
    """
    from skyfall.dsm import read_geotiff

    folder = city if isinstance(city, CityFolder) else CityFolder(city)
    manifest = folder.manifest()
    truth_npy, truth_json = folder.gt_dir / "dsm.npy", folder.gt_dir / "dsm.json"
    if not truth_npy.is_file():
        raise ConfigError(f"{truth_npy}: no exact city DSM (synthetic cities only), so no seam report")
    try:
        tg = DsmGrid.from_json(json.loads(truth_json.read_text()), truth_json)
    except (OSError, ValueError) as e:
        raise TileFormatError(truth_json, None, f"cannot read the truth's grid: {e}") from e
    truth = np.load(truth_npy).astype(np.float64)
    if truth.shape != (tg.height, tg.width):
        raise TileFormatError(
            truth_npy,
            None,
            f"shape {truth.shape} does not match {truth_json.name} ({tg.height} x {tg.width})",
        )
    if mosaic is None:
        r = read_geotiff(folder.export_dir / "dsm.tif")
        heights, grid, crs = r.heights, r.grid, r.crs
    elif isinstance(mosaic, CityDsm):
        heights, grid, crs = mosaic.heights, mosaic.grid, mosaic.crs
    else:
        heights, grid = mosaic
        crs = None
    if crs is not None:
        raise ConfigError(
            "the seam report compares in the city's local frame (synthetic cities); this mosaic is georeferenced"
        )
    heights = np.asarray(heights, dtype=np.float64)
    gx, gy = grid.centres()
    j = np.floor((gx - tg.x_min) / tg.resolution).astype(np.int64)
    i = np.floor((tg.y_max - gy) / tg.resolution).astype(np.int64)
    ok = (i >= 0) & (i < tg.height) & (j >= 0) & (j < tg.width)
    t = np.full(heights.shape, np.nan)
    t[ok] = truth[i[ok], j[ok]]
    err = heights - t
    seam = seam_mask(manifest.cells, gx, gy, distance_m)

    def stats(sel: np.ndarray) -> dict[str, Any]:
        e = err[sel & np.isfinite(err)]
        has_truth = sel & np.isfinite(t)
        cov = float(np.isfinite(heights[has_truth]).mean()) if has_truth.any() else None
        if not e.size:
            return {"count": 0, "mae_m": None, "median_abs_m": None, "mean_error_m": None, "coverage": cov}
        a = np.abs(e)
        return {
            "count": int(e.size),
            "mae_m": float(a.mean()),
            "median_abs_m": float(np.median(a)),
            "mean_error_m": float(e.mean()),
            "coverage": cov,
        }

    s, inner = stats(seam), stats(~seam)
    report = {
        "distance_m": float(distance_m),
        "truth": str(truth_npy),
        "grid": grid.to_json(),
        "seam": s,
        "interior": inner,
        "all": stats(np.ones(seam.shape, dtype=bool)),
        "seam_penalty_m": (
            None if s["mae_m"] is None or inner["mae_m"] is None else s["mae_m"] - inner["mae_m"]
        ),
    }
    if write:
        atomic_write_text(folder.export_dir / "dsm_errors.json", json.dumps(report, indent=1) + "\n")
    return report
