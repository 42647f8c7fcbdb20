"""WGS84 geodetic <-> ECEF <-> local ENU (east, north, up) conversions, float64.

The ENU frame of a tile is tangent to the ellipsoid at ``origin = (lon0, lat0, h0)``; x = east,
y = north, z = up, in metres. Over a few-hundred-metre tile the ENU z differs from the ellipsoidal
height by ``d² / 2R`` (2 mm at 150 m), which the conversions below handle exactly anyway. A city's
tiles share the city's tangent plane instead, each translated by its own ``offset`` (``ENUFrame``).
"""

from __future__ import annotations

import numpy as np

WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)
WGS84_B = WGS84_A * (1.0 - WGS84_F)


def geodetic_to_ecef(lon: np.ndarray, lat: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Degrees, degrees, metres [...] -> ECEF metres [..., 3]."""
    lam, phi = np.radians(lon), np.radians(lat)
    h = np.asarray(h, np.float64)
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(phi) ** 2)
    x = (n + h) * np.cos(phi) * np.cos(lam)
    y = (n + h) * np.cos(phi) * np.sin(lam)
    z = (n * (1.0 - WGS84_E2) + h) * np.sin(phi)
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


def ecef_to_geodetic(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ECEF metres [..., 3] -> (lon deg, lat deg, h m), each [...].

    Bowring's parametric-latitude start followed by three fixed-point iterations: sub-micrometre
    for points near the Earth's surface.
    """
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lam = np.arctan2(y, x)
    p = np.hypot(x, y)
    ep2 = WGS84_E2 / (1.0 - WGS84_E2)
    beta = np.arctan2(z * WGS84_A, p * WGS84_B)
    phi = np.arctan2(z + ep2 * WGS84_B * np.sin(beta) ** 3, p - WGS84_E2 * WGS84_A * np.cos(beta) ** 3)
    for _ in range(3):
        n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(phi) ** 2)
        h = p / np.cos(phi) - n
        phi = np.arctan2(z, p * (1.0 - WGS84_E2 * n / (n + h)))
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(phi) ** 2)
    h = p / np.cos(phi) - n
    return np.degrees(lam), np.degrees(phi), h


def enu_rotation(lon0: float, lat0: float) -> np.ndarray:
    """[3, 3] rotation whose rows are the east, north and up unit vectors in ECEF at (lon0, lat0)."""
    lam, phi = np.radians(lon0), np.radians(lat0)
    sl, cl, sp, cp = np.sin(lam), np.cos(lam), np.sin(phi), np.cos(phi)
    return np.array([[-sl, cl, 0.0], [-sp * cl, -sp * sl, cp], [cp * cl, cp * sl, sp]])


class ENUFrame:
    """A local ENU frame at a geodetic origin, optionally translated within its tangent plane's axes.

    Args:
        lon0, lat0: tangent point in degrees; h0: its height in metres (ellipsoidal).
        offset: where this frame's origin lies in the tangent-point frame (ENU metres), or None for
            the tangent point itself. Tiles of a city share one tangent plane (the city's) and
            differ only by their offsets, so that tile -> city is an exact translation
            (``skyfall.city.manifest``); a tile's own tangent plane would also be rotated against
            its neighbours' (about 1.6e-4 rad per km between tangent points).
    """

    def __init__(self, lon0: float, lat0: float, h0: float, offset: tuple[float, float, float] | None = None):
        self.lon0, self.lat0, self.h0 = float(lon0), float(lat0), float(h0)
        self.offset = None if offset is None else tuple(float(v) for v in offset)
        if self.offset is not None and len(self.offset) != 3:
            raise ValueError(f"offset must be 3 numbers (east, north, up), got {offset!r}")
        self.rot = enu_rotation(self.lon0, self.lat0)
        self.origin_ecef = geodetic_to_ecef(np.array(self.lon0), np.array(self.lat0), np.array(self.h0))
        self._shift = np.zeros(3) if self.offset is None else np.asarray(self.offset, np.float64)

    def from_geodetic(self, lon: np.ndarray, lat: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Geodetic [...] -> ENU metres [..., 3]."""
        return (geodetic_to_ecef(lon, lat, h) - self.origin_ecef) @ self.rot.T - self._shift

    def to_geodetic(self, enu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ENU metres [..., 3] -> (lon, lat, h) each [...]."""
        return ecef_to_geodetic((np.asarray(enu, np.float64) + self._shift) @ self.rot + self.origin_ecef)

    def to_dict(self) -> dict[str, float | list[float]]:
        """``{lon, lat, alt}`` of the tangent point, plus ``offset`` [east, north, up] when there is one."""
        d: dict[str, float | list[float]] = {"lon": self.lon0, "lat": self.lat0, "alt": self.h0}
        if self.offset is not None:
            d["offset"] = list(self.offset)
        return d
