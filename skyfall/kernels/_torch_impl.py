"""Torch reference twins of skyfall's own kernels: the CPU path and the test oracle.

Each ``_op`` here is the reference implementation of ``skyfall.kernels.ops.op``. The ``_ssim_fwd_parts``
/ ``_ssim_bwd`` pair mirrors, step by step, the math of the fused CUDA kernel
(``cuda_ext/csrc/ssim.cu``) so that its analytic backward can be checked on machines without a GPU.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def gaussian_window_1d(
    window_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised 1D Gaussian taps ``g[i] ∝ exp(-(i - r)^2 / (2 sigma^2))``, ``r = window_size // 2``.

    The 2D SSIM window is the outer product ``g g^T`` (it sums to 1).

    Returns:
        [window_size] weights summing to 1.
    """
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd number, got {window_size}")
    r = window_size // 2
    # float64 first: the CUDA launcher receives the same float64-derived taps, so both paths agree.
    x = torch.arange(window_size, dtype=torch.float64) - r
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype)


@functools.lru_cache(maxsize=16)
def _window_on(window_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`gaussian_window_1d` on ``device``, made once: a copy from the host at every loss would make
    the host wait for the GPU. Shared, so never modified in place."""
    with torch.inference_mode(False), torch.no_grad():
        return gaussian_window_1d(window_size, sigma, dtype=dtype).to(device)


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian blur with zero "same" padding (== ``conv2d(x, g g^T, padding=r)``).

    Args:
        x: [B, C, H, W].
        g: [ws] 1D taps.

    Returns:
        [B, C, H, W].
    """
    c = x.shape[1]
    ws = g.shape[0]
    r = ws // 2
    gh = g.to(x.dtype).view(1, 1, 1, ws).expand(c, 1, 1, ws)
    gv = g.to(x.dtype).view(1, 1, ws, 1).expand(c, 1, ws, 1)
    # Zero padding commutes with the separable split: the padded rows are zero after the
    # horizontal pass too, so this equals the 2D convolution with padding=r.
    x = F.conv2d(x, gh, padding=(0, r), groups=c)
    return F.conv2d(x, gv, padding=(r, 0), groups=c)


def _as_batched(img: Tensor) -> Tensor:
    if img.dim() == 3:
        return img.unsqueeze(0)
    if img.dim() != 4:
        raise ValueError(f"expected an image [C,H,W] or [B,C,H,W], got shape {tuple(img.shape)}")
    return img


def _reduce_map(ssim_map: Tensor, window_size: int, padding: str, reduction: str) -> Tensor:
    if padding == "valid":
        r = window_size // 2
        ssim_map = ssim_map[..., r : ssim_map.shape[-2] - r, r : ssim_map.shape[-1] - r]
    elif padding != "same":
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    if reduction == "mean":
        return ssim_map.mean()
    if reduction == "none":
        return ssim_map
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _ssim(
    img1: Tensor,  # [B, C, H, W] or [C, H, W]
    img2: Tensor,  # same shape as img1
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    C1: float = SSIM_C1,
    C2: float = SSIM_C2,
    padding: Literal["same", "valid"] = "same",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Reference implementation of `skyfall.kernels.ops.ssim`.

    Per-channel SSIM with a Gaussian window and zero "same" padding, as ``fused_ssim`` (and the
    original 3DGS ``ssim``) compute it:

        S = (2 mu1 mu2 + C1)(2 s12 + C2) / ((mu1^2 + mu2^2 + C1)(s11 + s22 + C2)),

    with ``mu = G*x``, ``s11 = G*x^2 - mu1^2``, ``s12 = G*(x y) - mu1 mu2``. ``padding="valid"`` drops
    the ``window_size // 2`` border pixels of the map before reducing (fused_ssim's "valid").

    Returns:
        Scalar mean SSIM (``reduction="mean"``) or the SSIM map [B, C, H', W'] (``"none"``).
    """
    if img1.shape != img2.shape:
        raise ValueError(
            f"img1 and img2 must have the same shape, got {tuple(img1.shape)} vs {tuple(img2.shape)}"
        )
    x = _as_batched(img1)
    y = _as_batched(img2).to(x.dtype)
    c = x.shape[1]
    g = _window_on(window_size, float(sigma), x.dtype, x.device)
    # one grouped convolution for all five moments instead of five calls
    stats = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu1, mu2, e11, e22, e12 = stats.split(c, dim=1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s11, s22, s12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    ssim_map = ((2 * mu12 + C1) * (2 * s12 + C2)) / ((mu1_sq + mu2_sq + C1) * (s11 + s22 + C2))
    return _reduce_map(ssim_map, window_size, padding, reduction)


def _ssim_fwd_parts(
    img1: Tensor,  # [B, C, H, W]
    img2: Tensor,  # [B, C, H, W]
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    C1: float = SSIM_C1,
    C2: float = SSIM_C2,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference twin of ``ssim_fwd_cuda``: the SSIM map and its per-pixel partial derivatives.

    With ``mu1 = G*x``, ``A = G*x^2`` and ``P = G*(x y)`` as the independent per-pixel moments,
    returns ``(S, dS/dmu1, dS/dA, dS/dP)``, each [B, C, H, W]. The gradient w.r.t. ``img1`` is then
    ``G*(g dS/dmu1) + 2 x G*(g dS/dA) + y G*(g dS/dP)`` (see `_ssim_bwd`).
    """
    c = img1.shape[1]
    g = gaussian_window_1d(window_size, sigma, dtype=img1.dtype).to(img1.device)
    x, y = img1, img2
    mu1, mu2, e11, e22, e12 = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).split(c, dim=1)
    s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    n1, n2 = 2 * mu1 * mu2 + C1, 2 * s12 + C2
    d1, d2 = mu1 * mu1 + mu2 * mu2 + C1, s11 + s22 + C2
    s = (n1 * n2) / (d1 * d2)
    ds_ds12 = 2 * n1 / (d1 * d2)
    ds_ds11 = -s / d2
    # total derivative w.r.t. mu1 with A and P held fixed: s11 and s12 depend on mu1 too
    ds_dmu1 = (2 * mu2 * n2 / d2 - 2 * mu1 * s) / d1 + ds_ds11 * (-2 * mu1) + ds_ds12 * (-mu2)
    return s, ds_dmu1, ds_ds11, ds_ds12


def _ssim_bwd(
    img1: Tensor,  # [B, C, H, W]
    img2: Tensor,  # [B, C, H, W]
    grad_map: Tensor,  # [B, C, H, W] dL/dS
    ds_dmu1: Tensor,  # [B, C, H, W]
    ds_da: Tensor,  # [B, C, H, W]
    ds_dp: Tensor,  # [B, C, H, W]
    *,
    window_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Reference twin of ``ssim_bwd_cuda``: dL/d img1 [B, C, H, W] from dL/dS and the partials.

    The window is symmetric, so the adjoint of the "same" zero-padded blur is the same blur.
    """
    c = img1.shape[1]
    g = gaussian_window_1d(window_size, sigma, dtype=img1.dtype).to(img1.device)
    b_mu, b_a, b_p = _blur(
        torch.cat([grad_map * ds_dmu1, grad_map * ds_da, grad_map * ds_dp], dim=1), g
    ).split(c, dim=1)
    return b_mu + 2 * img1 * b_a + img2 * b_p


__all__ = ["SSIM_C1", "SSIM_C2", "gaussian_window_1d", "_ssim", "_ssim_fwd_parts", "_ssim_bwd"]
