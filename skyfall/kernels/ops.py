"""Public kernels: dispatch to the fused CUDA extension when possible, else to the torch reference."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from skyfall.kernels import _backend
from skyfall.kernels._torch_impl import SSIM_C1, SSIM_C2, _as_batched, _reduce_map, _ssim, gaussian_window_1d


def ssim(
    img1: Tensor,  # [B, C, H, W] or [C, H, W], values in [0, 1]
    img2: Tensor,  # same shape as img1
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    C1: float = SSIM_C1,
    C2: float = SSIM_C2,
    padding: Literal["same", "valid"] = "same",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """SSIM as ``fused_ssim`` defines it (the SSIM term of Skyfall-GS's photometric loss in ``train.py``).

    Per-channel SSIM with an ``window_size``² Gaussian window (std ``sigma``) and zero "same" padding
    (like ``conv2d(padding=window_size // 2)``); see `skyfall.kernels._torch_impl._ssim` for the formula.

    The fused CUDA kernel is used for CUDA float32 inputs (both) with an 11x11 window when the extension is
    available and ``img2`` needs no gradient (the kernel differentiates w.r.t. ``img1`` only, as
    fused_ssim). Every other case runs the torch reference, which is differentiable w.r.t. both.

    Args:
        img1: [B, C, H, W] or [C, H, W] image, typically the render (gets the gradient).
        img2: same shape, typically the ground truth.
        window_size: odd window edge in pixels.
        sigma: window standard deviation in pixels.
        C1: stabiliser of the luminance term, ``(0.01 L)^2`` with L = 1.
        C2: stabiliser of the contrast-structure term, ``(0.03 L)^2``.
        padding: ``"same"`` averages the full map; ``"valid"`` drops the ``window_size // 2`` border.
        reduction: ``"mean"`` returns a scalar, ``"none"`` the map [B, C, H', W'].

    Returns:
        Scalar mean SSIM, or the SSIM map.

    Raises:
        RuntimeError: ``SKYFALL_KERNELS=cuda``, CUDA inputs, and the extension is unavailable.
    """
    if img1.shape != img2.shape:
        raise ValueError(
            f"img1 and img2 must have the same shape, got {tuple(img1.shape)} vs {tuple(img2.shape)}"
        )
    if img1.is_cuda:
        ext = _backend.get_extension()
        fusable = (
            ext is not None
            and img1.dtype == torch.float32
            and img2.dtype == torch.float32
            and window_size == ext.ssim_window_size()
            and not img2.requires_grad
        )
        if fusable:
            from skyfall.kernels._wrapper import FusedSSIMMap

            x = _as_batched(img1).contiguous()
            y = _as_batched(img2).contiguous()
            taps = gaussian_window_1d(window_size, sigma, dtype=torch.float64).tolist()
            ssim_map = FusedSSIMMap.apply(x, y, ext, taps, float(C1), float(C2))
            return _reduce_map(ssim_map, window_size, padding, reduction)
    return _ssim(
        img1, img2, window_size=window_size, sigma=sigma, C1=C1, C2=C2, padding=padding, reduction=reduction
    )
