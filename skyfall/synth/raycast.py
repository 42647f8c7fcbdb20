"""Vectorised ray casting of boxes and ellipsoids in torch, with two culling schemes.

* **Primary rays** are grouped into 16x16 pixel blocks. A primitive is a candidate for a block when
  its projected AABB overlaps the block's pixel rectangle (conservative: primitives that cross the
  camera plane count for every block). Blocks are sorted by candidate count and processed in chunks
  padded to the chunk's largest count, so padding waste stays small.
* **Shadow rays** are all parallel to the sun direction ``s``. Every point of such a ray projects
  (along ``s``) to the same ground point, so primitives are binned on a ground grid by the
  projection of their AABB along ``s``; a shadow ray only tests the primitives of its cell.

Oriented boxes: a box may carry a yaw (turned about the vertical axis through its centre). Its slab
test runs in the box's own frame (ray origin relative to the box centre and direction turned by
-yaw), and the culling above uses the world bounding box of the turned box. Scenes without any yaw
take the plain axis-aligned path, bit for bit as before yaws existed.

Precision: satellite cameras are ~1e6 m away, so rays are generated in float64 and their origins are
moved along the ray to just before the scene's bounding box (still float64); the intersection tests
then run in float32 on local distances and the float64 offset is added back for the depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from skyfall.data.cameras import Cameras

BLOCK = 16
_T_EPS = 1e-4  # minimum hit distance (m) of primary rays
_CHUNK_ELEMS = 1_500_000  # rays x candidates per chunk: bounds the temporaries to ~tens of MB


@dataclass
class Primitives:
    """Scene primitives as float32 tensors (world metres).

    ``box_yaw`` (None: all 0) turns box i about the vertical axis through its centre by ``box_yaw[i]``
    radians, counter-clockwise seen from above; ``box_lo``/``box_hi`` are the box before the turn.
    """

    box_lo: Tensor  # [B, 3]
    box_hi: Tensor  # [B, 3]
    ell_c: Tensor  # [E, 3]
    ell_r: Tensor  # [E, 3]
    box_casts_shadow: Tensor  # [B] bool (the ground slab does not)
    box_yaw: Tensor | None = None  # [B] radians

    def __post_init__(self) -> None:
        self.oriented = self.box_yaw is not None and bool((self.box_yaw != 0).any())
        if self.oriented:
            # Per-box frames, precomputed once: centre, half extents, (cos, sin) of the yaw.
            self.box_c = 0.5 * (self.box_lo + self.box_hi)
            self.box_h = 0.5 * (self.box_hi - self.box_lo)
            yaw = self.box_yaw.float()
            self.box_cs = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)

    @property
    def n_boxes(self) -> int:
        return self.box_lo.shape[0]

    def box_aabbs(self) -> tuple[Tensor, Tensor]:
        """[B, 3] world bounding boxes of the (turned) boxes, float64; exact for unturned ones."""
        lo, hi = self.box_lo.double(), self.box_hi.double()
        if not self.oriented:
            return lo, hi
        c, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
        ac, as_ = self.box_cs.double().abs().unbind(-1)
        hw = torch.stack([ac * h[:, 0] + as_ * h[:, 1], as_ * h[:, 0] + ac * h[:, 1], h[:, 2]], -1)
        flat = (self.box_yaw == 0)[:, None]
        return torch.where(flat, lo, c - hw), torch.where(flat, hi, c + hw)

    def aabbs(self) -> tuple[Tensor, Tensor]:
        """[B + E, 3] lower and upper corners of the world bounding boxes of all primitives (boxes first)."""
        blo, bhi = self.box_aabbs()
        lo = torch.cat([blo, (self.ell_c - self.ell_r).double()])
        hi = torch.cat([bhi, (self.ell_c + self.ell_r).double()])
        return lo, hi

    def world_bounds(self, pad: float = 0.5) -> tuple[Tensor, Tensor]:
        lo, hi = self.aabbs()
        return lo.min(0).values - pad, hi.max(0).values + pad


@dataclass
class Hits:
    """Closest hits of a batch of rays."""

    mask: Tensor  # [R] bool
    t: Tensor  # [R] float64 distance along the unit ray from the camera centre (inf on miss)
    prim: Tensor  # [R] int64: box index, or n_boxes + ellipsoid index; -1 on miss
    points: Tensor  # [R, 3] float32 world hit points (0 on miss)


def _safe_inv(d: Tensor) -> Tensor:
    tiny = 1e-12
    return 1.0 / torch.where(d.abs() < tiny, torch.full_like(d, tiny) * torch.where(d < 0, -1.0, 1.0), d)


def _slab(o: Tensor, inv: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays vs boxes; shapes broadcast: o, inv [..., 3], lo, hi [..., 3]."""
    t0 = (lo - o) * inv
    t1 = (hi - o) * inv
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


def turn_xy(v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Vectors ``v`` [..., 3] turned about z by the angle of (``cos``, ``sin``) [...]; shapes broadcast."""
    x = cos * v[..., 0] - sin * v[..., 1]
    y = sin * v[..., 0] + cos * v[..., 1]
    return torch.stack(torch.broadcast_tensors(x, y, v[..., 2]), -1)


def _box_interval(
    prims: Primitives, o: Tensor, d: Tensor, inv: Tensor, gather: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays (o, d, inv = 1/d) vs boxes of ``prims``; shapes broadcast.

    ``gather`` picks the candidate boxes' rows out of a [B, ...] per-box tensor (and adds the axes that
    broadcast them against the rays). Turned boxes are tested in their own frame: the ray origin
    relative to the box centre and its direction are turned by -yaw, where the box is axis-aligned.
    """
    if not prims.oriented:
        return _slab(o, inv, gather(prims.box_lo), gather(prims.box_hi))
    c, h, cs = gather(prims.box_c), gather(prims.box_h), gather(prims.box_cs)
    cos, sin = cs[..., 0], cs[..., 1]
    qx, qy = o[..., 0] - c[..., 0], o[..., 1] - c[..., 1]
    dx, dy = d[..., 0], d[..., 1]
    # Per axis, the slab [-h, h] of a ray q + t u (u's inverse r) spans t in -q r -/+ h |r|; the
    # z axis is the same in both frames. Written per axis, without stacking [.., 3] temporaries:
    # this is the inner loop of every non-default city.
    t_in = (c[..., 2] - o[..., 2]) * inv[..., 2]
    t_half = h[..., 2] * inv[..., 2].abs()
    t_in, t_out = t_in - t_half, t_in + t_half
    for q, u, hh in ((cos * qx + sin * qy, cos * dx + sin * dy, h[..., 0]),
                     (cos * qy - sin * qx, cos * dy - sin * dx, h[..., 1])):  # fmt: skip
        r = 1.0 / (u + torch.copysign(torch.tensor(1e-12), u))  # never 0: no 0 * inf = NaN
        mid, half = -q * r, hh * r.abs()
        t_in = torch.maximum(t_in, mid - half)
        t_out = torch.minimum(t_out, mid + half)
    return t_in, t_out


def _ellipsoid(o: Tensor, d: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays vs axis-aligned ellipsoids (NaN-free: misses give t_in > t_out)."""
    oc = (o - c) / r
    dd = d / r
    a = (dd * dd).sum(-1)
    tc = -(oc * dd).sum(-1) / a
    # Stable discriminant from the closest-approach distance (avoids b^2 - ac cancellation).
    perp = oc + tc[..., None] * dd
    h2 = (1.0 - (perp * perp).sum(-1)) / a
    h = torch.sqrt(h2.clamp_min(0.0))
    miss = h2 < 0
    t_in = torch.where(miss, torch.full_like(tc, float("inf")), tc - h)
    t_out = torch.where(miss, torch.full_like(tc, -float("inf")), tc + h)
    return t_in, t_out


def camera_rays(cameras: Cameras, ci: int, width: int, height: int) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 rays through the pixel centres of a (padded) ``height`` x ``width`` grid.

    Returns:
        origins [H*W, 3], unit directions [H*W, 3], and ``zscale`` [H*W] (camera z per unit distance).
    """
    k = cameras.Ks[ci]
    c2w = cameras.camtoworlds[ci]
    jj = torch.arange(width, dtype=torch.float64) + 0.5
    ii = torch.arange(height, dtype=torch.float64) + 0.5
    v, u = torch.meshgrid(ii, jj, indexing="ij")
    x = (u - k[0, 2] - k[0, 1] * (v - k[1, 2]) / k[1, 1]) / k[0, 0]
    y = (v - k[1, 2]) / k[1, 1]
    dc = torch.stack([x, y, torch.ones_like(x)], -1).reshape(-1, 3)
    norm = dc.norm(dim=-1)
    d = (dc / norm[:, None]) @ c2w[:3, :3].T
    o = c2w[:3, 3].expand_as(d)
    return o, d, 1.0 / norm


def _projected_blocks(
    cameras: Cameras, ci: int, lo: Tensor, hi: Tensor, nbx: int, nby: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Block ranges [bx0, bx1] x [by0, by1] (inclusive) covered by each AABB's projection, and visibility."""
    corners = torch.stack(
        [
            torch.stack([(lo, hi)[i][:, 0], (lo, hi)[j][:, 1], (lo, hi)[k][:, 2]], -1)
            for i in (0, 1)
            for j in (0, 1)
            for k in (0, 1)
        ],
        1,
    )  # [P, 8, 3]
    uv, z = cameras[ci].project(corners.reshape(-1, 3))
    uv = uv[0].reshape(-1, 8, 2)
    z = z[0].reshape(-1, 8)
    near = 1e-3
    behind = (z <= near).all(1)
    straddle = (z <= near).any(1) & ~behind
    big = torch.tensor(1e18, dtype=torch.float64)
    u = torch.where(z > near, uv[..., 0], big)
    v = torch.where(z > near, uv[..., 1], big)
    umin, vmin = u.amin(1), v.amin(1)
    u = torch.where(z > near, uv[..., 0], -big)
    v = torch.where(z > near, uv[..., 1], -big)
    umax, vmax = u.amax(1), v.amax(1)
    bx0 = torch.floor(umin / BLOCK).clamp(-1, nbx).long()
    bx1 = torch.floor(umax / BLOCK).clamp(-1, nbx).long()
    by0 = torch.floor(vmin / BLOCK).clamp(-1, nby).long()
    by1 = torch.floor(vmax / BLOCK).clamp(-1, nby).long()
    bx0 = torch.where(straddle, 0, bx0)
    by0 = torch.where(straddle, 0, by0)
    bx1 = torch.where(straddle, nbx - 1, bx1)
    by1 = torch.where(straddle, nby - 1, by1)
    visible = ~behind & (bx1 >= 0) & (bx0 <= nbx - 1) & (by1 >= 0) & (by0 <= nby - 1)
    return bx0, bx1, by0, by1, visible


def _overlap(bx0: Tensor, bx1: Tensor, by0: Tensor, by1: Tensor, vis: Tensor, nbx: int, nby: int) -> Tensor:
    """[nby * nbx, P] bool: primitive p may be seen in block b."""
    gx = torch.arange(nbx)
    gy = torch.arange(nby)
    ox = (gx[None] >= bx0[:, None]) & (gx[None] <= bx1[:, None]) & vis[:, None]  # [P, nbx]
    oy = (gy[None] >= by0[:, None]) & (gy[None] <= by1[:, None])  # [P, nby]
    return (oy.T[:, None, :] & ox.T[None, :, :]).reshape(nby * nbx, -1)


def _candidates(ov: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """First ``k`` True columns of each row of ``ov`` [n, P] -> indices [n, k], valid [n, k]."""
    n = ov.shape[0]
    idx = torch.zeros(n, k, dtype=torch.long)
    valid = torch.zeros(n, k, dtype=torch.bool)
    if k == 0 or ov.shape[1] == 0:
        return idx, valid
    # Rank of each True entry within its row (a cumulative count), then scatter: O(nP), no sort.
    rank = ov.cumsum(1, dtype=torch.int32) - 1
    rows, cols = torch.nonzero(ov & (rank < k), as_tuple=True)
    slot = rank[rows, cols].long()
    idx[rows, slot] = cols
    valid[rows, slot] = True
    return idx, valid


def _closest(
    o: Tensor, d: Tensor, prims: Primitives, bidx: Tensor, bval: Tensor, eidx: Tensor, evalid: Tensor
) -> tuple[Tensor, Tensor]:
    """Closest hit among per-group candidates. o, d [n, m, 3] f32; idx/valid [n, K]. -> t [n, m], prim [n, m]."""
    n, m = o.shape[:2]
    best_t = torch.full((n, m), float("inf"))
    best_p = torch.full((n, m), -1, dtype=torch.long)
    if bidx.shape[1]:
        inv = _safe_inv(d)
        tn, tf = _box_interval(
            prims, o[:, :, None], d[:, :, None], inv[:, :, None], lambda a: a[bidx][:, None]
        )
        hit = (tf >= tn) & (tn > _T_EPS) & bval[:, None]
        t = torch.where(hit, tn, torch.full_like(tn, float("inf")))
        tmin, kk = t.min(-1)
        best_t, best_p = tmin, torch.where(torch.isfinite(tmin), bidx.gather(1, kk), best_p)
    if eidx.shape[1]:
        tn, tf = _ellipsoid(
            o[:, :, None], d[:, :, None], prims.ell_c[eidx][:, None], prims.ell_r[eidx][:, None]
        )
        hit = (tf >= tn) & (tn > _T_EPS) & evalid[:, None]
        t = torch.where(hit, tn, torch.full_like(tn, float("inf")))
        tmin, kk = t.min(-1)
        better = tmin < best_t
        best_t = torch.where(better, tmin, best_t)
        best_p = torch.where(better, prims.n_boxes + eidx.gather(1, kk), best_p)
    return best_t, best_p


def trace_camera(cameras: Cameras, ci: int, prims: Primitives) -> tuple[Hits, Tensor, Tensor]:
    """Cast one ray per pixel of camera ``ci``.

    Returns:
        hits (flattened over the H x W image, row-major), unit ray directions [H*W, 3] float64, and
        zscale [H*W] float64 (camera-space z = t * zscale).
    """
    w, h = cameras.width, cameras.height
    nbx, nby = -(-w // BLOCK), -(-h // BLOCK)
    pw, ph = nbx * BLOCK, nby * BLOCK
    o, d, zscale = camera_rays(cameras, ci, pw, ph)

    # Rebase origins to just before the scene box (float64), so float32 works on local distances.
    wlo, whi = prims.world_bounds()
    t_in, t_out = _slab(o, _safe_inv(d), wlo, whi)
    inside = t_out >= t_in.clamp_min(0.0)
    t_base = torch.where(inside, (t_in - 1.0).clamp_min(0.0), torch.zeros_like(t_in))
    o_loc = (o + t_base[:, None] * d).float()
    d32 = d.float()

    # [nblk, BLOCK*BLOCK] ray index per block.
    pix = torch.arange(ph * pw).reshape(nby, BLOCK, nbx, BLOCK).permute(0, 2, 1, 3).reshape(nby * nbx, -1)
    lo, hi = prims.aabbs()
    bx0, bx1, by0, by1, vis = _projected_blocks(cameras, ci, lo, hi, nbx, nby)
    ov = _overlap(bx0, bx1, by0, by1, vis, nbx, nby)
    blk_has_ray = inside[pix].any(1)
    ov &= blk_has_ray[:, None]
    ovb, ove = ov[:, : prims.n_boxes], ov[:, prims.n_boxes :]
    cb, ce = ovb.sum(1), ove.sum(1)
    order = torch.argsort(cb + ce, descending=True)
    order = order[(cb + ce)[order] > 0]

    t_loc = torch.full((ph * pw,), float("inf"))
    prim = torch.full((ph * pw,), -1, dtype=torch.long)
    m = BLOCK * BLOCK
    start = 0
    while start < len(order):
        kmax = int((cb + ce)[order[start]])
        nblk = max(1, _CHUNK_ELEMS // (m * max(kmax, 1)))
        sel = order[start : start + nblk]
        start += nblk
        bidx, bval = _candidates(ovb[sel], int(cb[sel].max()))
        eidx, evalid = _candidates(ove[sel], int(ce[sel].max()))
        rays = pix[sel]
        tt, pp = _closest(o_loc[rays], d32[rays], prims, bidx, bval, eidx, evalid)
        t_loc[rays.reshape(-1)] = tt.reshape(-1)
        prim[rays.reshape(-1)] = pp.reshape(-1)

    # Crop the block padding back to the image.
    keep = torch.arange(ph * pw).reshape(ph, pw)[:h, :w].reshape(-1)
    t_loc, prim, o_loc, d32, d, zscale, t_base = (
        x[keep] for x in (t_loc, prim, o_loc, d32, d, zscale, t_base)
    )
    mask = torch.isfinite(t_loc) & (prim >= 0)
    points = torch.where(mask[:, None], o_loc + t_loc[:, None] * d32, torch.zeros_like(o_loc))
    t = torch.where(mask, t_base + t_loc.double(), torch.full_like(t_base, float("inf")))
    return Hits(mask, t, prim, points), d, zscale


class ShadowGrid:
    """Sun-projection binning of the shadow casters, built once per sun direction.

    Args:
        prims: the scene.
        sun: [3] unit direction towards the sun (z > 0).
        cell: ground-grid cell size (m).
    """

    def __init__(self, prims: Primitives, sun: Tensor, cell: float = 4.0) -> None:
        self.prims = prims
        self.sun = sun.float()
        self.cell = cell
        self.sxy = self.sun[:2] / self.sun[2]
        lo, hi = prims.aabbs()
        lo, hi = lo.float(), hi.float()
        caster = torch.cat([prims.box_casts_shadow, torch.ones(len(prims.ell_c), dtype=torch.bool)])
        ids = torch.nonzero(caster).squeeze(1)
        self.empty = len(ids) == 0
        if self.empty:
            return
        # Project AABB corners along the sun onto z = 0: a shadow ray's ground projection is one point.
        pts = []
        for z in (lo[:, 2], hi[:, 2]):
            for x in (lo[:, 0], hi[:, 0]):
                for y in (lo[:, 1], hi[:, 1]):
                    pts.append(torch.stack([x - self.sxy[0] * z, y - self.sxy[1] * z], -1))
        cxy = torch.stack(pts, 1)[ids]  # [P, 8, 2]
        plo, phi = cxy.amin(1), cxy.amax(1)
        self.g0 = plo.amin(0)
        self.nx, self.ny = (((phi.amax(0) - self.g0) / cell).floor().long() + 1).tolist()
        c0 = ((plo - self.g0) / cell).floor().long()
        c1 = ((phi - self.g0) / cell).floor().long()
        ov = _overlap(
            c0[:, 0], c1[:, 0], c0[:, 1], c1[:, 1], torch.ones(len(ids), dtype=torch.bool), self.nx, self.ny
        )
        self.counts = ov.sum(1)  # [cells]
        cidx, self.cand_val = _candidates(ov, int(self.counts.max()))
        self.cand_idx = ids[cidx]  # [cells, K] global primitive ids

    def visible(self, points: Tensor) -> Tensor:
        """[R] bool: True where ``points`` [R, 3] (already offset off their surface) see the sun."""
        lit = torch.ones(points.shape[0], dtype=torch.bool)
        if self.empty or points.shape[0] == 0:
            return lit
        prims, sun = self.prims, self.sun
        q = points[:, :2] - self.sxy[None] * points[:, 2:3]
        qi = ((q - self.g0) / self.cell).floor().long()
        in_grid = (qi[:, 0] >= 0) & (qi[:, 0] < self.nx) & (qi[:, 1] >= 0) & (qi[:, 1] < self.ny)
        cell_id = torch.where(in_grid, qi[:, 1] * self.nx + qi[:, 0], torch.zeros_like(qi[:, 0]))
        rc = torch.where(in_grid, self.counts[cell_id], torch.zeros_like(cell_id))
        order = torch.argsort(rc, descending=True)
        order = order[rc[order] > 0]
        n_boxes, n_ell = prims.n_boxes, len(prims.ell_c)
        inv = _safe_inv(sun)
        start = 0
        while start < len(order):
            k = int(rc[order[start]])
            sel = order[start : start + max(1, _CHUNK_ELEMS // max(k, 1))]
            start += len(sel)
            ci = self.cand_idx[cell_id[sel], :k]
            cv = self.cand_val[cell_id[sel], :k]
            o = points[sel][:, None]
            is_box = ci < n_boxes
            bi = ci.clamp_max(n_boxes - 1)
            tn, tf = _box_interval(prims, o, sun, inv, lambda a, bi=bi: a[bi])
            hit = (tf >= tn.clamp_min(0)) & (tf > 1e-3)  # an origin inside a caster is shadowed too
            if n_ell:
                ei = (ci - n_boxes).clamp(0, n_ell - 1)
                en, ef = _ellipsoid(o, sun.expand_as(o), prims.ell_c[ei], prims.ell_r[ei])
                hit = torch.where(is_box, hit, (ef >= en.clamp_min(0)) & (ef > 1e-3))
            lit[sel] = ~(hit & cv).any(1)
        return lit
