"""Gaussian initialisation from a coloured point cloud (Skyfall-GS ``GaussianModel.create_from_pcd``).

SH DC from the point colours, higher bands 0; isotropic log scale from the mean squared distance to
the 3 nearest neighbours (simple-knn ``distCUDA2``, reimplemented with a k-d tree so it runs without
CUDA); identity rotation.

Positions are stored as float32: tile coordinates are local ENU metres within about ±300 m of the
tile centre, where float32 still resolves ~3e-5 m, far below any splat size that matters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from skyfall.gaussians.sh import SH_C0 as SH_C0  # re-exported: colour = 0.5 + SH_C0 * sh0
from skyfall.gaussians.sh import rgb_to_sh0


def knn_mean_sq_dist(xyz: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean squared distance of each point to its ``k`` nearest *other* points (simple-knn ``distCUDA2``).

    Self is removed by index, not by a zero distance, so exact duplicates still count as neighbours
    (distance 0), as in simple-knn.

    Args:
        xyz: [P, 3] float64 points, P >= 2.
        k: number of neighbours.

    Returns:
        [P] float64 mean squared distances (not clamped).
    """
    p = xyz.shape[0]
    if p < 2:
        raise ValueError(f"need at least 2 points for the KNN scale initialisation, got {p}")
    kk = min(k, p - 1)
    tree = cKDTree(xyz)
    dist, idx = tree.query(xyz, k=kk + 1)
    # With duplicates, cKDTree may list a twin before the point itself: drop exactly the column
    # that holds the point's own index; if self is not among the k+1 (many duplicates), drop the last.
    own = idx == np.arange(p)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), kk)
    keep = np.ones_like(own)
    keep[np.arange(p), drop] = False
    d = dist[keep].reshape(p, kk)
    return (d * d).mean(axis=1)


def init_from_points(
    xyz: np.ndarray | Tensor,  # [P, 3] float64
    rgb: np.ndarray | Tensor,  # [P, 3] uint8
    *,
    sh_degree: int = 1,
    init_opacity: float = 0.5,
    max_scale: float | np.ndarray | None = None,
    flat: float = 0.0,
) -> dict[str, Tensor]:
    """Initial Gaussian parameters from points, as the reference's ``create_from_pcd``.

    Args:
        xyz: [P, 3] positions (float64, local ENU metres).
        rgb: [P, 3] uint8 colours.
        sh_degree: maximum SH degree; shN gets ``(sh_degree + 1)^2 - 1`` zero coefficients.
        init_opacity: initial opacity in (0, 1); the reference uses 0.5 (logit 0).
        max_scale: optional cap on the initial standard deviation (metres), for isolated points;
            one value or one per point.
        flat: > 0: each Gaussian a disk in the plane of its neighbourhood (``surface_frames``), its
            normal axis ``flat`` times the KNN scale; 0: isotropic, identity rotation (the reference).

    Returns:
        gsplat-named float32 CPU tensors: ``means`` [P, 3], ``scales`` [P, 3] (log),
        ``quats`` [P, 4] (wxyz identity), ``opacities`` [P] (logit), ``sh0`` [P, 1, 3], ``shN`` [P, K-1, 3].
    """
    xyz_np = np.asarray(xyz.detach().cpu().numpy() if isinstance(xyz, Tensor) else xyz, dtype=np.float64)
    rgb_np = np.asarray(rgb.detach().cpu().numpy() if isinstance(rgb, Tensor) else rgb)
    if xyz_np.ndim != 2 or xyz_np.shape[1] != 3 or rgb_np.shape != xyz_np.shape:
        raise ValueError(f"expected xyz and rgb of shape [P, 3], got {xyz_np.shape} and {rgb_np.shape}")
    if not 0.0 < init_opacity < 1.0:
        raise ValueError(f"init_opacity must be in (0, 1), got {init_opacity}")
    p = xyz_np.shape[0]

    dist2 = np.maximum(knn_mean_sq_dist(xyz_np), 1e-7)
    log_scale = np.log(np.sqrt(dist2))
    if max_scale is not None:
        log_scale = np.minimum(
            log_scale, np.log(np.broadcast_to(np.asarray(max_scale, np.float64), log_scale.shape))
        )
    scales = torch.from_numpy(log_scale).float()[:, None].repeat(1, 3)

    colours = torch.from_numpy(rgb_np.astype(np.float32) / 255.0)
    sh0 = rgb_to_sh0(colours)[:, None, :]
    n_rest = (sh_degree + 1) ** 2 - 1
    quats = torch.zeros(p, 4)
    quats[:, 0] = 1.0
    if flat > 0 and p >= 4:
        quats = torch.from_numpy(surface_frames(xyz_np)).float()
        scales[:, 2] += math.log(flat)
    return {
        "means": torch.from_numpy(xyz_np).float(),
        "scales": scales,
        "quats": quats,
        "opacities": torch.full((p,), math.log(init_opacity / (1.0 - init_opacity))),
        "sh0": sh0,
        "shN": torch.zeros(p, n_rest, 3),
    }


def surface_frames(xyz: np.ndarray, k: int = 8) -> np.ndarray:
    """[P, 4] wxyz quaternions whose local z axis is the normal of each point's neighbourhood.

    The normal is the eigenvector of the smallest eigenvalue of the covariance of the point and its
    ``k`` nearest neighbours (PCA); x and y span the fitted plane (largest spread first), the frame is
    right-handed. Satellite-matched points sample roofs, ground and walls, so the disks start in the
    plane each one is meant to represent.
    """
    from scipy.spatial.transform import Rotation

    p = xyz.shape[0]
    kk = min(k, p - 1)
    _, idx = cKDTree(xyz).query(xyz, k=kk + 1)
    nb = xyz[idx]  # [P, k+1, 3]
    d = nb - nb.mean(axis=1, keepdims=True)
    cov = np.einsum("pki,pkj->pij", d, d) / (kk + 1)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues: columns = smallest .. largest
    frame = vecs[:, :, ::-1].copy()  # x = largest, y = middle, z = smallest (the normal)
    flip = np.linalg.det(frame) < 0
    frame[flip, :, 2] *= -1
    xyzw = Rotation.from_matrix(frame).as_quat()
    return np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)


def height_field_points(
    xyz: np.ndarray | Tensor,  # [P, 3]
    rgb: np.ndarray | Tensor,  # [P, 3] uint8
    spacing: float,
    k: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Points on a regular x-y grid over the points' footprint, each at the median height of its ``k``
    nearest points (x-y distance) and with the colour of the nearest: a 2.5D surface through a sparse
    cloud, so that a few thousand matched points start a surface without holes between them (where
    the sparse start leaves blobs metres wide that no view pulls apart). The median keeps a track's
    outlier from lifting its neighbourhood. Grid nodes with a point within ``0.75 spacing`` are left
    out (every node of a grid as fine as this one, however shifted, has one that close): where the
    cloud is already that dense (e.g. ``prepare``'s dense heights) it is the surface.

    Returns:
        (xyz [G, 3] float64, rgb [G, 3] uint8); empty when there are fewer than ``k`` points.
    """
    xyz = np.asarray(xyz.detach().cpu().numpy() if isinstance(xyz, Tensor) else xyz, dtype=np.float64)
    rgb = np.asarray(rgb.detach().cpu().numpy() if isinstance(rgb, Tensor) else rgb, dtype=np.uint8)
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    if len(xyz) < k:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    lo, hi = xyz[:, :2].min(axis=0), xyz[:, :2].max(axis=0)
    gx = np.arange(lo[0] + spacing / 2, hi[0], spacing)
    gy = np.arange(lo[1] + spacing / 2, hi[1], spacing)
    q = np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1).reshape(-1, 2)
    dist, idx = cKDTree(xyz[:, :2]).query(q, k=k)
    hole = dist[:, 0] > 0.75 * spacing
    q, idx = q[hole], idx[hole]
    z = np.median(xyz[idx, 2], axis=1)
    return np.concatenate([q, z[:, None]], axis=1), rgb[idx[:, 0]]
