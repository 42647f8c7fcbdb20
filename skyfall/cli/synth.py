"""``skyfall synth``: write a procedural city tile with exact ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro


@dataclass
class Synth:
    """Write a synthetic city tile (satellite views, masks, cameras, points3D.txt) with ground truth in OUT/gt.

    The tile follows the reference tile format, so every command that reads a tile can read it. Ground
    truth: an exact DSM (0.5 m grid) and canonical-lighting views with depth along the Stage 2 orbits,
    at street level and (default preset) on the altitude ladder of `skyfall export-views`, 1.7 to 350 m
    (gt/views/ladder_<alt>m). With --rpc, OUT/rpc/ also holds satellite views as GeoTIFFs with RPCs fitted to
    the exact cameras (plus a known per-view bias), anchored in Jacksonville, FL, and the exact DSM as a
    UTM GeoTIFF: input for `skyfall prepare` whose truth is known (OUT/rpc/rpc.json).
    """

    out: Annotated[Path, tyro.conf.Positional]
    """Tile directory to write."""
    preset: Literal["default", "tiny"] = "default"
    """default: 16 satellite views at 512x512 (about a minute); tiny: 6 views at 64x64 (seconds, for tests)."""
    style: str = "default"
    """City style: default (the original city), downtown (dense, 40-80 m towers, narrow blocks, few trees), suburb (4-10 m houses on small lots with gardens, many trees) or mixed (every building turned by up to 45 deg, the widest size ranges). Non-default styles also have turned and L/T/U-shaped buildings, 3-5 dates, and cars that change between dates (never in gt/)."""
    seed: int = 0
    """Random seed of the city (layout, dates, cameras) and of the RPC biases."""
    overwrite: bool = False
    """Replace the tile files of a non-empty OUT."""
    rpc: bool = False
    """Also write OUT/rpc/: RPC GeoTIFFs of the first --rpc-views satellite views, a UTM DSM GeoTIFF and rpc.json (needs the geo extra)."""
    rpc_views: int = 5
    """Number of satellite views (sat_00, sat_01, ...) written with RPCs."""
    rpc_bias_px: float = 2.0
    """Largest injected RPC bias in pixels (view 0 none; the others a random direction, length in [b/2, b])."""
    city: str | None = None
    """Write a city split into ROWSxCOLS tiles instead (e.g. 2x2): OUT/city.json, OUT/tiles/<cell>/ (each
    a synthetic tile of the preset, core + margin, with its own ground truth) and OUT/gt/ (the city-wide
    exact DSM), for `skyfall city train`. An interrupted split continues."""
    tile_size: float = 256.0
    """--city: side of each tile's core in metres (the reference's tile is 256 m)."""
    overlap: float = 32.0
    """--city: margin of each tile beyond its core, metres (neighbours share twice this)."""

    def check(self) -> None:
        """One ConfigError naming the option for a value no tile could use; nothing is written before.

        The --rpc-* options are checked even without --rpc: a typo there is a mistake all the same.
        """
        import math

        from skyfall.errors import ConfigError
        from skyfall.synth.layout import city_style
        from skyfall.synth.writer import PRESETS

        if self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed}")
        city_style(self.style)  # an unknown style names the choices
        n_sat = PRESETS[self.preset].n_sat
        if not 1 <= self.rpc_views <= n_sat:
            raise ConfigError(
                f"--rpc-views must be 1..{n_sat} (the {self.preset} preset's satellite views), got {self.rpc_views}"
            )
        if not (math.isfinite(self.rpc_bias_px) and self.rpc_bias_px >= 0):
            raise ConfigError(f"--rpc-bias-px must be a finite number >= 0, got {self.rpc_bias_px}")
        if self.city is not None:
            from skyfall.city.synth import check_city_options, parse_grid

            if self.rpc:
                raise ConfigError("--rpc writes one tile's RPC views; it does not combine with --city")
            check_city_options(*parse_grid(self.city), self.tile_size, self.overlap)
            return  # the city writer checks OUT (an interrupted city continues)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise ConfigError(f"{self.out} is not empty; pass --overwrite to replace the tile")

    def main(self) -> None:
        from skyfall.synth import write_synthetic_tile

        self.check()  # before anything is written
        if self.city is not None:
            from skyfall.city.synth import parse_grid, write_synthetic_city

            rows, cols = parse_grid(self.city)
            write_synthetic_city(
                self.out, rows, cols, tile_size_m=self.tile_size, overlap_m=self.overlap,
                preset=self.preset, seed=self.seed, style=self.style, overwrite=self.overwrite,
            )  # fmt: skip
            print(f"[synth] next: skyfall city train {self.out} --preset demo")
            return
        if self.rpc:
            # Check the options and the optional dependencies before the slow rendering.
            from skyfall.synth.rpc import check_rpc_options

            check_rpc_options(self.preset, self.rpc_views, self.rpc_bias_px)
        write_synthetic_tile(
            self.out, preset=self.preset, seed=self.seed, overwrite=self.overwrite, style=self.style
        )
        if self.rpc:
            from skyfall.synth.rpc import write_rpc_set

            s = write_rpc_set(self.out, n_views=self.rpc_views, bias_px=self.rpc_bias_px)
            worst = max(v["check_max_px"] for v in s["views"])
            a = s["anchor"]
            print(
                f"[synth] wrote {self.out / 'rpc'}: {len(s['views'])} RPC GeoTIFFs (RPC vs exact camera: max "
                f"{worst:.2e} px; biases up to {self.rpc_bias_px:g} px in rpc.json), DSM EPSG:{s['dsm']['epsg']} "
                f"{s['dsm']['width']}x{s['dsm']['height']} at {s['dsm']['resolution']:g} m; anchor "
                f"{a['lon']:.4f},{a['lat']:.4f},{a['h']:g} m"
            )
            images = " ".join(str(self.out / "rpc" / v["image"]) for v in s["views"])
            print(
                f"[synth] try: skyfall prepare {images} --out TILE --aoi {s['prepare']['aoi']} "
                f"--alt-range={s['prepare']['alt_range']}"
            )
