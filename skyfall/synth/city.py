"""``SyntheticCity``: a procedural city tile with exact ground truth (images, depth, DSM).

The world is only the tile slab and its objects: rays that miss it are black with depth +inf and
mask False, matching the reference's "black = no data" convention.

Canonical lighting (``render(..., date=None)``, used for every ground-truth oblique/street view) is
the lighting of date 0, which is always a training date, so a reconstruction rendered with that
date's appearance can match the ground truth.

Windows. A tile of a larger synthetic city (``skyfall synth CITY --city RxC``) sees the city through a
*window*: ``offset`` is the tile frame's origin in the city frame (same axes: city point = tile point
+ offset) and ``extent_m`` the side of the square the tile covers around its origin. Every method
takes and returns tile-frame coordinates (cameras, heights, the DSM grid), so a windowed city renders
its tile exactly as a one-tile city renders its own, and the neighbouring blocks beyond the window
are there, as in real imagery.

Transient objects (the cars of the non-default styles) belong to dates: ``render(..., date=d)`` shows
the cars present on date d; the canonical renders (``date=None``), the DSM and ``height_at`` show the
static city only, so the ground truth never contains them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyfall.data.cameras import Cameras
from skyfall.errors import ConfigError, TileFormatError
from skyfall.synth.layout import KIND_GROUND, Layout, city_style, generate_layout, in_footprint, world_aabb
from skyfall.synth.lighting import Lighting, make_dates
from skyfall.synth.raycast import Primitives, ShadowGrid, trace_camera
from skyfall.synth.shading import albedo, shade, surface_normals

GENERATOR = "skyfall.synth"
GENERATOR_VERSION = 1
_SHADOW_OFFSET = 0.02  # m, along the normal: keeps shadow rays off their own surface


@dataclass
class SyntheticCity:
    """A city: its primitives (``layout``), its acquisition dates (``dates``) and its ``style``."""

    layout: Layout
    dates: list[Lighting]
    seed: int | None = None
    style: str = "default"
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extent_m: float | None = None

    def window(self, centre_xy: tuple[float, float], size_m: float) -> SyntheticCity:
        """The same city seen as a tile of side ``size_m`` whose origin is ``centre_xy`` (city frame)."""
        return dataclasses.replace(
            self, offset=(float(centre_xy[0]), float(centre_xy[1]), 0.0), extent_m=float(size_m)
        )

    def _to_city(self, cameras: Cameras) -> Cameras:
        if not any(self.offset):
            return cameras
        c2w = cameras.camtoworlds.clone()
        c2w[:, :3, 3] += torch.tensor(self.offset, dtype=c2w.dtype)
        return Cameras(c2w, cameras.Ks, cameras.width, cameras.height)

    @classmethod
    def generate(cls, seed: int, size_m: float = 256.0, style: str = "default") -> SyntheticCity:
        """The city of ``seed`` in ``style`` (deterministic): layout and the style's 3-5 dates.

        Raises:
            ConfigError: unknown ``style`` (``skyfall.synth.layout.STYLES`` lists them).
        """
        layout = generate_layout(seed, size_m, style)
        dates = make_dates(np.random.default_rng([seed, 1]), city_style(style).n_dates)
        return cls(layout, dates, seed, style)

    @classmethod
    def from_tile(cls, tile_dir: str | Path) -> SyntheticCity:
        """Rebuild the city of a synthetic tile from its ``synth.json`` (checked against its checksum);
        a tile of a larger city (``city`` entry: the city's size, the tile's offset) is its window."""
        path = Path(tile_dir) / "synth.json"
        try:
            meta = json.loads(path.read_text())
            seed, size = int(meta["seed"]), float(meta["size_m"])
            style = str(meta.get("style", "default"))  # tiles written before styles existed: default
            whole = meta.get("city")
            if whole is not None:
                city_size = float(whole["size_m"])
                ox, oy = (float(v) for v in whole["offset"][:2])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TileFormatError(path, None, f"not a synthetic tile description: {e}") from e
        try:
            city = cls.generate(seed, city_size if whole is not None else size, style)
        except ConfigError as e:
            raise TileFormatError(path, "style", f"{e} (written by another skyfall version?)") from e
        if whole is not None:
            city = city.window((ox, oy), size)
        city.dates = [Lighting.from_json(d) for d in meta.get("dates", [])] or city.dates
        want = meta.get("scene_checksum")
        if want is not None and want != city.layout.checksum():
            raise TileFormatError(
                path, "scene_checksum", "this skyfall version builds a different city for that seed"
            )
        return city

    # ------------------------------------------------------------------------------------------------

    @property
    def size_m(self) -> float:
        """Side of the square this city (or its window) covers."""
        return self.layout.size_m if self.extent_m is None else self.extent_m

    @property
    def canonical(self) -> Lighting:
        """Lighting of ``date=None``: date 0's (see the module docstring)."""
        return self.dates[0]

    def primitives(self, date: int | None = None) -> Primitives:
        """The raycaster's scene on ``date`` (None: the static city, see the module docstring)."""
        lay = self.layout.at_date(date)
        return Primitives(
            box_lo=torch.as_tensor(lay.box_lo, dtype=torch.float32),
            box_hi=torch.as_tensor(lay.box_hi, dtype=torch.float32),
            ell_c=torch.as_tensor(lay.ell_center, dtype=torch.float32),
            ell_r=torch.as_tensor(lay.ell_radii, dtype=torch.float32),
            box_casts_shadow=torch.as_tensor(lay.box_kind != KIND_GROUND),
            box_yaw=torch.as_tensor(lay.box_yaw, dtype=torch.float32),
        )

    def render(
        self, cameras: Cameras, date: int | None = None, supersample: int = 1
    ) -> dict[str, torch.Tensor]:
        """Ray-cast RGB, depth and hit mask for every camera (any pinhole, near or far).

        Args:
            cameras: C cameras.
            date: index into ``dates`` (its lighting and its transient objects); None = canonical
                lighting (date 0's) and no transient objects.
            supersample: s > 1 casts s x s rays per pixel (on a regular sub-grid) and box-filters
                them, like a sensor's pixel integration; the tile's satellite views use 2 so that
                edges are anti-aliased and consistent across views.

        Returns:
            ``rgb`` [C, H, W, 3] float32 in [0, 1] (black where nothing is hit), ``depth`` [C, H, W]
            float32 camera-space z of the pixel-centre ray (OpenCV z, not ray length; +inf on miss;
            with supersampling, pixels whose centre misses but a sub-sample hits get the nearest
            sub-sample's), ``mask`` [C, H, W] bool (with supersampling: any sub-sample hit).
        """
        light = self.canonical if date is None else self.dates[date]
        cameras = self._to_city(cameras.to("cpu"))
        scene = self.layout.at_date(date)
        prims = self.primitives(date)
        sun = torch.as_tensor(light.sun_dir, dtype=torch.float32)
        s = int(supersample)
        h, w = cameras.height, cameras.width
        hi_cams = cameras.scaled(s) if s > 1 else cameras
        hh, ww = hi_cams.height, hi_cams.width
        shadows = ShadowGrid(prims, sun)
        rgbs, depths, masks = [], [], []
        for ci in range(len(cameras)):
            hits, _d, zscale = trace_camera(hi_cams, ci, prims)
            rgb = torch.zeros(hh * ww, 3)
            if hits.mask.any():
                p = hits.points[hits.mask]
                prim = hits.prim[hits.mask]
                n = surface_normals(scene, prim, p)
                lit = torch.zeros(len(p), dtype=torch.bool)
                facing = (n @ sun) > 0
                lit[facing] = shadows.visible(p[facing] + _SHADOW_OFFSET * n[facing])
                rgb[hits.mask] = shade(albedo(scene, prim, p, n), n, lit, light)
            depth = torch.where(hits.mask, hits.t * zscale, torch.full_like(zscale, float("inf"))).float()
            mask = hits.mask
            if s > 1:
                rgb = rgb.reshape(h, s, w, s, 3).mean((1, 3))
                mask = mask.reshape(h, s, w, s).any(3).any(1)
                # Depth of the pixel-centre ray (exact geometry), falling back to the nearest
                # sub-sample on pixels whose centre misses but which are partly covered.
                centre, _, zc = trace_camera(cameras, ci, prims)
                depth_c = torch.where(centre.mask, centre.t * zc, torch.full_like(zc, float("inf"))).float()
                depth = torch.where(centre.mask, depth_c, depth.reshape(h, s, w, s).amin((1, 3)).reshape(-1))
            rgbs.append(rgb.reshape(h, w, 3))
            depths.append(depth.reshape(h, w))
            masks.append(mask.reshape(h, w))
        return {"rgb": torch.stack(rgbs), "depth": torch.stack(depths), "mask": torch.stack(masks)}

    def height_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Exact top-surface height (ENU z, metres) at arbitrary horizontal positions.

        Same rule as :meth:`dsm` (a box covers a point strictly inside its footprint; an ellipsoid
        where its top exists), so ``height_at`` at the DSM's cell centres is the DSM. Static city
        only: transient objects (cars) are not part of the ground truth.

        Args:
            x, y: [...] ENU metres, broadcast together.

        Returns:
            [...] float64 heights; NaN where no primitive covers the point (outside the tile).
        """
        x, y = (np.asarray(a, np.float64) for a in np.broadcast_arrays(x, y))
        x, y = x + self.offset[0], y + self.offset[1]
        shape = x.shape
        x, y = x.reshape(-1), y.reshape(-1)
        z = np.full(x.shape, -np.inf)
        # Points sorted by x: each primitive only looks at the slice inside its x extent.
        order = np.argsort(x, kind="stable")
        xs = x[order]
        lay = self.layout

        def candidates(x0: float, x1: float) -> np.ndarray:
            a, b = np.searchsorted(xs, x0, "right"), np.searchsorted(xs, x1, "left")
            return order[a:b]

        wlo, whi = world_aabb(lay.box_lo, lay.box_hi, lay.box_yaw)
        for lo, hi, yaw, alo, ahi in zip(lay.box_lo, lay.box_hi, lay.box_yaw, wlo, whi, strict=True):
            idx = candidates(alo[0], ahi[0])
            idx = idx[(y[idx] > alo[1]) & (y[idx] < ahi[1])]
            if yaw:
                idx = idx[in_footprint(x[idx], y[idx], lo, hi, yaw)]
            z[idx] = np.maximum(z[idx], hi[2])
        for c, r in zip(lay.ell_center, lay.ell_radii, strict=True):
            idx = candidates(c[0] - r[0], c[0] + r[0])
            idx = idx[np.abs(y[idx] - c[1]) < r[1]]
            q = 1.0 - ((x[idx] - c[0]) / r[0]) ** 2 - ((y[idx] - c[1]) / r[1]) ** 2
            top = np.where(q >= 0, c[2] + r[2] * np.sqrt(np.clip(q, 0, None)), -np.inf)
            z[idx] = np.maximum(z[idx], top)
        z[~np.isfinite(z)] = np.nan
        return z.reshape(shape) - self.offset[2]

    def dsm(self, resolution: float = 0.5) -> tuple[np.ndarray, dict]:
        """Exact top-surface height at each cell centre of a grid covering the tile.

        Returns:
            heights [H, W] float32 (row 0 = north, i.e. max y) and its georeference
            ``{x_min, y_max, resolution, width, height, crs}`` (cell (i, j) centre:
            ``x = x_min + (j + 0.5) * res``, ``y = y_max - (i + 0.5) * res``).
        """
        lay = self.layout
        half = self.size_m / 2
        n = int(round(self.size_m / resolution))
        # cell centres in the city frame; the grid and the heights are returned in the tile frame
        xs = -half + (np.arange(n) + 0.5) * resolution + self.offset[0]
        ys = half - (np.arange(n) + 0.5) * resolution + self.offset[1]
        z = np.zeros((n, n), dtype=np.float64)
        wlo, whi = world_aabb(lay.box_lo, lay.box_hi, lay.box_yaw)
        for lo, hi, yaw, alo, ahi in zip(lay.box_lo, lay.box_hi, lay.box_yaw, wlo, whi, strict=True):
            cols = (xs > alo[0]) & (xs < ahi[0])
            rows = (ys > alo[1]) & (ys < ahi[1])
            if cols.any() and rows.any():
                sub = np.ix_(rows, cols)
                top = hi[2]
                if yaw:  # a turned box covers only the cells inside its footprint
                    inside = in_footprint(xs[cols][None], ys[rows][:, None], lo, hi, yaw)
                    top = np.where(inside, hi[2], -np.inf)
                z[sub] = np.maximum(z[sub], top)
        for c, r in zip(lay.ell_center, lay.ell_radii, strict=True):
            cols = np.abs(xs - c[0]) < r[0]
            rows = np.abs(ys - c[1]) < r[1]
            if not (cols.any() and rows.any()):
                continue
            gx = ((xs[cols] - c[0]) / r[0])[None]
            gy = ((ys[rows] - c[1]) / r[1])[:, None]
            q = 1.0 - gx**2 - gy**2
            top = np.where(q >= 0, c[2] + r[2] * np.sqrt(np.clip(q, 0, None)), -np.inf)
            sub = np.ix_(rows, cols)
            z[sub] = np.maximum(z[sub], top)
        georef = {
            "x_min": -half,
            "y_max": half,
            "resolution": resolution,
            "width": n,
            "height": n,
            "crs": "local ENU metres",
        }
        return (z - self.offset[2]).astype(np.float32), georef
