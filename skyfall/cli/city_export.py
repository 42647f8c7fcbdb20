"""``skyfall city export CITY``: one scene from a city's per-tile runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass
class CityExportCommand:
    """Merge a city's per-tile runs into one scene: CITY/export/chunks/<cell>.<ext> (each cell's own
    Gaussians, city frame) with chunks.json (counts, bounds, bytes: what a web page streams), the whole
    city in CITY/export/city.<ext> while it stays under --single-max, and the DSM mosaic dsm.tif (+ png,
    json).

    Every tile bakes the appearance of the same acquisition (--embedding NAME, default the first
    training image name common to every tile), so colours match across seams. Gaussians are kept by the
    cell whose core holds their centre. Local (synthetic) cities get a DSM in the city frame without CRS
    and, with CITY/gt/dsm.npy, the DSM error near the seams vs the interior (dsm_errors.json); cities
    with a geodetic origin get a UTM GeoTIFF with ellipsoidal heights. A cell without a finished run
    stops the export, naming it, unless --allow-missing.
    """

    city: tyro.conf.Positional[Path]
    """City folder (CITY/city.json, runs in CITY/runs/<cell>/)."""
    format: Literal["ply", "ply-compressed", "spz", "splat"] = "ply"
    """ply: standard 3DGS PLY; ply-compressed: PlayCanvas/SuperSplat; spz: Niantic (gzip v2);
    splat: antimatter15 (no SH; not read by PlayCanvas)."""
    up: Literal["y", "z"] = "y"
    """y: rotate ENU Z-up to the -Y-up frame 3DGS viewers assume; z: keep ENU."""
    embedding: str | None = None
    """Appearance baked into every tile: a training image name shared by the tiles (e.g. sat_00) or
    'mean' (default: the first training image name common to every tile)."""
    single_max: int = 4_000_000
    """Write the single CITY/export/city.<ext> only up to this many splats (chunks are always written)."""
    dsm: bool = True
    """Write the DSM mosaic (needs `pip install "skyfall[geo]"`)."""
    dsm_resolution: float = 0.5
    """DSM cell size in metres."""
    dsm_oversample: int = 2
    """Georeferenced cities: ENU render cells per UTM cell along each axis before the exact resampling."""
    seam_distance: float = 10.0
    """Synthetic cities: metres from an interior core border that count as the seam band."""
    allow_missing: bool = False
    """Export the cells that have a finished run; leave the others as holes (listed in chunks.json)."""

    def main(self) -> None:
        from skyfall.city.export import export_city

        r = export_city(
            self.city,
            fmt=self.format,
            up=self.up,
            embedding=self.embedding,
            single_max=self.single_max,
            dsm=self.dsm,
            dsm_resolution=self.dsm_resolution,
            dsm_oversample=self.dsm_oversample,
            seam_distance_m=self.seam_distance,
            allow_missing=self.allow_missing,
            progress=True,
        )
        if r.embedding == "none":
            how = "none (the runs have no appearance model)"
        elif r.embedding == "mean":
            how = "mean (each tile's mean embedding: colours may differ across seams)"
        else:
            why = "the first training image common to every tile" if r.embedding_default else "--embedding"
            how = f"image {r.embedding} ({why})"
        n_chunks = sum(p is not None for p in r.chunks.values())
        mb = sum(p.stat().st_size for p in r.chunks.values() if p is not None) / 1e6
        print(
            f"[city export] {r.total:,} splats from {len(r.counts)} cells "
            f"({sum(r.dropped.values())} non-finite dropped), format={r.format} up={r.up}, {r.seconds:.1f} s"
        )
        print(f"[city export] appearance: {how}")
        print(f"[city export] {r.chunks_json}: {n_chunks} chunks, {mb:.2f} MB")
        if r.single is not None:
            print(f"[city export] {r.single}: {r.single.stat().st_size / 1e6:.2f} MB")
        else:
            print(f"[city export] no single file: {r.single_skipped}")
        for cell, why in r.missing.items():
            print(f"[city export] missing {cell}: {why} (a hole in the scene and the DSM)")
        if r.dsm is not None:
            g = r.dsm.grid
            print(
                f"[city export] {r.dsm.path}  crs={r.dsm.crs or 'local ENU'} {g.width}x{g.height} cells of "
                f"{g.resolution:g} m, completeness {r.dsm.completeness:.3f}; preview {r.dsm.preview}"
            )
        if r.seams is not None:
            s, i = r.seams["seam"], r.seams["interior"]
            print(
                f"[city export] DSM vs truth within {r.seams['distance_m']:g} m of a seam: MAE {_m(s['mae_m'])} "
                f"(median {_m(s['median_abs_m'])}, {s['count']:,} cells); interior: MAE {_m(i['mae_m'])} "
                f"(median {_m(i['median_abs_m'])}, {i['count']:,} cells); seam penalty "
                f"{_m(r.seams['seam_penalty_m'])}  -> {r.seams_path}"
            )


def _m(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} m"
