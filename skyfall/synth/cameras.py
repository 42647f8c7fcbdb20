"""Camera rigs of a synthetic tile: far satellite views, curriculum orbits, street-level views and the
altitude ladder."""

from __future__ import annotations

import math

import numpy as np
import torch

from skyfall.data import ladder as ladder_rule
from skyfall.data.camera_path import orbit_camtoworlds
from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.synth.layout import Layout

# Skyfall-GS's jax_v1 Stage-2 curriculum (``IDUParams``): (elevation deg, radius m), FoV 60 deg.
CURRICULUM = ((85.0, 300.0), (75.0, 275.0), (65.0, 275.0), (55.0, 250.0), (45.0, 250.0))
ORBIT_FOV_DEG = 60.0
# Street views: a pedestrian/car eye on a lane, looking along the road and pitched up to see facades.
STREET_EYE_M = 1.7
STREET_PITCH_DEG = 15.0
STREET_FOV_DEG = 70.0
# Altitude ladder (skyfall.data.ladder, the rule `skyfall export-views` uses): FoV of its views.
LADDER_FOV_DEG = 60.0


def satellite_cameras(
    rng: np.random.Generator, n: int, size_px: int, half_m: float, top_m: float, fill: float = 0.95
) -> tuple[Cameras, np.ndarray]:
    """Far perspective cameras that behave like the reference's skew-corrected satellite cameras.

    Each camera sits 400-800 km away at 5-30 deg off-nadir (azimuths spread around the compass). Its
    optical axis is aimed at a point kilometres away from the tile, then the principal point is set so
    that the tile centre lands on the image centre: cx, cy end up far outside the image, as for the
    real JAX cameras. The focal length (~1e6 px) frames the tile (``half_m`` either side of its
    origin) and its tallest objects (``top_m``) with a ``1 - fill`` margin (GSD ~0.55 m/px at 512 px
    for a 256 m tile).

    Returns:
        cameras [n] and their off-nadir angles in degrees [n].
    """
    half, top = float(half_m), float(top_m)
    corners = torch.tensor(
        [[x, y, z] for x in (-half, half) for y in (-half, half) for z in (0.0, top)], dtype=torch.float64
    )
    c2ws, ks, offs = [], [], []
    az0 = rng.uniform(0, 360)
    for i in range(n):
        az = math.radians(az0 + 360.0 * i / n + rng.uniform(-10, 10))
        off = math.radians(5.0 + 25.0 * ((i * 0.618034) % 1.0))  # spread 5-30 deg, golden-ratio order
        dist = rng.uniform(4.0e5, 8.0e5)
        eye = torch.tensor(
            [dist * math.sin(off) * math.cos(az), dist * math.sin(off) * math.sin(az), dist * math.cos(off)],
            dtype=torch.float64,
        )
        aim_r, aim_a = rng.uniform(2e3, 2e4), rng.uniform(0, 2 * math.pi)
        aim = torch.tensor([aim_r * math.cos(aim_a), aim_r * math.sin(aim_a), 0.0], dtype=torch.float64)
        roll = math.radians(rng.uniform(-12, 12))
        up = torch.tensor([math.sin(roll), math.cos(roll), 0.0], dtype=torch.float64)  # image up ~ north
        c2w = look_at(eye, aim, up)
        w2c = torch.linalg.inv(c2w)
        pc = corners @ w2c[:3, :3].T + w2c[:3, 3]
        centre = w2c[:3, 3]  # the tile centre (world origin) in camera space
        dx = pc[:, 0] / pc[:, 2] - centre[0] / centre[2]
        dy = pc[:, 1] / pc[:, 2] - centre[1] / centre[2]
        f = fill * 0.5 * size_px / float(torch.maximum(dx.abs().max(), dy.abs().max()))
        fy = f * (1.0 + rng.uniform(-0.004, 0.004))  # real RPC approximations are slightly anisotropic
        cx = 0.5 * size_px - f * float(centre[0] / centre[2])
        cy = 0.5 * size_px - fy * float(centre[1] / centre[2])
        c2ws.append(c2w)
        ks.append(torch.tensor([[f, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64))
        offs.append(math.degrees(off))
    return Cameras(torch.stack(c2ws), torch.stack(ks), size_px, size_px), np.array(offs)


def orbit_cameras(elevation_deg: float, radius: float, n_az: int, size_px: int) -> Cameras:
    """Curriculum orbit around the tile centre (reference azimuth order), FoV 60 deg."""
    c2w = orbit_camtoworlds((0.0, 0.0, 0.0), radius, elevation_deg, n_az)
    return Cameras(c2w, intrinsics_from_fov(ORBIT_FOV_DEG, size_px, size_px), size_px, size_px)


def street_cameras(
    rng: np.random.Generator,
    layout: Layout,
    n: int,
    size_px: int,
    offset: tuple[float, float] = (0.0, 0.0),
    half_m: float | None = None,
) -> Cameras:
    """Street-level views: eye 1.7 m above the right-hand lane, looking along the road, pitched up 15 deg.

    ``offset``, ``half_m``: a window of the layout (``SyntheticCity.window``): its origin in the
    layout's frame and half its side; the views stand on the roads crossing it, in its frame.
    """
    half = layout.size_m / 2 if half_m is None else float(half_m)
    o = np.array([offset[0], offset[1], 0.0])
    roads = list(layout.roads)
    if half_m is not None:  # a window: only the roads that cross it well inside its edges
        roads = [r for r in roads if abs(r.centre - o[r.axis]) < 0.8 * half] or roads
    c2ws = []
    for i in range(n):
        road = roads[i % len(roads)]
        sign = 1.0 if (i // len(roads)) % 2 == 0 else -1.0
        along = rng.uniform(-0.6 * half, 0.6 * half)
        # Right-hand lane for the direction of travel (right of +y is +x; right of +x is -y).
        lateral = road.centre - o[road.axis] + (1.75 if road.axis == 0 else -1.75) * sign
        fwd = np.zeros(3)
        fwd[1 - road.axis] = sign
        eye = np.zeros(3)
        eye[road.axis] = lateral
        eye[1 - road.axis] = along
        eye[2] = STREET_EYE_M
        target = eye + fwd * 10.0 + np.array([0.0, 0.0, 10.0 * math.tan(math.radians(STREET_PITCH_DEG))])
        c2ws.append(look_at(torch.tensor(eye), torch.tensor(target)))
    k = intrinsics_from_fov(STREET_FOV_DEG, size_px, size_px)
    return Cameras(torch.stack(c2ws), k, size_px, size_px)


def ladder_cameras(
    dsm: np.ndarray, georef: dict, size_m: float, size_px: int, n_targets: int, n_azimuths: int
) -> ladder_rule.Ladder:
    """The altitude ladder of ``skyfall.data.ladder`` on the city's exact DSM (``SyntheticCity.dsm``
    and its georeference): ground heights and building footprints are exact, where `skyfall
    export-views` reads them from a reconstruction's rendered DSM."""
    field = ladder_rule.HeightField(
        dsm, float(georef["x_min"]), float(georef["y_max"]), float(georef["resolution"])
    )
    half = size_m / 2
    return ladder_rule.place_ladder(
        field, (-half, half, -half, half), n_targets=n_targets, n_azimuths=n_azimuths,
        fov_deg=LADDER_FOV_DEG, size=size_px,
    )  # fmt: skip
