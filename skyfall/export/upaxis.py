"""Up-axis conversion: rotate splats rigidly (positions, orientations and SH colours).

skyfall keeps the world ENU, Z-up. 3DGS viewers expect the COLMAP/OpenCV-style frame with -Y up
(SuperSplat/PlayCanvas rotate PLY and .splat files by 180° about Z on import), so the exporter
can rotate by ``R = Rx(+90°): (x, y, z) -> (x, -z, y)``.

A rotation R acts on

* means: ``p' = R p``;
* quaternions (wxyz): ``q' = q_R ⊗ q`` (so ``rotmat(q') = R rotmat(q)``), norm preserved;
* SH: the colour seen along direction d must equal the new colour along ``R d``. Each band l is
  rotated by a (2l+1)x(2l+1) matrix fitted exactly by least squares from basis values at random
  directions (band l's span is closed under rotation, so the fit is exact to rounding). For degree 1
  this equals the closed-form 3x3 rule (band 1 rotates like the vector ``(-c[3], -c[1], c[2])``); for
  degrees 2-3 it gives the Wigner-D matrices without hand-written formulas.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from skyfall.errors import ConfigError
from skyfall.export.bake import Splats
from skyfall.render.sh import sh_bases

# Z-up (ENU) -> -Y-up (OpenCV/COLMAP "RDF"-style frame most 3DGS viewers assume).
Z_UP_TO_NEG_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# -Y-up (RDF) -> +Y-up (RUB, OpenGL): 180° about X, the conversion spz's packer applies to PLY input.
RDF_TO_RUB = np.diag([1.0, -1.0, -1.0])


def up_rotation(up: str) -> np.ndarray:
    """[3, 3] rotation from the ENU world to the export frame for ``--up`` 'z' (identity) or 'y'."""
    if up == "z":
        return np.eye(3)
    if up == "y":
        return Z_UP_TO_NEG_Y_UP.copy()
    raise ConfigError(f"--up must be 'z' or 'y', got {up!r}")


def _check_rotation(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-9) or np.linalg.det(r) < 0:
        raise ValueError("expected a proper 3x3 rotation matrix (orthonormal, det +1)")
    return r


def rotmat_to_quat(r: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion of a rotation matrix [3, 3] (w >= 0)."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(_check_rotation(r)).as_quat()
    q = np.array([w, x, y, z])
    return q if w >= 0 else -q


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of wxyz quaternions, broadcast over leading dims.  [..., 4]"""
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        axis=-1,
    )


def sh_rotation_matrices(r: np.ndarray, degree: int, n_dirs: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Per-band matrices M_l [(2l+1), (2l+1)] with ``c'_l = M_l c_l`` for a world rotation ``r``.

    ``sum_k c'_k Y_k(R d) = sum_k c_k Y_k(d)`` for every unit direction d.
    """
    r = _check_rotation(r)
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n_dirs, 3, generator=gen, dtype=torch.float64), dim=-1)
    rd = d @ torch.from_numpy(r).T  # rows R d
    b_new = sh_bases(degree, rd)  # Y(R d)
    b_old = sh_bases(degree, d)  # Y(d)
    mats = []
    for band in range(1, degree + 1):
        sl = slice(band * band, (band + 1) * (band + 1))
        # Y_l(d) = Y_l(R d) X  =>  c^T Y_l(d) = (X c)^T Y_l(R d), so c' = X c
        x = torch.linalg.lstsq(b_new[:, sl], b_old[:, sl]).solution  # [(2l+1), (2l+1)]
        mats.append(x.numpy())
    return mats


def rotate_splats(splats: Splats, r: np.ndarray) -> Splats:
    """Rotate splats rigidly about the origin by ``r`` [3, 3] (a proper rotation)."""
    r = _check_rotation(r)
    if np.allclose(r, np.eye(3)):
        return splats
    means = (splats.means.astype(np.float64) @ r.T).astype(np.float32)
    quats = quat_multiply(rotmat_to_quat(r)[None], splats.quats.astype(np.float64)).astype(np.float32)
    sh = splats.sh.astype(np.float64).copy()
    for band, m in enumerate(sh_rotation_matrices(r, splats.sh_degree), start=1):
        sl = slice(band * band, (band + 1) * (band + 1))
        sh[:, sl] = np.einsum("ij,njc->nic", m, sh[:, sl])
    return replace(splats, means=means, quats=quats, sh=sh.astype(np.float32))


def to_up_axis(splats: Splats, up: str) -> Splats:
    """Splats in the frame selected by ``--up`` ('z': unchanged ENU; 'y': -Y up)."""
    return rotate_splats(splats, up_rotation(up))
