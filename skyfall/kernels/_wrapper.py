"""autograd.Functions around the CUDA extension (the extension is fetched lazily by the caller)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor


class FusedSSIMMap(torch.autograd.Function):
    """Per-pixel SSIM map from the fused kernel; differentiable w.r.t. ``img1`` only (as fused_ssim)."""

    @staticmethod
    def forward(
        ctx: Any,
        img1: Tensor,  # [B, C, H, W] float32, CUDA, contiguous
        img2: Tensor,  # [B, C, H, W] float32, CUDA, contiguous
        ext: ModuleType,
        taps: list[float],  # [11] 1D window
        C1: float,
        C2: float,
    ) -> Tensor:
        assert img1.dim() == 4 and img1.shape == img2.shape, (img1.shape, img2.shape)
        assert img1.dtype == torch.float32 and img2.dtype == torch.float32, (img1.dtype, img2.dtype)
        need_parts = bool(ctx.needs_input_grad[0])
        ssim_map, ds_dmu1, ds_da, ds_dp = ext.ssim_fwd_cuda(img1, img2, taps, C1, C2, need_parts)
        if need_parts:
            ctx.save_for_backward(img1, img2, ds_dmu1, ds_da, ds_dp)
        ctx.ext = ext
        ctx.taps = taps
        return ssim_map

    @staticmethod
    def backward(ctx: Any, grad_map: Tensor) -> tuple[Tensor | None, ...]:
        img1, img2, ds_dmu1, ds_da, ds_dp = ctx.saved_tensors
        grad_img1 = ctx.ext.ssim_bwd_cuda(img1, img2, grad_map.contiguous(), ds_dmu1, ds_da, ds_dp, ctx.taps)
        return grad_img1, None, None, None, None, None
