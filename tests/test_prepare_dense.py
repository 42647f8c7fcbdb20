"""Dense heights (``skyfall.prepare.dense``): a textured block on textured ground seen by far, tilted views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skyfall.cli.prepare import PrepareOptions
from skyfall.data.cameras import Cameras, look_at
from skyfall.errors import ConfigError
from skyfall.prepare.dense import (
    DenseConfig,
    DenseHeights,
    block_cells,
    dense_heights,
    field_points,
    free_space_ceiling,
    lower_to_ceiling,
    pair_ncc,
    seen_by,
    sgm,
    shiftable,
    sweep_cost,
    sweep_costs,
    view_slopes,
    winner,
)

F64 = torch.float64
SIDE, GSD, PX = 48.0, 0.5, 96  # metres, metres/px, pixels
BLOCK = (-8.0, 8.0, -6.0, 10.0, 7.0)  # x0, x1, y0, y1, height
FAR = 600e3


def _height(x: torch.Tensor, y: torch.Tensor, blocks: tuple = (BLOCK,)) -> torch.Tensor:
    z = torch.zeros_like(x)
    for x0, x1, y0, y1, h in blocks:
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        z = torch.where(inside, torch.tensor(h, dtype=x.dtype), z)
    return z


def _texture(seed: int, n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 1, n, n, generator=g), size=4 * n, mode="bicubic")


def _sample(tex: torch.Tensor, a: torch.Tensor, b: torch.Tensor, extent: float) -> torch.Tensor:
    g = torch.stack([a / extent, b / extent], -1).float()[None]
    return F.grid_sample(tex, g, align_corners=False, padding_mode="reflection")[0, 0].double()


def _camera(off_nadir_deg: float, azimuth_deg: float) -> torch.Tensor:
    t, a = math.radians(off_nadir_deg), math.radians(azimuth_deg)
    eye = FAR * torch.tensor([math.sin(t) * math.sin(a), math.sin(t) * math.cos(a), math.cos(t)], dtype=F64)
    return look_at(eye, torch.zeros(3, dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64))


def _render(
    K: torch.Tensor, c2w: torch.Tensor, blocks: tuple = (BLOCK,), plain_roof: bool = False
) -> torch.Tensor:
    """The height field's image by ray marching: roof and ground textured in x-y, walls in (x + y, z)
    (``plain_roof``: the roofs one grey)."""
    v, u = torch.meshgrid(torch.arange(PX, dtype=F64) + 0.5, torch.arange(PX, dtype=F64) + 0.5, indexing="ij")
    d = (torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K).T) @ c2w[:3, :3].T
    c = c2w[:3, 3]
    hit_z = torch.zeros(PX, PX, dtype=F64)
    found = torch.zeros(PX, PX, dtype=torch.bool)
    for z in torch.arange(max(b[4] for b in blocks) + 0.5, -0.001, -0.02, dtype=F64):
        t = (z - c[2]) / d[..., 2]
        p = c + t[..., None] * d
        hit = ~found & (_height(p[..., 0], p[..., 1], blocks) >= z)
        hit_z = torch.where(hit, z, hit_z)
        found |= hit
    t = (hit_z - c[2]) / d[..., 2]
    p = c + t[..., None] * d
    surface = _height(p[..., 0], p[..., 1], blocks)
    top = surface <= hit_z + 0.03
    ground = 0.6 * _sample(_texture(1), p[..., 0], p[..., 1], SIDE)
    roof = 0.4 + 0.6 * _sample(_texture(3), p[..., 0], p[..., 1], SIDE)  # brighter, as roofs are
    if plain_roof:
        roof = torch.full_like(roof, 0.7)
    wall = _sample(_texture(2), p[..., 0] + p[..., 1], 4 * hit_z - 20, SIDE)
    return torch.where(top, torch.where(surface > 0, roof, ground), wall).float()


def _views(
    angles: list[tuple[float, float]], blocks: tuple = (BLOCK,), plain_roof: bool = False
) -> tuple[torch.Tensor, Cameras]:
    f = FAR / GSD
    K = torch.tensor([[f, 0, PX / 2], [0, f, PX / 2], [0, 0, 1]], dtype=F64)
    c2w = torch.stack([_camera(*a) for a in angles])
    grey = torch.stack([_render(K, c, blocks, plain_roof) for c in c2w])
    return grey, Cameras(c2w, K, PX, PX)


@pytest.fixture(scope="module")
def block_views() -> tuple[torch.Tensor, Cameras]:
    return _views([(3.0, 40.0), (18.0, 200.0), (22.0, 300.0), (15.0, 100.0)])


def _truth(field) -> np.ndarray:
    x, y = field.centres()
    return _height(torch.from_numpy(x), torch.from_numpy(y)).numpy()


def _edge_distance(field) -> np.ndarray:
    x, y = field.centres()
    x0, x1, y0, y1, _ = BLOCK
    dx = np.maximum.reduce([x0 - x, x - x1, np.zeros_like(x)])
    dy = np.maximum.reduce([y0 - y, y - y1, np.zeros_like(y)])
    outside = np.hypot(dx, dy)
    inside = np.minimum.reduce([x - x0, x1 - x, y - y0, y1 - y])
    return np.where(outside > 0, outside, inside)


HALF = SIDE / 2 - 4  # the dense grid's half side: 4 m inside the rendered square


def _dense(grey: torch.Tensor, cams: Cameras, valid: torch.Tensor | None = None, **kw) -> DenseHeights:
    """``dense_heights`` over the test grid and the -2..10 m height range (``kw``: DenseConfig)."""
    valid = torch.ones_like(grey, dtype=torch.bool) if valid is None else valid
    return dense_heights(
        grey, valid, cams, (-HALF, HALF, -HALF, HALF), (-2.0, 10.0), DenseConfig(**kw), gsd=GSD
    )


def _empty_field() -> DenseHeights:
    """A field of zeros on the test grid, for its cell centres and the truth there."""
    n = int(2 * HALF / GSD)
    return DenseHeights(np.zeros((n, n)), np.zeros((n, n)), -HALF, HALF, GSD, 0.25, 0)


def test_heights_of_block_and_ground_are_recovered(block_views) -> None:
    grey, cams = block_views
    field = _dense(grey, cams)
    assert field.heights.shape == (80, 80) and field.resolution == pytest.approx(GSD)
    err = np.abs(field.heights - _truth(field))
    far_from_edges = np.abs(_edge_distance(field)) >= 2.0
    assert np.median(err[far_from_edges]) < 0.1
    assert np.mean(err[far_from_edges] < 0.5) > 0.95
    # Near the block's outline (walls, occlusions) most cells still get the right side of the edge.
    near = ~far_from_edges
    assert np.mean(err[near] < 1.0) > 0.8
    assert np.median(field.score[far_from_edges]) > 0.8


def test_shiftable_windows_and_sgm_reduce_errors_at_the_edges(block_views) -> None:
    grey, cams = block_views

    def mae(**kw) -> float:
        f = _dense(grey, cams, **kw)
        return float(np.abs(f.heights - _truth(f)).mean())

    plain = mae(shift=1, p1=0.0, p2=0.0)
    full = mae()
    assert full < 0.8 * plain


ALLEY = 3.0  # metres between two 7 m blocks


@pytest.fixture(scope="module")
def alley_views() -> tuple[tuple[torch.Tensor, Cameras], tuple]:
    blocks = ((-12.0, -ALLEY / 2, -8.0, 10.0, 7.0), (ALLEY / 2, 12.0, -8.0, 10.0, 7.0))
    return _views([(3.0, 40.0), (18.0, 200.0), (22.0, 300.0), (15.0, 100.0)], blocks), blocks


def _alley_errors(alley_views, **kw) -> tuple[float, float]:
    """Mean height error in the alley and over the whole grid."""
    (grey, cams), blocks = alley_views
    f = _dense(grey, cams, **kw)
    x, y = f.centres()
    err = np.abs(f.heights - _height(torch.from_numpy(x), torch.from_numpy(y), blocks).numpy())
    alley = (np.abs(x) < ALLEY / 2) & (y > -6.0) & (y < 8.0)
    return float(err[alley].mean()), float(err.mean())


def test_small_windows_find_the_ground_of_an_alley(alley_views) -> None:
    """A 3 m alley between two 7 m blocks: the 5-cell window around an alley cell always reaches into
    a roof, so the sweep lifts the alley to roof height; a 3-cell window finds its ground
    (``DenseConfig.window``: the price is chance matches on weak texture)."""
    # Without the colour term, which keeps some alley cells to windows on the alley's own grey.
    alley_small, all_small = _alley_errors(alley_views, window=3, shift=3, shift_colour=0.0)
    alley_wide, all_wide = _alley_errors(alley_views, rematch_window=0, shift_colour=0.0)
    assert alley_wide > 5.0  # roof height
    assert alley_small < 0.7 * alley_wide and all_small < all_wide


def test_rematch_takes_the_small_window_only_where_it_finds_lower_ground(alley_views, block_views) -> None:
    """``rematch_window``: the small window's height replaces the wide one's only where it is lower
    and agreed on, so the alley gets most of the small window's gain while noisy views keep the
    wide window's robustness (where the small window alone goes wrong)."""
    # the default rematches with 3 cells (free space off: it lowers the alley too, see below)
    assert (
        _alley_errors(alley_views, free_space=0.0)[0]
        < 0.75 * _alley_errors(alley_views, rematch_window=0, free_space=0.0)[0]
    )

    block_grey, block_cams = block_views
    noisy = block_grey + 0.2 * torch.randn(block_grey.shape, generator=torch.Generator().manual_seed(0))

    def noisy_error(**kw) -> float:
        f = _dense(noisy, block_cams, **kw)
        return float(np.abs(f.heights - _truth(f)).mean())

    wide, small, both = noisy_error(rematch_window=0), noisy_error(window=3, shift=3), noisy_error()
    assert small > 1.15 * wide  # the small window alone matches the noise
    assert both < 1.05 * wide


def test_free_space_lowers_the_alley_that_the_matches_lift(alley_views) -> None:
    """Rays from the ground that the oblique views see beyond the blocks pass under the alley cells
    read at roof height (``DenseConfig.free_space``), with or without the rematch."""
    for kw in ({}, {"rematch_window": 0}):
        assert _alley_errors(alley_views, **kw)[0] < 0.9 * _alley_errors(alley_views, free_space=0.0, **kw)[0]


def test_colour_term_keeps_a_plain_roof_off_the_ground() -> None:
    """A roof of one grey on textured ground: the best-matching shifted window of a roof cell is one
    that reaches onto the ground, whose height it then takes; with the colour term it keeps to
    windows on the roof (``DenseConfig.shift_colour``)."""
    grey, cams = _views([(3.0, 40.0), (18.0, 200.0), (22.0, 300.0), (15.0, 100.0)], plain_roof=True)

    def errors(**kw) -> tuple[float, float]:
        f = _dense(grey, cams, **kw)
        truth = _truth(f)
        err = np.abs(f.heights - truth)
        return float(err[truth > 0].mean()), float(err.mean())

    (roof, whole), (roof_off, whole_off) = errors(), errors(shift_colour=0.0)
    assert roof < 0.75 * roof_off and whole < 0.8 * whole_off


def test_edge_aware_penalty_keeps_the_block_outline(block_views) -> None:
    """The large-jump penalty that noisy cities need would round the block's outline off; following
    the near-nadir view's edges keeps it."""
    grey, cams = block_views

    def near_edge_ok(**kw) -> float:
        f = _dense(grey, cams, **kw)
        near = np.abs(_edge_distance(f)) < 2.0
        return float(np.mean(np.abs(f.heights - _truth(f))[near] < 1.0))

    with_edges = near_edge_ok()
    assert with_edges > 0.8 and near_edge_ok(edge_tau=0.0) < with_edges - 0.1


def test_sgm_recovers_a_smooth_surface_from_noisy_costs() -> None:
    g = torch.Generator().manual_seed(0)
    d, h, w = 20, 32, 32
    truth = torch.full((h, w), 7)
    truth[:, 16:] = 12  # one jump
    cost = 0.1 + torch.rand(d, h, w, generator=g)
    cost.scatter_(
        0, truth[None], 0.3 * torch.rand(1, h, w, generator=g)
    )  # the truth is the minimum half the time
    raw = (cost.argmin(0) == truth).float().mean()
    agg = (sgm(cost, 0.1, 1.0).argmin(0) == truth).float().mean()
    assert raw < 0.6 and agg > 0.93


@pytest.mark.parametrize("seed", [0, 1])
def test_three_views_average_two_pairs_not_the_best_one(seed: int) -> None:
    # Three views give three pairs; the best pair alone is a maximum over chance correlations.
    grey, cams = _views([(3.0, 40.0), (18.0, 200.0), (22.0, 300.0)])
    g = torch.Generator().manual_seed(seed)
    noisy = grey + 0.2 * torch.randn(grey.shape, generator=g)
    valid = torch.ones_like(grey, dtype=torch.bool)
    field = _empty_field()
    xy = field.centres()
    heights = np.arange(-2.0, 10.0 + 1e-9, 0.25)
    truth = _truth(field)

    def wta_error(**kw) -> float:
        cost = sweep_cost(noisy, valid, cams, xy, heights, 5, **kw)
        return float(np.abs(heights[cost.argmin(0).numpy()] - truth).mean())

    default, best_pair = wta_error(), wta_error(keep=1)
    assert default < 0.85 * best_pair
    assert wta_error(keep=2) == default


def test_one_sweep_for_two_windows_gives_each_window_its_own_cost() -> None:
    """The rematch's sweep shares the sampling with the main one: the same costs as two sweeps."""
    grey, cams = _views([(3.0, 40.0), (18.0, 200.0), (22.0, 300.0)])
    valid = torch.ones_like(grey, dtype=torch.bool)
    valid[1, :, :20] = False  # a view without data somewhere: the masks are shared too
    xy = _empty_field().centres()
    heights = np.arange(-2.0, 10.0 + 1e-9, 0.5)
    five, three = sweep_costs(grey, valid, cams, xy, heights, (5, 3), shifts=(5, 3))
    assert torch.equal(five.centred, sweep_cost(grey, valid, cams, xy, heights, 5))
    assert torch.equal(three.centred, sweep_cost(grey, valid, cams, xy, heights, 3))
    assert not torch.equal(five.centred, three.centred)
    # Without the colour term the shifted cost is the neighbourhood's minimum of the centred one.
    assert torch.equal(five.shifted, shiftable(five.centred, 5))
    assert torch.equal(three.shifted, shiftable(three.centred, 3))


def test_winner_interpolates_the_minimum_of_a_parabola() -> None:
    pos = torch.tensor([3.3, 5.7, 1.0])
    d = torch.arange(10, dtype=torch.float32)[:, None, None]
    cost = (d - pos[None, None]) ** 2  # [10, 1, 3]
    idx, sub = winner(cost)
    assert idx[0].tolist() == [3, 6, 1]
    assert torch.allclose(sub[0], pos.double(), atol=1e-5)


def test_points_keep_trusted_cells_on_the_spacing_grid(block_views) -> None:
    grey, cams = block_views
    valid = torch.ones_like(grey, dtype=torch.bool)
    valid[:, :, : PX // 2] = False  # the western half has no data in any view
    field = _dense(grey, cams, valid)
    pts, ground = field_points(field, 2.0, 0.3)
    assert len(ground) == 0  # no layer unless asked for
    # the grid is the spacing rounded to whole cells
    k = block_cells(2.0, field.resolution)
    assert k == round(2.0 / field.resolution) and block_cells(0.1, field.resolution) == 1
    assert np.allclose(np.diff(np.unique(pts[:, 0].round(6))).min(), k * field.resolution)
    assert 100 < len(pts) < 20 * 20 / 2 + 20
    assert pts[:, 0].min() > -6.0  # nothing where no view has data
    truth = _height(torch.from_numpy(pts[:, 0]), torch.from_numpy(pts[:, 1])).numpy()
    assert np.median(np.abs(pts[:, 2] - truth)) < 0.3


@pytest.mark.parametrize(
    ("kw", "what"),
    [({"window": 4}, "window"), ({"shift": 0}, "shift"), ({"p1": 1.0, "p2": 0.5}, "p2"),
     ({"spacing": 0.0}, "spacing"), ({"step": -1.0}, "step"), ({"ground_window": -1.0}, "ground_window"),
     ({"ground_rise": 0.0}, "ground_rise"), ({"window": 3, "shift": 5}, "shift"),
     ({"rematch_window": 2}, "rematch_window"), ({"rematch_drop": -1.0}, "rematch_drop"),
     ({"rematch_score": 1.5}, "rematch_score"), ({"rematch_score": float("nan")}, "rematch_score"),
     ({"point_quantile": 1.2}, "dense-quantile"), ({"shift_colour": -1.0}, "shift_colour"),
     ({"step_jump": -1.0}, "step_jump"), ({"free_space": 1.5}, "free_space"),
     ({"free_space_trust": -2.0}, "free_space_trust"), ({"free_space_margin": -1.0}, "free_space_margin"),
     ({"free_space_drop": float("nan")}, "free_space_drop")],
)  # fmt: skip
def test_bad_options_name_the_option(kw: dict, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        DenseConfig(**kw).check()


def test_points_take_the_chosen_quantile_of_a_block_that_straddles_an_outline() -> None:
    """A 10 m step through a column of 2 m blocks (4 x 4 cells): with three of a block's four columns
    on the roof both the median and the 0.35 quantile stand on the roof; with two, the median is
    halfway up (the mean of the middle cells) and the 0.35 quantile on the ground. Blocks off the
    edge are the same either way."""
    n, res = 24, 0.5
    heights = np.zeros((n, n))
    heights[:, 9:] = 10.0  # the blocks of columns 8..11 straddle the edge: columns 9, 10, 11 are roof
    field = DenseHeights(heights, np.full((n, n), 0.9), 0.0, n * res, res, res / 2, 40)
    med, _ = field_points(field, 2.0, 0.3)
    low, _ = field_points(field, 2.0, 0.3, quantile=0.35)
    edge = np.abs(med[:, 0] - 5.0) < 0.01  # the straddling blocks' centres, x = 4..6 m
    assert edge.sum() == 6
    assert np.allclose(med[edge, 2], 10.0)  # 12 of 16 cells at 10 m: the median is roof
    assert np.allclose(low[edge, 2], 10.0)  # the 0.35 quantile too (a quarter of the cells is ground)
    heights[:, 9] = 0.0  # now columns 10, 11 only: half and half
    med, _ = field_points(field, 2.0, 0.3)
    low, _ = field_points(field, 2.0, 0.3, quantile=0.35)
    assert np.allclose(med[edge, 2], 5.0) and np.allclose(low[edge, 2], 0.0)
    assert np.allclose(med[~edge], low[~edge])


def test_a_smooth_slope_keeps_its_median_and_only_blocks_with_a_step_go_low() -> None:
    """The low quantile is for blocks that an outline cuts; on a slope (0.8 m/m, 0.4 m between
    neighbouring cells) it would put every point below the surface."""
    n, res = 24, 0.5
    x = (np.arange(n) + 0.5) * res
    heights = np.broadcast_to(0.8 * x, (n, n)).copy()
    field = DenseHeights(heights, np.full((n, n), 0.9), 0.0, n * res, res, res / 2, 40)
    low, _ = field_points(field, 2.0, 0.3, quantile=0.15)
    assert np.allclose(low[:, 2], 0.8 * low[:, 0])  # the median: the slope at each block's centre
    heights[:, 10:] += 3.0  # a 3 m wall across the slope, inside the blocks of columns 8..11
    low, _ = field_points(field, 2.0, 0.3, quantile=0.15)
    edge = np.abs(low[:, 0] - 5.0) < 0.01
    want = np.quantile(heights[:4, 8:12], 0.15)
    assert edge.sum() == 6 and np.allclose(low[edge, 2], want) and want < 0.8 * 5.0 - 0.5
    assert np.allclose(low[~edge, 2], 0.8 * low[~edge, 0] + 3.0 * (low[~edge, 0] > 5.0))
    # A lower jump threshold than the slope's steps: the slope goes low too.
    lower, _ = field_points(field, 2.0, 0.3, quantile=0.15, step_jump=0.3)
    assert (lower[~edge, 2] < low[~edge, 2] - 0.2).all()


def test_ground_layer_lies_under_raised_cells_at_the_local_ground() -> None:
    # A 40 m square of 0.5 m cells: ground sloping 0.05 m/m, a 10 m block and one untrusted cell.
    n, res = 80, 0.5
    x = (np.arange(n) + 0.5) * res
    ground = np.broadcast_to(0.05 * x, (n, n)).copy()
    heights = ground.copy()
    heights[20:40, 32:52] += 10.0  # rows 20..39, columns 32..51: 10 m x 10 m, on whole 2 m blocks
    score = np.full((n, n), 0.9)
    score[60:64, 60:64] = 0.0
    field = DenseHeights(heights, score, 0.0, n * res, res, res / 2, 40)
    top, low = field_points(field, 2.0, 0.3, ground_window=22.0, ground_rise=2.0)
    assert len(top) == 20 * 20 - 1  # every 2 m block but the untrusted one
    assert len(low) == 5 * 5  # one under each block of the 10 m square
    under = (low[:, 0] > 16) & (low[:, 0] < 26) & (low[:, 1] > 20) & (low[:, 1] < 30)
    assert under.all()
    # Each at about the ground around it: the 10th percentile of an 11-block window on the slope.
    assert np.abs(low[:, 2] - 0.05 * low[:, 0]).max() < 0.05 * 10 + 0.1
    raised = top[top[:, 2] - 0.05 * top[:, 0] > 5]
    assert np.allclose(np.sort(raised[:, :2], 0), np.sort(low[:, :2], 0))
    # No layer when the window is 0, nor where nothing rises above the ground.
    assert len(field_points(field, 2.0, 0.3, ground_window=0.0)[1]) == 0
    flat = DenseHeights(ground, score, 0.0, n * res, res, res / 2, 40)
    assert len(field_points(flat, 2.0, 0.3, ground_window=22.0)[1]) == 0
    # A smooth hill as tall as the block (slopes up to 0.6) rises above the local ground too, but in
    # no step: no layer.
    r2 = (x[None, :] - 20.0) ** 2 + (x[:, None] - 20.0) ** 2
    hill = DenseHeights(ground + 10.0 * np.exp(-r2 / (2 * 10.0**2)), score, 0.0, n * res, res, res / 2, 40)
    hill_top, hill_low = field_points(hill, 2.0, 0.3, ground_window=22.0, ground_rise=2.0)
    assert (hill_top[:, 2] - 0.05 * hill_top[:, 0]).max() > 9.0 and len(hill_low) == 0
    # The same hill with the block on its flank: the block's part gets its layer, the hill still none.
    both = hill.heights.copy()
    both[20:40, 32:52] += 10.0
    _, both_low = field_points(DenseHeights(both, score, 0.0, n * res, res, res / 2, 40), 2.0, 0.3, 22.0)
    assert len(both_low) >= 25


def test_prepare_options_default_to_the_dense_config() -> None:
    """`skyfall prepare`'s dense options repeat DenseConfig's defaults (the CLI module must not import
    torch, so it cannot read them): they must not drift apart."""
    assert PrepareOptions().config().dense == DenseConfig()


def test_free_space_ceiling_rises_along_each_seen_cells_ray() -> None:
    """A ray from a seen cell to its view rises 1 / run metres per metre (run: metres sideways per
    metre up), and the cells it passes over may stand at most ``margin`` above it."""
    z = np.zeros((12, 30))
    z[0, 29] = 12.0  # a ray that has risen above the highest cell limits nothing: 12.5 m of reach
    seen = np.zeros((2, 12, 30), bool)
    seen[0, :, 5] = True  # view 0, towards the east, sees column 5
    seen[1, 8, :] = True  # view 1, towards the north, sees row 8
    slopes = np.array([[0.5, 0.0], [0.0, 0.25]])
    c = free_space_ceiling(z, seen, slopes, 1.0, 0.5)
    # east of column 5 along view 0's rays: 0.5 + 2 m per cell; its own column and the west unlimited
    # there except where view 1's rays from row 8 pass (4 m per cell northwards)
    row = 10  # south of row 8: only view 0 limits it
    assert np.allclose(c[row, 6:13], 0.5 + 2.0 * np.arange(1, 8))
    assert np.isinf(c[row, :6]).all() and np.isinf(c[row, 13:]).all()  # 12.5 m of height = 6.25 cells
    col = 2  # west of column 5: only view 1 limits it, north of row 8
    assert np.allclose(c[4:8, col], 0.5 + 4.0 * np.array([4, 3, 2, 1]))
    assert np.isinf(c[8:, col]).all() and np.isinf(c[:4, col]).all()
    assert c[7, 6] == min(0.5 + 2.0, 0.5 + 4.0)
    # a nadir view (no run) limits nothing
    assert np.isinf(free_space_ceiling(z, seen[:1], np.array([[0.0, 0.0]]), 1.0, 0.5)).all()
    # a trusted 20 m wall 3 cells east of column 5 hides it from view 0 (its ray is 6 m up there), so
    # column 5 limits nothing; an untrusted wall does not count
    walled = z.copy()
    walled[:, 8] = 20.0
    trusted = np.zeros_like(seen[0])
    trusted[:, 8] = True
    assert np.isinf(free_space_ceiling(walled, seen[:1], slopes[:1], 1.0, 0.5, trusted)[row, 6:8]).all()
    assert np.allclose(free_space_ceiling(walled, seen[:1], slopes[:1], 1.0, 0.5)[row, 6:8], [2.5, 4.5])


def test_lowering_takes_unsure_cells_to_their_ceiling_or_the_local_ground() -> None:
    z = np.full((20, 20), 10.0)
    z[:, :10] = 0.0  # ground west, a roof east
    score = np.full(z.shape, 0.9)
    ceiling = np.full(z.shape, np.inf)
    ceiling[:, 10] = 10.3  # above the roof (the margin is in the ceiling): nothing to lower
    ceiling[:, 11] = 9.6  # a little under: to the ceiling
    ceiling[:, 12] = 4.0  # far under: to the local ground
    score[:, 11:13] = 0.5
    cfg = DenseConfig()
    out, cut = lower_to_ceiling(z, score, ceiling, cfg, 1.0)
    assert (out[:, 10] == 10.0).all() and np.allclose(out[:, 11], 9.6) and np.allclose(out[:, 12], 0.0)
    assert cut[:, 11:13].all() and cut.sum() == 40
    # a trusted cell keeps its height whatever the rays say
    score[:, 12] = DenseConfig().free_space_trust
    out, _ = lower_to_ceiling(z, score, ceiling, cfg, 1.0)
    assert (out[:, 12] == 10.0).all()
    # without a ground window the far cells stop at the ceiling
    out, _ = lower_to_ceiling(z, np.full(z.shape, 0.5), ceiling, DenseConfig(ground_window=0.0), 1.0)
    assert np.allclose(out[:, 12], 4.0)


def test_free_space_lowers_a_band_beside_a_wall_that_the_oblique_view_sees_past() -> None:
    """Rendered views, a 7 m block, and a height field that carries the roof 5 m south over the
    ground (what semi-global matching does where only one view sees the ground beside the wall).
    The northern view sees the ground beyond the wall's 3.3 m blind strip, and its rays from there
    pass under the far part of the band: that part comes down to the ground, the blind strip (no
    view but the near-nadir one sees it) and the roof stay."""
    grey, cams = _views([(3.0, 40.0), (25.0, 0.0), (20.0, 60.0)])
    valid = torch.ones_like(grey, dtype=torch.bool)
    field = _empty_field()
    x, y = field.centres()
    truth = _truth(field)
    x0, x1, y0, y1, h = BLOCK
    band = (x > x0 + 1) & (x < x1 - 1) & (y < y0) & (y > y0 - 5.0)
    z = np.where(band, h, truth)
    score = np.where(band, 0.4, 0.9)
    xy = (x, y)
    seen = seen_by(pair_ncc(grey, valid, cams, xy, z, 5), 3, 0.6).numpy()
    slopes = view_slopes(cams, xy, z)
    assert np.allclose(np.hypot(*slopes.T), np.tan(np.radians([3.0, 25.0, 20.0])), rtol=0.02)
    assert slopes[1, 1] > 0 and abs(slopes[1, 0]) < 1e-3  # towards the north
    assert seen[:, truth > 0].mean() > 0.8  # the textured roof is seen by every view
    ceiling = free_space_ceiling(z, seen, slopes, GSD, 0.5, score >= DenseConfig().free_space_trust)
    out, cut = lower_to_ceiling(z, score, ceiling, DenseConfig(), GSD)
    d = y0 - y  # distance south of the wall
    far, blind = band & (d > 4.0), band & (d < 2.5)
    assert np.mean(out[far] < 1.0) > 0.8
    assert np.mean(out[blind] > h - 0.5) > 0.8
    assert not cut[truth > 0].any()
