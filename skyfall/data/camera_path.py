"""Reference camera-path JSON (``gen_render_path.py`` format) and orbit generation.

File layout (as Skyfall-GS's ``gen_render_path.py`` writes and ``render_video.py`` reads)::

    {"_target": [x, y, z], "_radius": r, "_elevation": deg, "camera_type": "perspective",
     "render_height": H, "render_width": W, "fps": F,
     "camera_path": [{"camera_to_world": [16 floats, row-major], "fov": deg, "aspect": 1}, ...]}

``camera_to_world`` is in the **OpenGL** convention (x right, y up, looking along -z) and ``fov`` is
the **vertical** FoV in degrees; the same focal length is used for x (three.js convention). We
convert to our OpenCV convention by flipping columns 1 and 2, as the reference loader does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from skyfall.data.cameras import Cameras, look_at
from skyfall.errors import TileFormatError

_FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def orbit_camtoworlds(
    target: tuple[float, float, float],
    radius: float,
    elevation_deg: float,
    n_frames: int,
    *,
    clockwise: bool = True,
    start_azimuth_deg: float = 0.0,
) -> torch.Tensor:
    """OpenCV camera-to-world matrices on an orbit around ``target`` (up = +z).

    Azimuths follow the reference: ``theta_i = -2*pi*i/N`` (clockwise, starting on +x) when
    ``clockwise``; eye = target + r (cos t cos e, sin t cos e, sin e).

    Returns:
        [n_frames, 4, 4] float64.
    """
    sign = -1.0 if clockwise else 1.0
    th = torch.tensor(
        [math.radians(start_azimuth_deg) + sign * 2 * math.pi * i / n_frames for i in range(n_frames)],
        dtype=torch.float64,
    )
    el = math.radians(elevation_deg)
    tgt = torch.tensor(target, dtype=torch.float64)
    eye = tgt + radius * torch.stack(
        [torch.cos(th) * math.cos(el), torch.sin(th) * math.cos(el), torch.full_like(th, math.sin(el))], -1
    )
    return look_at(eye, tgt.expand_as(eye))


def write_camera_path(
    path: str | Path,
    cameras: Cameras,
    *,
    fps: int = 24,
    target: tuple[float, float, float] | None = None,
    radius: float | None = None,
    elevation_deg: float | None = None,
) -> None:
    """Write ``cameras`` (centred principal point, fx == fy assumed) as a reference camera-path JSON."""
    frames = []
    for c2w, k in zip(cameras.camtoworlds, cameras.Ks, strict=True):
        gl = (c2w @ _FLIP_YZ).reshape(-1).tolist()
        fov = math.degrees(2 * math.atan(0.5 * cameras.height / float(k[1, 1])))
        frames.append({"camera_to_world": gl, "fov": fov, "aspect": 1})
    doc = {
        "_target": list(target) if target is not None else None,
        "_radius": radius,
        "_elevation": elevation_deg,
        "camera_type": "perspective",
        "render_height": cameras.height,
        "render_width": cameras.width,
        "fps": fps,
        "camera_path": frames,
    }
    Path(path).write_text(json.dumps(doc, indent=1))


def read_camera_path(path: str | Path) -> Cameras:
    """Read a reference camera-path JSON into OpenCV ``Cameras`` (principal point at the centre)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TileFormatError(path, None, f"cannot read camera path JSON: {e}") from e
    for key in ("render_height", "render_width", "camera_path"):
        if key not in doc:
            raise TileFormatError(path, key, "missing field")
    w, h = int(doc["render_width"]), int(doc["render_height"])
    c2ws, ks = [], []
    for i, fr in enumerate(doc["camera_path"]):
        try:
            m = torch.tensor(fr["camera_to_world"], dtype=torch.float64).reshape(4, 4)
            fov = float(fr["fov"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TileFormatError(path, f"camera_path[{i}]", f"invalid frame: {e}") from e
        if not torch.isfinite(m).all() or not (0.0 < fov < 180.0):
            raise TileFormatError(path, f"camera_path[{i}]", "non-finite matrix or fov outside (0, 180)")
        f = 0.5 * h / math.tan(math.radians(fov) / 2)
        c2ws.append(m @ _FLIP_YZ)
        ks.append(torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=torch.float64))
    if not c2ws:
        raise TileFormatError(path, "camera_path", "no frames")
    return Cameras(torch.stack(c2ws), torch.stack(ks), w, h)
