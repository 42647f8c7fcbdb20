"""Multi-view tracks and the joint bundle adjustment of every view's RPC correction.

* **Tracks** (:func:`build_tracks`): pairwise matches (a reference view's keypoints found in
  another view) are chained with union-find over observation nodes. A reference-side node is the
  keypoint itself ((view, position): keypoints depend only on their image, so one keypoint is one
  node in every pair it takes part in); a searched-side node is the sub-pixel match. With
  ``merge_px > 0``, nodes of one view closer than that are merged into one node (their mean
  position), which chains matches made from different reference views. A track that still holds
  two different nodes of one view is contradictory and dropped.
* **Joint adjustment** (:func:`joint_adjustment`): each view k gets an image-space correction of
  its projection, ``uv = p + b_k`` (``model="offset"``, the standard RPC bias correction of
  Grodecki & Dial 2003) or ``uv = p + b_k + L_k (p - c)`` (``model="affine"``, c the image centre),
  with p the fitted pinhole's projection. All corrections and all track points are solved together
  by ``scipy.optimize.least_squares`` (finite differences through a sparse Jacobian pattern, soft-L1
  loss). Outliers (data snooping): after each solve, the tracks are re-triangulated from their
  inliers and, per track, the observation with the largest studentized residual beyond
  ``outlier_sigma`` robust sigmas is left out (:func:`standardized_inliers`; sigma from the median,
  so up to half the observations may be wrong); the problem is re-solved with the soft-L1 scale set
  to that sigma (matching errors are heavy-tailed: moving shadow edges, windows across depth
  edges), until the inliers stop changing (at most ``max_rounds``). Left-out observations are
  tested again every round against their track's point, so one wrongly dropped comes back. Gauge: view 0's
  correction is fixed at zero (``gauge="view0"``) or all views are free (``gauge="mean"``). Image
  data alone cannot tell a common 3D translation t of all points from the image shifts J_k t it
  causes in each view k (in the "view0" gauge one direction is left: along view 0's rays, i.e. a
  height shift, which moves the other views' offsets along their epipolar lines). After the solve the solution is moved along that ambiguity to the smallest
  offsets (least squares over t), which leaves every residual unchanged. A weak prior towards zero
  (``prior_weight`` per pixel) picks the smallest corrections along the affine model's further
  ambiguities (3D affine maps of the scene).

Statistics (:class:`JointAdjustment`) compare the delivered cameras ("before", zero corrections,
points triangulated from all their observations) with the adjusted ones ("after"): reprojection
errors per view and on tracks of >= 3 views, and the height of each track point triangulated from
every pair of its views, whose spread shows whether the views agree with each other and not only
pair by pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix
from scipy.spatial import cKDTree

from skyfall.prepare.matching import Matches, pixel_rays, triangulate

Camera = tuple[np.ndarray, np.ndarray]  # (K [3, 3], c2w [4, 4])


@dataclass
class Tracks:
    """Observations grouped by track.

    Attributes:
        view: [O] view index of each observation; track: [O] its track index; uv: [O, 2] pixels.
        n_tracks: number of tracks (indices 0..n_tracks-1, each with >= 2 views, one observation per view).
        dropped_conflicts: tracks dropped because they held two different nodes of one view.
    """

    view: np.ndarray
    track: np.ndarray
    uv: np.ndarray
    n_tracks: int
    dropped_conflicts: int = 0

    def lengths(self) -> np.ndarray:
        """[n_tracks] number of views of each track."""
        return np.bincount(self.track, minlength=self.n_tracks)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=int)


def build_tracks(matches: list[Matches], merge_px: float = 0.0) -> Tracks:
    """Chain pairwise matches into tracks (module docstring)."""
    node_view: list[int] = []
    node_uv: list[tuple[float, float]] = []
    ref_nodes: dict[tuple[int, float, float], int] = {}
    edges: list[tuple[int, int]] = []
    for m in matches:
        for (u0, v0), (uk, vk) in zip(m.uv0, m.uvk, strict=True):
            key = (m.ref, float(u0), float(v0))
            a = ref_nodes.get(key)
            if a is None:
                a = ref_nodes[key] = len(node_view)
                node_view.append(m.ref)
                node_uv.append((u0, v0))
            node_view.append(m.view)
            node_uv.append((uk, vk))
            edges.append((a, len(node_view) - 1))
    n = len(node_view)
    views = np.array(node_view, dtype=int)
    uvs = np.array(node_uv, dtype=float).reshape(-1, 2)
    # Same-view merging: one "node cluster" per distinct image position of a view.
    same = _UnionFind(n)
    if merge_px > 0:
        for v in np.unique(views):
            idx = np.flatnonzero(views == v)
            for a, b in cKDTree(uvs[idx]).query_pairs(merge_px):
                same.union(int(idx[a]), int(idx[b]))
    cluster = same.roots()
    chain = _UnionFind(n)
    for i in range(n):
        chain.union(i, int(cluster[i]))
    for a, b in edges:
        chain.union(a, b)
    comp = chain.roots()
    out_view, out_track, out_uv = [], [], []
    n_tracks = dropped = 0
    order = np.lexsort((cluster, views, comp))
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for grp in np.split(order, bounds):
        if len(grp) == 0:
            continue
        g_views = views[grp]
        g_clusters = cluster[grp]
        per_view = {}
        conflict = False
        for v, c in zip(g_views, g_clusters, strict=True):
            if per_view.setdefault(int(v), int(c)) != int(c):
                conflict = True
                break
        if conflict:
            dropped += 1
            continue
        if len(per_view) < 2:
            continue
        for v in sorted(per_view):
            sel = grp[g_views == v]
            out_view.append(v)
            out_track.append(n_tracks)
            out_uv.append(uvs[sel].mean(axis=0))
        n_tracks += 1
    return Tracks(
        view=np.array(out_view, dtype=int),
        track=np.array(out_track, dtype=int),
        uv=np.array(out_uv, dtype=float).reshape(-1, 2),
        n_tracks=n_tracks,
        dropped_conflicts=dropped,
    )


@dataclass
class Correction:
    """Image-space corrections of V views: ``uv = p + offset + linear @ (p - centre)`` (pixels)."""

    offset: np.ndarray  # [V, 2]
    linear: np.ndarray  # [V, 2, 2] (zero for the offset model)
    centre: np.ndarray  # [2]

    @classmethod
    def zero(cls, n_views: int, centre: np.ndarray) -> Correction:
        return cls(np.zeros((n_views, 2)), np.zeros((n_views, 2, 2)), np.asarray(centre, float))

    def apply(self, view: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Pinhole pixels p [N, 2] of views ``view`` [N] -> corrected pixels."""
        d = p - self.centre
        return p + self.offset[view] + np.einsum("nij,nj->ni", self.linear[view], d)

    def undo(self, view: np.ndarray, uv: np.ndarray) -> np.ndarray:
        """Observed pixels -> the pinhole pixels that the correction maps onto them."""
        a = np.eye(2) + self.linear[view]
        rhs = uv - self.offset[view] - self.centre
        return np.linalg.solve(a, rhs[..., None])[..., 0] + self.centre


def project_views(cams: list[Camera], view: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Project points xyz [N, 3] with the pinhole of view[n] each -> pixels [N, 2]."""
    Ks = np.stack([c[0] for c in cams])[view]
    c2w = np.stack([c[1] for c in cams])[view]
    cam = np.einsum("nji,nj->ni", c2w[:, :3, :3], xyz - c2w[:, :3, 3])  # R^T (x - C)
    uvw = np.einsum("nij,nj->ni", Ks, cam)
    return uvw[:, :2] / uvw[:, 2:3]


def triangulate_tracks(
    cams: list[Camera], tracks: Tracks, corr: Correction, keep: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares ray intersection of every track from its (kept) observations -> [T, 3] (NaN if < 2)."""
    keep = np.ones(len(tracks.view), bool) if keep is None else keep
    uv = corr.undo(tracks.view, tracks.uv)
    a = np.zeros((tracks.n_tracks, 3, 3))
    b = np.zeros((tracks.n_tracks, 3))
    for k, (K, c2w) in enumerate(cams):
        sel = keep & (tracks.view == k)
        if not sel.any():
            continue
        origin, d = pixel_rays(K, c2w, uv[sel])
        proj = np.eye(3) - d[:, :, None] * d[:, None, :]
        np.add.at(a, tracks.track[sel], proj)
        np.add.at(b, tracks.track[sel], proj @ origin)
    n_obs = np.bincount(tracks.track[keep], minlength=tracks.n_tracks)
    out = np.full((tracks.n_tracks, 3), np.nan)
    ok = n_obs >= 2
    out[ok] = np.linalg.solve(a[ok], b[ok][..., None])[..., 0]
    return out


@dataclass
class JointAdjustment:
    """Result of :func:`joint_adjustment` (pixels of the written images, ENU metres).

    Attributes:
        correction: the solved corrections (view 0's is zero in the "view0" gauge).
        tracks: the tracks; inlier: [O] observations kept by the outlier test.
        points: [T, 3] track points (NaN for tracks left with < 2 inlier observations);
            points_before: the same triangulated with zero corrections.
        err_before, err_after: [O] reprojection error of each observation (px): before with zero
            corrections and points triangulated from the inliers, after with the solved ones.
        pair_heights: {(i, j): (track ids [P], heights before [P], heights after [P])}: each track
            point triangulated from views i and j only (ENU z).
        ray_gap_before_m, ray_gap_after_m: mutual distance of the two rays of every view pair of
            every track (metres).
        n_iter: function evaluations of all solves.
        model, gauge: the options used.
        rounds: outlier rejection rounds (re-solves); dropped: observations left out;
            sigma_px: the robust sigma (px per image axis) of the last rejection round;
            outlier_sigma: the rejection threshold in sigmas.
    """

    correction: Correction
    tracks: Tracks
    inlier: np.ndarray
    points: np.ndarray
    points_before: np.ndarray
    err_before: np.ndarray
    err_after: np.ndarray
    pair_heights: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )
    ray_gap_before_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ray_gap_after_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_iter: int = 0
    model: str = "offset"
    gauge: str = "view0"
    rounds: int = 0
    dropped: int = 0
    sigma_px: float | None = None
    outlier_sigma: float = 0.0

    def good_tracks(self) -> np.ndarray:
        """[T] tracks with >= 2 inlier observations."""
        return np.isfinite(self.points[:, 0])

    def summary(self, n_views: int) -> dict:
        """JSON-ready statistics: per view, track lengths, tracks of >= 3 views, pairwise heights."""
        t = self.tracks
        ok = self.inlier & self.good_tracks()[t.track]
        n_in = np.bincount(t.track[ok], minlength=t.n_tracks)
        long3 = (n_in >= 3)[t.track] & ok
        rms = lambda e: None if len(e) == 0 else float(np.sqrt(np.mean(e**2)))  # noqa: E731
        per_view = []
        for k in range(n_views):
            sel = ok & (t.view == k)
            per_view.append(
                {
                    "offset_px": self.correction.offset[k].tolist(),
                    "linear": self.correction.linear[k].tolist(),
                    "observations": int((t.view == k).sum()),
                    "inliers": int(sel.sum()),
                    "rms_before_px": rms(self.err_before[sel]),
                    "rms_after_px": rms(self.err_after[sel]),
                    "rms_tracks3_before_px": rms(self.err_before[sel & long3]),
                    "rms_tracks3_after_px": rms(self.err_after[sel & long3]),
                }
            )
        hist = np.bincount(n_in[n_in >= 2], minlength=n_views + 1)
        pairs = {}
        spread_b, spread_a = _height_spread(self.pair_heights, t.n_tracks)
        for (i, j), (ids, hb, ha) in sorted(self.pair_heights.items()):
            # Signed bias of this pair's heights against the all-view heights of the same tracks
            # (>= 3 views only: on a 2-view track the two agree by construction).
            sel = n_in[ids] >= 3
            zb = self.points_before[ids[sel], 2]
            za = self.points[ids[sel], 2]
            pairs[f"{i}-{j}"] = {
                "tracks": int(len(ids)),
                "tracks3": int(sel.sum()),
                "median_dz_before_m": _median(hb[sel] - zb),
                "median_dz_after_m": _median(ha[sel] - za),
            }
        return {
            "model": self.model,
            "gauge": self.gauge,
            "views": per_view,
            "track_length_histogram": {str(n): int(c) for n, c in enumerate(hist) if n >= 2 and c},
            "tracks": int(self.good_tracks().sum()),
            "observations": int(len(t.view)),
            "inliers": int(ok.sum()),
            "conflicting_tracks_dropped": int(t.dropped_conflicts),
            "outliers": {
                "dropped": int(self.dropped),
                "rounds": int(self.rounds),
                "sigma_px": self.sigma_px,
                "n_sigma": self.outlier_sigma,
            },
            "reproj_rms_before_px": rms(self.err_before[ok]),
            "reproj_rms_after_px": rms(self.err_after[ok]),
            "reproj_rms_tracks3_before_px": rms(self.err_before[long3]),
            "reproj_rms_tracks3_after_px": rms(self.err_after[long3]),
            "pair_height_spread_m": {
                "median_before": _median(spread_b),
                "median_after": _median(spread_a),
                "tracks": int(len(spread_a)),
            },  # fmt: skip
            "pairs": pairs,
        }


def _fix_translation(cams: list[Camera], corr: Correction, pts: np.ndarray, gauge: str) -> None:
    """Move the solution along its translation ambiguity to the smallest offsets (in place).

    Moving every point by t and every offset by −J_k t (J_k: view k's image shift per metre at the
    scene centre) leaves all residuals unchanged to ~1e-4 px over a scene 1e-3 of the orbit
    distance across. t is restricted to view 0's null direction (its ray) in the "view0" gauge.
    """
    centre = np.nanmedian(pts, axis=0)
    n = len(cams)
    base = project_views(cams, np.arange(n), np.repeat(centre[None], n, 0))
    jac = np.stack(
        [project_views(cams, np.arange(n), np.repeat((centre + e)[None], n, 0)) - base for e in np.eye(3)], -1
    )
    basis = np.linalg.svd(jac[0])[2][-1:].T if gauge == "view0" else np.eye(3)  # [3, m]
    a = (jac @ basis).reshape(-1, basis.shape[1])
    s, *_ = np.linalg.lstsq(a, corr.offset.ravel(), rcond=None)
    t = basis @ s
    corr.offset -= jac @ t
    if gauge == "view0":
        corr.offset[0] = 0.0
    pts += t


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if len(x) else None


def _height_spread(
    pair_heights: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]], n_tracks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per track seen by >= 2 pairs: max - min of its pairwise heights, before and after."""
    lo_b = np.full(n_tracks, np.inf)
    hi_b = np.full(n_tracks, -np.inf)
    lo_a, hi_a = lo_b.copy(), hi_b.copy()
    cnt = np.zeros(n_tracks, int)
    for ids, hb, ha in pair_heights.values():
        np.minimum.at(lo_b, ids, hb)
        np.maximum.at(hi_b, ids, hb)
        np.minimum.at(lo_a, ids, ha)
        np.maximum.at(hi_a, ids, ha)
        np.add.at(cnt, ids, 1)
    sel = cnt >= 2
    return (hi_b - lo_b)[sel], (hi_a - lo_a)[sel]


def standardized_inliers(
    res: np.ndarray, jac: np.ndarray, tracks: Tracks, keep: np.ndarray, n_sigma: float, floor_px: float = 0.0
) -> tuple[np.ndarray, float]:
    """One round of the outlier test: the inliers at ``n_sigma`` robust sigmas, and sigma (px per axis).

    Studentized residuals (data snooping): with isotropic Gaussian errors of sigma per image axis
    and J_i the 2 x 3 derivative of observation i's projection by its track point, the least-squares
    residual of a kept observation has covariance sigma² (I - J_i N⁻¹ J_iᵀ), N = sum of J_jᵀ J_j over
    the track's kept observations, and the prediction error of a left-out one sigma² (I + J_i N⁻¹
    J_iᵀ). So s_i = rᵀ C⁺ r is sigma² chi²(d), d the rank of C: 2, except 1 on a 2-view track (only
    the component across the epipolar line shows). Sigma² is the median of s_i over the median of
    its chi²(d) (robust to half the observations being outliers); an observation is beyond the limit
    when s_i exceeds sigma² times the chi²(d) quantile exceeded with the probability that a 2-D
    Gaussian error exceeds ``n_sigma`` sigmas, exp(-n_sigma² / 2) (1.1 % for 3, 13.5 % for 2), or
    ``floor_px²`` if larger. One outlier pulls its track's point and inflates its partners'
    residuals, so per track only the kept observation furthest beyond the limit leaves in one call;
    observations already out stay out while they are beyond it (their s_i is then the prediction
    error of the track's point).

    Args:
        res: [O, 2] residuals from least-squares points of the inliers (NaN for tracks without one).
        jac: [O, 2, 3] derivatives of each observation's projection by its track point.
        tracks: the tracks; keep: [O] the current inliers (they define N).
        n_sigma: the rejection threshold in sigmas; floor_px: lower bound of the threshold (px).

    Returns:
        The new inliers [O] and sigma.
    """
    from scipy.stats import chi2

    fin = np.isfinite(res).all(1)
    if not fin.any():
        return fin, 0.0
    use = keep & fin
    normal = np.zeros((tracks.n_tracks, 3, 3))
    np.add.at(normal, tracks.track[use], np.einsum("oij,oik->ojk", jac[use], jac[use]))
    ok_t = np.linalg.matrix_rank(normal) == 3
    inv = np.zeros_like(normal)
    inv[ok_t] = np.linalg.inv(normal[ok_t])
    fin &= ok_t[tracks.track]
    hat = np.einsum("oij,ojk,olk->oil", jac, inv[tracks.track], jac)
    cov = np.eye(2) + np.where(use[:, None, None], -hat, hat)
    w, v = np.linalg.eigh(cov)
    rank = (w > 1e-6 * w[:, -1:]).sum(1)
    proj = np.einsum("oji,oj->oi", v, np.where(fin[:, None], res, 0.0))
    s = np.where(w > 1e-6 * w[:, -1:], proj**2 / np.maximum(w, 1e-300), 0.0).sum(1)
    dof = np.clip(rank, 1, 2)
    null_median = np.where(dof == 1, chi2.median(1), chi2.median(2))
    sigma2 = float(np.median(s[fin] / null_median[fin]))
    alpha = math.exp(-0.5 * n_sigma**2)
    limit = np.where(dof == 1, chi2.isf(alpha, 1), chi2.isf(alpha, 2)) * sigma2
    above = fin & (s > np.maximum(limit, floor_px**2))
    # One outlier pulls its track's point and inflates its partners' residuals: per track, only the
    # worst kept observation beyond the limit leaves in a round (the others are tested again after
    # the re-solve); left-out observations stay out while they are beyond it.
    ratio = np.where(above, s / np.maximum(limit, 1e-300), 0.0)
    worst = np.zeros(tracks.n_tracks)
    np.maximum.at(worst, tracks.track[above & use], ratio[above & use])
    out = above & (~use | (ratio >= worst[tracks.track]))
    return fin & ~out, math.sqrt(sigma2)


def joint_adjustment(
    cams: list[Camera],
    tracks: Tracks,
    image_size: tuple[int, int],
    *,
    model: str = "offset",
    gauge: str = "view0",
    f_scale: float = 0.5,
    outlier_sigma: float = 3.0,
    outlier_px: float = 0.0,
    max_rounds: int = 10,
    prior_weight: float = 1e-3,
    max_nfev: int = 100,
) -> JointAdjustment:
    """Solve every view's image correction jointly with the track points (module docstring).

    Args:
        cams: (K, c2w) of each view's fitted pinhole.
        tracks: observations (:func:`build_tracks`).
        image_size: (width, height) of the images (the affine model's centre is their middle).
        model: "offset" (2 parameters per view) or "affine" (6).
        gauge: "view0" (view 0 fixed) or "mean" (all free; the smallest corrections are chosen).
        f_scale: soft-L1 loss scale (px) of the first solve: residuals beyond it count linearly.
            The solves after a rejection round use the robust sigma of that round instead.
        outlier_sigma: observations whose studentized residual exceeds this many robust sigmas are
            left out of the next solve (:func:`standardized_inliers`); 0 keeps every observation.
        outlier_px: lower bound (px) of that rejection threshold.
        max_rounds: rejection and re-solve rounds at most (they stop when the inliers do not change
            or come back to an earlier set).
        prior_weight: weight of the prior towards zero correction (per pixel of correction).
        max_nfev: function evaluations per solve.
    """
    if model not in ("offset", "affine"):
        raise ValueError(f"model must be 'offset' or 'affine', got {model!r}")
    if gauge not in ("view0", "mean"):
        raise ValueError(f"gauge must be 'view0' or 'mean', got {gauge!r}")
    n_views = len(cams)
    npar = 2 if model == "offset" else 6
    free = list(range(1, n_views)) if gauge == "view0" else list(range(n_views))
    slot = np.full(n_views, -1)
    slot[free] = np.arange(len(free))
    nv = npar * len(free)
    centre = 0.5 * np.asarray(image_size, float)
    # Linear terms are parameterised by their effect at the image border (px), like the offsets.
    lin_scale = 1.0 / max(float(centre.max()), 1.0)

    def correction(x: np.ndarray) -> Correction:
        c = Correction.zero(n_views, centre)
        q = x[:nv].reshape(len(free), npar)
        c.offset[free] = q[:, :2]
        if model == "affine":
            c.linear[free] = q[:, 2:].reshape(-1, 2, 2) * lin_scale
        return c

    def solve(x0_corr: np.ndarray, keep: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
        corr0 = correction(x0_corr)
        pts0 = triangulate_tracks(cams, tracks, corr0, keep)
        use_t = np.isfinite(pts0[:, 0])
        obs = keep & use_t[tracks.track]
        compact = np.cumsum(use_t) - 1
        o_view, o_track, o_uv = tracks.view[obs], compact[tracks.track[obs]], tracks.uv[obs]
        n_pts = int(use_t.sum())

        def residual(x: np.ndarray) -> np.ndarray:
            pts = x[nv:].reshape(-1, 3)
            p = correction(x).apply(o_view, project_views(cams, o_view, pts[o_track]))
            return np.r_[(p - o_uv).ravel(), prior_weight * x[:nv]]

        n_obs = len(o_view)
        rows, cols = [], []
        ob = np.arange(n_obs)
        for r in (0, 1):
            for c in range(3):
                rows.append(2 * ob + r)
                cols.append(nv + 3 * o_track + c)
            fo = slot[o_view] >= 0
            for c in range(npar):
                rows.append(2 * ob[fo] + r)
                cols.append(npar * slot[o_view[fo]] + c)
        rows.append(2 * n_obs + np.arange(nv))
        cols.append(np.arange(nv))
        sparsity = lil_matrix((2 * n_obs + nv, nv + 3 * n_pts), dtype=int)
        sparsity[np.concatenate(rows), np.concatenate(cols)] = 1
        sol = least_squares(
            residual, np.r_[x0_corr, pts0[use_t].ravel()], jac_sparsity=sparsity, loss="soft_l1",
            f_scale=scale, x_scale="jac", method="trf", max_nfev=max_nfev, xtol=1e-12, ftol=1e-12,
        )  # fmt: skip
        pts = np.full((tracks.n_tracks, 3), np.nan)
        pts[use_t] = sol.x[nv:].reshape(-1, 3)
        return sol.x[:nv], pts, int(sol.nfev)

    def residuals(corr: Correction, pts: np.ndarray) -> np.ndarray:
        return corr.apply(tracks.view, project_views(cams, tracks.view, pts[tracks.track])) - tracks.uv

    def errors(corr: Correction, pts: np.ndarray) -> np.ndarray:
        return np.linalg.norm(residuals(corr, pts), axis=1)

    def point_jacobians(corr: Correction, pts: np.ndarray) -> np.ndarray:
        """[O, 2, 3] derivative of each observation's corrected projection by its point (1 cm steps)."""
        p = np.nan_to_num(pts[tracks.track])
        base = corr.apply(tracks.view, project_views(cams, tracks.view, p))
        cols = [
            corr.apply(tracks.view, project_views(cams, tracks.view, p + 0.01 * e)) - base for e in np.eye(3)
        ]
        return np.stack(cols, -1) / 0.01

    keep = np.ones(len(tracks.view), bool)
    x, pts, nfev = solve(np.zeros(nv), keep, f_scale)
    rounds = 0
    sigma = None
    seen = {keep.tobytes()}
    while outlier_sigma > 0 and rounds < max_rounds:
        # The test's statistics hold for least-squares points: re-triangulate the robust solution's
        # tracks from their inliers (the corrections stay the robust ones).
        c = correction(x)
        p_ls = triangulate_tracks(cams, tracks, c, keep)
        new_keep, sigma = standardized_inliers(
            residuals(c, p_ls), point_jacobians(c, p_ls), tracks, keep, outlier_sigma, outlier_px
        )
        if new_keep.tobytes() in seen:  # unchanged, or a cycle between borderline observations
            break
        seen.add(new_keep.tobytes())
        keep = new_keep
        x, pts, n = solve(x, keep, max(sigma, 1e-3))
        nfev += n
        rounds += 1
    corr = correction(x)
    good = np.isfinite(pts[:, 0])
    if good.any():
        _fix_translation(cams, corr, pts, gauge)
    keep &= good[tracks.track]
    zero = Correction.zero(n_views, centre)
    pts_before = triangulate_tracks(cams, tracks, zero, keep)
    err_before = errors(zero, pts_before)
    err_after = errors(corr, pts)

    obs_of = np.full((tracks.n_tracks, n_views), -1)
    obs_of[tracks.track[keep], tracks.view[keep]] = np.flatnonzero(keep)
    pair_heights = {}
    gaps_b, gaps_a = [], []
    for i, j in combinations(range(n_views), 2):
        ids = np.flatnonzero((obs_of[:, i] >= 0) & (obs_of[:, j] >= 0))
        if len(ids) == 0:
            continue
        oi, oj = obs_of[ids, i], obs_of[ids, j]
        hb = []
        for c in (zero, corr):
            uvi = c.undo(np.full(len(ids), i), tracks.uv[oi])
            uvj = c.undo(np.full(len(ids), j), tracks.uv[oj])
            p, g = triangulate([cams[i], cams[j]], [uvi, uvj])
            hb.append(p[:, 2])
            (gaps_b if c is zero else gaps_a).append(g)
        pair_heights[(i, j)] = (ids, hb[0], hb[1])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return JointAdjustment(
        correction=corr, tracks=tracks, inlier=keep, points=pts, points_before=pts_before,
        err_before=err_before, err_after=err_after, pair_heights=pair_heights,
        ray_gap_before_m=cat(gaps_b), ray_gap_after_m=cat(gaps_a), n_iter=nfev,
        model=model, gauge=gauge, rounds=rounds, dropped=int(len(keep) - keep.sum()), sigma_px=sigma,
        outlier_sigma=outlier_sigma,
    )  # fmt: skip
