"""The multi-view photometric consistency term: a textured plane seen by far, tilted cameras."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from skyfall.data.cameras import look_at
from skyfall.losses import multiview_ncc_loss, patch_ncc, source_views

H = W = 64
F64 = torch.float64


def _cam(eye: tuple[float, float, float]) -> torch.Tensor:
    return look_at(
        torch.tensor(eye, dtype=F64), torch.zeros(3, dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    )


def _plane_view(K: torch.Tensor, c2w: torch.Tensor, texture: torch.Tensor, gain: float = 1.0):
    """Image of the textured plane z = 0 (texture over [-32, 32]² m) and the z-depth of every pixel."""
    v, u = torch.meshgrid(torch.arange(H, dtype=F64) + 0.5, torch.arange(W, dtype=F64) + 0.5, indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K).T
    d = rays @ c2w[:3, :3].T
    t = -c2w[2, 3] / d[..., 2]  # rays have camera z = 1, so t is the z-depth
    p = c2w[:3, 3] + t[..., None] * d
    grid = (p[..., :2] / 32).float()[None]
    img = F.grid_sample(texture, grid, align_corners=False)[0, 0]
    return gain * img + 0.1, t


def _scene(far: float = 1.0):
    torch.manual_seed(0)
    texture = F.interpolate(torch.rand(1, 1, 16, 16), size=64, mode="bicubic")
    K = torch.tensor([[80.0 * far, 0, 32], [0, 80.0 * far, 32], [0, 0, 1]], dtype=F64)
    cams = [
        _cam((0.0, 0.0, 60.0 * far)),
        _cam((20.0 * far, 5.0 * far, 60.0 * far)),
        _cam((-15.0 * far, -10 * far, 60.0 * far)),
    ]
    views = [_plane_view(K, c, texture, gain) for c, gain in zip(cams, (1.0, 0.7, 1.3), strict=True)]
    return K, cams, views


def _loss(depth, K, cams, views, valid=None, src=(1, 2), **kw):
    ones = torch.ones(H, W, dtype=torch.bool)
    return multiview_ncc_loss(
        depth,
        ones if valid is None else valid,
        views[0][0],
        K,
        cams[0],
        torch.stack([views[i][0] for i in src]),
        torch.ones(len(src), H, W, dtype=torch.bool),
        K[None].expand(len(src), 3, 3),
        torch.stack([cams[i] for i in src]),
        **kw,
    )


def test_true_depth_scores_best_and_the_gradient_points_back_to_it():
    K, cams, views = _scene()
    true = views[0][1].float()
    at_truth = float(_loss(true, K, cams, views))
    assert at_truth < 0.01  # different gains: NCC ignores them
    for off in (1.0, -1.0):
        d = (true + off).requires_grad_()
        loss = _loss(d, K, cams, views)
        loss.backward()
        assert float(loss.detach()) > 5 * at_truth
        # descending the gradient moves the depth back towards the truth
        assert math.copysign(1.0, float(d.grad.sum())) == math.copysign(1.0, off)


def test_far_satellite_like_cameras_keep_their_precision():
    """Cameras 600 km away (depths ~6e5 in float32): geometry runs in float64, so 5 m of depth still shows."""
    K, cams, views = _scene(far=1e4)
    true = views[0][1].float()
    assert float(_loss(true, K, cams, views)) < 0.02
    assert float(_loss(true + 5.0, K, cams, views)) > 0.05


def test_a_pixel_is_judged_by_its_best_source():
    """A source that shows something else (an occluder) does not raise the loss while another agrees."""
    K, cams, views = _scene()
    true = views[0][1].float()
    centre = torch.zeros(H, W, dtype=torch.bool)
    centre[16:48, 16:48] = True  # seen by both sources
    one = float(_loss(true, K, cams, views, valid=centre, src=(1,)))
    views_occ = list(views)
    views_occ[2] = (torch.rand(H, W), views[2][1])  # source 2 sees noise everywhere
    assert float(_loss(true, K, cams, views_occ, valid=centre)) <= one + 1e-6
    assert float(_loss(true, K, cams, views_occ, valid=centre, src=(2,))) > 0.3
    # 'mean' counts every source that sees the pixel: half the pixels' sources are noise here
    mean = float(_loss(true, K, cams, views_occ, valid=centre, aggregate="mean"))
    noise = float(_loss(true, K, cams, views_occ, valid=centre, src=(2,)))
    assert mean == pytest.approx((one + noise) / 2, rel=0.05)


def test_textureless_windows_and_invalid_pixels_count_for_nothing():
    K, cams, views = _scene()
    true = views[0][1].float()
    flat = [(torch.full((H, W), 0.5), t) for _, t in views]
    assert float(_loss(true + 3.0, K, cams, flat)) == 0.0  # no texture: no pixel counts
    none = torch.zeros(H, W, dtype=torch.bool)
    assert float(_loss(true + 3.0, K, cams, views, valid=none)) == 0.0


def test_patch_ncc_is_gain_and_offset_invariant():
    torch.manual_seed(1)
    a = torch.rand(1, 1, 20, 20)
    ncc, std = patch_ncc(a, 0.5 * a + 0.2, 5)
    assert torch.allclose(ncc, torch.ones_like(ncc), atol=1e-3)
    assert torch.allclose(patch_ncc(a, -a, 5)[0], -torch.ones_like(ncc), atol=1e-3)
    assert float(std.min()) > 0


def test_source_views_pick_the_closest_directions_with_parallax():
    dirs = [0.0, 1.0, 10.0, 25.0, 40.0]  # tilt of each camera from nadir, degrees, same azimuth
    c2w = []
    for a in dirs:
        r = math.radians(a)
        c2w.append(_cam((600.0 * math.sin(r), 0.0, 600.0 * math.cos(r))))
    src = source_views(torch.stack(c2w), k=2, min_angle_deg=2.0)
    assert src[0] == [2, 3]  # view 1 is within 2 degrees of view 0: no parallax
    assert src[2] == [1, 0]  # 9 and 10 degrees away
    assert src[4] == [3, 2]
