"""Image metrics: PSNR, pyiqa-definition SSIM (Y channel, valid window) and LPIPS(alex) math, by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from skyfall.eval.image_metrics import LPIPS, gaussian_window, load_lpips, psnr, ssim


def test_psnr_hand_computed_and_masked():
    gt = torch.zeros(4, 4, 3, dtype=torch.float64)
    pred = torch.full((4, 4, 3), 0.1, dtype=torch.float64)
    assert math.isclose(psnr(pred, gt), -10 * math.log10(0.01 + 1e-8), rel_tol=1e-9)
    # Only the masked pixels count: the error outside the mask must not matter.
    pred2 = pred.clone()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    pred2[2:] = 1.0
    assert math.isclose(psnr(pred2, gt, mask), psnr(pred, gt), rel_tol=1e-9)


def test_ssim_constant_images_hand_computed():
    # Constant images: all variances are 0, so cs = 1 and SSIM = (2ab + C1) / (a^2 + b^2 + C1), with
    # a, b the rounded luma values x 255 (pyiqa to_y_channel(img, 255, 'yiq')).
    x = torch.full((16, 16, 3), 0.4, dtype=torch.float64)  # luma 0.4 * 255 = 102
    y = torch.zeros(16, 16, 3, dtype=torch.float64)
    y[..., 0] = 0.8  # luma 0.299 * 0.8 * 255 = 60.996 -> 61
    a, b = 102.0, 61.0
    c1 = (0.01 * 255) ** 2
    assert math.isclose(ssim(x, y), (2 * a * b + c1) / (a * a + b * b + c1), rel_tol=1e-12)


def test_ssim_uses_luma_only_and_rounds():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.uniform(0.2, 0.8, (24, 24, 3)))
    # Changing chroma while keeping Y = 0.299 R + 0.587 G + 0.114 B leaves SSIM at exactly 1.
    d = torch.tensor([0.587, -0.299, 0.0], dtype=torch.float64) * 0.1
    assert abs(sum(c * w for c, w in zip(d.tolist(), (0.299, 0.587, 0.114), strict=True))) < 1e-15
    assert ssim(base + d, base) == 1.0
    # Sub-quantisation noise (well below 0.5/255 in luma) mostly vanishes after rounding.
    assert ssim(base + 1e-5, base) > 0.999


def test_ssim_matches_explicit_window_sums():
    """SSIM map mean equals a direct per-window computation (valid positions only)."""
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (13, 14, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ya = np.round((a @ np.array([0.299, 0.587, 0.114])) * 255)
    yb = np.round((b @ np.array([0.299, 0.587, 0.114])) * 255)
    w = gaussian_window().numpy()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(13 - 10):
        for j in range(14 - 10):
            pa, pb = ya[i : i + 11, j : j + 11], yb[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            cs = max(0.0, (2 * cov + c2) / (va + vb + c2))
            vals.append((2 * ma * mb + c1) / (ma**2 + mb**2 + c1) * cs)
    assert math.isclose(ssim(torch.from_numpy(b), torch.from_numpy(a)), float(np.mean(vals)), rel_tol=1e-9)


def test_gaussian_window_is_fspecial():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float(w[5, 5] / w[5, 6]), math.exp(1 / (2 * 1.5**2)), rel_tol=1e-12)


def _random_lpips_files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = LPIPS()
    backbone = {}
    for k, idx in enumerate((0, 3, 6, 8, 10)):
        backbone[f"features.{idx}.weight"] = torch.randn_like(model.convs[k].weight) * 0.05
        backbone[f"features.{idx}.bias"] = torch.randn_like(model.convs[k].bias) * 0.05
    lins = {f"lin{k}.model.1.weight": torch.rand_like(model.lins[k].weight) for k in range(5)}
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "alex.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def test_lpips_unavailable_reason_without_weights(tmp_path: Path):
    reason = load_lpips(tmp_path / "missing.pth", tmp_path / "missing_lin.pth")
    assert isinstance(reason, str) and "missing.pth" in reason


def test_lpips_formula_matches_hand_computation(tmp_path: Path):
    bb, lin = _random_lpips_files(tmp_path)
    model = load_lpips(bb, lin)
    assert isinstance(model, LPIPS)
    torch.manual_seed(1)
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert float(model(x, x)[0]) == 0.0
    # Hand computation from the saved tensors: scaling layer, AlexNet ReLU taps, channel unit-norm,
    # squared difference weighted per channel, spatial mean, sum over the 5 layers.
    sd, ld = torch.load(bb), torch.load(lin)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h = ((img * 2 - 1) - shift) / scale
        out = []
        for k, (idx, stride, pad) in enumerate(((0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1))):
            if k in (1, 2):
                h = torch.nn.functional.max_pool2d(h, 3, 2)
            h = torch.relu(
                torch.nn.functional.conv2d(
                    h, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], stride, pad
                )
            )
            out.append(h)
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(taps(x), taps(y), strict=True)):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        wk = ld[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += float(((na - nb) ** 2 * wk).sum(1).mean())
    assert math.isclose(float(model(x, y)[0]), total, rel_tol=1e-4)
    assert math.isclose(float(model(x, y)[0]), float(model(y, x)[0]), rel_tol=1e-6)
