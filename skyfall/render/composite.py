"""Pure-torch alpha compositing with gsplat 1.5.3's rules and a hand-written backward.

Instead of padding [tiles, 256 px, K_max] like a tile rasteriser, the forward pass builds flat
lists of (pixel, Gaussian) pairs, only where ``o * exp(-sigma)`` can reach 1/255: for every row
of a Gaussian's box, the exact x-interval of the ellipse ``sigma <= ln(255 o)``. Gaussians are
processed front to back in depth chunks (about ``max_pairs`` candidate pairs each). Inside a
chunk, pairs are made in depth order and stably sorted by pixel id, so each pixel's pairs form a
front-to-back segment; transmittance is a segmented cumulative sum of ``log(1 - alpha)`` in
float64 continued from the per-pixel state of the earlier chunks. Pixels that reached the
T cut-off get no pairs from later chunks (gsplat's early termination), which keeps the work and
the memory proportional to the pairs that matter.

Rules copied from ``RasterizeToPixels3DGSFwd.cu`` / ``...Bwd.cu``:

* pixel centres at (j + 0.5, i + 0.5); ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``;
* ``alpha = min(0.999, o exp(-sigma))``; a pair is skipped when ``sigma < 0`` or ``alpha < 1/255``;
* a pixel stops *before* the Gaussian that would bring T to <= 1e-4, and for good;
* ``alphas = 1 - T_final``; background added as ``bg * T_final``;
* backward: no gradient through ``sigma``/opacity where ``o exp(-sigma) > 0.999`` (the clamp);
  ``absgrad`` = sum over pixels of ``|dL/d means2d|`` per pixel contribution, per component.

Only the contributing pairs (pixel id, Gaussian id, alpha, T before) are stored for the backward
pass, which walks the chunks back to front with a per-pixel accumulator for the "behind" sums.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
ALPHA_MAX = 0.999
T_EPS = 1e-4
LOG_T_EPS = math.log(T_EPS)
# Candidate pairs per depth chunk. Measured optimum on one CPU thread (10k Gaussians at 256^2:
# 125k 0.37 s, 250k 0.34 s, 500k 0.30 s, 1M 0.30 s, 2M 0.33 s forward+backward): chunks of a few
# MiB stay cache- and malloc-friendly (no mmap/munmap churn) and keep the peak memory small.
DEFAULT_MAX_PAIRS = 500_000
# compact the pair list only when less than this fraction survives; otherwise dropped pairs stay
# as alpha = 0 entries (cheaper than nonzero + gathers when almost everything survives)
COMPACT_BELOW = 0.9


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` along dim 0; index_select is several times faster than advanced indexing on CPU."""
    return torch.index_select(t, 0, idx)


def _add_rows(out: Tensor, idx: Tensor, src: list[Tensor]) -> None:
    """``out[k].index_add_(idx, src[k])`` for a channel-major [D, X] accumulator.

    One 1-D index_add per channel beats a 2-D index_add over [M, D] rows on CPU.
    """
    for k, v in enumerate(src):
        out[k].index_add_(0, idx, v)


def _boxes(
    means2d: Tensor, conics: Tensor, opacities: Tensor, order: Tensor, width: int, height: int
) -> Tensor:
    """Inclusive pixel boxes [G, 4] (j0, j1, i0, i1) where alpha >= 1/255 is possible, clipped to the image."""
    m = means2d[order]
    a, b, c = conics[order].unbind(-1)
    det = a * c - b * b
    # sigma <= ln(255 o) is the alpha >= 1/255 ellipse; its half-extents are sqrt(2 s0 Sigma_ii).
    s0 = torch.log(opacities[order] / ALPHA_THRESHOLD).clamp_min(0.0)
    ex = torch.sqrt(2.0 * s0 * (c / det).clamp_min(0.0))
    ey = torch.sqrt(2.0 * s0 * (a / det).clamp_min(0.0))
    # a small margin: pairs just outside are removed by the exact alpha test anyway
    ex = ex * (1.0 + 1e-4) + 1e-3
    ey = ey * (1.0 + 1e-4) + 1e-3
    j0 = torch.ceil(m[:, 0] - ex - 0.5).clamp(0, width)
    j1 = torch.floor(m[:, 0] + ex - 0.5).clamp(-1, width - 1)
    i0 = torch.ceil(m[:, 1] - ey - 0.5).clamp(0, height)
    i1 = torch.floor(m[:, 1] + ey - 0.5).clamp(-1, height - 1)
    return torch.stack([j0, j1, i0, i1], dim=-1).to(torch.int64)


def _chunk_pairs(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    order: Tensor,
    boxes: Tensor,
    done: Tensor,
    any_done: bool,
    width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of a depth-ordered chunk of Gaussians, sorted by pixel then depth.

    Two levels: (Gaussian, row) spans first, each clipped to the exact x-interval of the
    ``sigma <= ln(255 o)`` ellipse in that row (plus a hair of margin), then pixels. Almost every
    generated pair passes the alpha test, unlike a bounding box (about 30 % waste).

    Pairs on pixels that are already ``done`` (T cut-off reached in an earlier chunk) and pairs
    below the alpha threshold are dropped. Returns pixel ids [M] int32, Gaussian ids [M] int32 and
    alphas [M].
    """
    dev, dt = means2d.device, means2d.dtype
    i0, i1 = boxes[:, 2], boxes[:, 3]
    ny = (i1 - i0 + 1).clamp_min(0)
    sel = torch.nonzero(ny > 0).squeeze(1)
    empty = (torch.zeros(0, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int32, device=dev))
    if sel.numel() == 0:
        return empty[0], empty[1], means2d.new_zeros(0)
    ny, i0 = _take(ny, sel), _take(i0, sel)
    gid = _take(order, sel)
    # level 1: one span per (Gaussian, row), in depth order
    n_rows = int(ny.sum())
    rrep = torch.repeat_interleave(torch.arange(sel.numel(), device=dev), ny, output_size=n_rows)
    row = _take(i0, rrep) + torch.arange(n_rows, device=dev) - _take(torch.cumsum(ny, 0) - ny, rrep)
    g_r = _take(gid, rrep)
    mx, my = _take(means2d[:, 0], g_r), _take(means2d[:, 1], g_r)
    a, b, c = (_take(conics[:, k], g_r) for k in range(3))
    op = _take(opacities, g_r)
    s0 = torch.log(op / ALPHA_THRESHOLD).clamp_min(0.0)
    dy = my - (row.to(dt) + 0.5)
    # sigma(dx) = 0.5 a dx^2 + b dy dx + 0.5 c dy^2 <= s0, dx = mx - px
    disc = (b * dy) ** 2 - a * (c * dy * dy - 2.0 * s0)
    half = torch.sqrt(disc.clamp_min(0.0)) / a
    centre = mx + b * dy / a
    half = half * (1.0 + 1e-4) + 1e-3
    j0 = torch.ceil(centre - half - 0.5).clamp(0, width).to(torch.int64)
    j1 = torch.floor(centre + half - 0.5).clamp(-1, width - 1).to(torch.int64)
    nx = torch.where(disc >= 0, (j1 - j0 + 1).clamp_min(0), torch.zeros_like(j1))
    if any_done:
        # skip spans whose pixels have all reached the T cut-off (per-row prefix counts of `done`)
        done_cs = torch.zeros(done.numel() // width, width + 1, dtype=torch.int32, device=dev)
        torch.cumsum(done.view(-1, width), dim=1, dtype=torch.int32, out=done_cs[:, 1:])
        base = row * (width + 1)
        flat = done_cs.view(-1)
        n_done = _take(flat, base + (j1 + 1).clamp_min(0)) - _take(flat, base + j0.clamp_max(width))
        nx = torch.where(n_done < nx, nx, torch.zeros_like(nx))
    # level 2: pixels; sigma = (A dx + B) dx + C with dx = d0 - local along the span
    total = int(nx.sum())
    if total == 0:
        return empty[0], empty[1], means2d.new_zeros(0)
    # int32 indices halve the memory traffic of the per-pair integer maths
    i32 = torch.int32
    prep = torch.repeat_interleave(torch.arange(n_rows, device=dev, dtype=i32), nx, output_size=total)
    local_i = torch.arange(total, device=dev, dtype=i32) - _take((torch.cumsum(nx, 0) - nx).to(i32), prep)
    local = local_i.to(dt)
    dx = _take(mx - (j0.to(dt) + 0.5), prep) - local
    sigma = (_take(0.5 * a, prep) * dx + _take(b * dy, prep)) * dx + _take(0.5 * c * dy * dy, prep)
    alpha = torch.clamp_max(_take(op, prep) * torch.exp(-sigma), ALPHA_MAX)
    pix = _take((row * width + j0).to(i32), prep) + local_i
    keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    if any_done:
        keep &= ~_take(done, pix)
    if int(keep.sum()) < COMPACT_BELOW * total:
        idx = torch.nonzero(keep).squeeze(1)
        pix, alpha = _take(pix, idx), _take(alpha, idx)
        g = _take(g_r.to(torch.int32), _take(prep, idx))
    else:
        # few drops: keep them as alpha = 0 entries (no contribution, masked in the backward)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        g = _take(g_r.to(torch.int32), prep)
    # pairs were made in depth order; a stable sort by pixel keeps that order inside each pixel
    pix, perm = torch.sort(pix, stable=True)
    return pix, _take(g, perm), _take(alpha, perm)


def _segment_starts(pix: Tensor) -> Tensor:
    """Positions [S] of the first pair of every pixel segment in pixel-sorted pairs."""
    first = torch.ones_like(pix, dtype=torch.bool)
    first[1:] = pix[1:] != pix[:-1]
    return torch.nonzero(first).squeeze(1)


def _per_pixel(table: Tensor, values_at_starts: Tensor, pix: Tensor, starts: Tensor) -> Tensor:
    """Per-pair read of one value per segment, through an [HW] scratch ``table``.

    A gather from an [HW] table (a few hundred KiB) is cache friendly, unlike gathers at the
    segment starts of the [M] pair arrays. Only this chunk's pixels are written and read, so the
    table never needs clearing.
    """
    table.index_copy_(0, _take(pix, starts).to(torch.int64), values_at_starts)
    return _take(table, pix)


def _composite_chunk(
    pix: Tensor, alpha: Tensor, log_t: Tensor, done: Tensor, scratch: Tensor
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Front-to-back transmittance of one chunk's pixel-sorted pairs, continuing ``log_t``.

    Updates the per-pixel state in place (``log_t`` [HW] float64 log T, ``done`` [HW] bool) and
    returns the positions of the kept pairs [K] (None when all are kept), their alphas [K] (0 for
    pairs past the cut-off that were not compacted away), T before them [K] and their
    ``log(1 - alpha)`` [K] (float64). ``scratch`` is an [HW] float64 work table.
    """
    # log/exp in the rendering dtype (float64 transcendental functions are ~5x slower on CPU);
    # the running sums are float64 because they span the whole chunk, not one pixel
    log1m = torch.log1p(-alpha).to(torch.float64)
    incl = torch.cumsum(log1m, 0)
    excl = incl - log1m
    starts = _segment_starts(pix)
    # log T before the pair: the pixel's state plus this chunk's earlier pairs of the same pixel
    # (per pixel: log_t - excl at the segment start)
    offset = _take(log_t, pix) - _per_pixel(scratch, _take(excl, starts), pix, starts)
    # gsplat stops *before* the Gaussian whose next_T <= 1e-4 and never resumes; T only
    # decreases inside a pixel, so the contributing pairs are a prefix of every segment.
    alive = incl + offset > LOG_T_EPS
    cut = torch.nonzero(~alive).squeeze(1)
    pos = None
    if cut.numel():
        done.index_fill_(0, _take(pix, cut).to(torch.int64), True)
        if cut.numel() > (1.0 - COMPACT_BELOW) * pix.numel():
            idx = torch.nonzero(alive).squeeze(1)
            pos, log1m, excl, offset = idx, _take(log1m, idx), _take(excl, idx), _take(offset, idx)
            alpha = _take(alpha, idx)
        else:
            alpha = torch.where(alive, alpha, torch.zeros_like(alpha))
            log1m = torch.where(alive, log1m, torch.zeros_like(log1m))
    # contributing pairs have log T > ln(1e-4); the clamp only keeps dropped (alpha = 0) pairs away
    # from slow denormal exp/casts
    t_before = torch.exp((excl + offset).clamp_min_(2.0 * LOG_T_EPS).to(alpha.dtype))
    return pos, alpha, t_before, log1m


def _front_to_back(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, depths: Tensor,
    width: int, height: int, max_pairs: int, log_t: Tensor,
):  # fmt: skip
    """Walk one camera's contributing pairs front to back, one depth chunk at a time.

    Yields, per chunk, pixel ids [K], Gaussian ids [K], alphas [K], T before [K] and
    ``log(1 - alpha)`` [K] (float64) of the pairs that contribute; ``log_t`` ([HW] float64 log T,
    zeros on entry) is advanced past each chunk before the next one is made.
    """
    dev = means2d.device
    hw = width * height
    vis = torch.nonzero((radii > 0).all(-1)).squeeze(1)
    order = _take(vis, torch.argsort(_take(depths, vis), stable=True))
    boxes = _boxes(means2d, conics, opacities, order, width, height)
    cnt = (boxes[:, 1] - boxes[:, 0] + 1).clamp_min(0) * (boxes[:, 3] - boxes[:, 2] + 1).clamp_min(0)
    # depth chunks of about max_pairs candidates (a chunk holds at least one Gaussian)
    bounds = torch.searchsorted(
        torch.cumsum(cnt, 0),
        torch.arange(max_pairs, int(cnt.sum()) + max_pairs, max_pairs, device=dev),
    ).tolist()
    scratch = torch.empty(hw, dtype=torch.float64, device=dev)
    done = torch.zeros(hw, dtype=torch.bool, device=dev)
    lo, any_done = 0, False
    for hi in bounds + [len(order)]:
        hi = max(min(hi, len(order)), lo + 1)
        if lo >= len(order):
            break
        pix, g, alpha = _chunk_pairs(
            means2d, conics, opacities, order[lo:hi], boxes[lo:hi], done, any_done, width
        )
        lo = hi
        if pix.numel() == 0:
            continue
        pos, alpha, t_before, log1m = _composite_chunk(pix, alpha, log_t, done, scratch)
        any_done = any_done or pos is not None or bool(done.any())
        if pos is not None:
            pix, g = _take(pix, pos), _take(g, pos)
        yield pix, g, alpha, t_before, log1m
        log_t.index_add_(0, pix, log1m)


class _RasterizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        means2d: Tensor,  # [C, N, 2]
        conics: Tensor,  # [C, N, 3]
        colors: Tensor,  # [C, N, D]
        opacities: Tensor,  # [C, N]
        backgrounds: Tensor,  # [C, D] (zeros when none)
        radii: Tensor,  # [C, N, 2] int32
        depths: Tensor,  # [C, N]
        width: int,
        height: int,
        absgrad: bool,
        max_pairs: int,
    ) -> tuple[Tensor, Tensor]:
        n_cam, _, n_ch = colors.shape
        dt, dev = colors.dtype, colors.device
        hw = width * height
        out_c = torch.zeros(n_cam, n_ch, hw, dtype=dt, device=dev)
        out_t = torch.ones(n_cam, hw, dtype=dt, device=dev)
        saved, n_chunks = [], []
        for cam in range(n_cam):
            m2d, con, op = means2d[cam], conics[cam], opacities[cam]
            col_t = colors[cam].t().contiguous()
            log_t = torch.zeros(hw, dtype=torch.float64, device=dev)
            count = 0
            for pix, g, alpha, t_before, _ in _front_to_back(
                m2d, con, op, radii[cam], depths[cam], width, height, max_pairs, log_t
            ):
                w = alpha * t_before
                _add_rows(out_c[cam], pix, [w * _take(col_t[k], g) for k in range(n_ch)])
                saved += [pix, g, alpha, t_before]
                count += 1
            out_t[cam] = torch.exp(log_t).to(dt)
            n_chunks.append(count)
        out_c = out_c.transpose(1, 2) + out_t[..., None] * backgrounds[:, None, :]
        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, out_t, *saved)
        ctx.dims = (width, height, absgrad, n_chunks)
        return out_c.reshape(n_cam, height, width, n_ch), (1.0 - out_t).reshape(n_cam, height, width, 1)

    @staticmethod
    def backward(ctx, v_colors_img: Tensor, v_alphas_img: Tensor):
        means2d, conics, colors, opacities, backgrounds, out_t, *saved = ctx.saved_tensors
        width, height, absgrad, n_chunks = ctx.dims
        n_cam, _, n_ch = colors.shape
        hw = width * height
        v_img = v_colors_img.reshape(n_cam, hw, n_ch)
        v_a_img = v_alphas_img.reshape(n_cam, hw)
        # channel-major accumulators [C, k, N], transposed once at the end
        v_means2d = means2d.new_zeros(n_cam, 2, means2d.shape[1])
        v_abs = means2d.new_zeros(n_cam, 2, means2d.shape[1]) if absgrad else None
        v_conics = conics.new_zeros(n_cam, 3, conics.shape[1])
        v_colors = colors.new_zeros(n_cam, n_ch, colors.shape[1])
        v_opac = torch.zeros_like(opacities)
        # d out_c / d bg = T_final; the background also enters every v_alpha below
        v_bg = (out_t[..., None] * v_img).sum(1)
        bg_dot = (v_img * backgrounds[:, None, :]).sum(-1)  # [C, HW]
        # pixel-centre tables (gathers from [HW] tables beat integer division per pair)
        ar = torch.arange(hw, device=v_img.device)
        px_tab = (ar % width).to(colors.dtype) + 0.5
        py_tab = torch.div(ar, width, rounding_mode="floor").to(colors.dtype) + 0.5
        first = 0
        for cam in range(n_cam):
            chunks = [saved[4 * (first + i) : 4 * (first + i) + 4] for i in range(n_chunks[cam])]
            first += n_chunks[cam]
            v_cols = v_img[cam].t().contiguous()  # [D, HW]
            col_t = colors[cam].t().contiguous()  # [D, N]
            m2x, m2y = means2d[cam, :, 0].contiguous(), means2d[cam, :, 1].contiguous()
            con_t = conics[cam].t().contiguous()
            # per-pixel part of v_alpha: T_final * (dL/dalpha - bg . dL/dcolor)
            tail = (out_t[cam] * (v_a_img[cam] - bg_dot[cam])).to(torch.float64)
            # tail minus the sum of w * (c . dL/dC) over the pairs behind in later chunks (walk the
            # chunks back to front)
            tail_acc = tail.clone()
            scratch = torch.empty(hw, dtype=torch.float64, device=v_img.device)
            for pix, g, alpha, t_before in reversed(chunks):
                w = alpha * t_before
                v_pix = [_take(v_cols[k], pix) for k in range(n_ch)]
                _add_rows(v_colors[cam], g, [w * v for v in v_pix])
                dot = sum(_take(col_t[k], g) * v_pix[k] for k in range(n_ch))
                q = (w * dot).to(torch.float64)
                incl = torch.cumsum(q, 0)
                starts = _segment_starts(pix)
                tail_acc.index_add_(0, pix, -q)
                # behind = the pixel's sum from here on (this and later chunks) minus this chunk's
                # pairs up to and including this one (incl - the cumulative sum before the segment)
                base = _per_pixel(scratch, _take(incl - q, starts), pix, starts)
                tail_behind = (_take(tail_acc, pix) - base + incl).to(alpha.dtype)
                v_alpha = t_before * dot + tail_behind / (1.0 - alpha)
                dx = _take(m2x, g) - _take(px_tab, pix)
                dy = _take(m2y, g) - _take(py_tab, pix)
                ca, cb, cc = (_take(con_t[k], g) for k in range(3))
                # alpha = o * exp(-sigma) where unclamped, so d alpha / d sigma = -alpha and
                # d alpha / d o = alpha / o; clamped (gsplat: `opac * vis > 0.999f`) and dropped
                # (alpha = 0) pairs get no gradient
                live = (alpha > 0) & (alpha < ALPHA_MAX)
                v_sigma = torch.where(live, -alpha * v_alpha, torch.zeros_like(v_alpha))
                v_opac[cam].index_add_(0, g, v_sigma)
                _add_rows(
                    v_conics[cam], g, [0.5 * v_sigma * dx * dx, v_sigma * dx * dy, 0.5 * v_sigma * dy * dy]
                )
                v_x = v_sigma * (ca * dx + cb * dy)
                v_y = v_sigma * (cb * dx + cc * dy)
                _add_rows(v_means2d[cam], g, [v_x, v_y])
                if absgrad:
                    _add_rows(v_abs[cam], g, [v_x.abs(), v_y.abs()])
        # sum of -alpha * v_alpha was accumulated; d alpha / d o = alpha / o
        v_opac = -v_opac / opacities.clamp_min(1e-30)
        v_means2d, v_conics, v_colors = (t.transpose(1, 2) for t in (v_means2d, v_conics, v_colors))
        if absgrad:
            # like gsplat: the per-pixel absolute gradient sum is exposed as an attribute
            means2d.absgrad = v_abs.transpose(1, 2).contiguous()
        return v_means2d, v_conics, v_colors, v_opac, v_bg, None, None, None, None, None, None


def rasterize_pixels(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2]
    depths: Tensor,  # [C, N]
    width: int,
    height: int,
    backgrounds: Tensor | None = None,  # [C, D]
    absgrad: bool = True,
    max_pairs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians into images: colours [C, H, W, D] and alphas [C, H, W, 1].

    Differentiable w.r.t. means2d, conics, colors, opacities and backgrounds; with ``absgrad``
    the backward pass sets ``means2d.absgrad`` ([C, N, 2]). ``max_pairs`` bounds the candidate
    pairs per row band (memory); default ``DEFAULT_MAX_PAIRS``.
    """
    if max_pairs is None:
        max_pairs = DEFAULT_MAX_PAIRS
    if backgrounds is None:
        backgrounds = colors.new_zeros(colors.shape[0], colors.shape[-1])
    return _RasterizeFunction.apply(
        means2d,
        conics,
        colors,
        opacities,
        backgrounds,
        radii,
        depths.detach(),
        width,
        height,
        absgrad,
        max_pairs,
    )


@torch.no_grad()
def median_depth_pixels(
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N, 2]
    depths: Tensor,  # [N]
    width: int,
    height: int,
    *,
    normalized: bool = False,
    max_pairs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Median depth [H, W] of one camera and its accumulated alpha [H, W].

    The median is the depth of the Gaussian at which T falls to <= 0.5 (NaN where it never does).
    With ``normalized`` it is the median of the per-pixel weight distribution instead (the level
    ``(1 + T_final) / 2``, i.e. half of the pixel's alpha), defined wherever anything is rendered:
    the median counterpart of the alpha-normalised expected depth. Same pairs, order and cut-off
    rules as the colour forward pass. Unlike the expected depth it does not average a roof with the
    ground behind it at an edge, which is what a DSM wants (the median-depth rule of 2DGS/GOF-style
    geometry).
    """
    if max_pairs is None:
        max_pairs = DEFAULT_MAX_PAIRS
    hw = width * height
    dev = means2d.device

    def sweep(level: Tensor | None) -> tuple[Tensor, Tensor]:
        out = torch.full((hw,), math.nan, dtype=depths.dtype, device=dev)
        log_t = torch.zeros(hw, dtype=torch.float64, device=dev)
        walk = _front_to_back(means2d, conics, opacities, radii, depths, width, height, max_pairs, log_t)
        for pix, g, alpha, t_before, log1m in walk:
            if level is None:
                continue
            # the crossing pair: T before above the level, T after at or below it (one per pixel)
            lv = _take(level, pix.to(torch.int64))
            log_before = torch.log(t_before.to(torch.float64).clamp_min(1e-300))
            cross = (log_before > lv) & (log_before + log1m <= lv) & (alpha > 0)
            idx = torch.nonzero(cross).squeeze(1)
            if idx.numel():
                g_idx = _take(g, idx).to(torch.int64)
                out.index_copy_(0, _take(pix, idx).to(torch.int64), _take(depths, g_idx))
        return out, log_t

    if normalized:
        _, log_t_final = sweep(None)
        # log((1 + T) / 2); pixels with T = 1 get level 0, which no pair can cross (NaN stays)
        level = torch.log1p(torch.exp(log_t_final)) - math.log(2.0)
    else:
        level = torch.full((hw,), math.log(0.5), dtype=torch.float64, device=dev)
    med, log_t = sweep(level)
    alphas = (1.0 - torch.exp(log_t)).to(depths.dtype)
    return med.reshape(height, width), alphas.reshape(height, width)
