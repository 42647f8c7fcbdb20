"""DSM read-out of a scene on a ground-truth grid and its error (the trainers' summary protocol).

Heights come from rendered near-vertical depth on the ground-truth DSM grid; the error is the mean
absolute difference over cells valid in both, without registration. ``skyfall.eval.runner`` adds NCC
shift registration and reports on top of this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from skyfall.data.orbits import nadir_grid_camera
from skyfall.scene import Scene


def load_gt_dsm(tile_dir: str | Path) -> tuple[np.ndarray, dict] | None:
    """The synthetic tile's ``gt/dsm.npy`` + ``gt/dsm.json`` georeference, or None when absent."""
    root = Path(tile_dir) / "gt"
    if not (root / "dsm.npy").exists() or not (root / "dsm.json").exists():
        return None
    return np.load(root / "dsm.npy"), json.loads((root / "dsm.json").read_text())


@torch.no_grad()
def render_dsm(
    scene: Scene, georef: dict, *, depth: str = "median", alpha_min: float = 0.05, block: int = 256
) -> np.ndarray:
    """Heights on the DSM grid from rendered near-vertical depth; NaN where (almost) nothing is rendered.

    ``depth="median"`` (default) reads, per cell, the median of the rendered weight distribution
    (the depth at which the accumulated alpha reaches half of the cell's alpha); ``"expected"`` the
    alpha-normalised accumulated depth. The expected depth averages a roof with the ground behind its
    semi-transparent edge splats, which on a dense city puts metres of error on every building edge;
    the median picks one surface. Cells whose alpha is below ``alpha_min`` are empty (NaN), so a
    sparse, half-transparent surface still counts towards the error instead of being dropped; the
    completeness of ``dsm_errors`` says how much is empty. The grid is rendered in blocks of
    ``block`` x ``block`` cells to bound memory.
    """
    if depth not in ("median", "expected"):
        raise ValueError(f"depth must be 'median' or 'expected', got {depth!r}")
    res = float(georef["resolution"])
    w, h = int(georef["width"]), int(georef["height"])
    out = np.full((h, w), np.nan, dtype=np.float32)
    for i0 in range(0, h, block):
        for j0 in range(0, w, block):
            bh, bw = min(block, h - i0), min(block, w - j0)
            cam = nadir_grid_camera(
                float(georef["x_min"]) + j0 * res, float(georef["y_max"]) - i0 * res, res, bw, bh
            )
            cam_z = float(cam.camtoworlds[0, 2, 3])
            if depth == "median":
                med, alpha = scene.render_median_depth(cam, normalized=True)
                d = med[0, ..., 0].double().cpu().numpy()
            else:
                r = scene.render(cam, None, absgrad=False)
                d, alpha = r.expected_depths[0, ..., 0].double().cpu().numpy(), r.alphas
            ok = (alpha[0, ..., 0].cpu().numpy() >= alpha_min) & np.isfinite(d)
            out[i0 : i0 + bh, j0 : j0 + bw] = np.where(ok, cam_z - d, np.nan)
    return out


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
