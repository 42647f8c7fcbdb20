"""``skyfall demo``: the main job on the embedded default data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Demo:
    """Run the main job on the embedded default: synthesize the default city tile (if missing), then reconstruct it.

    The synthetic tile has exact ground truth, so the demo can report how good the reconstruction is.
    """

    out: Path = Path("outputs/demo")
    """Run directory; the synthetic tile is written to OUT/tile."""
    seed: int = 0
    """Random seed of the synthetic city."""

    def main(self) -> None:
        from skyfall.synth import write_synthetic_tile

        tile_dir = self.out / "tile"
        if (tile_dir / "transforms_train.json").exists():
            print(f"[demo] using existing synthetic tile {tile_dir}")
        else:
            write_synthetic_tile(tile_dir, preset="default", seed=self.seed)
            print(f"[demo] wrote synthetic tile {tile_dir}")
