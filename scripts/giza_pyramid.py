"""Measure the Great Pyramid of Giza in a DSM GeoTIFF: a check of real-imagery heights against known
geometry (there is no truth DSM for the Pléiades sample in ../shared/data/phr_gizeh).

    python scripts/giza_pyramid.py TILE/dense/dsm.tif        # prepare's stereo DSM
    python scripts/giza_pyramid.py RUN/dsm/dsm.tif           # a trained run's export

Khufu's pyramid, as surveyed: apex near 29.97918 N, 31.13436 E (published positions differ by ~10 m);
sides 230.3 m along the cardinal directions (within 4'); faces inclined 51.84 deg; today 138.5 m high
(the top 8 m are gone, leaving a platform ~10 m across with a thin survey mast on it). Printed: the
apex found in the DSM (the highest point of its 7 m median filter within 40 m of the published
position; its offset from that position), the platform's height (median of the cells within 4 m of
it) above the plateau (the median of the cells 5-20 m outside the base, inside the DSM), and for each
face (a triangle of the base square) whose middle part lies in the DSM, the slope and azimuth of a
plane fitted robustly to the cells 15-95 m from the apex. The DSM's grid must be in a projected CRS in
metres (skyfall's exports are in the tile's UTM zone). Last line: the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

APEX_LON, APEX_LAT = 31.13436, 29.97918
HEIGHT_M = 138.5
HALF_BASE_M = 115.15
SLOPE_DEG = 51.84


def measure(path: str | Path) -> dict:
    """Apex height above the plateau and the faces' slopes in the DSM at ``path`` (module docstring)."""
    from pyproj import Transformer

    from skyfall.dsm import read_geotiff

    dsm = read_geotiff(path)
    if dsm.crs is None:
        raise SystemExit(f"{path}: no CRS; need a georeferenced DSM (metres)")
    from scipy.ndimage import median_filter

    e_pub, n_pub = Transformer.from_crs("EPSG:4326", dsm.crs, always_xy=True).transform(APEX_LON, APEX_LAT)
    x, y = dsm.grid.centres()
    h = dsm.heights
    ok = np.isfinite(h)
    smooth = median_filter(np.where(ok, h, -np.inf), size=max(3, round(7.0 / dsm.grid.resolution)))
    search = ok & (np.hypot(x - e_pub, y - n_pub) <= 40.0)
    if not search.any():
        raise SystemExit(f"{path}: the pyramid's apex is not inside this DSM")
    i = np.flatnonzero(search)[np.argmax(smooth[search])]
    e0, n0 = float(x.flat[i]), float(y.flat[i])
    dx, dy = x - e0, y - n0
    out: dict = {"dsm": str(path), "apex_utm": [round(e0, 2), round(n0, 2)],
                 "apex_offset_m": [round(e0 - e_pub, 1), round(n0 - n_pub, 1)]}  # fmt: skip
    near = ok & (np.hypot(dx, dy) <= 4.0)
    cheb = np.maximum(np.abs(dx), np.abs(dy))
    ring = ok & (cheb >= HALF_BASE_M + 5) & (cheb <= HALF_BASE_M + 20)
    if near.any() and ring.sum() >= 20:
        top, plateau = float(np.median(h[near])), float(np.median(h[ring]))
        out.update({"top_m": round(top, 2), "plateau_m": round(plateau, 2), "height_m": round(top - plateau, 2),
                    "plateau_cells": int(ring.sum())})  # fmt: skip
    faces = {}
    r = np.hypot(dx, dy)
    for name, (ax, ay) in {"east": (1, 0), "west": (-1, 0), "north": (0, 1), "south": (0, -1)}.items():
        along = dx * ax + dy * ay  # distance from the apex towards the face's base edge
        across = dx * ay - dy * ax
        sel = ok & (along > np.abs(across) + 3.0) & (r >= 15.0) & (along <= 95.0)
        if sel.sum() < 200:
            continue
        faces[name] = _plane(dx[sel], dy[sel], h[sel], (ax, ay)) | {"cells": int(sel.sum())}
    out["faces"] = faces
    return out


def _plane(x: np.ndarray, y: np.ndarray, h: np.ndarray, outward: tuple[int, int]) -> dict:
    """Plane h = a x + b y + c by iteratively reweighted least squares (Huber, 1 m); slope, azimuth."""
    a_mat = np.c_[x, y, np.ones_like(x)]
    w = np.ones_like(h)
    for _ in range(10):
        coef, *_ = np.linalg.lstsq(a_mat * w[:, None], h * w, rcond=None)
        res = h - a_mat @ coef
        mad = max(float(np.median(np.abs(res))) * 1.4826, 1e-6)
        w = np.sqrt(np.minimum(1.0, 1.0 * mad / np.maximum(np.abs(res), 1e-9)))
    a, b = float(coef[0]), float(coef[1])
    slope = math.degrees(math.atan(math.hypot(a, b)))
    # the direction the face falls towards (downhill), as an azimuth from grid north, clockwise
    azimuth = math.degrees(math.atan2(-a, -b)) % 360.0
    return {"slope_deg": round(slope, 2), "downhill_azimuth_deg": round(azimuth, 1),
            "residual_mad_m": round(mad, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dsm", type=Path)
    m = measure(p.parse_args().dsm)
    print(
        f"apex found {m['apex_offset_m'][0]:+.1f} m E, {m['apex_offset_m'][1]:+.1f} m N of the published position"
    )
    if "height_m" in m:
        print(f"platform {m['top_m']:.1f} m, plateau {m['plateau_m']:.1f} m ({m['plateau_cells']} cells): height "
              f"{m['height_m']:.1f} m (surveyed {HEIGHT_M} m)")  # fmt: skip
    else:
        print("the apex or the plateau around the base is outside the DSM")
    for name, f in m["faces"].items():
        print(f"{name} face: slope {f['slope_deg']:.1f} deg (surveyed {SLOPE_DEG}), falls towards "
              f"{f['downhill_azimuth_deg']:.0f} deg, residual MAD {f['residual_mad_m']:.2f} m over {f['cells']} cells")  # fmt: skip
    print(json.dumps(m))


if __name__ == "__main__":
    main()
