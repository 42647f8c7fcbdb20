"""Feature matching between views and ray triangulation (tracks and the bundle adjustment: :mod:`skyfall.prepare.adjust`).

Dependency-free (numpy only) on purpose: the reference needs a patched C++ COLMAP for this step.

* **Keypoints** in the reference view: Shi-Tomasi corners (smallest eigenvalue of the
  structure tensor), the strongest one per ``cell`` x ``cell`` block, away from no-data.
* **Pairwise matching** (:func:`match_pair`): each keypoint's ray (from the fitted pinhole) is cut
  at the altitude range and projected into the other view; the image of that segment, dilated by
  ``search_margin`` pixels for the RPC bias, is searched exhaustively with normalised
  cross-correlation (NCC) of a ``(2 * half + 1)²`` patch. A match needs NCC >= ``min_ncc`` and a
  peak that is unique (no other score within ``uniqueness`` of it more than 2 px away).
* **Multi-view matching** (:func:`match_multiview`, cameras already corrected by a first
  adjustment): a keypoint is searched in all the other views at once along its ray (Okutomi &
  Kanade's multiple-baseline stereo). The NCC of every view is computed in a band of ``margin``
  pixels around the epipolar segment, sampled (bilinearly) at the images of heights spaced
  ``sweep_px`` pixels apart, and averaged over the views (negative scores count as 0); the best
  height must be unique (no height more than 2 px away within ``uniqueness``). In each view the
  NCC peak within 1.5 px of that height's image with NCC >= ``min_ncc`` is the match. A repetitive
  pattern (lane markings, window grids, crossings) that fools one pair lies along a different
  epipolar direction in the others: on the synthetic cities this halves the matches more than
  1 px off (44 % -> 26 %, scripts/bench_matches.py).
* **Sub-pixel**: a parabola through the peak and its neighbours on each axis, then
  (``refine="lk"``) Gauss-Newton on the difference of the zero-mean, unit-norm windows, sampling
  the searched image with cubic splines on the reference window's grid mapped by the local affine
  map of a horizontal surface (parabola fits of NCC peaks are biased towards whole pixels). The
  Gauss-Newton derivative is that of the unit-norm window (the gradient projected off the window),
  so it converges to the NCC maximum also when NCC < 1.
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
    half: int = 4
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
    guided: bool = True
    """With the adjustment on: a first pairwise pass (``coarse_cell``) and adjustment only corrects
    the cameras, which then guide a second pass of :func:`match_multiview` in a band of
    ``guided_margin`` pixels; the tracks of that pass are adjusted from the delivered cameras."""
    coarse_cell: int = 16
    """Keypoint cell of the guiding first pass."""
    guided_margin: float = 1.0
    """Pixels searched on each side of the corrected epipolar segments by the guided pass."""
    sweep_views: str = "later"
    """Views searched for each reference view's keypoints by the guided pass: 'later' (views j > i,
    each pair once, as the first pass) or 'all' (every other view: longer tracks, twice the time)."""
    sweep_px: float = 0.5
    """Height step of :func:`match_multiview`: this many pixels of image motion in the view of
    largest parallax."""


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
    target = _Searched(imgk, validk, cfg)
    uv0, uvk, scores = [], [], []
    for i, (u, v) in enumerate(kp):
        tpl, tn = _template(img0, u, v, cfg.half)
        if tpl is None:
            continue
        found = _ncc_map(tpl, tn, target, lo[i], hi[i])
        if found is None:
            continue
        ncc, c0, r0 = found
        r, c = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        best = ncc[r, c]
        if best < cfg.min_ncc or r in (0, ncc.shape[0] - 1) or c in (0, ncc.shape[1] - 1):
            continue
        yy, xx = np.ogrid[: ncc.shape[0], : ncc.shape[1]]
        far = (yy - r) ** 2 + (xx - c) ** 2 > 4
        if (ncc[far] > best - cfg.uniqueness).any():
            continue
        xy = _subpixel(ncc, int(r), int(c), c0, r0, tpl / tn, target, cam0, camk, np.array([u, v]))
        if xy is None:
            continue
        uv0.append((u, v))
        uvk.append(xy)
        scores.append(best)
    return Matches(view, np.array(uv0).reshape(-1, 2), np.array(uvk).reshape(-1, 2), np.array(scores), ref)


def match_multiview(
    imgs: list[np.ndarray], valids: list[np.ndarray], cams: list[tuple[np.ndarray, np.ndarray]],
    z_range: tuple[float, float], ref: int, views: list[int], cfg: MatchConfig, margin: float,
) -> list[Matches]:  # fmt: skip
    """Keypoints of view ``ref`` matched in all ``views`` at once by a height sweep (module docstring).

    The cameras must already agree (corrected by a first adjustment): the searched band is only
    ``margin`` pixels wide around each epipolar segment. Returns one :class:`Matches` per view.

    Args:
        imgs, valids: every view's [H, W] image in 0..1 and validity mask (indexed by view).
        cams: (K, c2w) of every view (corrected).
        z_range: ENU heights bounding the scene.
        ref: the reference view; views: the searched views.
        margin: pixels searched on each side of the epipolar segments.
    """
    cam0 = cams[ref]
    kp = keypoints(imgs[ref], valids[ref], cfg)
    origin, d = pixel_rays(*cam0, kp)
    targets = {k: _Searched(imgs[k], valids[k], cfg) for k in views}
    # Height samples: at most ``sweep_px`` of image motion per step in the view of largest parallax.
    ends = {k: [project_pinhole(*cams[k], _at_height(origin, d, z)) for z in z_range] for k in views}
    length = np.max([np.linalg.norm(e[1] - e[0], axis=1) for e in ends.values()], axis=0)
    n_steps = np.ceil(length / cfg.sweep_px).astype(int) + 2
    out: dict[int, tuple[list, list, list]] = {k: ([], [], []) for k in views}
    for i, (u, v) in enumerate(kp):
        tpl, tn = _template(imgs[ref], u, v, cfg.half)
        if tpl is None:
            continue
        t = (np.linspace(*z_range, n_steps[i]) - origin[2]) / d[i, 2]
        pts = origin + t[:, None] * d[i]
        score = np.zeros(n_steps[i])
        found = {}
        for k in views:
            p = project_pinhole(*cams[k], pts)
            lo = np.floor(p.min(0) - margin).astype(int)
            hi = np.ceil(p.max(0) + margin).astype(int)
            res = _ncc_map(tpl, tn, targets[k], lo, hi)
            if res is None:
                continue
            ncc, c0, r0 = res
            s = _bilinear(ncc, p[:, 0] - 0.5 - c0, p[:, 1] - 0.5 - r0)
            score += np.clip(s, 0.0, None)
            found[k] = (ncc, c0, r0, p)
        if not found:
            continue
        score /= len(found)
        j = int(np.argmax(score))
        # Unique along the sweep: no other height more than 2 px away (in the view of largest
        # parallax) scores within ``uniqueness`` of the best.
        far = np.abs(np.arange(n_steps[i]) - j) * length[i] / max(n_steps[i] - 1, 1) > 2.0
        if (score[far] > score[j] - cfg.uniqueness).any():
            continue
        for k, (ncc, c0, r0, p) in found.items():
            x, y = p[j, 0] - 0.5 - c0, p[j, 1] - 0.5 - r0
            rc = _local_peak(ncc, x, y, 1.5)
            if rc is None or ncc[rc] < cfg.min_ncc:
                continue
            xy = _subpixel(ncc, *rc, c0, r0, tpl / tn, targets[k], cam0, cams[k], np.array([u, v]))
            if xy is None:
                continue
            out[k][0].append((u, v))
            out[k][1].append(xy)
            out[k][2].append(ncc[rc])
    return [
        Matches(k, np.array(a).reshape(-1, 2), np.array(b).reshape(-1, 2), np.array(c), ref)
        for k, (a, b, c) in out.items()
    ]


class _Searched:
    """A searched image with what the matcher needs of it (valid window centres, spline coefficients)."""

    def __init__(self, img: np.ndarray, valid: np.ndarray, cfg: MatchConfig):
        h = cfg.half
        size = 2 * h + 1
        self.img = img
        self.half = h
        self.ok = ndimage.binary_erosion(valid, np.ones((size, size)), border_value=0)
        # Norm of the zero-mean window centred on every pixel: sqrt(sum(w²) - n mean²).
        n = size * size
        mean = ndimage.uniform_filter(img, size, mode="constant")
        sq = ndimage.uniform_filter(img * img, size, mode="constant")
        self.norm = np.sqrt(np.maximum(n * (sq - mean * mean), 1e-12))
        self.refine = cfg.refine
        if cfg.refine == "lk":
            # Spline coefficients of the image, d/drow and d/dcol, stacked along the rows.
            self.spline = np.concatenate(
                [ndimage.spline_filter(a, order=3) for a in (img, *np.gradient(img))]
            )
        elif cfg.refine != "parabola":
            raise ValueError(f"refine must be 'lk' or 'parabola', got {cfg.refine!r}")


def _template(img: np.ndarray, u: float, v: float, h: int) -> tuple[np.ndarray | None, float]:
    """The zero-mean window of pixel (u, v) and its norm (None if flat)."""
    j0, i0 = int(u), int(v)
    tpl = img[i0 - h : i0 + h + 1, j0 - h : j0 + h + 1]
    tpl = tpl - tpl.mean()
    tn = float(np.sqrt((tpl**2).sum()))
    return (None, 0.0) if tn < 1e-6 else (tpl, tn)


def _ncc_map(
    tpl: np.ndarray, tn: float, target: _Searched, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, int, int] | None:
    """NCC of the template with every window of ``target`` centred in the pixel box [lo, hi]
    (columns, rows; clipped to the image): (scores [R, C] (-1 where the window has no-data), the
    box's first column and row), or None if the box is under 3 x 3."""
    h = target.half
    size = 2 * h + 1
    H, W = target.img.shape
    c0, c1 = max(int(lo[0]), h), min(int(hi[0]), W - h - 1)
    r0, r1 = max(int(lo[1]), h), min(int(hi[1]), H - h - 1)
    if c1 - c0 < 2 or r1 - r0 < 2:
        return None
    region = target.img[r0 - h : r1 + h + 1, c0 - h : c1 + h + 1]
    win = sliding_window_view(region, (size, size))  # [R, C, size, size]
    num = np.einsum("rcij,ij->rc", win, tpl)  # sum((w - mean_w) * tpl) = sum(w * tpl): tpl is zero-mean
    ncc = num / (target.norm[r0 : r1 + 1, c0 : c1 + 1] * tn)
    return np.where(target.ok[r0 : r1 + 1, c0 : c1 + 1], ncc, -1.0), c0, r0


def _bilinear(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of a [R, C] array at (column x, row y) [N]; -1 outside."""
    R, C = a.shape
    inside = (x >= 0) & (x <= C - 1) & (y >= 0) & (y <= R - 1)
    x, y = np.clip(x, 0, C - 1), np.clip(y, 0, R - 1)
    x0, y0 = np.minimum(x.astype(int), C - 2), np.minimum(y.astype(int), R - 2)
    fx, fy = x - x0, y - y0
    top = a[y0, x0] * (1 - fx) + a[y0, x0 + 1] * fx
    bottom = a[y0 + 1, x0] * (1 - fx) + a[y0 + 1, x0 + 1] * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, -1.0)


def _local_peak(ncc: np.ndarray, x: float, y: float, radius: float) -> tuple[int, int] | None:
    """The best score of ``ncc`` within ``radius`` of (column x, row y), if it is a local maximum
    inside the array (not on its border)."""
    R, C = ncc.shape
    rows = np.arange(max(int(np.floor(y - radius)), 1), min(int(np.ceil(y + radius)), R - 2) + 1)
    cols = np.arange(max(int(np.floor(x - radius)), 1), min(int(np.ceil(x + radius)), C - 2) + 1)
    if len(rows) == 0 or len(cols) == 0:
        return None
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    near = (rr - y) ** 2 + (cc - x) ** 2 <= radius**2
    if not near.any():
        return None
    k = int(np.argmax(np.where(near, ncc[rr, cc], -np.inf)))
    r, c = int(rr.flat[k]), int(cc.flat[k])
    if ncc[r, c] < ncc[r - 1 : r + 2, c - 1 : c + 2].max():
        return None
    return r, c


def _subpixel(
    ncc: np.ndarray, r: int, c: int, c0: int, r0: int, tpl: np.ndarray, target: _Searched,
    cam0: tuple[np.ndarray, np.ndarray], camk: tuple[np.ndarray, np.ndarray], uv0: np.ndarray,
) -> tuple[float, float] | None:  # fmt: skip
    """Sub-pixel position (pixels, gsplat convention) of the NCC peak (r, c) of a map whose first
    window centre is pixel (c0, r0): parabola, then (``refine="lk"``) Gauss-Newton; None if that fails."""
    best = ncc[r, c]
    dx = _parabola(ncc[r, c - 1], best, ncc[r, c + 1])
    dy = _parabola(ncc[r - 1, c], best, ncc[r + 1, c])
    x, y = c0 + c + dx, r0 + r + dy  # array indices of the window centre
    if target.refine == "lk":
        H, W = target.img.shape
        warp = _local_affine(cam0, camk, uv0, np.array([x + 0.5, y + 0.5]))
        refined = _refine(target.spline, tpl, x, y, target.half, H, W, warp)
        if refined is None:
            return None
        x, y = refined
    return x + 0.5, y + 0.5


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
    spline: np.ndarray, tpl: np.ndarray, x: float, y: float, h: int, H: int, W: int, warp: np.ndarray
) -> tuple[float, float] | None:
    """Gauss-Newton on the zero-mean, unit-norm window difference, cubic-spline sampling.

    ``spline``: [3H, W] cubic-spline coefficients of the searched image and of its row and column
    derivatives, stacked.

    The searched window is the template's grid mapped by ``warp`` ([2, 2], template pixel offsets
    -> searched-image offsets). Starts at (x, y) (array indices of the window centre); None if it
    leaves the image, moves more than 1 px from the start or does not converge.
    """
    ty, tx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    dx = (warp[0, 0] * tx + warp[0, 1] * ty).ravel()
    dy = (warp[1, 0] * tx + warp[1, 1] * ty).ravel()
    h = int(np.ceil(max(np.abs(dx).max(), np.abs(dy).max())))
    t = tpl.ravel()
    x1, y1 = x, y
    for _ in range(10):
        if not (h + 1 <= x1 <= W - h - 2 and h + 1 <= y1 <= H - h - 2):
            return None
        # One spline evaluation for the window and both gradients (stacked rows of one array).
        coords = np.stack([np.r_[y1 + dy, y1 + dy + H, y1 + dy + 2 * H], np.tile(x1 + dx, 3)])
        w, gy, gx = ndimage.map_coordinates(spline, coords, order=3, prefilter=False).reshape(3, -1)
        w = w - w.mean()
        norm = np.sqrt(w @ w)
        if norm < 1e-9:
            return None
        wn = w / norm
        res = wn - t
        # Derivative of the unit-norm window: the zero-mean gradient projected off the window itself.
        jac = np.stack([gx - gx.mean(), gy - gy.mean()], 1) / norm
        jac -= wn[:, None] * (wn @ jac)[None]
        step = _solve2(jac.T @ jac, -(jac.T @ res))
        if step is None:
            return None
        x1, y1 = x1 + step[0], y1 + step[1]
        if abs(x1 - x) > 1 or abs(y1 - y) > 1:
            return None
        if np.abs(step).max() < 1e-3:
            return x1, y1
    return None


def _solve2(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Solution of the 2 x 2 system a x = b (None if singular)."""
    det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
    if abs(det) < 1e-12 * max(float(np.abs(a).max()) ** 2, 1e-300):
        return None
    return np.array([a[1, 1] * b[0] - a[0, 1] * b[1], a[0, 0] * b[1] - a[1, 0] * b[0]]) / det


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
