"""``skyfall export RUN``: viewer-ready splat files from a run's latest checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass
class Export:
    """Export a run as a splat file for web viewers (3D filter and appearance baked into the splats),
    or as a DSM GeoTIFF.

    Default: RUN/ply/export.ply, a standard 3DGS PLY (SH degree of the run) rotated to -Y up, which
    SuperSplat, the PlayCanvas engine and Spark load upright. Non-finite Gaussians are dropped and
    counted. `--format raw-ply` writes the raw parameters plus filter_3D (round trips, not for viewing).
    `--format dsm` writes RUN/dsm/dsm.tif (+ dsm.png preview, dsm.json): on tiles made by `skyfall
    prepare` a north-up grid in the tile's UTM zone with heights above the WGS84 ellipsoid (needs
    `pip install "skyfall[geo]"`); on synthetic tiles a grid of the local ENU frame with no CRS.
    """

    run: tyro.conf.Positional[Path]
    """Run directory (RUN/ckpts/ckpt_*.pt)."""
    format: Literal["ply", "raw-ply", "splat", "ply-compressed", "spz", "dsm"] = "ply"
    """ply: standard 3DGS PLY; raw-ply: + filter_3D, unbaked; splat: antimatter15 (no SH);
    ply-compressed: PlayCanvas/SuperSplat; spz: Niantic (gzip v2); dsm: DSM GeoTIFF + PNG preview."""
    up: Literal["y", "z"] = "y"
    """y: rotate ENU Z-up to the -Y-up frame 3DGS viewers assume; z: keep ENU (e.g. the Mip-Splatting
    viewer with up 0,0,1)."""
    embedding: str | None = None
    """Appearance embedding baked into the colours: 'mean' or an image index (default: the run's
    appearance.test_embedding)."""
    out: Path | None = None
    """Output file (default RUN/ply/export[_zup].<ext>; for dsm RUN/dsm/dsm.tif)."""
    dsm_resolution: float = 0.5
    """dsm: cell size in metres."""
    dsm_oversample: int = 2
    """dsm: ENU render cells per output cell along each axis before the exact resampling to UTM."""
    data: Path | None = None
    """dsm: tile folder, which decides the frame and extent (default: `data` in RUN/config.yml)."""

    def main(self) -> None:
        from skyfall.errors import ConfigError
        from skyfall.export.run import export_run

        if self.format == "dsm":
            from skyfall.export.dsm import export_dsm

            if self.embedding is not None:
                raise ConfigError(
                    "--embedding does not apply to --format dsm (a DSM has heights, no colours)"
                )
            d = export_dsm(
                self.run,
                data=self.data,
                resolution=self.dsm_resolution,
                oversample=self.dsm_oversample,
                out=self.out,
                progress=True,
            )
            print(
                f"[export] {d.path}  crs={d.crs} {d.grid.width}x{d.grid.height} cells of "
                f"{d.grid.resolution:g} m, completeness {d.completeness:.3f}, {d.seconds:.2f} s; "
                f"preview {d.preview}"
            )
            return

        res = export_run(self.run, self.format, up=self.up, embedding=self.embedding, out=self.out)
        size = res.path.stat().st_size / 1e6
        print(
            f"[export] {res.path}  format={res.format} up={res.up} embedding={res.embedding}  "
            f"{res.written} splats ({res.dropped} non-finite dropped), {size:.2f} MB, {res.seconds:.2f} s"
        )
