"""Stage 1 ablations on a tile: appearance, opacity regularisation and pseudo depth on/off.

Runs the chosen preset once per variant (sequentially) and prints one JSON line per run plus a
Markdown table (held-out satellite PSNR, DSM MAE, Gaussian count, wall time).

    python scripts/ablate_stage1.py --data outputs/demo/tile --out outputs/ablate --preset demo

Takes the Stage 1 options of ``skyfall train stage1`` (``--preset``, ``--config``, ``--stage1.*``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from skyfall.cli.train import PresetName
from skyfall.config.training import Stage1Config

VARIANTS = {
    "full": lambda c: c,
    "no-appearance": lambda c: dataclasses.replace(
        c, appearance=dataclasses.replace(c.appearance, enabled=False)
    ),
    "no-opacity-reg": lambda c: dataclasses.replace(c, lambda_opacity=0.0),
    "no-pseudo-depth": lambda c: dataclasses.replace(c, pseudo=dataclasses.replace(c.pseudo, enabled=False)),
}


@dataclass
class Ablate:
    """Stage 1 ablations on a tile: appearance, opacity regularisation and pseudo depth on/off."""

    data: Path
    """Tile folder."""
    out: Path
    """Parent folder of the runs (one per variant)."""
    variants: tuple[Literal[tuple(VARIANTS)], ...] = tuple(VARIANTS)  # type: ignore[valid-type]
    """Variants to run, in order."""
    preset: PresetName = "demo"
    """Named Stage 1 defaults (configs/NAME.yaml)."""
    config: Path | None = None
    """A YAML file with a stage1: section layered on the preset."""
    stage1: Stage1Config = field(default_factory=Stage1Config)


def main() -> None:
    import sys

    import tyro

    from skyfall.cli import command_defaults, preset_options

    args = tyro.cli(Ablate, default=command_defaults(Ablate, *preset_options(sys.argv[1:])))

    from skyfall.train.stage1 import train_stage1

    rows = []
    for name in args.variants:
        cfg = VARIANTS[name](args.stage1)
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        s = train_stage1(cfg, args.data, out, progress=False)["stage1"]
        nan = float("nan")
        row = {
            "variant": name,
            "psnr_test": s.get("psnr_test", nan),
            "psnr_test_novel_embedding": s.get("psnr_test_novel_embedding", nan),
            "dsm_mae_m": s.get("dsm_mae_m", nan),
            "dsm_completeness": s.get("dsm_completeness", nan),
            "dsm_mae_expected_depth_m": s.get("dsm_mae_expected_depth_m", nan),
            "num_gaussians": s["num_gaussians"],
            "wall_s": s["wall_s"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(
        "\n| variant | held-out PSNR, fitted / mean embedding (dB) | DSM MAE, median / expected depth (m) "
        "| DSM completeness | Gaussians | wall (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['psnr_test']:.2f} / {r['psnr_test_novel_embedding']:.2f} "
            f"| {r['dsm_mae_m']:.2f} / {r['dsm_mae_expected_depth_m']:.2f} | {r['dsm_completeness']:.3f} "
            f"| {r['num_gaussians']:,} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
