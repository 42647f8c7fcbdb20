"""``skyfall path orbit``: write a reference-format camera-path JSON (``gen_render_path.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class OrbitOptions:
    """A circular orbit around a target, looking at it, up = +z (ENU metres)."""

    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Look-at point (x y z, metres)."""
    radius: float = 200.0
    """Distance from the target (metres)."""
    elevation: float = 45.0
    """Elevation above the target's horizon (degrees)."""
    fov: float = 40.0
    """Vertical field of view (degrees)."""
    frames: int = 120
    """Number of frames (one full turn, clockwise from +x as the reference)."""
    width: int = 512
    """Image width (pixels)."""
    height: int = 512
    """Image height (pixels)."""
    fps: int = 24
    """Frames per second."""

    def cameras(self):  # noqa: ANN201  (Cameras; torch is imported lazily)
        import math

        import torch

        from skyfall.data.camera_path import orbit_camtoworlds
        from skyfall.data.cameras import Cameras
        from skyfall.errors import ConfigError

        if self.frames < 1 or self.width < 1 or self.height < 1 or not 0 < self.fov < 180 or self.radius <= 0:
            raise ConfigError("orbit: frames, width, height and radius must be > 0 and fov in (0, 180)")
        c2w = orbit_camtoworlds(self.target, self.radius, self.elevation, self.frames)
        f = 0.5 * self.height / math.tan(math.radians(self.fov) / 2)
        k = torch.tensor([[f, 0, self.width / 2], [0, f, self.height / 2], [0, 0, 1]], dtype=torch.float64)
        return Cameras(c2w, k, self.width, self.height)


@dataclass
class PathOrbit(OrbitOptions):
    """Write an orbit camera path (reference JSON: OpenGL camera_to_world, vertical fov) to OUT."""

    out: Path = Path("orbit.json")
    """Output JSON file."""

    def main(self) -> None:
        from skyfall.data.camera_path import write_camera_path

        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_camera_path(
            self.out,
            self.cameras(),
            fps=self.fps,
            target=tuple(self.target),
            radius=self.radius,
            elevation_deg=self.elevation,
        )
        print(
            f"[path] {self.out}: {self.frames} frames, {self.width}x{self.height}, fov {self.fov}°, {self.fps} fps"
        )
