"""Geometry and imagery that condition a refiner beyond the render itself (Top2Ground's two signals).

- a **height map** of a view: every pixel's rendered surface point (camera-space z depth, unprojected
  through the view's pinhole) as its height above the tile's ground level;
- the **satellite crop** that sees a ground point: the training view looking at it most steeply,
  cropped square around the point's projection to a given ground width.

Plain tensors in, plain tensors out: Stage 2 assembles them per orbit view
(``skyfall.train.stage2``), the refiner only reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from skyfall.data.cameras import Cameras


def world_points(depth: Tensor, camera: Cameras) -> Tensor:
    """[H, W, 3] float64 world points of a z-depth map of one camera (NaN where depth <= 0 or not finite).

    Pixel (i, j) is the ray through its centre (j + 0.5, i + 0.5), the gsplat convention.
    """
    h, w = depth.shape
    k = camera.Ks[0].double().cpu()
    c2w = camera.camtoworlds[0].double().cpu()
    z = depth.double().cpu()
    z = torch.where(torch.isfinite(z) & (z > 0), z, torch.full_like(z, math.nan))
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    y = (v + 0.5 - k[1, 2]) / k[1, 1]
    x = (u + 0.5 - k[0, 2] - k[0, 1] * y) / k[0, 0]
    pc = torch.stack([x * z, y * z, z], dim=-1)
    return pc @ c2w[:3, :3].T + c2w[:3, 3]


def ground_level(points: Tensor, quantile: float = 0.02) -> float:
    """The tile's ground height: a low quantile of its point cloud's z (robust to stray points below)."""
    if len(points) == 0:
        return 0.0
    return float(torch.quantile(points[:, 2].double(), quantile))


def height_map(depth: Tensor, camera: Cameras, ground_z: float) -> Tensor:
    """[H, W] float32 height above ``ground_z`` of each pixel's surface point; 0 where nothing was rendered.

    Heights below the ground are clamped to 0: a height map, as Top2Ground's, starts at the ground.
    """
    z = world_points(depth, camera)[..., 2] - ground_z
    return torch.nan_to_num(z, nan=0.0).clamp_min(0.0).float()


def best_satellite_view(cameras: Cameras, point: Tensor, masks: Tensor | None = None) -> int | None:
    """Index of the training view that sees ``point`` [3] most steeply (smallest off-nadir angle), among
    those where it projects inside the image (and on a valid mask pixel); None when no view sees it."""
    uv, z = cameras.project(point.double().reshape(1, 3))
    uv, z = uv[:, 0], z[:, 0]
    inside = (
        (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cameras.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cameras.height)
    )
    if masks is not None:
        ui = uv[:, 0].floor().long().clamp(0, cameras.width - 1)
        vi = uv[:, 1].floor().long().clamp(0, cameras.height - 1)
        inside &= masks[torch.arange(len(cameras)), vi.cpu(), ui.cpu()].to(inside.device)
    if not bool(inside.any()):
        return None
    ray = point.double().reshape(1, 3) - cameras.centers
    off_nadir = torch.acos((-ray[:, 2] / ray.norm(dim=-1)).clamp(-1, 1))
    off_nadir = torch.where(inside, off_nadir, torch.full_like(off_nadir, math.inf))
    return int(off_nadir.argmin())


def satellite_crop(image: Tensor, camera: Cameras, point: Tensor, side_m: float, size: int) -> Tensor:
    """[3, size, size] crop of ``image`` [3, H, W] centred on ``point``'s projection, ``side_m`` metres wide.

    The width in pixels is ``side_m`` over the view's ground sampling distance at the point (camera z
    over the focal length); pixels outside the image are 0. Bilinear, so the centre is exact to a
    fraction of a pixel.
    """
    uv, z = camera.project(point.double().reshape(1, 3))
    u, v, zc = float(uv[0, 0, 0]), float(uv[0, 0, 1]), float(z[0, 0])
    k = camera.Ks[0]
    half_x = 0.5 * side_m * float(k[0, 0]) / zc  # pixels
    half_y = 0.5 * side_m * float(k[1, 1]) / zc
    _, h, w = image.shape
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1  # -1..1 across the crop
    xs = u + t * half_x
    ys = v + t * half_y
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    # grid_sample with align_corners=False: pixel k spans [k, k+1), normalised 2 x / W - 1
    grid = torch.stack([2 * gx / w - 1, 2 * gy / h - 1], dim=-1)[None].to(image.device, image.dtype)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
