"""A descent along the altitude ladder: one camera column from 350 m down to street level.

The picture users want of co-registered multi-altitude data: the ladder's cameras of one target and
azimuth (``skyfall.data.ladder``) sit on one vertical column (a fixed standoff from the target),
so a descent is that column travelled continuously, looking at the target all the way: the pitch
turns from near-nadir to near-horizontal as the camera sinks. Altitudes are spaced geometrically
(each frame the same factor lower), so the long aerial stretch passes quickly and the last metres,
where the view changes most, get most frames; the path holds a few frames at the top and bottom.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.data.ladder import HeightField, Ladder, camera_position


def descent_altitudes(top_m: float, bottom_m: float, frames: int, hold: int = 0) -> np.ndarray:
    """``frames`` altitudes from ``top_m`` to ``bottom_m``, geometrically spaced, plus ``hold`` repeats
    of each end."""
    if not (0 < bottom_m < top_m) or frames < 2:
        raise ValueError(
            f"a descent needs 0 < bottom < top and >= 2 frames, got {bottom_m}, {top_m}, {frames}"
        )
    alts = np.geomspace(top_m, bottom_m, frames)
    return np.concatenate([np.full(hold, top_m), alts, np.full(hold, bottom_m)])


def descent_cameras(
    height: HeightField,
    ladder: Ladder,
    *,
    frames: int = 120,
    hold: int = 12,
    fov_deg: float = 60.0,
    width: int = 512,
    height_px: int | None = None,
) -> tuple[Cameras, dict]:
    """Cameras descending the column of the ladder's first street-level view, and what was chosen.

    The column is that of the lowest placed view (its target and its azimuth after relocation), the
    descent runs from the ladder's highest altitude to its lowest. Frames where the rule would put the
    camera inside something (an aerial frame too close to a roof) keep the previous frame's height
    ratio instead, so the path stays continuous.

    Raises:
        ValueError: the ladder has no view.
    """
    if not ladder.views:
        raise ValueError("the ladder has no placed view to descend to")
    low = min(ladder.views, key=lambda v: (v.altitude_m, v.target_index, v.azimuth_index))
    top = max(v.altitude_m for v in ladder.views)
    if top <= low.altitude_m:
        raise ValueError("a descent needs views at two altitudes at least")
    target = np.asarray(low.target, dtype=np.float64)
    standoff = math.hypot(low.eye[0] - target[0], low.eye[1] - target[1])
    eyes = []
    for alt in descent_altitudes(top, low.altitude_m, frames, hold):
        eye, _ = camera_position(height, target, float(alt), low.azimuth_deg, standoff)
        if not math.isfinite(eye[2]):
            eye = np.array([low.eye[0], low.eye[1], target[2] + alt])
        eyes.append(eye)
    eye_t = torch.tensor(np.stack(eyes), dtype=torch.float64)
    c2w = look_at(eye_t, torch.tensor(target, dtype=torch.float64).expand_as(eye_t))
    h = height_px or width
    k = intrinsics_from_fov(fov_deg, width, h)
    cams = Cameras(c2w, k.expand(len(eyes), 3, 3).clone(), width, h)
    info = {
        "target": [float(v) for v in target],
        "azimuth_deg": float(low.azimuth_deg),
        "standoff_m": float(standoff),
        "top_m": float(top),
        "bottom_m": float(low.altitude_m),
        "frames": len(eyes),
    }
    return cams, info
