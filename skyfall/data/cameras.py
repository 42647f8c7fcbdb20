"""Camera container and the one camera convention used everywhere in skyfall.

Conventions (stated once, here):

* **World frame**: local ENU in metres (x = east, y = north, z = up), as in the reference's
  satellite tiles. Synthetic tiles put the tile centre at the origin and the ground at z = 0.
* **Camera frame**: OpenCV / COLMAP (x right, y down, z forward). ``camtoworlds`` are 4x4
  camera-to-world matrices; ``viewmats`` are their inverses (world-to-camera), the gsplat name.
* **Intrinsics**: ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels with gsplat's pixel-centre
  convention: pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)`` and its centre is
  ``(j + 0.5, i + 0.5)``; a camera-space point projects to ``u = fx * x / z + cx``.
  (The reference's rasteriser has a -0.5 px offset here; we follow gsplat.)
* **Precision**: satellite cameras have fx ~ 1e6 px, principal points far off-image and centres
  ~1e6 m away, so matrices stay **float64** here. Conversion to float32 happens only inside the
  renderer, after the float64 world-to-camera transform (see ``skyfall.render``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def invert_rigid(m: Tensor) -> Tensor:
    """Invert rigid 4x4 transforms exactly (R^T, -R^T t) instead of a general inverse.  [..., 4, 4]"""
    r = m[..., :3, :3]
    t = m[..., :3, 3:]
    out = torch.zeros_like(m)
    rt = r.transpose(-1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = -rt @ t
    out[..., 3, 3] = 1.0
    return out


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """OpenCV camera-to-world matrices looking from ``eye`` at ``target``.

    Args:
        eye: [..., 3] camera centres.
        target: [..., 3] look-at points.
        up: [3] world up (default +z). Must not be parallel to the viewing direction.

    Returns:
        [..., 4, 4] float64 camera-to-world matrices (x right, y down, z forward).
    """
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    up = torch.as_tensor(up, dtype=torch.float64).expand_as(eye)
    fwd = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, up, dim=-1), dim=-1)
    down = torch.linalg.cross(fwd, right, dim=-1)
    c2w = torch.zeros(eye.shape[:-1] + (4, 4), dtype=torch.float64)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = down
    c2w[..., :3, 2] = fwd
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def intrinsics_from_fov(fov_x_deg: float, width: int, height: int, fov_y_deg: float | None = None) -> Tensor:
    """Pinhole K with a centred principal point from horizontal (and optional vertical) FoV. [3, 3]"""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    fy = fx if fov_y_deg is None else 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor([[fx, 0.0, width / 2], [0.0, fy, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    Attributes:
        camtoworlds: [C, 4, 4] float64 OpenCV camera-to-world matrices.
        Ks: [C, 3, 3] float64 intrinsics in pixels (gsplat pixel-centre convention).
        width: image width in pixels.
        height: image height in pixels.
    """

    camtoworlds: Tensor
    Ks: Tensor
    width: int
    height: int
    world_to_camera: Tensor | None = field(default=None, repr=False, compare=False)
    """[C, 4, 4] ``viewmats`` computed beforehand (a trainer keeps its views' on the device), or None:
    inverted from ``camtoworlds`` when asked for."""

    def __post_init__(self) -> None:
        self.camtoworlds = torch.as_tensor(self.camtoworlds, dtype=torch.float64)
        self.Ks = torch.as_tensor(self.Ks, dtype=torch.float64)
        if self.camtoworlds.dim() == 2:
            self.camtoworlds = self.camtoworlds[None]
        if self.Ks.dim() == 2:
            self.Ks = self.Ks[None].expand(len(self.camtoworlds), 3, 3).clone()
        assert self.camtoworlds.shape[1:] == (4, 4), self.camtoworlds.shape
        assert self.Ks.shape == (len(self.camtoworlds), 3, 3), self.Ks.shape
        self.width = int(self.width)
        self.height = int(self.height)

    def __len__(self) -> int:
        return self.camtoworlds.shape[0]

    def __getitem__(self, idx: int | slice | Tensor | list[int]) -> Cameras:
        if isinstance(idx, int):
            idx = [idx]
        return Cameras(self.camtoworlds[idx], self.Ks[idx], self.width, self.height)

    @property
    def viewmats(self) -> Tensor:
        """[C, 4, 4] float64 world-to-camera matrices."""
        if self.world_to_camera is not None:
            return self.world_to_camera
        return invert_rigid(self.camtoworlds)

    @property
    def centers(self) -> Tensor:
        """[C, 3] float64 camera centres in world coordinates."""
        return self.camtoworlds[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.camtoworlds.to(device), self.Ks.to(device), self.width, self.height)

    def scaled(self, factor: float) -> Cameras:
        """Cameras for images resized by ``factor`` (e.g. 0.5 halves the resolution).

        With the pixel-centre convention, resizing maps continuous pixel coordinates by
        ``u' = u * factor``, so fx, fy, cx and cy all scale by the same factor.
        """
        w = round(self.width * factor)
        h = round(self.height * factor)
        ks = self.Ks.clone()
        ks[:, 0, :] *= w / self.width
        ks[:, 1, :] *= h / self.height
        return Cameras(self.camtoworlds.clone(), ks, w, h)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points into every camera, in float64.

        Args:
            points: [N, 3] world points.

        Returns:
            uv: [C, N, 2] continuous pixel coordinates; depth: [C, N] camera-space z.
        """
        pts = torch.as_tensor(points, dtype=torch.float64, device=self.camtoworlds.device)
        vm = self.viewmats
        pc = torch.einsum("cij,nj->cni", vm[:, :3, :3], pts) + vm[:, None, :3, 3]
        z = pc[..., 2]
        uvw = torch.einsum("cij,cnj->cni", self.Ks, pc)
        uv = uvw[..., :2] / uvw[..., 2:3]
        return uv, z
