"""``skyfall prepare``: satellite images with RPC camera models -> a tile."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class Prepare:
    """Turn satellite images with RPCs (GeoTIFF/NITF tags, OSSIM .geom, .RPB, DIMAP XML) into a tile.

    Crops the area of interest, converts to a local ENU frame (metres), fits one pinhole camera per
    image to its RPC and reports the fit error, matches features for a relative bundle adjustment
    and the initial points3D.txt, and writes images/, masks/, transforms_*.json and prepare.json.
    """

    images: Annotated[list[Path], tyro.conf.Positional]
    """Input images (view 0 is the matching reference)."""
    out: Path
    """Tile directory to write."""
    aoi: str | None = None
    """Area of interest 'lon,lat,size_m' (degrees, degrees, metres; a square)."""
    geojson: Path | None = None
    """Area of interest from a GeoJSON file (bounding square), instead of --aoi."""
    alt_range: str | None = None
    """Scene heights 'min,max' in metres above the WGS84 ellipsoid (default: the RPC's validity range)."""
    rpc: list[Path] = field(default_factory=list)
    """Explicit RPC files, one per image (default: embedded tags, then sidecars next to the image)."""
    downsample: int = 1
    """Integer box-downsampling factor of the written images."""
    stretch: str = "2,98"
    """Percentiles 'low,high' of valid pixels mapped to 1 and 255."""
    match: bool = True
    """Match features (initial points from triangulation, relative bundle adjustment)."""
    adjust: bool = True
    """Relative bundle adjustment of the RPCs from the matches."""
    overwrite: bool = False
    """Write into a non-empty OUT."""

    def main(self) -> None:
        from skyfall.prepare.pipeline import PrepareConfig, parse_aoi, parse_range, prepare_tile

        cfg = PrepareConfig(
            aoi=parse_aoi(self.aoi) if self.aoi is not None else None,
            geojson=self.geojson,
            alt_range=parse_range(self.alt_range, "--alt-range") if self.alt_range is not None else None,
            downsample=self.downsample,
            stretch=parse_range(self.stretch, "--stretch"),
            match=self.match,
            adjust=self.adjust,
        )
        s = prepare_tile(self.images, self.out, cfg, rpc_files=self.rpc or None, overwrite=self.overwrite)
        a = s["aoi"]
        print(
            f"tile {self.out}: {len(s['views'])} views at {s['width']}x{s['height']} px, AOI "
            f"{a['lon']:.6f},{a['lat']:.6f} {a['size_m']:g} m, heights {a['alt_range'][0]:g}..{a['alt_range'][1]:g} m"
        )
        for v in s["views"]:
            print(
                f"  {v['name']}: pinhole vs RPC over the AOI: rms {v['check_rms_px']:.4f} px, max "
                f"{v['check_max_px']:.4f} px (projective with skew, fit grid: max {v['skewed_fit_max_px']:.4f} px); RPC from {v['rpc']}"
            )
            if v["aoi_inside_image"] < 0.995:
                print(
                    f"    note: {100 * (1 - v['aoi_inside_image']):.0f}% of the AOI is outside this image (masked)"
                )
        ba = s["bundle_adjustment"]
        if ba["done"]:
            print(
                f"  bundle adjustment: {ba['inliers']} matches, image offsets (px) "
                f"{', '.join(f'({u:+.2f}, {v:+.2f})' for u, v in ba['offsets_px'][1:])}, ray gap median "
                f"{ba['ray_gap_before_m']['median']:.3f} -> {ba['ray_gap_m']['median']:.3f} m"
            )
        else:
            print(f"  no bundle adjustment ({ba['reason']}): the RPCs are used as delivered")
        print(f"  points3D.txt: {s['points3D']['count']} points, {s['points3D']['method']}")
