"""``skyfall export-views RUN --out DIR``: co-registered multi-altitude views (AerialMegaDepth style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

# The ladder's defaults, repeated here so that `skyfall --help` needs no numpy/torch import;
# tests check they equal skyfall.data.ladder's.
DEFAULT_ALTITUDES = (1.7, 5.0, 20.0, 50.0, 100.0, 200.0, 350.0)
DEFAULT_STANDOFF = 30.0


@dataclass
class ExportViews:
    """Render co-registered views of a run from street level to 350 m (AerialMegaDepth-style pairs
    for DUSt3R/MASt3R), with depth, poses and a COLMAP model.

    Cameras stand on an altitude ladder around an N x N grid of look-at targets over the tile's
    central half: for altitude a and azimuth phi the eye is --standoff metres from the target
    horizontally and a metres above the local ground (from the run's rendered DSM), looking at the
    target, so the pitch goes from near-horizontal at street level to near-nadir at 350 m. No camera
    stands inside a building: street-level ones (below 10 m) only where the DSM is within 0.5 m of the
    ground and the target is in sight, higher ones 2 m clear of the roofs; others move along their
    azimuth circle or are skipped (counted).

    Writes DIR/NAME.jpg, NAME.npy (float32 camera-z depth, 0 = invalid), NAME_mask.png, NAME.npz
    (intrinsics, cam2world: DUSt3R's processed-MegaDepth layout), views.json, sparse/ (COLMAP text),
    covisibility.npy + pairs.csv and README.md (frame: the tile's local ENU, metres, z up).
    """

    run: tyro.conf.Positional[Path]
    """Run directory (RUN/ckpts/ckpt_*.pt)."""
    out: Path
    """Output folder (created; must be empty unless --overwrite)."""
    altitudes: tuple[float, ...] = DEFAULT_ALTITUDES
    """Camera heights above the local ground in metres (AerialMegaDepth's range by default)."""
    targets: int = 2
    """N: an N x N grid of look-at targets over the tile's central half."""
    azimuths: int = 4
    """Cameras per target and altitude, evenly spaced around it."""
    fov: float = 60.0
    """Horizontal (= vertical) field of view in degrees."""
    size: int = 512
    """Image side in pixels (square views)."""
    embedding: str | None = None
    """Appearance embedding: 'mean' or an image index (default: the run's appearance.test_embedding)."""
    alpha_threshold: float = 0.5
    """Pixels whose rendered alpha is below this get depth 0 and mask 0."""
    standoff: float = DEFAULT_STANDOFF
    """Horizontal distance from camera to target in metres (sets the pitch of each altitude)."""
    dsm_resolution: float = 1.0
    """Cell size in metres of the rendered DSM that gives ground heights and building footprints."""
    pairs: bool = True
    """Also write covisibility.npy and the ranked pairs.csv."""
    min_overlap: float = 0.1
    """pairs.csv: pairs whose co-visibility is below this are left out."""
    cross_band_only: bool = False
    """pairs.csv: only pairs of views from different altitude bands (ground / low / high)."""
    one_way_pairs: bool = False
    """pairs.csv: keep a pair when either view sees --min-overlap of the other (default: both ways).
    Aerial-ground pairs need this: a street view is mostly visible from above, but covers a sliver
    of the aerial view."""
    points_per_view: int = 500
    """sparse/points3D.txt: unprojected depth pixels per view (0: an empty points3D.txt)."""
    data: Path | None = None
    """Tile folder, which decides the extent (default: `data` in RUN/config.yml)."""
    device: str = "auto"
    """Torch device for rendering: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N."""
    overwrite: bool = False
    """Replace an earlier export-views output in --out (only the files it lists)."""

    def main(self) -> None:
        from skyfall.export.views import export_views

        res = export_views(
            self.run,
            self.out,
            altitudes=self.altitudes,
            targets=self.targets,
            azimuths=self.azimuths,
            fov=self.fov,
            size=self.size,
            embedding=self.embedding,
            alpha_threshold=self.alpha_threshold,
            standoff=self.standoff,
            dsm_resolution=self.dsm_resolution,
            data=self.data,
            pairs=self.pairs,
            min_overlap=self.min_overlap,
            cross_band_only=self.cross_band_only,
            one_way_pairs=self.one_way_pairs,
            points_per_view=self.points_per_view,
            overwrite=self.overwrite,
            device=self.device,
            progress=True,
        )
        pairs = "no pairs (--no-pairs)" if res.pairs is None else f"{res.pairs} ranked pairs"

        print(
            f"[export-views] {res.out}  {res.n_views} views ({res.moved} moved along their azimuth circle, "
            f"{res.skipped} skipped: no valid position), embedding={res.embedding}, "
            f"{pairs}, {res.seconds:.2f} s"
        )
