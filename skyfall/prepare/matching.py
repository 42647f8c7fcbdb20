"""Feature matching between views, ray triangulation and a relative bundle adjustment of the RPCs.

Dependency-free (numpy only) on purpose: the reference needs a patched C++ COLMAP for this step.

* **Keypoints** in the reference view (view 0): Shi-Tomasi corners (smallest eigenvalue of the
  structure tensor), the strongest one per ``cell`` x ``cell`` block, away from no-data.
* **Matching**: each keypoint's ray (from the fitted pinhole) is cut at the altitude range and
  projected into the other view; the image of that segment, dilated by ``search_margin`` pixels
  for the RPC bias, is searched exhaustively with normalised cross-correlation (NCC) of a
  ``(2 * half + 1)²`` patch. A match needs NCC >= ``min_ncc`` and a peak that is unique (no other
  score within ``uniqueness`` of it more than 2 px away), and is refined to sub-pixel by fitting
  a parabola through the peak and its neighbours on each axis.
* **Relative bundle adjustment**: view 0 is fixed (gauge); every other view k gets one image-space
  offset ``(du, dv)`` (the standard RPC bias correction, see Grodecki & Dial 2003). Alternate:
  triangulate every match as the point closest to all its rays (least squares), then set each
  offset to the median of the views' reprojection residuals; the component along the epipolar
  direction is not observable from image data and stays at 0 (it would only shift heights).
  Outliers (residual > max(1 px, 4 robust sigma)) are dropped between iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from skyfall.prepare.pinhole import project_pinhole


@dataclass
class MatchConfig:
    """Parameters of the NCC matcher and the relative bundle adjustment."""

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


@dataclass
class Matches:
    """Matches between view 0 and view k.

    Attributes:
        view: k.
        uv0: [M, 2] pixels in view 0; uvk: [M, 2] pixels in view k (gsplat convention).
        ncc: [M] correlation scores.
    """

    view: int
    uv0: np.ndarray
    uvk: np.ndarray
    ncc: np.ndarray


@dataclass
class Adjustment:
    """Result of the relative bundle adjustment.

    Attributes:
        offsets: [V, 2] image-space offsets in pixels of the written images (row 0 is 0: the gauge).
        points: [P, 3] triangulated inliers (ENU); uv0: [P, 2] their view-0 pixels; views: [P] k.
        reproj_px: [P] RMS reprojection error of each point over its 2 views, after adjustment.
        ray_gap_m: [P] distance between the two rays, after adjustment.
        ray_gap_before_m: [P] the same with the RPCs as delivered (no offsets).
        n_matches: matches per view pair before outlier rejection.
    """

    offsets: np.ndarray
    points: np.ndarray
    uv0: np.ndarray
    views: np.ndarray
    reproj_px: np.ndarray
    ray_gap_m: np.ndarray
    ray_gap_before_m: np.ndarray
    n_matches: list[int] = field(default_factory=list)


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


def _ray(K: np.ndarray, c2w: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    z_range: tuple[float, float], view: int, cfg: MatchConfig,
) -> Matches:  # fmt: skip
    """NCC matches of view-0 keypoints in view k along their epipolar segments (module docstring).

    Args:
        img0, imgk: [H, W] float images in 0..1; valid0, validk: [H, W] bool.
        cam0, camk: (K, c2w) of the fitted pinholes.
        z_range: ENU heights bounding the scene.
        view: k, stored in the result.
    """
    kp = keypoints(img0, valid0, cfg)
    origin, d = _ray(*cam0, kp)
    ends = [project_pinhole(*camk, _at_height(origin, d, z)) for z in z_range]
    lo = np.floor(np.minimum(*ends) - cfg.search_margin).astype(int)
    hi = np.ceil(np.maximum(*ends) + cfg.search_margin).astype(int)
    h = cfg.half
    size = 2 * h + 1
    H, W = imgk.shape
    okk = ndimage.binary_erosion(validk, np.ones((size, size)), border_value=0)
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
        uv0.append((u, v))
        uvk.append((c0 + c + dx + 0.5, r0 + r + dy + 0.5))
        scores.append(best)
    return Matches(view, np.array(uv0).reshape(-1, 2), np.array(uvk).reshape(-1, 2), np.array(scores))


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
        o, d = _ray(*cam, uv)
        proj = np.eye(3) - d[:, :, None] * d[:, None, :]
        a += proj
        b += proj @ o
        rays.append((o, d))
    pts = np.linalg.solve(a, b[..., None])[..., 0]
    (o1, d1), (o2, d2) = rays[0], rays[1]
    n = np.cross(d1, d2)
    gap = np.abs(n @ (o2 - o1)) / np.linalg.norm(n, axis=1)
    return pts, gap


def relative_adjustment(
    cams: list[tuple[np.ndarray, np.ndarray]], matches: list[Matches], n_iter: int = 30
) -> Adjustment:
    """Estimate per-view image offsets (view 0 fixed) from matches to view 0 (module docstring)."""
    n_views = len(cams)
    offsets = np.zeros((n_views, 2))
    keep = [np.ones(len(m.uv0), bool) for m in matches]

    def shifted(k: int) -> tuple[np.ndarray, np.ndarray]:
        K = cams[k][0].copy()
        K[:2, 2] += offsets[k]
        return K, cams[k][1]

    for it in range(n_iter):
        for m, kp in zip(matches, keep, strict=True):
            if kp.sum() < 3:
                continue
            uv0, uvk = m.uv0[kp], m.uvk[kp]
            pts, _ = triangulate([cams[0], shifted(m.view)], [uv0, uvk])
            res = uvk - project_pinhole(*shifted(m.view), pts)
            offsets[m.view] += np.median(res, axis=0)
            if it in (5, 15):  # robust rejection once the offset has settled
                pts, _ = triangulate([cams[0], shifted(m.view)], [m.uv0, m.uvk])
                e = np.linalg.norm(m.uvk - project_pinhole(*shifted(m.view), pts), axis=1)
                e += np.linalg.norm(m.uv0 - project_pinhole(*cams[0], pts), axis=1)
                sigma = 1.4826 * np.median(np.abs(e[kp] - np.median(e[kp])))
                kp &= e <= max(1.0, np.median(e[kp]) + 4 * sigma)
    pts_all, uv0_all, views, rep, gap, gap0 = [], [], [], [], [], []
    for m, kp in zip(matches, keep, strict=True):
        uv0, uvk = m.uv0[kp], m.uvk[kp]
        pts, g = triangulate([cams[0], shifted(m.view)], [uv0, uvk])
        _, g0 = triangulate([cams[0], cams[m.view]], [uv0, uvk])
        e0 = ((project_pinhole(*cams[0], pts) - uv0) ** 2).sum(1)
        ek = ((project_pinhole(*shifted(m.view), pts) - uvk) ** 2).sum(1)
        pts_all.append(pts)
        uv0_all.append(uv0)
        views.append(np.full(len(pts), m.view))
        rep.append(np.sqrt(0.5 * (e0 + ek)))
        gap.append(g)
        gap0.append(g0)
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    return Adjustment(
        offsets=offsets,
        points=cat(pts_all, (0, 3)),
        uv0=cat(uv0_all, (0, 2)),
        views=cat(views, (0,)).astype(int),
        reproj_px=cat(rep, (0,)),
        ray_gap_m=cat(gap, (0,)),
        ray_gap_before_m=cat(gap0, (0,)),
        n_matches=[len(m.uv0) for m in matches],
    )
