"""compute_3d_filter: hand-computed values for both rules, visibility bounds and the unseen rule."""

from __future__ import annotations

import math

import pytest
import torch

from skyfall.data.cameras import Cameras
from skyfall.gaussians.filters import apply_3d_filter, compute_3d_filter

S = math.sqrt(0.2)


def three_cameras() -> Cameras:
    """Cameras looking along world +z from z = 0, -2 and +1 with fx = 100, 400 and 50 (100x100 px)."""
    c2w = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    c2w[1, 2, 3] = -2.0
    c2w[2, 2, 3] = 1.0
    ks = torch.zeros(3, 3, 3, dtype=torch.float64)
    for i, f in enumerate((100.0, 400.0, 50.0)):
        ks[i] = torch.tensor([[f, 0, 50.0], [0, f, 50.0], [0, 0, 1]])
    return Cameras(c2w, ks, 100, 100)


def test_rules_differ_with_mixed_focal_lengths():
    cams = three_cameras()
    means = torch.tensor([[0.0, 0.0, 4.0], [3.0, 0.0, 6.0], [0.0, 0.0, -5.0]])
    # p0: seen by all: z = 4, 6, 3 -> z/f = 0.04, 0.015, 0.06
    # p1: A (u = 100) z = 6, z/f = 0.06; B u = 200 (outside); C (u = 80) z = 5, z/f = 0.1
    # p2: behind every camera -> the largest of the others
    per_cam = compute_3d_filter(means, cams)
    ref = compute_3d_filter(means, cams, rule="reference")
    torch.testing.assert_close(per_cam, torch.tensor([0.015, 0.06, 0.06]) * S, rtol=1e-6, atol=0)
    torch.testing.assert_close(ref, torch.tensor([3.0, 5.0, 5.0]) / 400.0 * S, rtol=1e-6, atol=0)
    assert per_cam.dtype == torch.float32 and per_cam.device == means.device


def test_visibility_bounds_near_and_margin():
    c2w = torch.eye(4, dtype=torch.float64)
    K = torch.tensor([[100.0, 0, 50.0], [0, 100.0, 40.0], [0, 0, 1]], dtype=torch.float64)
    cams = Cameras(c2w, K, 100, 80)
    # margin 0.125 (exact in binary): u in [-12.5, 112.5], v in [-10, 90]; u = 100 x / z + 50
    means = torch.tensor(
        [[1.25, 0.0, 2.0], [1.26, 0.0, 2.0], [0.0, 0.0, 0.2], [0.0, 0.0, 0.5], [0.0, 1.5, 3.0]],
        dtype=torch.float64,
    )
    f = compute_3d_filter(means, cams, margin=0.125)
    # #0: u = 112.5 on the edge (inclusive), z/f = 0.02; #3: 0.005; #4: v = 90 on the edge, 0.03
    # #1: u = 113 outside, #2: z == near (strict) -> both get the max, 0.03
    expected = torch.tensor([0.02, 0.03, 0.03, 0.005, 0.03], dtype=torch.float64) * S
    torch.testing.assert_close(f.double(), expected, rtol=1e-6, atol=0)


def test_chunked_over_many_cameras_matches_single_pass():
    g = torch.Generator().manual_seed(0)
    n_cam = 40
    c2w = torch.eye(4, dtype=torch.float64).repeat(n_cam, 1, 1)
    c2w[:, :3, 3] = torch.randn(n_cam, 3, generator=g, dtype=torch.float64) * 0.5 - torch.tensor([0, 0, 3.0])
    ks = torch.tensor([[80.0, 0, 32], [0, 80.0, 32], [0, 0, 1]], dtype=torch.float64).repeat(n_cam, 1, 1)
    ks[:, 0, 0] *= 1 + torch.rand(n_cam, generator=g, dtype=torch.float64)
    cams = Cameras(c2w, ks, 64, 64)
    means = torch.randn(300_000, 3, generator=g)  # > 2^22 / 40 elements per chunk -> several chunks
    f = compute_3d_filter(means, cams)
    sub = torch.arange(0, 300_000, 997)
    brute = torch.full((len(sub),), float("inf"), dtype=torch.float64)
    for c in range(n_cam):
        uv, z = cams[c].project(means[sub])
        ok = (
            (z[0] > 0.2)
            & (uv[0, :, 0] >= -9.6)
            & (uv[0, :, 0] <= 73.6)
            & (uv[0, :, 1] >= -9.6)
            & (uv[0, :, 1] <= 73.6)
        )
        brute = torch.where(ok, torch.minimum(brute, z[0] / ks[c, 0, 0]), brute)
    seen = torch.isfinite(brute)
    assert seen.float().mean() > 0.5
    torch.testing.assert_close(f[sub][seen].double(), brute[seen] * S, rtol=1e-6, atol=0)


def test_no_gaussian_visible_gives_zero_and_bad_rule_raises():
    cams = three_cameras()
    f = compute_3d_filter(torch.tensor([[0.0, 0.0, -10.0]]), cams)
    assert f.tolist() == [0.0]
    with pytest.raises(ValueError):
        compute_3d_filter(torch.zeros(1, 3), cams, rule="max")  # type: ignore[arg-type]


def test_apply_filter_preserves_integrated_density():
    scales = torch.log(torch.tensor([[0.1, 0.2, 0.05]]))
    opac = torch.tensor([0.3])
    s_eff, a_eff = apply_3d_filter(scales, opac, torch.tensor([0.04]))
    s = torch.exp(scales)
    # opacity * volume of the Gaussian is unchanged by the convolution
    torch.testing.assert_close(a_eff * s_eff.prod(-1), torch.sigmoid(opac) * s.prod(-1), rtol=1e-6, atol=0)


def test_filter_over_camera_groups_equals_one_group():
    # Stage 2 passes satellite and orbit cameras as separate groups (different image sizes); with equal
    # sizes the grouped result must equal the single-group one, for both rules.
    import math as _m

    from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
    from skyfall.gaussians.filters import compute_3d_filter

    eyes = torch.tensor([[0.0, -50.0, 80.0], [60.0, 0.0, 120.0], [0.0, 0.0, 300.0]], dtype=torch.float64)
    c2w = look_at(eyes, torch.zeros_like(eyes))
    ks = torch.stack([intrinsics_from_fov(fov, 64, 64) for fov in (40.0, 60.0, 20.0)])
    cams = Cameras(c2w, ks, 64, 64)
    means = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 10
    for rule in ("per_camera", "reference"):
        whole = compute_3d_filter(means, cams, rule=rule)
        split = compute_3d_filter(means, [cams[0], cams[[1, 2]]], rule=rule)
        assert torch.allclose(whole, split), rule
        assert whole.min() > 0 and not _m.isnan(float(whole.sum()))
