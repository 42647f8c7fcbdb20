"""Scoring a prepared tile's stereo DSM (its dense heights, ``TILE/dense/field.npz``) against a truth
DSM, the way ``skyfall eval --dsm-truth`` scores a trained run (``skyfall.eval.truth.score_truth``):
the field resampled exactly onto the truth grid, cropped to the tile, NCC shift within +-radius cells
and a vertical offset. Used by ``skyfall prepare --dsm-truth`` and by ``skyfall eval``'s
``dsm_stereo`` row, so that the two figures are the same computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyfall.dsm import GeoRaster, TileFrame, field_sampler, tile_frame
from skyfall.errors import SkyfallError
from skyfall.eval.truth import load_truth, score_truth
from skyfall.prepare.dense_field import load_field

KEEP = ("dsm_mae_m", "dsm_rmse_m", "dsm_completeness", "dsm_mae_unregistered_m", "dsm_mae_subcell_m", "dz_m", "shift_rows",
        "shift_cols", "shift_e_m", "shift_n_m", "ncc", "dsm_pag2.5", "dsm_pag7.5", "n_truth_cells",
        "resolution_m")  # fmt: skip


def score_stereo(
    tile: str | Path,
    truth: str | Path | GeoRaster,
    *,
    frame: TileFrame | None = None,
    extent: tuple[float, float, float, float] | None = None,
    oversample: int = 2,
    radius: int = 5,
) -> dict[str, Any] | None:
    """``{"file", "dsm_mae_m", ...}`` of the tile's stereo DSM against ``truth`` (a GeoTIFF path or a
    loaded raster); None when the tile has no dense heights.

    ``frame`` / ``extent`` default to the tile's (``tile_frame``). A truth that cannot be scored (it
    does not overlap the tile, or does not read) gives ``{"file", "error"}``: the tile stands without it.
    """
    field = load_field(tile)
    if field is None:
        return None
    name = str(truth.path if isinstance(truth, GeoRaster) else truth)
    try:
        raster = truth if isinstance(truth, GeoRaster) else load_truth(truth)
        frame = frame or tile_frame(tile)
        ext = extent or frame.extent
        if ext is None:
            raise SkyfallError(f"{tile}: the tile's extent is unknown (no AOI in prepare.json)")
        s = score_truth(field_sampler(field), raster, frame, extent=ext, oversample=oversample, radius=radius)
    except SkyfallError as e:
        return {"file": name, "error": str(e)}
    return {"file": name, **{k: s.metrics[k] for k in KEEP if k in s.metrics}}
