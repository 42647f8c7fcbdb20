"""Real spherical harmonics colours (degrees 0-3), the 3DGS / gsplat convention.

Colour = ``clamp_min(sum_k c_k Y_k(d) + 0.5, 0)`` with ``d`` the unit direction from the camera
centre to the Gaussian mean. Both backends evaluate SH here (the gsplat adapter renders in a
re-centred camera space where gsplat's own direction computation would be wrong).
"""

from __future__ import annotations

import torch
from torch import Tensor

from skyfall.gaussians.sh import SH_C0

_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
MAX_SH_DEGREE = 3


def sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """SH basis values for unit directions.

    Args:
        degree: 0..3.
        dirs: [..., 3] unit directions.

    Returns:
        [..., (degree + 1)^2] basis values in gsplat's coefficient order.
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"sh_degree must be in 0..{MAX_SH_DEGREE}, got {degree}")
    out = [torch.full_like(dirs[..., 0], SH_C0)]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_rgb(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """View-dependent colours from SH coefficients (a partial degree uses the first bands only).

    Args:
        degree: active SH degree; ``(degree + 1)^2 <= K``.
        dirs: [..., N, 3] directions camera -> Gaussian (need not be normalised).
        coeffs: [..., N, K, 3] SH coefficients (broadcast against ``dirs``' leading dims).

    Returns:
        [..., N, 3] colours, ``clamp_min(SH + 0.5, 0)``.
    """
    k = (degree + 1) ** 2
    if coeffs.shape[-2] < k:
        raise ValueError(f"sh_degree {degree} needs {k} coefficients, colors has {coeffs.shape[-2]}")
    d = torch.nn.functional.normalize(dirs, dim=-1)
    basis = sh_bases(degree, d)  # [..., N, k]
    rgb = (basis[..., :, None] * coeffs[..., :k, :]).sum(-2)
    return torch.clamp_min(rgb + 0.5, 0.0)
