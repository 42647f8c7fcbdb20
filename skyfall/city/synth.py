"""A synthetic city split into tiles: the measuring stick of city runs (every tile has exact truth).

One procedural city is generated for the whole area (its side: the grid plus one margin on every
side, so that the outer tiles see city, not void, beyond their cores). Each cell of a regular grid
(``skyfall.city.manifest.grid``) becomes a synthetic tile in the reference format — satellite views,
points, its own ground truth — that sees the city through its window (``SyntheticCity.window``): its
frame is the city frame translated to the cell's centre, exactly as the manifest says. The city-wide
exact DSM goes to ``CITY/gt/`` for the seam figures.

Every tile uses the same satellite camera rig relative to its centre, the same dates and the same
image names, so ``sat_03`` of every tile is one acquisition (date, lighting, cars): what a tile cut
from one set of real images looks like, and what lets the merge bake one common appearance.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from skyfall.city.folders import CityFolder
from skyfall.city.manifest import CityManifest, grid
from skyfall.errors import ConfigError

SYNTH_CITY = "synth_city.json"


def parse_grid(text: str, option: str = "--city") -> tuple[int, int]:
    """'RxC' (e.g. '2x2') -> (rows, cols); ConfigError naming ``option`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"{option} must be ROWSxCOLS with both >= 1 (e.g. 2x2), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def check_city_options(n_rows: int, n_cols: int, tile_size_m: float, overlap_m: float) -> None:
    """ConfigError naming the option for a grid no city run could use."""
    if n_rows * n_cols > 64:
        raise ConfigError(
            f"--city {n_rows}x{n_cols}: at most 64 synthetic tiles (the city is generated whole)"
        )
    if not (np.isfinite(tile_size_m) and 16 <= tile_size_m <= 1024):
        raise ConfigError(f"--tile-size must be 16..1024 m, got {tile_size_m:g}")
    if not (np.isfinite(overlap_m) and 0 <= overlap_m < tile_size_m / 2):
        raise ConfigError(
            f"--overlap must be >= 0 and below half the tile size ({tile_size_m / 2:g} m), got {overlap_m:g}"
        )


def write_synthetic_city(
    out: str | Path,
    n_rows: int,
    n_cols: int,
    *,
    tile_size_m: float = 256.0,
    overlap_m: float = 32.0,
    preset: str = "default",
    seed: int = 0,
    style: str = "default",
    overwrite: bool = False,
    progress: bool = True,
) -> CityManifest:
    """Write ``CITY/city.json``, one synthetic tile per cell (``CITY/tiles/<cell>/``) and the
    city-wide exact DSM (``CITY/gt/dsm.npy``, ``dsm.json``). Cells whose tile is complete (its
    synth.json, written last, exists) are kept, so an interrupted split continues where it stopped.

    Raises:
        ConfigError: a bad grid or tile option, or ``out`` not empty and not this city (without
            ``overwrite``).
    """
    from tqdm import tqdm

    from skyfall.synth.city import SyntheticCity
    from skyfall.synth.writer import write_synthetic_tile

    check_city_options(n_rows, n_cols, tile_size_m, overlap_m)
    folder = CityFolder(out)
    side = max(n_rows, n_cols) * tile_size_m + 2 * overlap_m  # the generated city: grid + margins
    manifest = grid(
        n_rows, n_cols, tile_size_m, overlap_m, origin=(-n_cols * tile_size_m / 2, -n_rows * tile_size_m / 2)
    )
    doc = {
        "generator": "skyfall.city.synth",
        "preset": preset,
        "seed": seed,
        "style": style,
        "city_size_m": side,
        "grid": [n_rows, n_cols],
    }
    _check_out(folder, manifest, doc, overwrite)
    folder.root.mkdir(parents=True, exist_ok=True)
    manifest.to_json(folder.manifest_path)
    (folder.root / SYNTH_CITY).write_text(json.dumps(doc, indent=1) + "\n")

    t0 = time.perf_counter()
    tile_side = tile_size_m + 2 * overlap_m
    cells = tqdm(manifest.cells, desc="[synth] city tiles", disable=not progress, dynamic_ncols=True)
    for cell in cells:
        tile = folder.tile(cell)
        if (tile / "synth.json").is_file() and not overwrite:
            continue
        write_synthetic_tile(
            tile, preset=preset, seed=seed, overwrite=True, style=style, city_size_m=side,
            window=(cell.origin[0], cell.origin[1], tile_side),
        )  # fmt: skip
    city = SyntheticCity.generate(seed, side, style)
    x0, x1, y0, y1 = manifest.bounds
    truth = city.window((0.5 * (x0 + x1), 0.5 * (y0 + y1)), max(x1 - x0, y1 - y0))
    dsm, georef = truth.dsm(0.5)
    # the truth's grid in the city frame (the window's frame is centred on the city)
    georef["x_min"] += truth.offset[0]
    georef["y_max"] += truth.offset[1]
    folder.gt_dir.mkdir(exist_ok=True)
    np.save(folder.gt_dir / "dsm.npy", dsm)
    (folder.gt_dir / "dsm.json").write_text(json.dumps(georef, indent=1))
    print(
        f"[synth] wrote {folder.root}: {n_rows}x{n_cols} city of {x1 - x0:g} x {y1 - y0:g} m, "
        f"{len(manifest.cells)} tiles of {tile_side:g} m ({tile_size_m:g} m cores + {overlap_m:g} m margins), "
        f"{preset} preset, {time.perf_counter() - t0:.1f} s"
    )
    return manifest


def _check_out(folder: CityFolder, manifest: CityManifest, doc: dict, overwrite: bool) -> None:
    """An existing non-empty ``out`` must be this very city (then it is continued) unless overwriting."""
    root = folder.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    if not root.is_dir() or not any(root.iterdir()) or overwrite:
        return
    if not folder.manifest_path.is_file():
        raise ConfigError(f"{root} is not empty and holds no city.json; choose another folder")
    if folder.manifest().to_dict() != manifest.to_dict():
        raise ConfigError(
            f"{folder.manifest_path}: another grid was written here; pass --overwrite to replace it"
        )
    meta = folder.root / SYNTH_CITY
    old = json.loads(meta.read_text()) if meta.is_file() else {}
    changed = [k for k in doc if old.get(k) != doc[k]]
    if changed:
        raise ConfigError(
            f"{meta}: this city was written with another {', '.join(changed)}; pass --overwrite to replace it"
        )
