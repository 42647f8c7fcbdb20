"""Dense heights from the adjusted views: an ortho plane sweep with semi-global matching.

Why: the matched points of :mod:`skyfall.prepare.matching` are a few thousand samples, and only off
the height edges do they sit on the surface; Stage 1 started from them keeps a DSM several metres
off (README, "Real satellite images"). A dense height per ground cell is the classic answer of
satellite photogrammetry (s2p, the DFC2019 baselines): here it gives ``points3D.txt`` a height field
that covers the AOI.

How (all views at once, in the tile's ENU frame, no rectification):

1. **Cost volume**: for every height plane z_d of the AOI's range and every cell (x, y) of a
   north-up grid, every view is sampled at the projection of (x, y, z_d) (bilinear, the views'
   pinholes in float64) and each pair of views is compared by the NCC of ``window``² patches on the
   grid; the cost is 1 minus the mean of the better half (rounded up) of the pairs' NCC, so that views that
   see a wall or another roof at that cell (occlusion) do not veto the others. Shiftable windows
   (the minimum cost over the ``shift``² cells around) keep a height edge from spreading half a window
   into the lower side (foreground fattening); a colour term keeps them to windows on the cell's own
   surface (``shift_colour``).
2. **Semi-global matching** (Hirschmüller 2008): the costs are aggregated along the 4 grid
   directions with a penalty ``p1`` for one height step between neighbours and ``p2`` for larger
   jumps, then summed; ``p2`` drops where the view closest to nadir has an image edge (his adaptive
   P2), so heights jump at building outlines rather than across them.
3. **Winner take all**, then each cell's height moves to the best centred-window cost within
   ``refine`` planes (shiftable windows pull cells on slopes towards their neighbours' heights),
   with a parabola through the three costs around it (sub-step heights); ``score`` is the winning
   height's better-half NCC, for choosing which cells to trust.
4. **Rematch** with a smaller window (``rematch_window``): a cell takes its height where that is
   clearly lower and well matched — the alleys that the wide window lifted to the roof beside them.
5. **Free space** (``free_space``): the ray from a cell to a view that sees it is empty, so the
   unsure cells it passes under come down to it (the ground beside a wall that one view alone sees,
   which SGM reads at roof height; chance matches above open ground).

The points written from the field (``field_points``) are the trusted cells on a coarser grid, plus a
ground layer under the raised ones (``DenseConfig.ground_window``).

Cost and memory grow with cells x planes: the grid is capped at ``max_cells`` per side and the
planes at ``max_planes`` (the resolution and height step grow instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.errors import ConfigError


@dataclass
class DenseConfig:
    """Dense heights of ``skyfall prepare`` (:mod:`skyfall.prepare.dense`)."""

    enabled: bool = True
    """Compute a dense height field from the training views and start Stage 1 from it (points3D.txt)
    instead of the matched points alone."""
    resolution: float = 0.0
    """Grid cell (metres); 0: the views' ground sampling distance (the AOI side / the image side)."""
    step: float = 0.0
    """Height step between planes (metres); 0: half a cell."""
    window: int = 5
    """NCC window (cells, odd). A trade-off that depends on the city: a window reaches across a
    height edge into the roof beside it and lifts a narrow alley to roof height, while a small one
    matches weak texture (lawns, plain roads) by chance. Chain DSM MAE of ``real`` with window and
    shift 3 instead of 5 (5-view tuning / held-out mixed / unseen suburb; 3-view tuning / held-out
    mixed): 1.90 -> 1.70, 1.42 -> 1.37, 1.43 -> 1.49 m; 2.10 -> 2.02, 2.38 -> 2.82 m (the held-out
    city's open ground comes out noisy); the mean of the 3- and 5-cell costs: 1.86 m on the tuning city,
    2.59 m on the 3-view held-out one. 5 loses least."""
    shift: int = 5
    """Shiftable-window neighbourhood (cells, odd; 1: off; at most ``window``, so that every window
    tried still contains its cell)."""
    shift_colour: float = 2.5
    """Colour weight of the shiftable windows (0: off): a shifted window's cost gains this times
    |its mean grey - the cell's grey| (grey 0..1, the mean of the views sampled at the plane's
    height), so that a cell keeps to a window on its own surface. Why: the best-matching window
    around a cell of weak texture (a plain roof, a tree crown) is often one that reaches onto the
    textured ground beside it, and the cell takes the ground's height (background fattening, the
    shiftable windows' own failure). The adaptive support weights of Yoon & Kweon (2006) in their
    cheapest form: one weight per window instead of one per pixel. MAE of the dense field alone,
    3-view tuning city, weight 0 / 1 / 2 / 3 / 6 / 15: 2.57 / 2.47 / 2.43 / 2.42 / 2.49 / 2.77 m
    (larger weights match textured open ground worse); 2.5 on the 3-view held-out mixed city: 2.36
    -> 2.32 m. Chain DSM MAE of ``real``, off -> 2.5: 3-view tuning 1.77 -> 1.70 m and held-out
    mixed 1.78 -> 1.75 m (points at the 0.15 quantile in every block), 5-view held-out mixed 1.28 ->
    1.25 m (0.35).
    The dense step takes as long (27 s with 3 views); the shifted costs are kept, one more cost
    volume per window."""
    rematch_window: int = 3
    """A second match with this smaller window (cells, odd; 0 or not below ``window``: off;
    ``--dense-rematch``): where it
    finds the surface more than ``rematch_drop`` metres lower than the main window does, with a score
    of at least ``rematch_score``, the cell takes that height. Why: a wide window lifts the ground
    beside a wall to the roof (foreground fattening only ever raises a cell), while a small one finds
    a narrow alley's floor but matches weak texture by chance; taking the small window's answer only
    where it is lower and agreed on keeps the first and not the second (see ``window`` for the small
    window alone). Chain DSM MAE of ``real``, off -> on, 5 views (tuning / held-out
    mixed / unseen suburb): 1.82 -> 1.59, 1.38 -> 1.25, 1.38 -> 1.33 m; 3 views: 2.00 -> 1.88,
    2.31 -> 2.13, 1.78 -> 1.75 m. Both windows come from one sweep (the views
    are projected and sampled once per plane): with 3 views the dense step takes 32 s instead of 38 s
    with two sweeps (tuning city, 2-core CPU, a Stage 1 run beside it), against 21 s without the
    rematch. 1 m and 0.5 are the second values tried (2 m and 0.7 took 3.5 % of the tuning city's cells
    instead of 12 % and lowered the field's own error less: 2.60 -> 2.48 m rather than 2.41 m)."""
    rematch_drop: float = 1.0
    """How much lower (metres) the small window's height must be to replace the main one."""
    rematch_score: float = 0.5
    """Score (better-half NCC) the small window's height must reach to replace the main one."""
    refine: int = 2
    """After SGM, each cell's height moves to the best centred-window cost within this many planes
    (0: off): shiftable windows pull cells on slopes towards their neighbours' heights."""
    p1: float = 0.1
    """SGM penalty for a one-step height change between neighbouring cells (cost units, 0..2). Kept
    small for slopes: each plane step between neighbours costs it (see ``edge_tau`` for the choice)."""
    p2: float = 8.0
    """SGM penalty for a larger height change (divided at image edges, see ``edge_tau``)."""
    edge_tau: float = 0.1
    """Edge-aware SGM: the large-jump penalty is divided by 1 + |grey step| / edge_tau along the
    view closest to nadir (grey 0..1), so heights jump at image edges (0: a constant penalty).
    Chosen over four cases, not one (DSM MAE of the field alone on two 5-view synthetic RPC cities,
    registered, tuning / held-out; MAE on the clean block of tests/test_prepare_dense.py; median
    deviation on the hilly terrain of tests/test_prepare_multiview.py), (p1, p2, edge_tau):
    (0.2, 4, 0) 3.14 / 1.82 m, 0.18 m, 0.08 m; (0.1, 8, 0.1) 3.29 / 1.74 m, 0.10 m, 0.05 m (the
    default); (0.1, 16, 0.1) 2.95 / 1.87 m, 0.23 m, 0.05 m; (0.5, 16, 0.1) 2.78 / 1.81 m, 0.89 m,
    0.29 m — the cities alone would pick the strongest smoothing, which flattens slopes and rounds
    off outlines. Also measured on the cities: (0.1, 2, 0) 3.94 / 2.61 m; (0.5, 16, 0.05) 3.23 /
    1.56 m; (0.2, 8, 0.1) 3.32 / 1.64 m; (1, 32, 0.1) 2.71 / 2.48 m."""
    max_cells: int = 512
    """Cap of the grid side (cells); a larger AOI gets coarser cells."""
    max_planes: int = 320
    """Cap of the number of height planes; a taller range gets larger steps."""
    spacing: float = 2.0
    """Spacing (metres) of the points written from the height field, rounded to whole cells
    (prepare.json's dense.spacing_m is the one used)."""
    min_score: float = 0.3
    """Cells whose winning NCC is below this write no point (no texture, no agreeing views)."""
    point_quantile: float = 0.15
    """Height of each point written from the field where its block holds a step (``step_jump``): this
    quantile of the block's cell heights (0.5: the median, which the other blocks take). Why low:
    where a block straddles an outline, its point stands either on the roof (with a ground-layer
    point beneath, so Stage 1 can still fade the roof) or on the ground, and Stage 1 fades a roof
    spread over the ground less readily than it shows one; and the field reads roof height on the
    ground beside a wall that only one view sees (no pair can match it), so the lower cells of such
    a block are the likelier ground. Chain DSM MAE of ``real``, the quantile taken in every block,
    without the colour term, 0.75 / 0.5 / 0.35 / 0.25 / 0.15: 3-view tuning city 2.05 / 1.88 / 1.83 /
    1.80 / 1.77 m, 3-view held-out mixed city 2.42 / 2.13 / 1.98 / 1.87 / 1.78 m; with the colour
    term (``shift_colour``), 0.35 / 0.15 / 0.05: 3-view tuning - / 1.70 / 1.70 m, 3-view held-out
    mixed - / 1.75 / 1.64 m, 3-view unseen suburb - / 1.72 / 1.75 m, 5-view tuning - / 1.42 / 1.43 m,
    5-view held-out mixed 1.25 / 1.30 / 1.40 m, 5-view unseen suburb - / 1.30 / 1.35 m: lower helps
    the tuning cities and three views and costs the 5-view held-out city, whose many views leave
    less of its ground unseen; 0.15 is the compromise. Only in blocks with a step (the default):
    3-view tuning / held-out mixed / unseen suburb 1.71 / 1.75 / 1.72 m, 5 views 1.42 / 1.32 / 1.30 m."""
    step_jump: float = 1.0
    """Only blocks that hold a step take ``point_quantile``: two neighbouring cells more than this
    apart (metres; steeper than about 60 degrees at 0.58 m cells); the others take their median, so
    that a smooth slope's points are not biased low (0.15 quantile everywhere: 0.11 m low on the hilly
    test terrain of tests/test_prepare_multiview.py)."""
    ground_window: float = 22.0
    """Ground layer (``--dense-ground``): under every point more than ``ground_rise`` above the local
    ground (the 10th percentile of the trusted heights within this window, metres), in a raised part
    that some wall bounds (a step of more than ``ground_rise`` between neighbouring points; a hill's
    slope gets none), a second point is put at that ground height (0: no layer). Why: alleys and
    the margins of buildings narrower than the NCC support come out at roof height, and Stage 1
    started from the top surface alone has nothing to show where the roof should not be; with a
    ground layer beneath, it fades the wrong roof and shows the floor. Chain DSM MAE (`real` with
    its multi-view term then on, 5-view synthetic RPC cities, tuning / held-out / unseen): 3.00 /
    1.77 / 1.55 m without, 2.21 / 1.53 / 1.40 m with (22 m and 2 m are the first values tried, not
    tuned)."""
    ground_rise: float = 2.0
    """Height (metres) above the local ground from which a point gets a ground-layer point beneath."""
    free_space: float = 0.5
    """Free-space carving after the match (``--dense-free-space``; 0: off): a view counts as seeing a
    cell where one of its pairs reaches this NCC there (centred ``window``, at the cell's height) and
    no trusted cell (``free_space_trust``) stands above the ray from it to the view; that ray is then
    empty, so every cell it passes over must lie below it (``free_space_margin`` above allowed). The
    cells above such a ray come down to it, and those more than ``free_space_drop`` above it to the
    local ground (the 10th percentile of the heights within ``ground_window``) where that is lower.
    Why: the ground beside a wall that only one view sees has no pair to match it, and semi-global
    matching carries the roof over it (the bands south and west of the blocks on the 3-view
    cities), while the ground further out, which the oblique views do see, is matched well and its
    rays to them pass under the band; the same rays take down chance matches above open ground. The
    visibility constraint of depth-map fusion (Merrell et al. 2007). Field DSM MAE (mean vertical
    offset; 3-view tuning / held-out mixed / unseen suburb, 5-view tuning / held-out mixed / suburb):
    2.66 -> 2.34, 2.59 -> 2.06, 1.83 -> 1.82, 2.78 -> 2.27, 1.70 -> 1.63, 1.57 -> 1.51 m. Without the
    trusted cells' check (NCC 0.6, cells from score 0.7 kept) it cut 3.5 % of the tuning city's roofs
    to the ground (field 2.40 m, its buildings 0.70 -> 0.72 m). Chain: see ``free_space_trust``."""
    free_space_margin: float = 0.5
    """How far (metres) a cell may stand above a ray from a cell a view sees before it is lowered
    (0.5 m over 1 m: a little better on the two 3-view cities tried)."""
    free_space_trust: float = 0.8
    """Cells whose score reaches this are trusted: they are never lowered, and a cell that they hide
    from a view does not count as seen by it (a chance match on the ground behind a building must not
    cut the building). Chain DSM MAE of ``real``, free space off -> NCC 0.5 with trust 0.8 (the
    default) / 0.9, and NCC 0.6 with trust 0.7: 3 views, tuning 1.71 -> 1.67 / 1.67 / 1.70 m,
    held-out mixed 1.75 -> 1.50 / 1.47 / 1.53 m, unseen suburb 1.72 -> 1.73 / 1.73 / 1.73 m; 5 views,
    tuning 1.42 -> 1.37 / 1.36 / 1.39 m, held-out mixed 1.32 -> 1.40 / 1.45 / - m, suburb 1.30 ->
    1.31 / 1.33 / - m. A higher threshold trusts fewer cells, and where four views give chance
    matches more chances more of a roof is cut (the 5-view held-out city's field: buildings 0.46 ->
    0.49 m at 0.8, 0.53 m at 0.9)."""
    free_space_drop: float = 1.0
    """Cells more than this (metres) above their free-space ceiling go to the local ground beneath it."""
    dsm_resolution: float = 0.5
    """Cell (metres) of the stereo DSM that ``skyfall prepare`` and ``skyfall city prepare`` write from
    the dense heights after the tile, ``TILE/dense/dsm.tif`` in the tile's UTM zone
    (:mod:`skyfall.export.stereo`; 0: not written; ``prepare_tile`` itself writes the heights only,
    ``dense/field.npz``). 0.5 m like ``export --format dsm``, so the two compare cell for cell."""

    def check(self) -> None:
        for name, value in (("window", self.window), ("shift", self.shift)):
            if value < 1 or value % 2 == 0:
                raise ConfigError(f"dense.{name} must be an odd number >= 1, got {value}.")
        for name, value in (
            ("resolution", self.resolution), ("step", self.step), ("p1", self.p1), ("p2", self.p2),
            ("edge_tau", self.edge_tau), ("rematch_drop", self.rematch_drop), ("shift_colour", self.shift_colour),
            ("step_jump", self.step_jump), ("free_space_margin", self.free_space_margin),
            ("free_space_drop", self.free_space_drop), ("dsm_resolution", self.dsm_resolution),
        ):  # fmt: skip
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"dense.{name} must be >= 0, got {value:g}.")
        if self.p2 < self.p1:
            raise ConfigError(f"dense.p2 ({self.p2:g}) must be >= dense.p1 ({self.p1:g}).")
        if self.rematch_window < 0 or (self.rematch_window > 0 and self.rematch_window % 2 == 0):
            raise ConfigError(
                f"--dense-rematch (dense.rematch_window) must be 0 or an odd number, got {self.rematch_window}."
            )
        if not (math.isfinite(self.rematch_score) and -1.0 <= self.rematch_score <= 1.0):
            raise ConfigError(
                f"dense.rematch_score is an NCC and must be within [-1, 1], got {self.rematch_score:g}."
            )
        if self.shift > self.window:
            raise ConfigError(
                f"dense.shift ({self.shift}) must be <= dense.window ({self.window}): a shifted window "
                "must still contain its cell."
            )
        if not (math.isfinite(self.point_quantile) and 0.0 <= self.point_quantile <= 1.0):
            raise ConfigError(
                f"--dense-quantile (dense.point_quantile) must be within [0, 1], got {self.point_quantile:g}."
            )
        if not (math.isfinite(self.spacing) and self.spacing > 0):
            raise ConfigError(f"--dense-spacing must be > 0, got {self.spacing:g}.")
        if not (math.isfinite(self.ground_window) and self.ground_window >= 0):
            raise ConfigError(
                f"--dense-ground (dense.ground_window) must be >= 0, got {self.ground_window:g}."
            )
        if not (math.isfinite(self.ground_rise) and self.ground_rise > 0):
            raise ConfigError(f"dense.ground_rise must be > 0, got {self.ground_rise:g}.")
        for name, value in (("free_space", self.free_space), ("free_space_trust", self.free_space_trust)):
            if not (math.isfinite(value) and -1.0 <= value <= 1.0):
                raise ConfigError(f"dense.{name} is an NCC and must be within [-1, 1], got {value:g}.")
        if self.max_cells < 8 or self.max_planes < 3:
            raise ConfigError("dense.max_cells must be >= 8 and dense.max_planes >= 3.")


def _centres(x0: float, y1: float, res: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres (x, y), each [h, w], of the north-up grid with corner (x0, y1) and cells ``res``."""
    x = x0 + (np.arange(w) + 0.5) * res
    y = y1 - (np.arange(h) + 0.5) * res
    return np.meshgrid(x, y, indexing="xy")


@dataclass
class DenseHeights:
    """Heights on a north-up grid: cell (i, j) has centre (x0 + (j + .5) res, y1 - (i + .5) res)."""

    heights: np.ndarray  # [H, W] ENU z (metres)
    score: np.ndarray  # [H, W] better-half NCC at the winning height (-1..1)
    x0: float
    y1: float
    resolution: float
    step: float
    planes: int
    lowered: float = 0.0  # share of the cells the free-space step lowered

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.heights.shape
        return _centres(self.x0, self.y1, self.resolution, w, h)


def nadir_view(cameras: Cameras) -> int:
    """Index of the camera whose viewing axis is closest to straight down (it sees the most ground)."""
    return int(torch.argmax(-cameras.camtoworlds[:, 2, 2]))


def _sample_grid(uv: Tensor, cameras: Cameras, shape: tuple[int, int]) -> Tensor:
    """Pixel positions [C, N, 2] (gsplat pixel centres) -> ``grid_sample`` coordinates [C, H, W, 2]."""
    g = torch.stack([2 * uv[..., 0] / cameras.width - 1, 2 * uv[..., 1] / cameras.height - 1], -1)
    return g.float().view(len(uv), *shape, 2)


def _box(x: Tensor, k: int) -> Tensor:
    """Mean over the ``k`` x ``k`` window around each cell, cells outside the grid not counted (on a
    CPU one 2-D pooling is faster than two 1-D ones, and a float32 running sum loses the variance)."""
    return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)


def _sample_views(
    img: Tensor, msk: Tensor, cameras: Cameras, pts: Tensor, shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Every view sampled at the world points ``pts`` [N, 3] laid out as a grid of ``shape``: grey
    [C, 1, H, W] (bilinear; ``img`` [C, 1, h, w]) and where it has data in front of the camera
    [C, 1, H, W] bool (``msk`` [C, 1, h, w] float)."""
    uv, depth = cameras.project(pts)  # [C, N, 2] float64
    g = _sample_grid(uv, cameras, shape)
    s = F.grid_sample(img, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(msk, g, mode="nearest", padding_mode="zeros", align_corners=False) > 0.5
    return s, m & (depth > 0).view(len(img), 1, *shape)


def _pair_ncc(box: Tensor, n: int, ii: Tensor, jj: Tensor, both: Tensor) -> Tensor:
    """Pairs' NCC [P, H, W] from the box means ``box`` of [s (n), s² (n), s_i s_j (P), ...]; -1 where
    ``both`` [P, H, W] is False (one of the two views has no data)."""
    mu, sq, cross = box[:n], box[n : 2 * n], box[2 * n : 2 * n + len(ii)]
    sd = (sq - mu * mu).clamp_min(1e-6).sqrt()
    return torch.where(both, (cross - mu[ii] * mu[jj]) / (sd[ii] * sd[jj]), torch.tensor(-1.0))


@dataclass
class WindowCost:
    """One window's plane-sweep costs, each [D, H, W] (0 = the views agree perfectly, 2 =
    anti-correlated): ``centred`` on each cell, and ``shifted``, the shiftable windows' cost
    (``shiftable``; the same tensor as ``centred`` when the neighbourhood is 1)."""

    centred: Tensor
    shifted: Tensor


def sweep_cost(
    grey: Tensor,
    valid: Tensor,
    cameras: Cameras,
    xy: tuple[np.ndarray, np.ndarray],
    heights: np.ndarray,
    window: int,
    keep: int | None = None,
) -> Tensor:
    """Plane-sweep matching cost [D, H, W] of windows centred on each cell.

    Args:
        grey: [C, h, w] float views (C >= 2).
        valid: [C, h, w] bool, True where a view has data.
        cameras: the C views' cameras.
        xy: grid cell centres (x, y), each [H, W] (ENU metres).
        heights: [D] plane heights (ENU z).
        window: NCC window (odd).
        keep: how many of the pairs' NCCs (the best) are averaged per cell and height; default the
            better half, rounded up. Rounded down, three views would keep one pair: a maximum over
            three pairs' chance correlations, which picks wrong heights on weak texture (chain DSM
            MAE, 3-view RPC city: 2.19 m with one pair, 2.10 m with two).
    """
    return sweep_costs(grey, valid, cameras, xy, heights, (window,), keep)[0].centred


def sweep_costs(
    grey: Tensor,
    valid: Tensor,
    cameras: Cameras,
    xy: tuple[np.ndarray, np.ndarray],
    heights: np.ndarray,
    windows: tuple[int, ...],
    keep: int | None = None,
    shifts: tuple[int, ...] | None = None,
    colour: float = 0.0,
) -> list[WindowCost]:
    """``sweep_cost`` for several windows in one sweep, one ``WindowCost`` per window: the views are
    projected and sampled once per plane, which is most of a sweep's time. ``shifts`` (one per window,
    default 1: none) and ``colour`` are ``shiftable``'s neighbourhood and colour weight; the shifted
    cost is computed plane by plane here because its colour term needs the plane's samples."""
    n = grey.shape[0]
    if n < 2:
        raise ValueError("the plane sweep needs at least two views")
    shifts = (1,) * len(windows) if shifts is None else shifts
    if len(shifts) != len(windows):
        raise ValueError(f"one shift per window: {len(shifts)} shifts for {len(windows)} windows")
    gh, gw = xy[0].shape
    pts = torch.from_numpy(np.stack([xy[0].ravel(), xy[1].ravel(), np.zeros(xy[0].size)], 1))
    img = grey[:, None].float()
    msk = valid[:, None].float()
    ii, jj = torch.triu_indices(n, n, 1)  # the pairs (0, 1), (0, 2), ..., (1, 2), ... as pair_ncc's
    keep = max(1, (len(ii) + 1) // 2) if keep is None else max(1, min(keep, len(ii)))
    out = []
    for shift in shifts:
        centred = torch.empty(len(heights), gh, gw)
        out.append(WindowCost(centred, torch.empty_like(centred) if shift > 1 else centred))
    coloured = colour > 0 and max(shifts) > 1
    for d, z in enumerate(heights):
        pts[:, 2] = float(z)
        s, m = _sample_views(img, msk, cameras, pts, (gh, gw))
        both = (m[ii] & m[jj])[:, 0]  # [P, H, W]
        # Every box mean a window needs (per view: mean, mean square; per pair: mean product; with
        # the colour term, the cells' grey: the mean of the views that have data there) in one call.
        terms, centre = [s, s * s, s[ii] * s[jj]], None
        if coloured:
            centre = (s * m).sum(0) / m.sum(0).clamp_min(1)  # [1, H, W]
            terms.append(centre[None])
        terms = torch.cat(terms)
        for wc, window, shift in zip(out, windows, shifts, strict=True):
            box = _box(terms, window)[:, 0]
            nccs = _pair_ncc(box, n, ii, jj, both)
            wc.centred[d] = 1 - nccs.topk(keep, dim=0).values.mean(0)
            if shift > 1:
                mean = box[-1:] if coloured else None
                wc.shifted[d] = shiftable(wc.centred[d : d + 1], shift, mean, centre, colour)[0]
    return out


def shiftable(
    cost: Tensor, shift: int, mean: Tensor | None = None, centre: Tensor | None = None, colour: float = 0.0
) -> Tensor:
    """Shiftable windows: per plane, the lowest cost of the ``shift``² cells around each cell.

    With ``colour`` > 0, each shifted window's cost gains ``colour`` x |``mean`` there - ``centre``
    here| (``mean``: the window's mean grey, ``centre``: the cell's own grey, both [D, H, W] like
    ``cost``), so a cell takes a window that lies on its own surface (see ``DenseConfig.shift_colour``).
    """
    if shift <= 1:
        return cost
    if colour <= 0 or mean is None or centre is None:
        return -F.max_pool2d(-cost[:, None], shift, 1, shift // 2)[:, 0]
    r, (h, w) = shift // 2, cost.shape[-2:]
    cp = F.pad(cost, (r, r, r, r), value=float("inf"))
    mp = F.pad(mean[:, None], (r, r, r, r), mode="replicate")[:, 0]
    best = torch.full_like(cost, float("inf"))
    for dy in range(shift):
        for dx in range(shift):
            penalty = (mp[:, dy : dy + h, dx : dx + w] - centre).abs_().mul_(colour)
            best = torch.minimum(best, penalty.add_(cp[:, dy : dy + h, dx : dx + w]))
    return best


def refine(cost: Tensor, idx: Tensor, radius: int) -> Tensor:
    """Sub-step heights [H, W] (plane units): the lowest ``cost`` within ``radius`` planes of ``idx``,
    with a parabola through its neighbours."""
    offs = torch.arange(-radius, radius + 1)
    cand = (idx[None] + offs[:, None, None]).clamp(0, cost.shape[0] - 1)
    best = cand.gather(0, cost.gather(0, cand).argmin(0)[None])[0]
    return _parabola(cost, best)


def _sgm_path(c: Tensor, total: Tensor, p1: float, p2: Tensor) -> None:
    """Add the SGM aggregation of ``c`` [H, W, D] along +W (all rows at once) into ``total``;
    ``p2`` [H, W] is the large-jump penalty of entering each cell from its predecessor."""
    prev = c[:, 0].clone()
    total[:, 0] += prev
    for x in range(1, c.shape[1]):
        low = prev.min(-1, keepdim=True).values
        step = torch.minimum(
            F.pad(prev[:, 1:], (0, 1), value=float("inf")), F.pad(prev[:, :-1], (1, 0), value=float("inf"))
        )
        best = torch.minimum(torch.minimum(prev, step + p1), low + p2[:, x, None])
        prev = c[:, x] + best - low
        total[:, x] += prev


def sgm(cost: Tensor, p1: float, p2: float, guide: Tensor | None = None, tau: float = 0.05) -> Tensor:
    """Semi-global aggregation of a cost volume [D, H, W] along the 4 grid directions -> [D, H, W].

    With a ``guide`` image [H, W] the large-jump penalty adapts to it as in Hirschmüller's SGM,
    ``max(p1, p2 / (1 + |guide step| / tau))``: heights may jump where the image has an edge.
    """
    c = cost.permute(1, 2, 0).contiguous()  # [H, W, D]
    g = guide.float() if guide is not None else torch.zeros(c.shape[:2])

    def penalty(gg: Tensor) -> Tensor:  # [H', W'] penalty of entering each cell along dim 1
        if guide is None:
            return torch.full(gg.shape, float(p2))
        jump = F.pad((gg[:, 1:] - gg[:, :-1]).abs(), (1, 0))
        return (p2 / (1 + jump / tau)).clamp_min(p1)

    total = torch.zeros_like(c)
    ct, gt = c.transpose(0, 1), g.t()
    for cc, gg, undo in (
        (c, g, lambda t: t),
        (c.flip(1), g.flip(1), lambda t: t.flip(1)),
        (ct, gt, lambda t: t.transpose(0, 1)),
        (ct.flip(1), gt.flip(1), lambda t: t.flip(1).transpose(0, 1)),
    ):
        part = torch.zeros(cc.shape)
        _sgm_path(cc.contiguous(), part, p1, penalty(gg.contiguous()))
        total += undo(part)
    return total.permute(2, 0, 1)


def ortho_guide(grey: Tensor, cameras: Cameras, xy: tuple[np.ndarray, np.ndarray], z: float) -> Tensor:
    """The view closest to nadir resampled on the grid at height ``z`` [H, W]: the image whose edges
    the SGM penalty follows (its building edges move least with the unknown height)."""
    k = nadir_view(cameras)
    pts = torch.from_numpy(np.stack([xy[0].ravel(), xy[1].ravel(), np.full(xy[0].size, z)], 1))
    uv, _ = cameras[k].project(pts)
    g = _sample_grid(uv, cameras, xy[0].shape)
    return F.grid_sample(grey[k][None, None].float(), g, align_corners=False)[0, 0]


def _parabola(cost: Tensor, best: Tensor) -> Tensor:
    """Sub-step position [H, W] of each cell's minimum at plane ``best``: the vertex of the parabola
    through its costs at best - 1, best, best + 1 (``best`` itself at the first and last plane)."""
    d = cost.shape[0]
    if d < 3:
        return best.double()
    i = best.clamp(1, d - 2)
    cm, c0, cp = (cost.gather(0, (i + o)[None])[0] for o in (-1, 0, 1))
    den = cm - 2 * c0 + cp
    off = torch.where(den > 1e-12, 0.5 * (cm - cp) / den.clamp_min(1e-12), torch.zeros_like(den))
    return torch.where(best == i, i.double() + off.clamp(-0.5, 0.5).double(), best.double())


def winner(agg: Tensor) -> tuple[Tensor, Tensor]:
    """Per cell the index of the lowest cost [H, W] (long) and its sub-step position (float, parabola)."""
    idx = agg.argmin(0)
    return idx, _parabola(agg, idx)


def dense_heights(
    grey: Tensor,
    valid: Tensor,
    cameras: Cameras,
    extent: tuple[float, float, float, float],
    z_range: tuple[float, float],
    cfg: DenseConfig,
    *,
    gsd: float,
) -> DenseHeights:
    """Height field over ``extent`` (ENU x0, x1, y0, y1) within ``z_range`` (module docstring)."""
    cfg.check()
    x0, x1, y0, y1 = extent
    side = max(x1 - x0, y1 - y0)
    res = cfg.resolution if cfg.resolution > 0 else gsd
    res = max(res, side / cfg.max_cells)
    w, h = max(1, int(math.ceil((x1 - x0) / res - 1e-9))), max(1, int(math.ceil((y1 - y0) / res - 1e-9)))
    step = cfg.step if cfg.step > 0 else res / 2
    z0, z1 = z_range
    step = max(step, (z1 - z0) / (cfg.max_planes - 1))
    heights = z0 + step * np.arange(int(math.floor((z1 - z0) / step + 1e-9)) + 1)
    xy = _centres(x0, y1, res, w, h)
    with torch.no_grad():
        guide = ortho_guide(grey, cameras, xy, 0.5 * (z0 + z1)) if cfg.edge_tau > 0 else None
        rematch = 0 < cfg.rematch_window < cfg.window  # as wide as the main one, it finds the same heights
        windows = (cfg.window, cfg.rematch_window) if rematch else (cfg.window,)
        shifts = tuple(min(cfg.shift, w) for w in windows)
        costs = sweep_costs(
            grey, valid, cameras, xy, heights, windows, shifts=shifts, colour=cfg.shift_colour
        )
        pos, score = _match(costs[0], guide, cfg)
        if rematch:
            pos_s, score_s = _match(costs[1], guide, cfg)
            lower = (pos - pos_s) * step > cfg.rematch_drop
            take = lower & (score_s >= cfg.rematch_score)
            pos, score = torch.where(take, pos_s, pos), torch.where(take, score_s, score)
        del costs
        z = heights[0] + pos.numpy() * step
        lowered = 0.0
        if cfg.free_space > 0:
            seen = seen_by(pair_ncc(grey, valid, cameras, xy, z, cfg.window), grey.shape[0], cfg.free_space)
            sc = score.numpy()
            ceiling = free_space_ceiling(
                z,
                seen.numpy(),
                view_slopes(cameras, xy, z),
                res,
                cfg.free_space_margin,
                sc >= cfg.free_space_trust,
            )
            z, cut = lower_to_ceiling(z, sc, ceiling, cfg, res)
            lowered = float(cut.mean())
    return DenseHeights(z, score.numpy(), x0, y1, res, step, len(heights), lowered)


def pair_ncc(
    grey: Tensor,
    valid: Tensor,
    cameras: Cameras,
    xy: tuple[np.ndarray, np.ndarray],
    z: np.ndarray,
    window: int,
) -> Tensor:
    """Each pair's NCC [P, H, W] of ``window``² patches at the cells' own heights ``z`` [H, W] (pairs
    in the order (0, 1), (0, 2), ..., (1, 2), ...; -1 where one of the two views has no data)."""
    n = grey.shape[0]
    pts = torch.from_numpy(np.stack([xy[0].ravel(), xy[1].ravel(), z.ravel()], 1))
    s, m = _sample_views(grey[:, None].float(), valid[:, None].float(), cameras, pts, z.shape)
    ii, jj = torch.triu_indices(n, n, 1)
    box = _box(torch.cat([s, s * s, s[ii] * s[jj]]), window)[:, 0]
    return _pair_ncc(box, n, ii, jj, (m[ii] & m[jj])[:, 0])


def seen_by(ncc: Tensor, n: int, threshold: float) -> Tensor:
    """[n, H, W]: True where some pair of view k (``pair_ncc``'s order) reaches ``threshold``."""
    ii, jj = torch.triu_indices(n, n, 1)
    best = torch.full((n, *ncc.shape[1:]), -1.0)
    for p in range(len(ii)):
        for k in (int(ii[p]), int(jj[p])):
            best[k] = torch.maximum(best[k], ncc[p])
    return best >= threshold


def view_slopes(cameras: Cameras, xy: tuple[np.ndarray, np.ndarray], z: np.ndarray) -> np.ndarray:
    """[C, 2]: how far (metres east, north) the ray from the grid's centre to each camera moves per
    metre of height (satellite views are near-parallel over a tile, so one vector per view)."""
    centre = np.array([xy[0].mean(), xy[1].mean(), float(np.median(z))])
    d = cameras.camtoworlds[:, :3, 3].double().numpy() - centre
    return d[:, :2] / np.maximum(d[:, 2:3], 1e-9)


def _along_rays(a: np.ndarray, slope: np.ndarray, res: float, reach: float, towards: bool) -> np.ndarray:
    """Along one view's rays (``slope``: metres east, north per metre up): per cell, the lowest of
    ``a`` + the ray's rise from the cells behind it (away from the view; ``towards`` False), or the
    highest of ``a`` - the rise to the cells in front of it (towards the view), over ``reach`` metres
    of height; the cell itself is not counted. One shifted minimum or maximum per cell of run."""
    h, w = a.shape
    run = float(np.hypot(*slope))  # metres sideways per metre up
    out = np.full((h, w), -np.inf if towards else np.inf)
    if run * reach < 0.5 * res:
        return out
    ux, uy = slope / run
    sign = -1 if towards else 1
    for s in range(1, int(math.ceil(reach * run / res)) + 1):
        dc, dr = sign * int(round(s * ux)), sign * int(round(-s * uy))  # rows run south
        if (dc == 0 and dr == 0) or abs(dr) >= h or abs(dc) >= w:
            continue
        dst = out[max(dr, 0) : h + min(dr, 0), max(dc, 0) : w + min(dc, 0)]
        src = a[max(-dr, 0) : h + min(-dr, 0), max(-dc, 0) : w + min(-dc, 0)]
        if towards:
            np.maximum(dst, src - s * res / run, out=dst)
        else:
            np.minimum(dst, src + s * res / run, out=dst)
    return out


def free_space_ceiling(
    heights: np.ndarray,
    seen: np.ndarray,
    slopes: np.ndarray,
    res: float,
    margin: float,
    trusted: np.ndarray | None = None,
) -> np.ndarray:
    """The highest each cell may stand [H, W] (inf: no limit) so that no ray from a cell to a view
    that sees it (``seen`` [C, H, W]) passes more than ``margin`` below it: a ray leaving cell c
    towards view k rises 1 / |slope_k| metres per metre, so the cell s metres along it may reach
    heights[c] + margin + s / |slope_k|.

    With ``trusted`` [H, W] (True: a cell whose height is sure), a cell counts as seen by view k only
    where no trusted cell between it and the view stands more than ``margin`` above its ray: a
    chance match on the ground that a building hides from the view must not cut that building."""
    span = float(heights.max() - heights.min()) + margin
    ceiling = np.full(heights.shape, np.inf)
    sure = None if trusted is None else np.where(trusted, heights, -np.inf)
    for k in range(len(slopes)):
        ok = seen[k]
        if sure is not None:
            ok = ok & (heights >= _along_rays(sure, slopes[k], res, span, towards=True) - margin)
        if ok.any():
            ceiling = np.minimum(
                ceiling,
                _along_rays(np.where(ok, heights + margin, np.inf), slopes[k], res, span, towards=False),
            )
    return ceiling


def lower_to_ceiling(
    z: np.ndarray, score: np.ndarray, ceiling: np.ndarray, cfg: DenseConfig, res: float
) -> tuple[np.ndarray, np.ndarray]:
    """The free-space step's new heights and the cells it lowered (``DenseConfig.free_space``)."""
    cut = (z > ceiling) & (score < cfg.free_space_trust)
    out = np.where(cut, ceiling, z)
    far = cut & (z - ceiling > cfg.free_space_drop)
    size = int(round(cfg.ground_window / res)) | 1
    if far.any() and cfg.ground_window > 0 and size >= 3:
        from scipy.ndimage import percentile_filter

        ground = percentile_filter(z, 10, size=size, mode="nearest")
        out = np.where(far, np.minimum(ceiling, ground), out)
    return out, cut


def _match(cost: WindowCost, guide: Tensor | None, cfg: DenseConfig) -> tuple[Tensor, Tensor]:
    """SGM on one window's shifted cost, winner, and refinement on its centred cost: per cell the
    sub-step plane position [H, W] (float64) and the score (better-half NCC at that height) [H, W]."""
    agg = sgm(cost.shifted, cfg.p1, cfg.p2, guide, cfg.edge_tau) if cfg.p2 > 0 else cost.shifted
    idx, pos = winner(agg)
    if cfg.refine > 0:
        pos = refine(cost.centred, idx, cfg.refine)
    score = 1 - cost.centred.gather(0, pos.round().long()[None])[0]
    return pos, score.double()


def block_cells(spacing: float, resolution: float) -> int:
    """Cells per side of the blocks that ``field_points`` turns into one point each: ``spacing``
    rounded to whole cells of ``resolution`` (so the grid used is this times ``resolution``)."""
    return max(1, int(round(spacing / resolution)))


def field_points(
    field: DenseHeights,
    spacing: float,
    min_score: float,
    ground_window: float = 0.0,
    ground_rise: float = 2.0,
    quantile: float = 0.5,
    step_jump: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 3] on a ``spacing`` grid of the field (each the median of its cells' heights, or
    their ``quantile`` where two neighbouring cells differ by more than ``step_jump`` metres; see
    ``DenseConfig.point_quantile``) where
    the median score reaches ``min_score``, and the ground-layer points [M, 3] beneath those that rise
    more than ``ground_rise`` above the 10th percentile of the trusted heights within ``ground_window``
    metres in a part that a step bounds (none when ``ground_window`` is 0; see
    ``DenseConfig.ground_window``)."""
    k = block_cells(spacing, field.resolution)
    h, w = field.heights.shape
    hh, ww = h // k * k, w // k * k
    if hh == 0 or ww == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:hh, :ww].reshape(hh // k, k, ww // k, k).transpose(0, 2, 1, 3).reshape(hh // k, ww // k, -1)

    zb = blocks(field.heights)
    z = np.median(zb, -1)
    if quantile != 0.5 and k > 1:
        cells = zb.reshape(*zb.shape[:2], k, k)
        jump = np.maximum(
            np.abs(np.diff(cells, axis=-1)).max((-2, -1)), np.abs(np.diff(cells, axis=-2)).max((-2, -1))
        )
        z = np.where(jump > step_jump, np.quantile(zb, quantile, axis=-1), z)
    s = np.median(blocks(field.score), -1)
    x, y = field.centres()
    cx, cy = blocks(x).mean(-1), blocks(y).mean(-1)
    ok = s >= min_score
    top = np.stack([cx[ok], cy[ok], z[ok]], 1)
    size = int(round(ground_window / (k * field.resolution))) | 1
    if ground_window <= 0 or not ok.any() or size < 3:
        return top, np.zeros((0, 3))
    from scipy.ndimage import label, percentile_filter

    # Untrusted cells count as high, so that they never pull the local ground down.
    zt = np.where(ok, z, z[ok].max())
    low = percentile_filter(zt, 10, size=size, mode="nearest")
    raised = ok & (z - low > ground_rise)
    # Only what rises in a step (a wall: more than ground_rise between neighbouring points of the
    # grid, i.e. steeper than ground_rise / spacing) stands on the ground; a hill's slope is its own
    # surface, with nothing beneath to show.
    zn = np.pad(np.where(ok, z, np.inf), 1, constant_values=np.inf)
    below = np.min([zn[1:-1, :-2], zn[1:-1, 2:], zn[:-2, 1:-1], zn[2:, 1:-1]], 0)
    steep = raised & (z - below > ground_rise)
    parts, _ = label(raised, structure=np.ones((3, 3)))
    up = raised & np.isin(parts, np.unique(parts[steep]))
    return top, np.stack([cx[up], cy[up], low[up]], 1)
