"""EWA projection of camera-space Gaussians with gsplat 1.5.3's rules (pinhole only).

Mirrors ``ProjectionEWA3DGSFused.cu`` / ``persp_proj`` / ``add_blur``: principal-point-aware
Jacobian clamp ``lim = (W - cx)/fx + 0.3 * 0.5 W/fx``, blur ``eps2d`` added to the 2D covariance,
antialiased compensation ``sqrt(max(0, det / det_blur))``, and the opacity-aware radius
``ceil(min(3.33, sqrt(2 ln(255 o))) * sqrt(cov_ii))`` with culling of Gaussians outside
[near, far], with a non-positive blurred determinant, with ``o * comp < 1/255`` or off-image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0


@dataclass
class Projected:
    """Per-camera screen-space Gaussians.

    Attributes:
        means2d: [C, N, 2] pixel coordinates (differentiable).
        conics: [C, N, 3] inverse blurred 2D covariance (a, b, c) (differentiable).
        depths: [C, N] camera-space z (differentiable).
        opacities: [C, N] opacities times the compensation in antialiased mode (differentiable).
        radii: [C, N, 2] int32 pixel radii (x, y); 0 where culled.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    opacities: Tensor
    radii: Tensor


def project(
    means_c: Tensor,  # [C, N, 3]
    covars_c: Tensor,  # [C, N, 3, 3]
    opacities: Tensor,  # [N]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
    antialiased: bool,
) -> Projected:
    """Project camera-space Gaussians to the image plane (see the module docstring)."""
    x, y, z = means_c.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    in_depth = (z >= near_plane) & (z <= far_plane)
    # Culled Gaussians still flow through the maths; keep them finite so no NaN reaches the grads.
    zs = torch.where(in_depth, z, torch.ones_like(z))
    rz = 1.0 / zs
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
    tx = zs * torch.minimum(lim_xp, torch.maximum(-lim_xn, x * rz))
    ty = zs * torch.minimum(lim_yp, torch.maximum(-lim_yn, y * rz))
    zero = torch.zeros_like(rz)
    j = torch.stack([fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1).reshape(
        *rz.shape, 2, 3
    )
    cov2d = j @ covars_c @ j.transpose(-1, -2)
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    ok = in_depth & (det > 0)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_s, -b / det_s, a / det_s], dim=-1)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    opac = opacities[None, :].expand_as(z)
    if antialiased:
        comp = torch.sqrt(torch.clamp_min(det_orig / det_s, 0.0))
        opac = opac * comp
    with torch.no_grad():
        o = opac.detach()
        ok = ok & (o >= ALPHA_THRESHOLD)
        extend = torch.clamp_max(
            torch.sqrt(2.0 * torch.log(torch.clamp_min(o, 1e-30) / ALPHA_THRESHOLD)), 3.33
        )
        # clamp before the int32 cast: near-plane Gaussians can have astronomically large footprints
        rx = torch.ceil(extend * torch.sqrt(torch.clamp_min(a.detach(), 0.0))).clamp_max(2.0**30)
        ry = torch.ceil(extend * torch.sqrt(torch.clamp_min(c.detach(), 0.0))).clamp_max(2.0**30)
        ok = ok & ((rx > 0) | (ry > 0))
        mx, my = means2d.detach().unbind(-1)
        ok = ok & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        ok = ok & torch.isfinite(mx) & torch.isfinite(my)
        radii = torch.stack([rx, ry], dim=-1).nan_to_num(0.0).to(torch.int32) * ok[..., None]
    return Projected(means2d, conics, z, opac, radii)
