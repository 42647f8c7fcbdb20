"""Pseudo-camera sampling for depth supervision (Skyfall-GS ``train.py:generate_pseudo_cams``,
``utils/camera_utils.py:gen_idu_orbit_camera``).

Cameras orbit look-at targets on the ground plane z = 0 with up = +z, in our OpenCV convention.
"""

from __future__ import annotations

import math

import torch

from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at


def linear_schedule(step: int, start: int, end: int, value_start: float, value_end: float) -> float:
    """Linear interpolation from ``value_start`` at ``start`` to ``value_end`` at ``end`` (clamped).

    The reference writes it as ``end_value + delta * (end - it) / (end - start)``.
    """
    if end <= start:
        return value_end
    t = min(max((end - step) / (end - start), 0.0), 1.0)
    return value_end + (value_start - value_end) * t


def orbit_eye(
    target: torch.Tensor, radius: float, elevation_deg: float, azimuth_rad: torch.Tensor
) -> torch.Tensor:
    """Eye positions ``target + r (cos a cos e, sin a cos e, sin e)``. [..., 3] float64"""
    e = math.radians(elevation_deg)
    a = azimuth_rad.to(torch.float64)
    offs = torch.stack(
        [torch.cos(a) * math.cos(e), torch.sin(a) * math.cos(e), torch.full_like(a, math.sin(e))], -1
    )
    return target.to(torch.float64) + radius * offs


def sample_pseudo_cameras(
    n: int,
    *,
    elevation_deg: float,
    radius: float,
    target_std: float,
    n_azimuths: int = 12,
    fov_deg: float = 60.0,
    size: int = 1024,
    generator: torch.Generator | None = None,
) -> Cameras:
    """Draw ``n`` pseudo cameras as the reference does.

    Each camera: a look-at target ``(x, y, 0)`` with ``x, y ~ N(0, target_std^2)``; the orbit of
    ``n_azimuths`` cameras at azimuths ``2 pi k / n_azimuths`` around it; one of them at random.
    """
    xy = torch.randn(n, 2, generator=generator, dtype=torch.float64) * target_std
    target = torch.cat([xy, torch.zeros(n, 1, dtype=torch.float64)], -1)
    k = torch.randint(0, n_azimuths, (n,), generator=generator)
    az = 2 * math.pi * k.to(torch.float64) / n_azimuths
    eye = orbit_eye(target, radius, elevation_deg, az)
    c2w = look_at(eye, target)
    K = intrinsics_from_fov(fov_deg, size, size)
    return Cameras(c2w, K, size, size)


def nadir_grid_camera(
    x_min: float, y_max: float, resolution: float, width: int, height: int, *, distance: float = 1.0e5
) -> Cameras:
    """A far, straight-down camera whose pixel centres sit on the centres of a raster grid.

    Used to render a DSM-aligned depth map: pixel (i, j) looks (almost vertically) at the cell centre
    ``(x_min + (j + 0.5) res, y_max - (i + 0.5) res)``. The camera is ``distance`` above z = 0, so
    rays deviate from vertical by at most ``half-extent / distance`` (1e-4 rad for a 200 m tile).
    """
    f = distance / resolution
    cx_world = x_min + 0.5 * width * resolution
    cy_world = y_max - 0.5 * height * resolution
    # OpenCV camera looking down (-z world): x_cam = +x world (east), y_cam = -y world (south = image down).
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    c2w[:3, 1] = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    c2w[:3, 2] = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    c2w[:3, 3] = torch.tensor([cx_world, cy_world, distance], dtype=torch.float64)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return Cameras(c2w, K, width, height)
