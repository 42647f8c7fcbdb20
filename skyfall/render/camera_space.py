"""World -> camera-space preparation shared by both backends (float64-safe satellite cameras).

Precision argument: a satellite camera sits ~7e5-1.5e6 m from the tile, with fx ~ 1e6-5e6 px and a
principal point up to ~5e5 px off the image. In float32 the spacing of numbers near 1e6 is 0.06 m,
i.e. a sizeable fraction of the ~0.3 m ground sample distance, and ``fx * x / z + cx`` cancels two
~5e5 px terms whose float32 spacing is 0.03-0.06 px. We therefore

1. apply the rigid world->camera transform in float64 (when the viewmats are float64), and
2. re-centre the principal point on the image centre with the exact shear
   ``x' = x + z (cx - W/2) / fx`` (``y`` likewise). For a pinhole camera ``u = fx x / z + cx =
   fx x' / z + W/2``; the EWA Jacobian satisfies ``J'(x') S = J(x)`` and gsplat's Jacobian clamp
   limits (principal-point aware) shift by the same amount, so the projection, its covariance
   and the clamp are unchanged; only the numbers become small.

Only then are the camera-space means cast to the rasterisation dtype: x', y' are of the order of
the imaged footprint (tens of metres) and z keeps a relative precision of 1e-7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances ``R S^2 R^T`` from unnormalised wxyz quaternions and linear scales.

    Args:
        quats: [N, 4] wxyz, any norm.
        scales: [N, 3] linear (activated) scales.

    Returns:
        [N, 3, 3] covariances.
    """
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    m = rot * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def camera_centers(viewmats: Tensor) -> Tensor:
    """[C, 3] camera centres ``-R^T t`` of world-to-camera matrices, in their own dtype."""
    r = viewmats[:, :3, :3]
    return -(r.transpose(-1, -2) @ viewmats[:, :3, 3:])[..., 0]


@dataclass
class CameraSpace:
    """Gaussians expressed in each (re-centred) camera, in the rasterisation dtype.

    Attributes:
        means: [C, N, 3] camera-space means (sheared so that the principal point is the image centre).
        covars: [C, N, 3, 3] camera-space covariances (same shear).
        Ks: [C, 3, 3] intrinsics with cx = W/2, cy = H/2 (focal lengths unchanged).
        campos: [C, 3] camera centres in world coordinates (precision dtype), for SH directions.
    """

    means: Tensor
    covars: Tensor
    Ks: Tensor
    campos: Tensor


def to_camera_space(
    means: Tensor,  # [N, 3]
    covars: Tensor,  # [N, 3, 3] world covariances (rasterisation dtype)
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
) -> CameraSpace:
    """Transform Gaussians into every camera in the viewmats' precision; see the module docstring."""
    dtype = means.dtype
    prec = torch.promote_types(dtype, viewmats.dtype)
    vm = viewmats.to(device=means.device, dtype=prec)
    ks = Ks.to(device=means.device, dtype=prec)
    fx, fy, cx, cy = ks[:, 0, 0], ks[:, 1, 1], ks[:, 0, 2], ks[:, 1, 2]
    shear = torch.eye(3, dtype=prec, device=means.device).repeat(len(vm), 1, 1)
    shear[:, 0, 2] = (cx - 0.5 * width) / fx
    shear[:, 1, 2] = (cy - 0.5 * height) / fy
    # S R (3x3) and S t in the precision dtype; the large translation never meets float32.
    rot = shear @ vm[:, :3, :3]
    trans = (shear @ vm[:, :3, 3:])[..., 0]
    means_c = torch.einsum("cij,nj->cni", rot, means.to(prec)) + trans[:, None, :]
    rot_r = rot.to(dtype)
    covars_c = torch.einsum("cij,njk,clk->cnil", rot_r, covars, rot_r)
    ks_c = ks.clone()
    ks_c[:, 0, 2] = 0.5 * width
    ks_c[:, 1, 2] = 0.5 * height
    return CameraSpace(means_c.to(dtype), covars_c, ks_c.to(dtype), camera_centers(vm))
