"""``skyfall train stage1 ...``: training commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from skyfall.config import Stage1Config

PresetName = Literal["paper-jax", "paper-nyc", "demo", "tiny"]


@dataclass
class TrainStage1:
    """Stage 1: fit 3D Gaussians to a tile's satellite views.

    Presets set every default (`--preset demo` for a CPU run on the synthetic tile); any option below
    overrides the preset. The resolved config is saved as RUN/config.yml.
    """

    data: Path
    """Tile folder (transforms_train.json, images/, points3D.txt, ...)."""
    out: Path
    """Run directory (checkpoints, metrics.jsonl, summary.json)."""
    preset: PresetName = "paper-jax"
    """Named defaults: paper-jax, paper-nyc (reference), demo (CPU, minutes), tiny (tests)."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT/ckpts."""
    export: bool = True
    """Write OUT/ply/stage1_raw.ply (raw PLY with the 3D filter) at the end."""
    cfg: Annotated[Stage1Config, tyro.conf.arg(name="")] = field(default_factory=Stage1Config)

    def main(self) -> None:
        from skyfall.train.stage1 import train_stage1

        summary = train_stage1(self.cfg, self.data, self.out, resume=self.resume)
        if self.export:
            from skyfall.train.stage1 import export_raw_ply

            print(f"[stage1] raw PLY: {export_raw_ply(self.out)}")
        _print_summary(summary.get("stage1", summary))


def _print_summary(s: dict) -> None:
    keys = ("steps", "num_gaussians", "psnr_test", "dsm_mae_m", "dsm_completeness", "wall_s")
    parts = []
    for k in keys:
        if k in s and s[k] is not None:
            v = s[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    print("[stage1] " + "  ".join(parts))


def _preset_default(argv: list[str]) -> TrainStage1:
    """Default TrainStage1 for the ``--preset`` named on the command line (pre-parsed)."""
    from skyfall.presets import get_preset

    name = "paper-jax"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    if name not in PresetName.__args__:  # type: ignore[attr-defined]
        name = "paper-jax"  # tyro then reports the invalid choice itself
    return TrainStage1(data=tyro.MISSING, out=tyro.MISSING, preset=name, cfg=get_preset(name))  # type: ignore[arg-type]


TrainStage1.preset_default = staticmethod(_preset_default)  # type: ignore[attr-defined]
