"""Pure-torch backend: gsplat 1.5.3 semantics on any device, no gsplat import.

Projection runs through autograd (cheap, [C, N] elementwise); compositing is a custom autograd
Function with a hand-written backward (``composite.py``) that also produces the exact absgrad.

Measured with ``scripts/bench_render.py`` on one CPU thread (SH degree 1, antialiased, RGB+D,
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184``, without which glibc spends
much of the time in mmap/munmap churn of the large tensors): 10k Gaussians at 256^2
~0.16 s forward + ~0.14 s backward; 50k at 512^2 ~1.6 s + ~1.1 s with ~350 MB peak RSS increase.
"""

from __future__ import annotations

from torch import Tensor

from skyfall.render.camera_space import quat_scale_to_covar, to_camera_space
from skyfall.render.composite import median_depth_pixels, rasterize_pixels
from skyfall.render.projection import Projected, project


def _project(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
    width: int, height: int, eps2d: float, near_plane: float, far_plane: float, antialiased: bool,
) -> Projected:  # fmt: skip
    """Activated world-space Gaussians -> per-camera screen-space Gaussians (differentiable)."""
    cam = to_camera_space(means, quat_scale_to_covar(quats, scales), viewmats, Ks, width, height)
    return project(
        cam.means, cam.covars, opacities, cam.Ks, width, height, eps2d, near_plane, far_plane, antialiased
    )


def rasterize_torch(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    rgb: Tensor | None,  # [C, N, 3] colours, or None to evaluate SH through ``sh_fn``
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    backgrounds: Tensor | None,  # [C, 3]
    eps2d: float,
    antialiased: bool,
    near_plane: float,
    far_plane: float,
    absgrad: bool,
    max_pairs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render RGB+D with activated parameters.

    Returns:
        colors+depth [C, H, W, 4], alphas [C, H, W, 1], means2d [C, N, 2], radii [C, N, 2] int32.
    """
    import torch

    proj = _project(
        means,
        quats,
        scales,
        opacities,
        viewmats,
        Ks,
        width,
        height,
        eps2d,
        near_plane,
        far_plane,
        antialiased,
    )
    feats = torch.cat([rgb, proj.depths[..., None]], dim=-1)
    if backgrounds is not None:
        # the depth channel's background is 0, as in gsplat's RGB+D
        backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(backgrounds.shape[0], 1)], dim=-1)
    out, alphas = rasterize_pixels(
        proj.means2d,
        proj.conics,
        feats,
        proj.opacities,
        proj.radii,
        proj.depths,
        width,
        height,
        backgrounds=backgrounds,
        absgrad=absgrad,
        max_pairs=max_pairs,
    )
    return out, alphas, proj.means2d, proj.radii


def median_depth_torch(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    eps2d: float,
    antialiased: bool,
    near_plane: float,
    far_plane: float,
    normalized: bool,
) -> tuple[Tensor, Tensor]:
    """Median depth [C, H, W, 1] and alpha [C, H, W, 1] with activated parameters (no gradients)."""
    import torch

    with torch.no_grad():
        proj = _project(
            means,
            quats,
            scales,
            opacities,
            viewmats,
            Ks,
            width,
            height,
            eps2d,
            near_plane,
            far_plane,
            antialiased,
        )
        outs = [
            median_depth_pixels(
                proj.means2d[c],
                proj.conics[c],
                proj.opacities[c],
                proj.radii[c],
                proj.depths[c],
                width,
                height,
                normalized=normalized,
            )
            for c in range(viewmats.shape[0])
        ]
    return torch.stack([o[0] for o in outs])[..., None], torch.stack([o[1] for o in outs])[..., None]
