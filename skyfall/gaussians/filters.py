"""Mip-Splatting 3D smoothing filter (reference-pipeline.md §2.1, §2.5, §8 #6).

Each Gaussian carries a filter size ``filter_3d`` (a world-space standard deviation, metres). The
filter convolves the Gaussian with an isotropic Gaussian of that size, which widens the scales and
lowers the opacity so that the integrated density is preserved.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_3d_filter(scales: Tensor, opacities: Tensor, filter_3d: Tensor | None) -> tuple[Tensor, Tensor]:
    """Effective (activated) scales and opacities with the 3D filter applied.

    ``s_eff = sqrt(s^2 + f^2)`` per axis and ``a_eff = a * sqrt(prod s^2 / prod (s^2 + f^2))``.

    Args:
        scales: [N, 3] log scales (raw parameters).
        opacities: [N] opacity logits (raw parameters).
        filter_3d: [N] filter standard deviations in world units, or None for no filter.

    Returns:
        scales_eff [N, 3] (linear) and opacities_eff [N] (in [0, 1]); differentiable.
    """
    s = torch.exp(scales)
    a = torch.sigmoid(opacities)
    if filter_3d is None:
        return s, a
    s2 = s * s
    f2 = (filter_3d * filter_3d).to(s.dtype)[:, None]
    s2f = s2 + f2
    # ratio of determinants computed as a product of per-axis ratios: stays in (0, 1] without
    # overflow/underflow for tiny or huge scales.
    coef = torch.sqrt(torch.prod(s2 / s2f, dim=-1))
    return torch.sqrt(s2f), a * coef
