"""DSM read-out of a scene on a ground-truth grid and its error (the trainers' summary protocol).

Heights come from rendered near-vertical depth on the ground-truth DSM grid (``render_dsm``, which
lives in ``skyfall.dsm`` so that export can use it too); the error is the mean
absolute difference over cells valid in both, without registration. ``skyfall.eval.runner`` adds NCC
shift registration and reports on top of this.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from skyfall.data.ground_truth import GT_DSM_KEYS, check_gt_dsm, check_shape, read_gt_georef
from skyfall.dsm import render_dsm

__all__ = ["GT_DSM_KEYS", "check_gt_dsm", "dsm_errors", "load_gt_dsm", "read_gt_georef", "render_dsm"]


def load_gt_dsm(tile_dir: str | Path) -> tuple[np.ndarray, dict] | None:
    """The synthetic tile's ``gt/dsm.npy`` + ``gt/dsm.json`` georeference (checked as in
    ``read_gt_georef``), or None when either is absent."""
    root = Path(tile_dir) / "gt"
    if not (root / "dsm.npy").exists() or not (root / "dsm.json").exists():
        return None
    georef = read_gt_georef(root / "dsm.json")
    dsm = np.load(root / "dsm.npy")
    check_shape(root / "dsm.npy", dsm.shape, georef)
    return dsm, georef


def dsm_errors(pred: np.ndarray, gt: np.ndarray) -> dict:
    """MAE / RMSE over cells valid in both (no registration), and completeness = valid_both / valid_gt."""
    valid_gt = np.isfinite(gt)
    both = valid_gt & np.isfinite(pred)
    if not both.any():
        return {"dsm_mae_m": math.nan, "dsm_rmse_m": math.nan, "dsm_completeness": 0.0}
    d = pred[both].astype(np.float64) - gt[both]
    return {
        "dsm_mae_m": float(np.abs(d).mean()),
        "dsm_rmse_m": float(np.sqrt((d * d).mean())),
        "dsm_completeness": float(both.sum() / max(valid_gt.sum(), 1)),
    }
