"""Stage-1 losses: photometric, opacity entropy, masked Pearson depth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from skyfall.kernels._torch_impl import _ssim
from skyfall.losses import l1_loss, opacity_entropy, pearson_depth_loss, photometric_loss

# ----------------------------------------------------------------------------- photometric


def _images(seed: int, shape: tuple[int, ...] = (3, 16, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


def test_photometric_identical_is_zero_and_formula():
    render, gt = _images(0)
    assert photometric_loss(render, render.clone()).item() == pytest.approx(0.0, abs=1e-6)
    l1 = (render - gt).abs().sum().item() / render.numel()
    expected = 0.8 * l1 + 0.2 * (1.0 - _ssim(render[None], gt[None]).item())
    assert photometric_loss(render, gt).item() == pytest.approx(expected, rel=1e-6)
    expected_half = 0.5 * l1 + 0.5 * (1.0 - _ssim(render[None], gt[None]).item())
    assert photometric_loss(render, gt, lambda_dssim=0.5).item() == pytest.approx(expected_half, rel=1e-6)


def test_photometric_constant_images_hand_computed():
    # render ≡ 0.5, gt ≡ 0.25: L1 = 0.25; SSIM map from the zero-padding closed form is < 1, so
    # compare only the L1 half exactly with lambda_dssim = 0.
    render = torch.full((3, 12, 12), 0.5)
    gt = torch.full((3, 12, 12), 0.25)
    assert photometric_loss(render, gt, lambda_dssim=0.0).item() == pytest.approx(0.25, rel=1e-6)


def test_photometric_mask_zeroes_both_images_and_l1_counts_all_pixels():
    render, gt = _images(1, (3, 10, 10))
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :5] = True  # left half supervised
    # L1 over ALL 300 values, masked zeros included: sum over the left half / 300
    l1_left = (render[:, :, :5] - gt[:, :, :5]).abs().sum().item() / 300
    assert photometric_loss(render, gt, mask, lambda_dssim=0.0).item() == pytest.approx(l1_left, rel=1e-6)
    # anything in the masked-out half is irrelevant, including for SSIM
    render2 = render.clone()
    render2[:, :, 5:] = torch.rand(3, 10, 5)
    a = photometric_loss(render, gt, mask).item()
    b = photometric_loss(render2, gt, mask).item()
    assert a == pytest.approx(b, abs=1e-7)
    # mask layouts [H,W], [1,H,W], [B,1,H,W] and float masks agree; batched == unbatched
    m = mask.float()
    c = photometric_loss(render[None], gt[None], m[None, None]).item()
    d = photometric_loss(render, gt, m[None]).item()
    assert a == pytest.approx(c, abs=1e-7) and a == pytest.approx(d, abs=1e-7)


def test_photometric_gradient_and_errors():
    render, gt = _images(2, (1, 3, 12, 12))
    render.requires_grad_(True)
    mask = torch.ones(12, 12)
    mask[:3] = 0
    photometric_loss(render, gt, mask).backward()
    assert torch.isfinite(render.grad).all()
    assert render.grad[..., :3, :].abs().max().item() == 0.0  # masked pixels get no gradient
    assert render.grad[..., 3:, :].abs().max().item() > 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        photometric_loss(render, gt[..., :10])
    with pytest.raises(ValueError, match="mask"):
        photometric_loss(render, gt, torch.ones(12, 11))


def test_l1_loss():
    assert l1_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(1.5)


# ----------------------------------------------------------------------------- opacity entropy


def _entropy(a: float) -> float:
    return -(a * math.log(a) + (1 - a) * math.log(1 - a))


def test_opacity_entropy_values():
    assert opacity_entropy(torch.zeros(5)).item() == pytest.approx(math.log(2), rel=1e-6)
    logits = torch.tensor([0.0, 2.0, -1.0, 30.0, -30.0])
    alphas = [0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)), 1 - 1e-3, 1e-3]  # last two clamped
    expected = sum(_entropy(a) for a in alphas) / 5
    assert opacity_entropy(logits).item() == pytest.approx(expected, rel=1e-5)
    assert opacity_entropy(torch.empty(0)).item() == 0.0


def test_opacity_entropy_gradient_is_reference_bce_gradient():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, 8.0, -8.0], dtype=torch.float64, requires_grad=True)
    opacity_entropy(logits).backward()
    # dH/da = log((1 - a)/a), times da/do = a(1 - a) inside the clamp range, 0 outside; mean over N
    a = torch.sigmoid(logits.detach())
    inside = (a > 1e-3) & (a < 1 - 1e-3)
    expected = torch.where(inside, torch.log((1 - a) / a) * a * (1 - a), torch.zeros_like(a)) / len(a)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-14)
    assert not inside[4] and not inside[5]
    # ... which is the gradient of the reference's BCE(input=α_c, target=α_c) with both arguments live
    o2 = logits.detach().clone().requires_grad_(True)
    a_c = torch.sigmoid(o2).clamp(1e-3, 1 - 1e-3)
    F.binary_cross_entropy(a_c, a_c).backward()
    torch.testing.assert_close(logits.grad, o2.grad, rtol=1e-10, atol=1e-14)
    # and it matches finite differences
    assert torch.autograd.gradcheck(opacity_entropy, (logits.detach()[:4].clone().requires_grad_(True),))


# ----------------------------------------------------------------------------- Pearson depth

# x = [1, 2, 3, 4], y = [2, 4, 5, 9]: centred x = [-1.5, -0.5, 0.5, 1.5], y = [-3, -1, 0, 4]
# Σxy = 11, Σx² = 5, Σy² = 26 -> r = 11 / sqrt(130)
R_HAND = 11 / math.sqrt(130)


def test_pearson_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, 4.0], [5.0, 9.0]])
    res = pearson_depth_loss(pred, target)
    assert res.loss is not None and res.skipped_reason is None
    assert res.loss.item() == pytest.approx(1 - R_HAND, rel=1e-6)
    assert (res.n_valid, res.n_total, res.would_skip_reference) == (4, 4, False)
    # affine relation -> r = 1 (scale invariance); negated -> r = -1
    assert pearson_depth_loss(pred, 3 * pred + 7).loss.item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_depth_loss(pred, -pred).loss.item() == pytest.approx(2.0, abs=1e-6)


def test_pearson_ignores_invalid_pixels_and_counts_reference_skip():
    pred = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, -7.0]])
    target = torch.tensor([[2.0, 4.0, math.inf], [5.0, 9.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    res = pearson_depth_loss(pred, target, valid)
    assert res.loss.item() == pytest.approx(1 - R_HAND, rel=1e-6)
    assert (res.n_valid, res.n_total) == (4, 6)
    assert res.would_skip_reference  # the +inf makes the reference's r NaN
    # the parity policy skips it
    parity = pearson_depth_loss(pred, target, valid, policy="skip_if_any")
    assert parity.loss is None and parity.skipped_reason == "invalid_pixels" and parity.would_skip_reference
    # a non-finite rendered depth is invalid too
    pred_nan = pred.clone()
    pred_nan[1, 2] = math.nan
    res2 = pearson_depth_loss(pred_nan, torch.nan_to_num(target, posinf=3.0))
    assert res2.n_valid == 5 and res2.would_skip_reference


def test_pearson_parity_policy_without_invalid_pixels_equals_all_pixel_pearson():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(8, 9, generator=gen, dtype=torch.float64)
    target = pred + 0.3 * torch.rand(8, 9, generator=gen, dtype=torch.float64)
    a = pred.flatten() - pred.mean()
    b = target.flatten() - target.mean()
    r = (a @ b / torch.sqrt((a @ a) * (b @ b))).item()
    for policy in ("valid_only", "skip_if_any"):
        res = pearson_depth_loss(pred, target, policy=policy)
        assert res.loss.item() == pytest.approx(1 - r, rel=1e-12)
        assert not res.would_skip_reference


def test_pearson_skips():
    # too few valid pixels: 50 of 10000 < 1 %; 100 of 10000 is enough
    pred = torch.rand(100, 100, generator=torch.Generator().manual_seed(1))
    target = torch.full((100, 100), math.inf)
    target.view(-1)[:50] = torch.rand(50, generator=torch.Generator().manual_seed(2))
    res = pearson_depth_loss(pred, target)
    assert res.loss is None and res.skipped_reason == "too_few_valid" and res.n_valid == 50
    target.view(-1)[:100] = torch.rand(100, generator=torch.Generator().manual_seed(3))
    res = pearson_depth_loss(pred, target)
    assert res.loss is not None and res.n_valid == 100
    assert pearson_depth_loss(pred, target, min_valid_fraction=0.02).skipped_reason == "too_few_valid"
    # zero variance (flat render, e.g. an empty view)
    flat = pearson_depth_loss(torch.ones(4, 4), torch.rand(4, 4))
    assert flat.loss is None and flat.skipped_reason == "zero_variance" and flat.would_skip_reference
    # a single valid pixel can never give a correlation, whatever the fraction
    one = torch.full((2, 2), math.inf)
    one[0, 0] = 1.0
    assert pearson_depth_loss(torch.rand(2, 2), one, min_valid_fraction=0.0).skipped_reason == "too_few_valid"


def test_pearson_gradient():
    pred = torch.tensor([[1.0, 2.0, math.nan], [3.0, 4.0, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[2.0, 4.0, 1.0], [5.0, 9.0, math.inf]], dtype=torch.float64, requires_grad=True)
    res = pearson_depth_loss(pred, target)
    res.loss.backward()
    assert target.grad is None  # no gradient into the pseudo ground truth
    # d(1 - r)/dx_i = -(ỹ_i / sqrt(Sxx Syy) - r x̃_i / Sxx) on valid pixels, 0 elsewhere
    xc = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)
    yc = torch.tensor([-3.0, -1.0, 0.0, 4.0], dtype=torch.float64)
    g = -(yc / math.sqrt(5 * 26) - R_HAND * xc / 5)
    expected = torch.tensor([[g[0], g[1], 0.0], [g[2], g[3], 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pred.grad, expected, rtol=1e-10, atol=1e-14)


def test_pearson_argument_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        pearson_depth_loss(torch.rand(3, 3), torch.rand(3, 4))
    with pytest.raises(ValueError, match="valid"):
        pearson_depth_loss(torch.rand(3, 3), torch.rand(3, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy"):
        pearson_depth_loss(torch.rand(3, 3), torch.rand(3, 3), policy="nan")  # type: ignore[arg-type]


def test_flatten_loss_is_the_mean_smallest_scale_and_fades_below_the_filter():
    from skyfall.gaussians.filters import apply_3d_filter
    from skyfall.losses import flatten_loss

    s = torch.tensor([[1.0, 2.0, 0.5], [0.3, 0.2, 4.0]])
    assert float(flatten_loss(s)) == pytest.approx((0.5 + 0.2) / 2)
    assert float(flatten_loss(torch.zeros(0, 3))) == 0.0
    # on filtered scales the push on a raw scale s is s / sqrt(s^2 + f^2): strong above the filter
    # size f, fading below it (thinner would only make the splat more transparent)
    f = 0.2
    grads = []
    for raw in (1.0, 0.02):
        log_s = torch.log(torch.tensor([[2.0, 2.0, raw]])).requires_grad_(True)
        eff, _ = apply_3d_filter(log_s, torch.zeros(1), torch.tensor([f]))
        flatten_loss(eff).backward()
        grads.append(float(log_s.grad[0, 2]) / raw)  # d loss / d s (linear)
    assert grads[0] == pytest.approx(1.0 / math.sqrt(1 + f * f), rel=1e-4)
    assert grads[1] == pytest.approx(0.02 / math.sqrt(0.02**2 + f * f), rel=1e-4) and grads[1] < 0.1
