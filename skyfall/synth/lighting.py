"""Per-acquisition-date lighting: sun direction, colour tint and haze.

Satellite tiles mix acquisitions from different dates, so the synthetic tile does too: each date has
its own sun position (shadows move), a white-balance tint and a little haze. This is what makes an
appearance model necessary, as on the real data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Lighting:
    """Lambertian sun + ambient sky, then a colour tint and a haze blend.

    ``rgb = mix(albedo * (ambient + sun * max(0, n.s) * visible) * tint, haze_color, haze)``

    Attributes:
        name: acquisition date label (ISO date).
        sun_azimuth_deg: compass azimuth of the sun (0 = north, 90 = east).
        sun_elevation_deg: sun elevation above the horizon.
        tint: [3] per-channel gain (white balance / season).
        haze: blend weight towards ``haze_color``.
        ambient: sky-light level.
        sun: direct sun level.
    """

    name: str
    sun_azimuth_deg: float
    sun_elevation_deg: float
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    haze: float = 0.0
    haze_color: tuple[float, float, float] = (0.62, 0.66, 0.72)
    ambient: float = 0.42
    sun: float = 0.72

    @property
    def sun_dir(self) -> np.ndarray:
        """[3] unit vector towards the sun, ENU."""
        az, el = math.radians(self.sun_azimuth_deg), math.radians(self.sun_elevation_deg)
        return np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])

    def to_json(self) -> dict:
        d = asdict(self)
        d["sun_dir"] = self.sun_dir.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Lighting:
        keys = cls.__dataclass_fields__.keys()
        kw = {k: v for k, v in d.items() if k in keys}
        for k in ("tint", "haze_color"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# Base sun positions of a northern mid-latitude city at ~10:30 local time over a year (the satellite
# overpass time), with tints from warm summer to cool winter light. Seeds jitter them slightly.
_BASE_DATES = [
    ("2016-06-14", 125.0, 68.0, (1.00, 1.00, 0.98), 0.02),
    ("2016-10-02", 150.0, 45.0, (1.06, 1.00, 0.90), 0.05),
    ("2016-12-20", 160.0, 32.0, (0.92, 0.97, 1.08), 0.08),
    ("2017-03-08", 142.0, 47.0, (0.98, 1.02, 1.00), 0.10),
    ("2017-08-26", 118.0, 58.0, (1.04, 0.98, 0.94), 0.04),
]


def make_dates(rng: np.random.Generator, n: int) -> list[Lighting]:
    """``n`` acquisition dates (n <= 5) with seed-dependent jitter of sun and tint."""
    out = []
    for name, az, el, tint, haze in _BASE_DATES[:n]:
        jt = np.clip(np.array(tint) + rng.uniform(-0.02, 0.02, 3), 0.8, 1.2)
        out.append(
            Lighting(
                name=name,
                sun_azimuth_deg=float(az + rng.uniform(-8, 8)),
                sun_elevation_deg=float(el + rng.uniform(-3, 3)),
                tint=tuple(float(t) for t in jt),
                haze=float(haze),
            )
        )
    return out
