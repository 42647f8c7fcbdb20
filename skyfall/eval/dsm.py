"""DSM read-out of a scene on a ground-truth grid and its error (the trainers' summary protocol).

Heights come from rendered near-vertical depth on the ground-truth DSM grid (``render_dsm``, which
lives in ``skyfall.dsm`` so that export can use it too); the error is the mean
absolute difference over cells valid in both, without registration. ``skyfall.eval.runner`` adds NCC
shift registration and reports on top of this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from skyfall.dsm import render_dsm

__all__ = ["dsm_errors", "load_gt_dsm", "render_dsm"]


def load_gt_dsm(tile_dir: str | Path) -> tuple[np.ndarray, dict] | None:
    """The synthetic tile's ``gt/dsm.npy`` + ``gt/dsm.json`` georeference, or None when absent."""
    root = Path(tile_dir) / "gt"
    if not (root / "dsm.npy").exists() or not (root / "dsm.json").exists():
        return None
    return np.load(root / "dsm.npy"), json.loads((root / "dsm.json").read_text())


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
