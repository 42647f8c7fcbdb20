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
    truth: an exact DSM (0.5 m grid) and canonical-lighting views with depth along the Stage 2 orbits
    and at street level.
    """

    out: Annotated[Path, tyro.conf.Positional]
    """Tile directory to write."""
    preset: Literal["default", "tiny"] = "default"
    """default: 16 satellite views at 512x512 (about a minute); tiny: 6 views at 64x64 (seconds, for tests)."""
    seed: int = 0
    """Random seed of the city (layout, dates, cameras)."""
    overwrite: bool = False
    """Replace the tile files of a non-empty OUT."""

    def main(self) -> None:
        from skyfall.synth import write_synthetic_tile

        write_synthetic_tile(self.out, preset=self.preset, seed=self.seed, overwrite=self.overwrite)
