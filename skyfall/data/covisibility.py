"""Pairwise covisibility of depth-mapped views and AerialMegaDepth-style pair selection.

AerialMegaDepth (Vuong et al., CVPR 2025) trains on image pairs picked from depth-mapped views by how
much of each view the other one sees. This module computes that overlap densely from depth maps and
ranks candidate pairs:

* :func:`covisibility` -- ``C[i, j]``: the fraction of view ``i``'s valid pixels whose surface point is
  seen, unoccluded, by view ``j`` (a depth test against view ``j``'s own depth map).
* :func:`pair_scores` -- the symmetry score ``AM / HM`` of ``(C[i, j], C[j, i])``.
* :func:`rank_pairs` -- the pairs that overlap enough both ways, best first, optionally only those
  that cross altitude bands (aerial--ground pairs).

Source: the public AerialMegaDepth code (github.com/kvuong2711/aerial-megadepth) ships its training
pairs precomputed -- ``data_splits/*.npz`` rows ``(scene_id, im1_id, im2_id, score)``, read by
``data_generation/misc/megadepth_aerial.py`` -- without the code that computed the overlap or the
score. So the definitions here (overlap by depth test, score ``AM / HM``, the ranking rule) are stated
in full in each function's docstring rather than deferred to that code.

Conventions follow :mod:`skyfall.data.cameras`: OpenCV cameras (x right, y down, z forward), rigid
4x4 camera-to-world matrices, pixel ``(row v, col u)`` covering ``[u, u+1) x [v, v+1)`` with its centre
at ``(u + 0.5, v + 0.5)``, and depth = camera-space z (not ray length). The geometry runs in float64:
satellite cameras sit ~1e6 m away with fx ~ 1e6 px, where float32 loses whole pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from skyfall.data.cameras import invert_rigid

__all__ = ["covisibility", "pair_scores", "rank_pairs"]

_DEFAULT_CHUNK = 1 << 20


def covisibility(
    depths: Tensor,
    valid: Tensor,
    Ks: Tensor,
    camtoworlds: Tensor,
    *,
    stride: int = 1,
    rel_tol: float = 0.01,
    abs_tol: float = 0.05,
    chunk: int = _DEFAULT_CHUNK,
) -> Tensor:
    """Directed covisibility matrix of N depth-mapped views.

    ``C[i, j]`` is the fraction of view ``i``'s sampled valid pixels whose 3D point (the pixel centre
    unprojected with its depth) is seen by view ``j``:

    * it lies in front of view ``j`` (camera-space ``z_j > 0``) and projects inside its image,
      ``0 <= u < W`` and ``0 <= v < H``;
    * the pixel it lands in (``floor(u), floor(v)``: the pixel whose square contains it) has a valid
      depth ``d_j`` there, and ``|z_j - d_j| <= abs_tol + rel_tol * z_j``. A point farther than the
      surface view ``j`` sees is occluded; one much nearer disagrees with ``j``'s geometry. Both fail.

    ``C[i, i]`` is 1 for every view with at least one valid sampled pixel and 0 otherwise, and a view
    without valid pixels has a zero row. ``C`` is not symmetric: a narrow view inside a wide one has
    ``C[narrow, wide] = 1`` while ``C[wide, narrow]`` is about the area ratio.

    Args:
        depths: [N, H, W] camera-space z depths; 0, negative, NaN and inf mean "no depth".
        valid: [N, H, W] bool, False where the depth must not be used (sky, masks); ANDed with the
            depth's own validity.
        Ks: [N, 3, 3] pinhole intrinsics (skew allowed; last row ``[0, 0, 1]``).
        camtoworlds: [N, 4, 4] rigid OpenCV camera-to-world matrices. Any float dtype; computed in
            float64.
        stride: sample every ``stride``-th pixel in each direction, starting at the middle of the first
            ``stride x stride`` cell, so the fraction is an unbiased estimate of the full-resolution one.
            Only the *sampled* pixels of view ``i`` are tested; view ``j``'s depth map is always used
            at full resolution.
        rel_tol: relative part of the depth tolerance (fraction of ``z_j``). The tolerance must
            absorb the depth change across half a pixel of view ``j``, which grows for oblique,
            coarse views. Suits perspective scenes; for very distant cameras (satellites, depths
            ~1e6 m) set it near 0 and give ``abs_tol`` in scene units.
        abs_tol: absolute part of the depth tolerance, in scene units (metres).
        chunk: the most (point, view) pairs evaluated at once; bounds the working memory to about
            ``chunk * 100`` bytes. It never changes the result.

    Returns:
        [N, N] float64 tensor on ``depths``' device.
    """
    if depths.dim() != 3:
        raise ValueError(f"depths must be [N, H, W], got {tuple(depths.shape)}")
    n, h, w = depths.shape
    if valid.shape != depths.shape:
        raise ValueError(f"valid must match depths {tuple(depths.shape)}, got {tuple(valid.shape)}")
    if Ks.shape != (n, 3, 3):
        raise ValueError(f"Ks must be [{n}, 3, 3], got {tuple(Ks.shape)}")
    if camtoworlds.shape != (n, 4, 4):
        raise ValueError(f"camtoworlds must be [{n}, 4, 4], got {tuple(camtoworlds.shape)}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    if not (rel_tol >= 0 and abs_tol >= 0):
        raise ValueError(f"tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
    stride, chunk = int(stride), int(chunk)

    dev = depths.device
    f64 = torch.float64
    # Depths stay in their own float dtype (widening to float64 is exact, done per lookup), so the
    # only full-size copy is ``target``.
    depth = depths if depths.is_floating_point() else depths.to(f64)
    ok = valid.to(device=dev, dtype=torch.bool) & torch.isfinite(depth) & (depth > 0)
    # NaN where invalid: the depth comparison is then False without a second lookup.
    target = torch.where(ok, depth, torch.full_like(depth, math.nan)).reshape(-1)
    has_depth = ok.reshape(n, -1).any(dim=1)

    Ks = Ks.to(device=dev, dtype=f64)
    c2w = camtoworlds.to(device=dev, dtype=f64)
    w2c = invert_rigid(c2w)

    rows = torch.arange((min(stride, h) - 1) // 2, h, stride, device=dev)
    cols = torch.arange((min(stride, w) - 1) // 2, w, stride, device=dev)
    grid_v, grid_u = torch.meshgrid(rows.to(f64) + 0.5, cols.to(f64) + 0.5, indexing="ij")
    pix = torch.stack([grid_u.reshape(-1), grid_v.reshape(-1), torch.ones_like(grid_u).reshape(-1)], dim=0)
    sampled_ok = ok[:, rows][:, :, cols].reshape(n, -1)  # [N, P]
    sampled_depth = depth[:, rows][:, :, cols].reshape(n, -1).to(f64)

    out = torch.zeros(n, n, dtype=f64, device=dev)
    for i in range(n):
        sel = sampled_ok[i]
        n_i = int(sel.sum())
        if n_i == 0:
            continue
        out[i, i] = 1.0
        # Points in camera i's frame: small coordinates, so the pair transform below carries the
        # large world offsets once instead of every point carrying them.
        rays = torch.linalg.solve(Ks[i], pix[:, sel])  # [3, n_i]
        pts = rays / rays[2:3] * sampled_depth[i, sel]
        # Projective matrices camera-i point -> homogeneous pixel of every view: K_j [R|t]_{j<-i}.
        proj = Ks @ (w2c @ c2w[i])[:, :3, :]  # [N, 3, 4]
        cand = has_depth & ~_box_outside(pts, proj, h, w)
        cand[i] = False
        views = torch.nonzero(cand).flatten()
        if views.numel() == 0:
            continue
        hits = torch.zeros(n, dtype=torch.int64, device=dev)
        pts_per_block = min(n_i, chunk)
        views_per_block = max(1, chunk // pts_per_block)
        for v0 in range(0, views.numel(), views_per_block):
            js = views[v0 : v0 + views_per_block]
            for p0 in range(0, n_i, pts_per_block):
                seen = _seen(pts[:, p0 : p0 + pts_per_block], proj[js], js, target, h, w, rel_tol, abs_tol)
                hits[js] += seen.sum(dim=1)
        hits[i] = n_i
        out[i] = hits.to(f64) / n_i
    return out


def _box_outside(pts: Tensor, proj: Tensor, h: int, w: int) -> Tensor:
    """[N] bool: True where no point of the bounding box of ``pts`` [3, P] can land in a view.

    Inside a view means ``z > 0, x >= 0, w*z - x > 0, y >= 0, h*z - y > 0`` in homogeneous pixel
    coordinates: linear half-spaces, so if all 8 box corners break the same one, every point in the
    box does. The box is padded slightly so float rounding never culls a view a point really hits.
    """
    lo = pts.amin(dim=1)
    hi = pts.amax(dim=1)
    pad = 1e-9 * (hi - lo).abs().max().clamp_min(1.0) + 1e-9 * torch.maximum(lo.abs(), hi.abs())
    lo, hi = lo - pad, hi + pad
    corners = torch.stack(
        [torch.stack([a, b, c]) for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
        dim=1,
    )  # [3, 8]
    hom = proj[:, :, :3] @ corners + proj[:, :, 3:]  # [N, 3, 8]
    x, y, z = hom[:, 0], hom[:, 1], hom[:, 2]
    return (
        (z <= 0).all(dim=1)
        | (x < 0).all(dim=1)
        | (y < 0).all(dim=1)
        | (x >= w * z).all(dim=1)
        | (y >= h * z).all(dim=1)
    )


def _seen(
    pts: Tensor, proj: Tensor, js: Tensor, target: Tensor, h: int, w: int, rel_tol: float, abs_tol: float
) -> Tensor:
    """[B, P] bool: which points ``pts`` [3, P] views ``js`` [B] (matrices ``proj`` [B, 3, 4]) see.

    Element-wise arithmetic only (no matmul), so every (point, view) result is bit-identical
    whatever the block shape and ``chunk`` never changes the output.
    """
    px, py, pz = pts[0][None], pts[1][None], pts[2][None]  # [1, P]

    def row(r: int) -> Tensor:
        m = proj[:, r, :, None]  # [B, 4, 1]
        acc = m[:, 0] * px
        acc.add_(m[:, 1] * py).add_(m[:, 2] * pz).add_(m[:, 3])
        return acc

    hz = row(2)
    u = row(0).div_(hz)
    v = row(1).div_(hz)
    inside = (hz > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    # Flat index into all depth maps, built in float64 (exact for integers below 2^53); points
    # outside index element 0, and ``inside`` discards them (and any inf/NaN from z = 0).
    base = (js * (h * w)).to(torch.float64)[:, None]
    flat = v.floor_().mul_(w).add_(u.floor_()).add_(base)
    flat = torch.where(inside, flat, 0.0).long()
    d = target.take(flat).to(torch.float64)
    tol = hz * rel_tol
    tol.add_(abs_tol)
    return inside & (d.sub_(hz).abs_() <= tol)


def pair_scores(C: Tensor) -> Tensor:
    """AerialMegaDepth-style pair score ``s[i, j] = AM / HM`` of the two overlaps ``(C[i, j], C[j, i])``.

    With ``a = C[i, j]`` and ``b = C[j, i]``::

        s = ((a + b) / 2) / (2 a b / (a + b)) = (a + b)^2 / (4 a b) = 1 + (a - b)^2 / (4 a b)

    ``s`` depends only on the ratio ``r = a / b``, ``s = (1 + r)^2 / (4 r)``: it is 1 for symmetric
    overlap and grows as the pair becomes lopsided (a zoomed or much closer view inside a wide one:
    r = 2 gives 1.125, r = 4 gives 1.5625, r = 10 gives 3.025). It says nothing about *how much* the
    views overlap; that is :func:`rank_pairs`' ``min_overlap``. Lower is better.

    Pairs with zero overlap in either direction have no score (the harmonic mean is 0): they are NaN
    here and never ranked. The diagonal is 1 for views with valid pixels (``C[i, i] = 1``).

    Args:
        C: [N, N] covisibility from :func:`covisibility`.

    Returns:
        [N, N] float64, symmetric, NaN where ``C[i, j] <= 0`` or ``C[j, i] <= 0``.
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [N, N], got {tuple(C.shape)}")
    a = C.to(torch.float64)
    b = a.T
    both = (a > 0) & (b > 0)
    s = (a + b).square() / (4 * a * b)
    return torch.where(both, s, torch.full_like(s, math.nan))


def rank_pairs(
    C: Tensor,
    *,
    altitudes: Tensor | Sequence[float] | None = None,
    bands: Sequence[float] | None = None,
    min_overlap: float = 0.1,
    max_pairs: int | None = None,
    cross_band_only: bool = False,
    one_way: bool = False,
) -> list[tuple[int, int, float, float, float]]:
    """Training pairs from a covisibility matrix, best first.

    ``one_way`` keeps a pair when *either* direction reaches ``min_overlap`` (the other may be 0: the
    score is then infinite) and orders by the stronger direction: aerial–ground pairs are like that,
    a street view is mostly visible from above while it covers a sliver of the aerial view.

    Rule: keep the unordered pairs ``i < j`` whose overlap is at least ``min_overlap`` in *both*
    directions and above 0 (so the score is defined), i.e. each view sees enough of the other;
    with ``cross_band_only`` keep only pairs whose views lie in different altitude bands. The
    two-way threshold also bounds the asymmetry: ``score <= (1 + m)^2 / (4 m)`` for ``m = min_overlap``.

    Order: by the weaker direction's overlap ``min(C[i, j], C[j, i])``, largest first (each view of
    the pair sees at least that fraction of the other); ties by :func:`pair_scores`' score, smallest
    (most symmetric) first; then by ``(i, j)``. ``max_pairs`` keeps the first that many.

    Args:
        C: [N, N] covisibility from :func:`covisibility`.
        altitudes: [N] view altitudes (metres, e.g. camera-centre height above ground).
        bands: increasing band edges in the same unit; band ``k`` is ``[bands[k-1], bands[k])``, so
            ``bands=[50.0]`` splits views into below 50 m (ground) and 50 m and above (aerial).
        min_overlap: minimum overlap, in [0, 1], required both ways.
        max_pairs: keep at most this many pairs (None: all).
        cross_band_only: keep only pairs whose two views fall in different bands; needs ``altitudes``
            and ``bands``.

    Returns:
        ``[(i, j, C[i, j], C[j, i], score), ...]`` with ``i < j``.
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [N, N], got {tuple(C.shape)}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    if max_pairs is not None and (int(max_pairs) != max_pairs or max_pairs < 0):
        raise ValueError(f"max_pairs must be a non-negative integer or None, got {max_pairs}")
    if (altitudes is None) != (bands is None):
        raise ValueError("altitudes and bands go together: pass both or neither")
    if cross_band_only and altitudes is None:
        raise ValueError("cross_band_only needs altitudes and bands")
    n = C.shape[0]
    a = C.detach().to("cpu", torch.float64)
    keep = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    if one_way:
        keep &= ((a >= min_overlap) | (a.T >= min_overlap)) & ((a > 0) | (a.T > 0))
    else:
        keep &= (a >= min_overlap) & (a.T >= min_overlap) & (a > 0) & (a.T > 0)

    if altitudes is not None and bands is not None:
        alt = torch.as_tensor(altitudes, dtype=torch.float64).detach().cpu().reshape(-1)
        edges = torch.as_tensor(list(bands), dtype=torch.float64).reshape(-1)
        if alt.numel() != n:
            raise ValueError(f"altitudes must have {n} entries, got {alt.numel()}")
        if not torch.isfinite(alt).all():
            raise ValueError("altitudes must be finite")
        if edges.numel() == 0 or not torch.isfinite(edges).all() or (edges.diff() <= 0).any():
            raise ValueError(f"bands must be finite, strictly increasing edges, got {list(bands)}")
        band = torch.bucketize(alt, edges, right=True)
        if cross_band_only:
            keep &= band[:, None] != band[None, :]

    ii, jj = torch.nonzero(keep, as_tuple=True)
    if ii.numel() == 0:
        return []
    score = torch.nan_to_num(pair_scores(a), nan=math.inf)
    columns = (ii.tolist(), jj.tolist(), a[ii, jj].tolist(), a[jj, ii].tolist(), score[ii, jj].tolist())
    pairs = list(zip(*columns, strict=True))
    overlap = max if one_way else min
    pairs.sort(key=lambda p: (-overlap(p[2], p[3]), p[4], p[0], p[1]))
    return pairs if max_pairs is None else pairs[: int(max_pairs)]
