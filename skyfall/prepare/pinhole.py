"""Fit an OpenCV pinhole camera to an RPC over a 3D grid of points (DLT + non-linear refinement).

Satellite pushbroom cameras are not pinholes, but over a few-hundred-metre area of interest a
perspective camera ~700 km away reproduces the RPC to hundredths of a pixel (EOGS reports ~0.01 px
for its affine approximation). Steps, all float64:

1. **DLT** on Hartley-normalised correspondences (ENU points -> pixels): the general 3x4 projective
   camera P (11 degrees of freedom, i.e. with skew).
2. **RQ decomposition** P = K [R | t], K upper triangular with a positive diagonal, det R = +1.
3. **Levenberg-Marquardt** on the reprojection error of a *skew-free* pinhole (fx, fy, cx, cy,
   rotation, centre: 10 parameters), started from step 2 with the skew dropped, and from
   off-axis principal points if that start stays worse than the skewed camera (see ``fit_pinhole``). The reference
   removes skew afterwards (SatelliteSfM ``skew_correct.py``); we fit the skew-free model directly
   so that the written camera is exactly the one whose error we report. The general (skewed)
   projective fit's error is reported next to it, so that a user sees what dropping skew cost.

Parameters are relative to the DLT start (focal factors, angles, centre offsets in units of the
camera distance) so that finite-difference Jacobians are well scaled although fx ~ 1e6 px and the
centre is ~1e6 m away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import rq
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation


@dataclass
class PinholeFit:
    """A fitted camera.

    Attributes:
        K: [3, 3] intrinsics (fx, fy, cx, cy; zero skew), pixels, gsplat pixel-centre convention.
        c2w: [4, 4] OpenCV camera-to-world matrix in the ENU frame.
        rms_px, max_px: reprojection error of this camera against the target pixels of the fit points.
        skewed_rms_px, skewed_max_px: the same for the general projective (DLT + LM) camera.
        skew: the general camera's K[0, 1] / K[0, 0] (dimensionless).
    """

    K: np.ndarray
    c2w: np.ndarray
    rms_px: float
    max_px: float
    skewed_rms_px: float
    skewed_max_px: float
    skew: float

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """World points [N, 3] -> pixels [N, 2]."""
        return project_pinhole(self.K, self.c2w, xyz)


def project_pinhole(K: np.ndarray, c2w: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Project world points [N, 3] with an OpenCV camera (K [3,3], c2w [4,4]) -> pixels [N, 2]."""
    r = c2w[:3, :3]
    cam = (xyz - c2w[:3, 3]) @ r  # = R^T (x - C) for each row
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:3]


def _normaliser(pts: np.ndarray) -> np.ndarray:
    """Hartley similarity T (homogeneous) mapping pts [N, d] to zero mean and RMS norm sqrt(d)."""
    d = pts.shape[1]
    mean = pts.mean(axis=0)
    scale = np.sqrt(d) / np.sqrt(((pts - mean) ** 2).sum(axis=1).mean())
    t = np.eye(d + 1)
    t[:d, :d] *= scale
    t[:d, d] = -scale * mean
    return t


def dlt(xyz: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Normalised DLT: the [3, 4] camera P minimising the algebraic error of uv ~ P [xyz, 1]."""
    tx, tu = _normaliser(xyz), _normaliser(uv)
    xh = np.c_[xyz, np.ones(len(xyz))] @ tx.T
    uh = np.c_[uv, np.ones(len(uv))] @ tu.T
    n = len(xyz)
    a = np.zeros((2 * n, 12))
    a[0::2, 0:4] = xh
    a[0::2, 8:12] = -uh[:, :1] * xh
    a[1::2, 4:8] = xh
    a[1::2, 8:12] = -uh[:, 1:2] * xh
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    p_norm = vt[-1].reshape(3, 4)
    return np.linalg.inv(tu) @ p_norm @ tx


def decompose(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P [3, 4] -> (K [3,3] with K[2,2] = 1 and positive diagonal, R [3,3] with det +1, centre [3])."""
    m = p[:, :3]
    if np.linalg.det(m) < 0:
        p = -p  # P is defined up to scale; pick the sign that makes R a proper rotation
        m = p[:, :3]
    k, r = rq(m)
    s = np.diag(np.sign(np.diag(k)))
    k, r = k @ s, s @ r
    centre = -np.linalg.solve(m, p[:, 3])
    return k / k[2, 2], r, centre


def _c2w(r_w2c: np.ndarray, centre: np.ndarray) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = r_w2c.T
    c2w[:3, 3] = centre
    return c2w


def fit_pinhole(xyz: np.ndarray, uv: np.ndarray) -> PinholeFit:
    """Fit a skew-free OpenCV pinhole to correspondences.

    Args:
        xyz: [N, 3] world (ENU) points, N >= 6 and not coplanar.
        uv: [N, 2] their target pixels (gsplat convention).

    Returns:
        The fit (see :class:`PinholeFit`).
    """
    xyz = np.asarray(xyz, np.float64)
    uv = np.asarray(uv, np.float64)
    k0, r0, c0 = decompose(dlt(xyz, uv))
    if np.median(((xyz - c0) @ r0.T)[:, 2]) < 0:
        raise ValueError("the DLT camera sees the points from behind (degenerate point set?)")
    dist = float(np.linalg.norm(xyz.mean(axis=0) - c0))

    def unpack(q: np.ndarray, skewed: bool) -> tuple[np.ndarray, np.ndarray]:
        fx, fy = k0[0, 0] * np.exp(q[0]), k0[1, 1] * np.exp(q[1])  # exp: focals stay positive
        cx, cy = k0[0, 2] + k0[0, 0] * q[2], k0[1, 2] + k0[1, 1] * q[3]
        r = Rotation.from_rotvec(q[4:7]).as_matrix().T @ r0  # camera-frame perturbation of R0
        k = np.array([[fx, (k0[0, 1] + k0[0, 0] * q[10]) if skewed else 0.0, cx], [0, fy, cy], [0, 0, 1]])
        return k, _c2w(r, c0 + dist * q[7:10])

    def residual(q: np.ndarray, skewed: bool) -> np.ndarray:
        k, c2w = unpack(q, skewed)
        return (project_pinhole(k, c2w, xyz) - uv).ravel()

    def solve(
        skewed: bool, q0: np.ndarray, nfev: int = 1500
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # Relative parameters are O(0.1) at most; 1e-9 steps stay far above float64 noise.
        sol = least_squares(residual, q0, args=(skewed,), method="lm", x_scale=1.0, diff_step=1e-9,
                            xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=nfev)  # fmt: skip
        k, c2w = unpack(sol.x, skewed)
        err = np.linalg.norm(project_pinhole(k, c2w, xyz) - uv, axis=1)
        return k, c2w, err, sol.x

    k_s, _, err_s, _ = solve(True, np.zeros(11))
    rms_s = float(np.sqrt((err_s**2).mean()))
    # A far, nearly affine camera can only mimic skew through an off-axis principal point (the
    # local affine map of an off-axis perspective camera is sheared), which is a long, flat valley
    # for LM from the on-axis start. So we also start from off-axis principal points (tangent t,
    # with the rotation that keeps the scene centre in place) and keep the best fit.
    best = None
    rms = lambda e: float(np.sqrt((e**2).mean()))  # noqa: E731
    for tx, ty in [(0.0, 0.0)] + [(a, b) for a in (-0.3, 0.0, 0.3) for b in (-0.3, 0.0, 0.3) if a or b]:
        q0 = np.zeros(10)
        q0[2], q0[3], q0[4], q0[5] = tx, ty, ty, -tx
        trial = solve(False, q0, nfev=300)  # short runs to rank the starts
        if np.median(((xyz - trial[1][:3, 3]) @ trial[1][:3, :3])[:, 2]) <= 0:
            continue  # a mirrored camera looking away from the scene
        if best is None or rms(trial[2]) < rms(best[2]):
            best = trial
        # Within 1.5x (or 0.002 px) of the skewed camera: no meaningfully better start to find.
        if rms(best[2]) <= max(1.5 * rms_s, rms_s + 2e-3):
            break
    if best is None:
        raise ValueError("no skew-free pinhole with the points in front of it was found")
    k, c2w, err, _ = solve(False, best[3])  # polish the best start

    return PinholeFit(
        K=k,
        c2w=c2w,
        rms_px=float(np.sqrt((err**2).mean())),
        max_px=float(err.max()),
        skewed_rms_px=float(np.sqrt((err_s**2).mean())),
        skewed_max_px=float(err_s.max()),
        skew=float(k_s[0, 1] / k_s[0, 0]),
    )
