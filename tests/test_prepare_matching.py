"""NCC matching of `skyfall prepare`: the sub-pixel refinement and the multi-view height sweep.

Views of a flat textured ground (z = 0) are rendered exactly through satellite-like pinholes (700 km
away, 0.5 m per pixel), so every keypoint's true match is known: its ray meets the ground, and the
other view projects that point.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from skyfall.prepare.matching import (
    MatchConfig,
    _local_affine,
    _refine,
    _Searched,
    match_multiview,
    match_pair,
    pixel_rays,
)
from skyfall.prepare.pinhole import project_pinhole

SIZE = 160  # px
Z_RANGE = (-15.0, 15.0)
PERIOD_M = 3.0


def _camera(azimuth_deg: float, elevation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """A north-up pinhole looking at the origin from (azimuth, elevation): image x runs east, as in
    satellite images of one area (the matcher compares unrotated windows)."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    centre = 7.0e5 * np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])
    fwd = -centre / np.linalg.norm(centre)
    x = np.array([1.0, 0.0, 0.0]) - fwd[0] * fwd
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(fwd, x), fwd], 1)  # OpenCV: x right, y down, z forward
    c2w[:3, 3] = centre
    f = np.linalg.norm(centre) / 0.5
    return np.array([[f, 0, SIZE / 2], [0, f, SIZE / 2], [0, 0, 1.0]]), c2w


def _texture(seed: int = 0):
    """Ground texture: a pattern that repeats every PERIOD_M metres east, modulated and offset by
    random functions of the northing (2-D structure, but the same every PERIOD_M along x)."""
    rng = np.random.default_rng(seed)
    ys = np.arange(-80.0, 80.0, 0.25)
    g = ndimage.gaussian_filter1d(rng.normal(size=len(ys)), 4.0)
    h = ndimage.gaussian_filter1d(rng.normal(size=len(ys)), 3.0)
    g = 0.6 + 0.4 * (g - g.min()) / np.ptp(g)
    h = 0.5 * (h - h.min()) / np.ptp(h)

    def tex(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = 0.5 + 0.5 * np.sin(2 * np.pi * x / PERIOD_M)
        return s * np.interp(y, ys, g) + np.interp(y, ys, h)

    return tex


def _render(cam: tuple[np.ndarray, np.ndarray], tex, ss: int = 3) -> np.ndarray:
    """The view of the textured plane z = 0 (ss x ss samples per pixel, box-filtered), in 0..1."""
    sub = (np.arange(SIZE * ss) + 0.5) / ss  # sample positions, pixel centres at +0.5
    jj, ii = np.meshgrid(sub, sub)
    uv = np.stack([jj, ii], -1).reshape(-1, 2)
    origin, d = pixel_rays(*cam, uv)
    t = -origin[2] / d[:, 2]
    p = origin + t[:, None] * d
    img = tex(p[:, 0], p[:, 1]).reshape(SIZE * ss, SIZE * ss)
    img = img.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))
    return (img - img.min()) / np.ptp(img)


def _truth(cam0, camk, uv0: np.ndarray) -> np.ndarray:
    origin, d = pixel_rays(*cam0, uv0)
    p = origin + (-origin[2] / d[:, 2])[:, None] * d
    return project_pinhole(*camk, p)


CAMS = [_camera(0, 85), _camera(90, 65), _camera(0, 65)]


def test_multiview_sweep_resolves_a_pattern_repeating_along_one_epipolar_line() -> None:
    """View 1 looks from the east: its epipolar lines run along the ground's x, along which the
    pattern repeats, so pair 0-1 alone cannot tell heights PERIOD_M / cot(65°) apart (its uniqueness
    test rejects nearly every keypoint). View 2 looks from the north, where the texture does not
    repeat. The sweep over both views finds the true height, and view 1's match with it."""
    tex = _texture()
    imgs = [_render(c, tex) for c in CAMS]
    valids = [np.ones((SIZE, SIZE), bool)] * 3
    cfg = MatchConfig(search_margin=1.0)  # the sweep's band (the cameras are exact)
    n_kp = (SIZE // cfg.cell) ** 2

    def errors(m) -> np.ndarray:  # noqa: ANN001
        return np.linalg.norm(m.uvk - _truth(CAMS[m.ref], CAMS[m.view], m.uv0), axis=1)

    e01 = errors(match_pair(imgs[0], valids[0], CAMS[0], imgs[1], valids[1], CAMS[1], Z_RANGE, 1, cfg))
    e02 = errors(match_pair(imgs[0], valids[0], CAMS[0], imgs[2], valids[2], CAMS[2], Z_RANGE, 2, cfg))
    assert (e01 < 0.2).sum() < 0.1 * n_kp  # ambiguous
    assert (e02 < 0.2).sum() > 0.3 * n_kp and np.median(e02) < 0.01  # unambiguous
    sweep = {m.view: m for m in match_multiview(imgs, valids, CAMS, Z_RANGE, 0, [1, 2], cfg, margin=1.0)}
    assert all(m.ref == 0 for m in sweep.values()) and set(sweep) == {1, 2}
    for k in (1, 2):
        e = errors(sweep[k])
        assert (e < 0.2).sum() > 0.45 * n_kp, k
        assert np.median(e) < 0.01 and np.mean(e > 1.0) < 0.05, k


def test_refine_converges_to_the_ncc_maximum() -> None:
    """With windows that do not match exactly (NCC < 1: part of the template darkened, as by a
    shadow), Gauss-Newton must stop at the NCC maximum, not where the unprojected gradient of the
    window difference vanishes."""
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 1.2)
    img = (img - img.min()) / np.ptp(img)
    cfg = MatchConfig(half=4)
    target = _Searched(img, np.ones(img.shape, bool), cfg)
    h = cfg.half
    ty, tx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    shift = np.array([0.3, -0.2])  # (x, y) of the true window centre relative to pixel (32, 32)
    x0, y0 = 32.0, 32.0
    tpl = ndimage.map_coordinates(img, [y0 + shift[1] + ty, x0 + shift[0] + tx], order=3)
    tpl[:, :3] = 0.8 * tpl[:, :3] + 0.05  # the left third darker (a shadow) with less contrast
    tpl = tpl - tpl.mean()
    tpl /= np.linalg.norm(tpl)

    def ncc(x: float, y: float) -> float:
        w = ndimage.map_coordinates(img, [y + ty, x + tx], order=3)
        w = w - w.mean()
        return float((w * tpl).sum() / np.linalg.norm(w))

    got = _refine(target.spline, tpl, x0, y0, h, 64, 64, np.eye(2))
    assert got is not None
    # The NCC maximum by a coarse-to-fine grid search.
    best = np.array([x0, y0])
    for step in (0.05, 0.005, 0.0005):
        grid = best + step * np.stack(np.meshgrid(np.arange(-10, 11), np.arange(-10, 11)), -1).reshape(-1, 2)
        best = grid[np.argmax([ncc(*p) for p in grid])]
    assert ncc(*best) < 0.99  # the windows really differ
    assert np.abs(best - [x0, y0] - shift).max() > 0.05  # and the NCC maximum moved
    assert np.abs(np.array(got) - best).max() < 0.0015, (got, best)


def test_local_affine_maps_ground_offsets_between_views() -> None:
    """The warp of the refinement: ground-plane offsets around a point, seen from two views."""
    uv0 = np.array([[80.5, 80.5]])
    uvk = _truth(CAMS[0], CAMS[1], uv0)
    a = _local_affine(CAMS[0], CAMS[1], uv0[0], uvk[0])
    step = np.array([[3.0, 0.0], [0.0, 3.0]])
    moved = _truth(CAMS[0], CAMS[1], uv0 + step)
    assert np.abs(moved - uvk - step @ a.T).max() < 1e-3
