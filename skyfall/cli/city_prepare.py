"""``skyfall city prepare``: satellite images with RPCs -> one tile per cell of a city grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from skyfall.cli.prepare import PrepareOptions


@dataclass
class CityPrepare:
    """Split a city into tiles: satellite images with RPCs -> CITY/city.json and one tile per cell.

    Lays a grid of --tile-size square cores over --bbox in one ENU frame tangent at the box's centre,
    and prepares every cell as `skyfall prepare` does (pinholes fitted to the RPCs, matching, bundle
    adjustment, points) over its core plus --overlap on every side, in the city frame translated to
    the cell's centre: a tile's coordinates are the city's minus the cell origin, exactly. All cells
    share one height range (--alt-range, or estimated once over the whole box). Writes
    CITY/city.json, CITY/tiles/<cell>/ and CITY/city_prepare.json (options, per-cell views, matches,
    adjustment, points, time). Running it again continues: finished tiles are kept (--overwrite
    prepares them again).
    """

    out: Path
    """City folder to write (new, empty, or one this command started: then continued)."""
    bbox: str
    """The city 'lon0,lat0,lon1,lat1' (west, south, east, north; degrees), at most 20 km a side;
    write --bbox=-81.7,... when it starts with a minus sign."""
    images: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Input images with RPCs, all seeing the whole box (view 0 is every tile's adjustment reference)."""
    tile_size: float = 256.0
    """Edge of a cell's core (metres); the grid has ceil(box extent / tile size) cells per axis."""
    overlap: float = 32.0
    """Margin of every tile beyond its core (metres; neighbouring tiles share twice this)."""
    rpc: list[Path] = field(default_factory=list)
    """Explicit RPC files, one per image (default: embedded tags, then sidecars next to the image)."""
    overwrite: bool = False
    """Prepare every cell again, also the finished ones (and accept other options than the first run)."""
    progress: bool = True
    """Show a progress bar over the cells."""
    tile: Annotated[PrepareOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PrepareOptions)
    """How each cell's tile is prepared (as `skyfall prepare`)."""

    def main(self) -> None:
        from skyfall.city.prepare import parse_bbox, prepare_city

        bbox = parse_bbox(self.bbox)
        cfg = self.tile.config()
        manifest = prepare_city(
            list(self.images), self.out, bbox, self.tile_size, self.overlap, cfg,
            rpc_files=self.rpc or None, overwrite=self.overwrite, progress=self.progress,
        )  # fmt: skip
        x0, x1, y0, y1 = manifest.bounds
        lon, lat, h = manifest.origin_lon_lat_h  # type: ignore[misc]
        print(
            f"city {self.out}: {len(manifest.cells)} tiles in {self.out / 'tiles'}, cores covering "
            f"{x1 - x0:g} x {y1 - y0:g} m of the ENU frame at {lon:.6f}, {lat:.6f}, {h:.2f} m "
            f"(city.json, city_prepare.json)"
        )
