"""Feature matching between two views and ray triangulation (tracks and the bundle adjustment: :mod:`skyfall.prepare.adjust`).

Dependency-free (numpy only) on purpose: the reference needs a patched C++ COLMAP for this step.

* **Keypoints** in the reference view: Shi-Tomasi corners (smallest eigenvalue of the
  structure tensor), the strongest one per ``cell`` x ``cell`` block, away from no-data.
* **Matching**: each keypoint's ray (from the fitted pinhole) is cut at the altitude range and
  projected into the other view; the image of that segment, dilated by ``search_margin`` pixels
  for the RPC bias, is searched exhaustively with normalised cross-correlation (NCC) of a
  ``(2 * half + 1)²`` patch. A match needs NCC >= ``min_ncc`` and a peak that is unique (no other
  score within ``uniqueness`` of it more than 2 px away), and is refined to sub-pixel by fitting
  a parabola through the peak and its neighbours on each axis, then (``refine="lk"``) by
  Gauss-Newton iterations on the difference of the zero-mean, unit-norm windows, sampling the
  searched image with cubic splines (parabola fits of NCC peaks are biased towards whole pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from skyfall.prepare.pinhole import project_pinhole


@dataclass
class MatchConfig:
    """Parameters of the NCC matcher."""

    cell: int = 8
    """One keypoint per cell x cell block of the reference view (pixels of the written images)."""
    half: int = 5
    """Correlation window half-size: windows are (2 * half + 1)² pixels."""
    min_ncc: float = 0.8
    """Minimum normalised cross-correlation of a match."""
    uniqueness: float = 0.03
    """A second peak (> 2 px away) within this NCC of the best rejects the keypoint (repetitive texture)."""
    search_margin: float = 6.0
    """Pixels added around the epipolar segment for the RPCs' relative bias."""
    min_texture: float = 1e-4
    """Minimum Shi-Tomasi response (image values in 0..1) of a keypoint."""
    refine: str = "lk"
    """Sub-pixel refinement: 'lk' (Gauss-Newton on the normalised window difference, cubic-spline
    sampling, started from 'parabola') or 'parabola' (a parabola through the NCC peak on each axis)."""


@dataclass
class Matches:
    """Matches of the keypoints of a reference view ``ref`` in view ``view``.

    Attributes:
        view: the searched view k.
        uv0: [M, 2] keypoint pixels in the reference view; uvk: [M, 2] pixels in view k (gsplat
            convention). Keypoint positions depend only on the reference image, so the same keypoint
            has bit-identical ``uv0`` in every pair with that reference.
        ncc: [M] correlation scores.
        ref: the reference view's index.
    """

    view: int
    uv0: np.ndarray
    uvk: np.ndarray
    ncc: np.ndarray
    ref: int = 0


def keypoints(img: np.ndarray, valid: np.ndarray, cfg: MatchConfig) -> np.ndarray:
    """Shi-Tomasi keypoints, one per cell. img: [H, W] float in 0..1; valid: [H, W]. Returns [K, 2] (u, v)."""
    gy, gx = np.gradient(ndimage.gaussian_filter(img, 0.8))
    size = 2 * cfg.half + 1
    sxx = ndimage.uniform_filter(gx * gx, size)
    syy = ndimage.uniform_filter(gy * gy, size)
    sxy = ndimage.uniform_filter(gx * gy, size)
    lam = 0.5 * (sxx + syy) - np.sqrt(0.25 * (sxx - syy) ** 2 + sxy**2)
    border = cfg.half + 2
    ok = ndimage.binary_erosion(valid, np.ones((2 * border + 1,) * 2), border_value=0)
    lam = np.where(ok, lam, 0.0)
    h, w = img.shape
    hc, wc = h // cfg.cell, w // cfg.cell
    blocks = lam[: hc * cfg.cell, : wc * cfg.cell].reshape(hc, cfg.cell, wc, cfg.cell).transpose(0, 2, 1, 3)
    flat = blocks.reshape(hc, wc, -1)
    arg = flat.argmax(axis=-1)
    best = np.take_along_axis(flat, arg[..., None], -1)[..., 0]
    rows = np.arange(hc)[:, None] * cfg.cell + arg // cfg.cell
    cols = np.arange(wc)[None, :] * cfg.cell + arg % cfg.cell
    keep = best > cfg.min_texture
    return np.stack([cols[keep] + 0.5, rows[keep] + 0.5], axis=-1)


def pixel_rays(K: np.ndarray, c2w: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray origins [3] and unit directions [N, 3] through pixels uv [N, 2]."""
    d = np.c_[(uv[:, 0] - K[0, 2]) / K[0, 0], (uv[:, 1] - K[1, 2]) / K[1, 1], np.ones(len(uv))]
    d = d @ c2w[:3, :3].T
    return c2w[:3, 3], d / np.linalg.norm(d, axis=1, keepdims=True)


def _at_height(origin: np.ndarray, d: np.ndarray, z: float) -> np.ndarray:
    t = (z - origin[2]) / d[:, 2]
    return origin + t[:, None] * d


def match_pair(
    img0: np.ndarray, valid0: np.ndarray, cam0: tuple[np.ndarray, np.ndarray],
    imgk: np.ndarray, validk: np.ndarray, camk: tuple[np.ndarray, np.ndarray],
    z_range: tuple[float, float], view: int, cfg: MatchConfig, ref: int = 0,
) -> Matches:  # fmt: skip
    """NCC matches of the reference view's keypoints in view k along their epipolar segments (module docstring).

    Args:
        img0, imgk: [H, W] float images in 0..1 (reference, searched); valid0, validk: [H, W] bool.
        cam0, camk: (K, c2w) of the fitted pinholes.
        z_range: ENU heights bounding the scene.
        view: k, stored in the result.
        ref: the reference view's index, stored in the result.
    """
    kp = keypoints(img0, valid0, cfg)
    origin, d = pixel_rays(*cam0, kp)
    ends = [project_pinhole(*camk, _at_height(origin, d, z)) for z in z_range]
    lo = np.floor(np.minimum(*ends) - cfg.search_margin).astype(int)
    hi = np.ceil(np.maximum(*ends) + cfg.search_margin).astype(int)
    h = cfg.half
    size = 2 * h + 1
    H, W = imgk.shape
    okk = ndimage.binary_erosion(validk, np.ones((size, size)), border_value=0)
    if cfg.refine == "lk":
        spline = ndimage.spline_filter(imgk, order=3)
        grads = [ndimage.spline_filter(g, order=3) for g in np.gradient(imgk)]  # d/drow, d/dcol
    elif cfg.refine != "parabola":
        raise ValueError(f"refine must be 'lk' or 'parabola', got {cfg.refine!r}")
    uv0, uvk, scores = [], [], []
    for i, (u, v) in enumerate(kp):
        j0, i0 = int(u), int(v)
        tpl = img0[i0 - h : i0 + h + 1, j0 - h : j0 + h + 1]
        tpl = tpl - tpl.mean()
        tn = np.sqrt((tpl**2).sum())
        if tn < 1e-6:
            continue
        # Search window: pixel (column) indices whose window centre lies in [lo, hi].
        c0, c1 = max(lo[i, 0], h), min(hi[i, 0], W - h - 1)
        r0, r1 = max(lo[i, 1], h), min(hi[i, 1], H - h - 1)
        if c1 - c0 < 2 or r1 - r0 < 2:
            continue
        region = imgk[r0 - h : r1 + h + 1, c0 - h : c1 + h + 1]
        win = sliding_window_view(region, (size, size))  # [R, C, size, size]
        wmean = win.mean(axis=(2, 3))
        num = np.einsum("rcij,ij->rc", win, tpl)  # sum((w - mean_w) * tpl) = sum(w * tpl): tpl is zero-mean
        wvar = (win**2).sum(axis=(2, 3)) - size * size * wmean**2
        ncc = num / (np.sqrt(np.maximum(wvar, 1e-12)) * tn)
        ncc = np.where(okk[r0 : r1 + 1, c0 : c1 + 1], ncc, -1.0)
        r, c = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        best = ncc[r, c]
        if best < cfg.min_ncc or r in (0, ncc.shape[0] - 1) or c in (0, ncc.shape[1] - 1):
            continue
        yy, xx = np.ogrid[: ncc.shape[0], : ncc.shape[1]]
        far = (yy - r) ** 2 + (xx - c) ** 2 > 4
        if (ncc[far] > best - cfg.uniqueness).any():
            continue
        dx = _parabola(ncc[r, c - 1], best, ncc[r, c + 1])
        dy = _parabola(ncc[r - 1, c], best, ncc[r + 1, c])
        x, y = c0 + c + dx, r0 + r + dy  # array indices of the window centre
        if cfg.refine == "lk":
            warp = _local_affine(cam0, camk, np.array([u, v]), np.array([x + 0.5, y + 0.5]))
            refined = _refine(spline, grads, tpl / tn, x, y, h, H, W, warp)
            if refined is None:
                continue
            x, y = refined
        uv0.append((u, v))
        uvk.append((x + 0.5, y + 0.5))
        scores.append(best)
    return Matches(view, np.array(uv0).reshape(-1, 2), np.array(uvk).reshape(-1, 2), np.array(scores), ref)


def _local_affine(
    cam0: tuple[np.ndarray, np.ndarray], camk: tuple[np.ndarray, np.ndarray], uv0: np.ndarray, uvk: np.ndarray
) -> np.ndarray:
    """[2, 2] map of pixel offsets around uv0 in the reference view to view k, for a horizontal surface through
    the point the two pixels triangulate to (the views' different rotation and foreshortening)."""
    p, _ = triangulate([cam0, camk], [uv0[None], uvk[None]])
    pts = p + np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a0 = project_pinhole(*cam0, pts)
    ak = project_pinhole(*camk, pts)
    j0 = (a0[1:] - a0[0]).T  # pixels per metre east / north
    jk = (ak[1:] - ak[0]).T
    return jk @ np.linalg.inv(j0)


def _refine(
    spline: np.ndarray, grads: list[np.ndarray], tpl: np.ndarray, x: float, y: float, h: int, H: int, W: int,
    warp: np.ndarray,
) -> tuple[float, float] | None:  # fmt: skip
    """Gauss-Newton on the zero-mean, unit-norm window difference, cubic-spline sampling.

    The searched window is the template's grid mapped by ``warp`` ([2, 2], template pixel offsets
    -> searched-image offsets). Starts at (x, y) (array indices of the window centre); None if it
    leaves the image, moves more than 1 px from the start or does not converge.
    """
    ty, tx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    dx = warp[0, 0] * tx + warp[0, 1] * ty
    dy = warp[1, 0] * tx + warp[1, 1] * ty
    h = int(np.ceil(max(np.abs(dx).max(), np.abs(dy).max())))
    x1, y1 = x, y
    for _ in range(10):
        if not (h + 1 <= x1 <= W - h - 2 and h + 1 <= y1 <= H - h - 2):
            return None
        coords = [y1 + dy, x1 + dx]
        w = ndimage.map_coordinates(spline, coords, order=3, prefilter=False)
        gy = ndimage.map_coordinates(grads[0], coords, order=3, prefilter=False)
        gx = ndimage.map_coordinates(grads[1], coords, order=3, prefilter=False)
        w = w - w.mean()
        norm = np.sqrt((w**2).sum())
        if norm < 1e-9:
            return None
        res = (w / norm - tpl).ravel()
        jac = np.stack([(gx - gx.mean()).ravel(), (gy - gy.mean()).ravel()], 1) / norm
        step = np.linalg.lstsq(jac, -res, rcond=None)[0]
        x1, y1 = x1 + step[0], y1 + step[1]
        if abs(x1 - x) > 1 or abs(y1 - y) > 1:
            return None
        if np.abs(step).max() < 1e-3:
            return x1, y1
    return None


def _parabola(a: float, b: float, c: float) -> float:
    den = a - 2 * b + c
    return 0.0 if den >= 0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))


def triangulate(
    cams: list[tuple[np.ndarray, np.ndarray]], uvs: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ray intersection.

    Args:
        cams: (K, c2w) per view; uvs: [N, 2] pixels per view (same points).

    Returns:
        points [N, 3] closest to all rays, and for two views the rays' mutual distance [N] (m).
    """
    a = np.zeros((len(uvs[0]), 3, 3))
    b = np.zeros((len(uvs[0]), 3))
    rays = []
    for cam, uv in zip(cams, uvs, strict=True):
        o, d = pixel_rays(*cam, uv)
        proj = np.eye(3) - d[:, :, None] * d[:, None, :]
        a += proj
        b += proj @ o
        rays.append((o, d))
    pts = np.linalg.solve(a, b[..., None])[..., 0]
    (o1, d1), (o2, d2) = rays[0], rays[1]
    n = np.cross(d1, d2)
    gap = np.abs(n @ (o2 - o1)) / np.linalg.norm(n, axis=1)
    return pts, gap
