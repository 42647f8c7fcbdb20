"""``skyfall train stage1 ...``: training commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from skyfall.config import Stage1Config, Stage2Config

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


def _scan_preset(argv: list[str]) -> str:
    name = "paper-jax"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    return name if name in PresetName.__args__ else "paper-jax"  # type: ignore[attr-defined]


def _preset_default(argv: list[str]) -> TrainStage1:
    """Default TrainStage1 for the ``--preset`` named on the command line (pre-parsed)."""
    from skyfall.presets import get_preset

    name = _scan_preset(argv)
    return TrainStage1(data=tyro.MISSING, out=tyro.MISSING, preset=name, cfg=get_preset(name))  # type: ignore[arg-type]


TrainStage1.preset_default = staticmethod(_preset_default)  # type: ignore[attr-defined]


@dataclass
class TrainStage2:
    """Stage 2: Iterative Dataset Update on a finished Stage 1 run (render orbits, refine, retrain, per episode).

    Resumable at any point: finished renders/refinements are skipped and training continues from the
    latest step checkpoint. `--refiner ideal` (synthetic tiles only) is a measuring instrument: it
    returns the ground-truth render of each pose, i.e. a perfect prior.
    """

    run: Path
    """Stage 1 run directory (Stage 2 continues in it)."""
    preset: PresetName = "paper-jax"
    """Named Stage 2 defaults: paper-jax, paper-nyc (reference), demo (CPU, ideal refiner), tiny (tests)."""
    cfg2: Annotated[Stage2Config, tyro.conf.arg(name="")] = field(default_factory=Stage2Config)

    def main(self) -> None:
        from skyfall.train.stage2 import train_stage2

        _print_stage2(train_stage2(self.cfg2, self.run))


@dataclass
class TrainAll:
    """Stage 1 then Stage 2 in one run directory (the same preset name selects both stages' defaults)."""

    data: Path
    """Tile folder."""
    out: Path
    """Run directory."""
    preset: PresetName = "paper-jax"
    """Named defaults for both stages."""
    resume: bool = False
    """Continue from the latest checkpoint (Stage 1 or Stage 2)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def main(self) -> None:
        from skyfall.storage.checkpoints import latest_checkpoint, load_checkpoint
        from skyfall.train.stage1 import train_stage1
        from skyfall.train.stage2 import train_stage2

        ckpt = latest_checkpoint(self.out / "ckpts") if self.resume else None
        stage = load_checkpoint(ckpt).get("stage") if ckpt is not None else None
        if stage != "stage2":
            s1 = train_stage1(self.stage1, self.data, self.out, resume=self.resume and ckpt is not None)
            _print_summary(s1.get("stage1", s1))
        _print_stage2(train_stage2(self.stage2, self.out))


def _print_stage2(summary: dict) -> None:
    s2 = summary.get("stage2", {})
    base = s2.get("stage1_baseline", {})
    print(
        f"[stage2] stage 1: psnr_gt_45={base.get('psnr_gt_45')} psnr_test={base.get('psnr_test')} dsm_mae_m={base.get('dsm_mae_m')}"
    )
    for e in s2.get("episodes", []):
        print(
            f"[stage2] episode {e['episode']} (elev {e['elevation']:g}, r {e['radius']:g}): "
            f"psnr_gt_45={e.get('psnr_gt_45')} psnr_test={e.get('psnr_test')} dsm_mae_m={e.get('dsm_mae_m')} n={e['num_gaussians']}"
        )


def _stage2_default(argv: list[str]) -> TrainStage2:
    from skyfall.presets import get_stage2_preset

    name = _scan_preset(argv)
    return TrainStage2(run=tyro.MISSING, preset=name, cfg2=get_stage2_preset(name))  # type: ignore[arg-type]


def _all_default(argv: list[str]) -> TrainAll:
    from skyfall.presets import get_preset, get_stage2_preset

    name = _scan_preset(argv)
    return TrainAll(
        data=tyro.MISSING,
        out=tyro.MISSING,
        preset=name,
        stage1=get_preset(name),
        stage2=get_stage2_preset(name),
    )  # type: ignore[arg-type]


TrainStage2.preset_default = staticmethod(_stage2_default)  # type: ignore[attr-defined]
TrainAll.preset_default = staticmethod(_all_default)  # type: ignore[attr-defined]
