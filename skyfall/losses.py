"""Stage-1 training losses (Skyfall-GS ``train.py:training``); the pseudo-depth Pearson loss ignores
invalid pixels ([FIX], see `pearson_depth_loss`).

Pure functions of tensors; weights and schedules (λ_op, the pseudo-depth ramp) belong to the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from skyfall.kernels import ssim

OPACITY_CLAMP = 1e-3
"""α is clamped to [1e-3, 1 - 1e-3] before the entropy (reference: ``train.py``)."""

PearsonPolicy = Literal["valid_only", "skip_if_any"]
PearsonSkip = Literal["too_few_valid", "zero_variance", "invalid_pixels"]


def l1_loss(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over every element."""
    return (a - b).abs().mean()


def _mask_like(mask: Tensor, image: Tensor) -> Tensor:
    """Broadcastable [B, 1, H, W] or [1, H, W] version of a [H, W] / [1, H, W] / [B, 1, H, W] mask."""
    m = mask.to(image.dtype)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if image.dim() == 4 and m.dim() == 3:
        m = m.unsqueeze(0)
    if m.dim() != image.dim() or m.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit image of shape {tuple(image.shape)}"
        )
    return m


def photometric_loss(
    render: Tensor,  # [3, H, W] or [B, 3, H, W]
    gt: Tensor,  # same shape as render
    mask: Tensor | None = None,  # [H, W], [1, H, W] or [B, 1, H, W]; 1 = supervised
    lambda_dssim: float = 0.2,
) -> Tensor:
    """Reference photometric loss ``(1 - λ) L1 + λ (1 - SSIM)`` on masked images.

    Both images are multiplied by the mask first; the L1 is then the mean over **all** pixels,
    masked zeros included, and SSIM runs on the masked images (as the reference does).

    Args:
        render: rendered image(s) in [0, 1].
        gt: ground-truth image(s), same shape.
        mask: optional supervision mask (bool or float).
        lambda_dssim: SSIM weight λ (0.2 in every reference config).

    Returns:
        Scalar loss.
    """
    if render.shape != gt.shape:
        raise ValueError(f"render and gt shapes differ: {tuple(render.shape)} vs {tuple(gt.shape)}")
    if mask is not None:
        m = _mask_like(mask, render)
        render = render * m
        gt = gt * m
    return (1.0 - lambda_dssim) * l1_loss(render, gt) + lambda_dssim * (1.0 - ssim(render, gt))


def opacity_entropy(opacity_logits: Tensor) -> Tensor:  # [N] -> []
    """Mean binary entropy of the clamped opacities (the reference's opacity loss).

    ``α_c = clamp(sigmoid(o), 1e-3, 1 - 1e-3)`` and ``H(a) = -a log a - (1 - a) log(1 - a)``. The
    reference evaluates ``BCE(input=α_c, target=α_c)`` with the gradient flowing through both
    arguments; the closed form below has exactly that gradient, ``dH/da = log((1 - a) / a)``, which
    pushes α towards 0 or 1.

    Args:
        opacity_logits: [N] raw opacity parameters (no 3D filter applied).

    Returns:
        Scalar mean entropy (nats); 0 for an empty input.
    """
    if opacity_logits.numel() == 0:
        return opacity_logits.sum()
    a = torch.sigmoid(opacity_logits).clamp(OPACITY_CLAMP, 1.0 - OPACITY_CLAMP)
    return -(a * torch.log(a) + (1.0 - a) * torch.log1p(-a)).mean()


@dataclass
class PearsonResult:
    """Outcome of `pearson_depth_loss`.

    Attributes:
        loss: ``1 - r`` (scalar, differentiable w.r.t. ``pred``), or None when the term is skipped.
        n_valid: number of pixels the correlation used (or would have used).
        n_total: number of pixels in the map.
        skipped_reason: None, ``"too_few_valid"``, ``"zero_variance"`` or ``"invalid_pixels"``
            (the last only under ``policy="skip_if_any"``).
        would_skip_reference: the reference rule (Pearson over all pixels, no mask) gives NaN here,
            i.e. some pixel of ``pred`` or ``target`` is non-finite or a variance is 0.
    """

    loss: Tensor | None
    n_valid: int
    n_total: int
    skipped_reason: PearsonSkip | None
    would_skip_reference: bool


def _pearson(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centred cross and auto sums ``(Σ x̃ ỹ, Σ x̃², Σ ỹ²)`` of two 1D tensors."""
    xc = x - x.mean()
    yc = y - y.mean()
    return (xc * yc).sum(), (xc * xc).sum(), (yc * yc).sum()


def pearson_depth_loss(
    pred: Tensor,  # [H, W] rendered depth
    target: Tensor,  # [H, W] pseudo ground-truth depth (MoGe; +inf where invalid)
    valid: Tensor | None = None,  # [H, W] bool, extra validity (e.g. rendered alpha > τ)
    *,
    min_valid_fraction: float = 0.01,
    policy: PearsonPolicy = "valid_only",
) -> PearsonResult:
    """Pseudo-camera depth loss ``1 - Pearson(pred, target)``, with a fix for invalid pixels.

    **[FIX]** the reference correlates all pixels, so any +inf from MoGe
    makes r NaN and the term is silently dropped. With ``policy="valid_only"`` the correlation uses
    only pixels where ``valid ∧ isfinite(pred) ∧ isfinite(target)``, and the term is skipped only
    when fewer than ``min_valid_fraction`` of the pixels (and fewer than 2) are valid or a variance is
    0. ``policy="skip_if_any"`` is the parity rule: skip whenever any pixel is invalid (with
    ``valid=None`` this is exactly the reference's NaN-skip), else correlate all pixels.

    The correlation is global (not patch-wise) and no gradient flows into ``target``.

    Returns:
        `PearsonResult` with the loss (or None) and counters for logging.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if valid is not None and valid.shape != pred.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(pred.shape)}")
    if policy not in ("valid_only", "skip_if_any"):
        raise ValueError(f"policy must be 'valid_only' or 'skip_if_any', got {policy!r}")
    target = target.detach().to(pred.dtype)
    finite = torch.isfinite(pred.detach()) & torch.isfinite(target)
    ok = finite if valid is None else finite & valid.to(torch.bool)
    n_total = pred.numel()
    n_valid = int(ok.sum().item())

    all_finite = bool(finite.all().item())
    if all_finite:
        _, sxx, syy = _pearson(pred.detach().reshape(-1), target.reshape(-1))
        would_skip_reference = bool((sxx == 0).item() or (syy == 0).item())
    else:
        would_skip_reference = True

    def skipped(reason: PearsonSkip) -> PearsonResult:
        return PearsonResult(None, n_valid, n_total, reason, would_skip_reference)

    if policy == "skip_if_any" and n_valid < n_total:
        return skipped("invalid_pixels")
    if n_valid < max(2, math.ceil(min_valid_fraction * n_total)):
        return skipped("too_few_valid")
    x = pred[ok]
    y = target[ok]
    sxy, sxx, syy = _pearson(x, y)
    if bool((sxx == 0).item() or (syy == 0).item()):
        return skipped("zero_variance")
    r = sxy / torch.sqrt(sxx * syy)
    return PearsonResult(1.0 - r, n_valid, n_total, None, would_skip_reference)


def flatten_loss(scales: Tensor) -> Tensor:  # [N, 3] linear -> []
    """Mean smallest scale of the Gaussians (pass the 3D-filtered scales); 0 for an empty input.

    Near-nadir views barely see how thick a Gaussian is, so nothing else keeps the Gaussians of a wall
    or a roof edge thin: as balls they stick out of the surface by their radius, which is a halo of
    roof height over the street in any top-down read-out. Minimising the smallest axis makes each
    Gaussian a disk in the plane its views do constrain. On the filtered scale sqrt(s^2 + f^2) the
    push fades below the Mip-Splatting filter size f, where thinner would only mean more transparent
    (the filter's opacity compensation).
    """
    if scales.numel() == 0:
        return scales.sum()
    return scales.amin(dim=-1).mean()


GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])
"""RGB -> grey (ITU-R BT.601 luma) for the multi-view term."""


def source_views(camtoworlds: Tensor, k: int, min_angle_deg: float) -> list[list[int]]:
    """For each camera, the ``k`` others whose viewing directions are closest to its own, leaving out
    those within ``min_angle_deg`` (no parallax).

    Args:
        camtoworlds: [N, 4, 4] OpenCV camera-to-world matrices (the viewing direction is +z).
    """
    d = torch.nn.functional.normalize(camtoworlds[:, :3, 2].double(), dim=-1)
    angle = torch.rad2deg(torch.arccos((d @ d.T).clamp(-1, 1)))
    out = []
    for i in range(len(d)):
        order = [int(j) for j in torch.argsort(angle[i]) if j != i and angle[i, j] >= min_angle_deg]
        out.append(order[:k])
    return out


def _box_mean(x: Tensor, patch: int) -> Tensor:  # [B, 1, H, W] -> same shape
    return torch.nn.functional.avg_pool2d(x, patch, stride=1, padding=patch // 2, count_include_pad=False)


def patch_ncc(a: Tensor, b: Tensor, patch: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Normalised cross-correlation of the ``patch`` x ``patch`` windows around every pixel.

    Args:
        a, b: [B, 1, H, W] grey images.

    Returns:
        (ncc [B, 1, H, W] in [-1, 1], standard deviation of ``a``'s windows [B, 1, H, W]).
    """
    ma, mb = _box_mean(a, patch), _box_mean(b, patch)
    va = (_box_mean(a * a, patch) - ma * ma).clamp_min(0)
    vb = (_box_mean(b * b, patch) - mb * mb).clamp_min(0)
    cov = _box_mean(a * b, patch) - ma * mb
    return (cov / torch.sqrt(va * vb + eps * eps)).clamp(-1, 1), va.sqrt()


def multiview_ncc_loss(
    depth: Tensor,  # [H, W] rendered z-depth of the reference view (differentiable)
    valid: Tensor,  # [H, W] bool: pixels whose depth counts (rendered, inside the view's mask)
    ref_gray: Tensor,  # [H, W] the reference view's image, grey
    K_ref: Tensor,  # [3, 3] float64
    c2w_ref: Tensor,  # [4, 4] float64, OpenCV
    src_gray: Tensor,  # [S, Hs, Ws] other views' images, grey
    src_valid: Tensor,  # [S, Hs, Ws] bool
    K_src: Tensor,  # [S, 3, 3] float64
    c2w_src: Tensor,  # [S, 4, 4] float64
    *,
    patch: int = 7,
    min_std: float = 0.02,
    aggregate: str = "min",
) -> Tensor:
    """Multi-view photometric consistency of a rendered depth map (the MVS term of PGSR-style methods).

    Each pixel of the reference view is lifted to 3D at its rendered depth, projected into every
    source view and the source image is sampled there; the cost of a pixel is ``1 - NCC`` of its
    ``patch``² window against the warped source window, and its loss is the smallest cost over the
    sources (a pixel occluded in some sources is judged by the ones that see it). NCC is invariant
    to gain and offset, so images taken on different dates compare. Windows without texture (standard
    deviation below ``min_std``) say nothing about depth and are left out, as are pixels that land
    outside a source or on its no-data. The gradient reaches the geometry through the sampling
    position (bilinear), i.e. through the depth. ``aggregate="mean"`` averages the cost over every
    source that sees the pixel instead: stricter, since each pixel can no longer pick the source that
    suits a wrong depth best, but occluded sources count.

    Geometry runs in float64: satellite cameras stand hundreds of kilometres away.

    Returns:
        The mean cost over the pixels that count (0 when none does).
    """
    H, W = depth.shape
    S, Hs, Ws = src_gray.shape
    dev = depth.device
    f64 = torch.float64
    v, u = torch.meshgrid(
        torch.arange(H, device=dev, dtype=f64), torch.arange(W, device=dev, dtype=f64), indexing="ij"
    )
    pix = torch.stack([u + 0.5, v + 0.5, torch.ones_like(u)], dim=-1)  # gsplat pixel centres
    rays = pix @ torch.linalg.inv_ex(K_ref.to(dev, f64))[0].T  # [H, W, 3] with z = 1
    c2w_ref = c2w_ref.to(dev, f64)
    world = (rays * depth.to(f64)[..., None]) @ c2w_ref[:3, :3].T + c2w_ref[:3, 3]  # [H, W, 3]
    w2c = torch.linalg.inv_ex(c2w_src.to(dev, f64))[0]  # [S, 4, 4]
    cam = torch.einsum("sij,hwj->shwi", w2c[:, :3, :3], world) + w2c[:, None, None, :3, 3]
    proj = torch.einsum("sij,shwj->shwi", K_src.to(dev, f64), cam)
    z = proj[..., 2].clamp_min(1e-9)
    grid = torch.stack([proj[..., 0] / z / Ws * 2 - 1, proj[..., 1] / z / Hs * 2 - 1], dim=-1).float()
    sampled = torch.nn.functional.grid_sample(
        torch.stack([src_gray.float(), src_valid.float()], dim=1),
        grid,
        align_corners=False,
        padding_mode="zeros",
    )  # [S, 2, H, W]
    warped, seen = sampled[:, :1], sampled[:, 1:].detach() > 0.999
    ref = ref_gray.float().expand(S, 1, H, W)
    ncc, std = patch_ncc(ref, warped, patch)
    ok = seen & (cam[..., 2] > 0)[:, None] & valid[None, None]
    ok = ok & (_box_mean(ok.float(), patch) > 0.999)  # whole window usable
    ok = ok & (std > min_std)
    if aggregate == "min":
        cost = torch.where(ok, 1.0 - ncc, torch.full_like(ncc, 3.0)).amin(dim=0)[0]  # [H, W]
        counts = ok.any(dim=0)[0].float()
        return (cost * counts).sum() / counts.sum().clamp_min(1.0)
    w = ok.float()
    return ((1.0 - ncc) * w).sum() / w.sum().clamp_min(1.0)
