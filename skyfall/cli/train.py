"""``skyfall train stage1|stage2|all``: training commands.

A command with ``preset`` and ``config`` fields gets its ``stage1``/``stage2`` defaults from the
preset (``configs/NAME.yaml``) and the user's file, layered by ``skyfall.config.presets``
(``skyfall.cli.command_defaults``); command-line options override them, and ``--help`` after
``--preset``/``--config`` shows the merged values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from skyfall.config.presets import DEFAULT_PRESET, preset_names
from skyfall.config.training import Stage1Config, Stage2Config

PresetName = Literal[preset_names()]  # type: ignore[valid-type]


@dataclass
class TrainStage1:
    """Stage 1: fit 3D Gaussians to a tile's satellite views.

    Defaults come from `--preset` (paper-jax, paper-nyc: the reference; demo: CPU, minutes; tiny: tests)
    and `--config my.yaml`; any option below overrides them. The resolved config is saved as
    OUT/config.yml.
    """

    data: Path
    """Tile folder (transforms_train.json, images/, points3D.txt, ...)."""
    out: Path
    """Run directory (checkpoints, metrics.jsonl, summary.json)."""
    preset: PresetName = DEFAULT_PRESET
    """Named defaults (configs/NAME.yaml)."""
    config: Path | None = None
    """A YAML file with stage1:/stage2: sections layered on the preset (a run's config.yml works too)."""
    resume: bool = False
    """Continue the run in OUT from its newest checkpoint; without --preset/--config it takes the run's
    own settings (OUT/config.yml), and it refuses a different tile, seed or model setting."""
    overwrite: bool = False
    """Start a fresh run in OUT even though it holds a run: its contents are deleted first."""
    export: bool = True
    """Write OUT/ply/stage1_raw.ply (raw PLY with the 3D filter) at the end."""
    stage1: Stage1Config = field(default_factory=Stage1Config)

    def main(self) -> None:
        from skyfall.train.stage1 import export_raw_ply, train_stage1

        summary = train_stage1(self.stage1, self.data, self.out, resume=self.resume, overwrite=self.overwrite)
        if self.export:
            print(f"[stage1] raw PLY: {export_raw_ply(self.out)}")
        print_stage1(summary["stage1"], self.stage1)


@dataclass
class TrainStage2:
    """Stage 2: Iterative Dataset Update on a finished Stage 1 run (render orbits, refine, retrain, per episode).

    Resumable at any point: finished renders/refinements are skipped and training continues from the
    latest step checkpoint. `--stage2.refiner ideal` (synthetic tiles only) is a measuring instrument:
    it returns the ground-truth render of each pose, i.e. a perfect prior.
    """

    run: Path
    """Stage 1 run directory (Stage 2 continues in it)."""
    preset: PresetName = DEFAULT_PRESET
    """Named defaults (configs/NAME.yaml; demo uses the ideal refiner)."""
    config: Path | None = None
    """A YAML file with a stage2: section layered on the preset."""
    allow_unfinished_stage1: bool = False
    """Start Stage 2 although Stage 1 stopped before its last step."""
    export: bool = True
    """Write RUN/ply/stage2_raw.ply (raw PLY with the 3D filter) at the end."""
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def main(self) -> None:
        from skyfall.train.stage1 import export_raw_ply
        from skyfall.train.stage2 import train_stage2

        print_stage2(
            train_stage2(self.stage2, self.run, allow_unfinished_stage1=self.allow_unfinished_stage1)
        )
        if self.export:
            print(f"[stage2] raw PLY: {export_raw_ply(self.run)}")


@dataclass
class TrainAll:
    """Stage 1 then Stage 2 in one run directory (the preset and config file set both stages' defaults)."""

    data: Path
    """Tile folder."""
    out: Path
    """Run directory."""
    preset: PresetName = DEFAULT_PRESET
    """Named defaults for both stages (configs/NAME.yaml)."""
    config: Path | None = None
    """A YAML file with stage1:/stage2: sections layered on the preset."""
    resume: bool = False
    """Continue the run in OUT from its newest checkpoint (Stage 1 or Stage 2); see `train stage1 --resume`."""
    overwrite: bool = False
    """Start a fresh run in OUT even though it holds a run: its contents are deleted first."""
    export: bool = True
    """Write OUT/ply/stage1_raw.ply and OUT/ply/stage2_raw.ply (raw PLYs with the 3D filter)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def main(self) -> None:
        from skyfall.storage.run_dir import RunDir
        from skyfall.storage.run_lock import run_lock
        from skyfall.train.stage1 import export_raw_ply, train_stage1
        from skyfall.train.stage2 import train_stage2

        self.stage2.check()  # both stages' options before Stage 1 starts
        with run_lock(self.out):
            # Stage 2 has begun once its baseline is in summary.json: Stage 1 is then not revisited.
            in_stage2 = self.resume and "stage2" in RunDir(self.out).read_summary()
            if not in_stage2:
                s1 = train_stage1(
                    self.stage1, self.data, self.out, resume=self.resume, overwrite=self.overwrite
                )
                print_stage1(s1["stage1"], self.stage1)
                if self.export:
                    print(f"[stage1] raw PLY: {export_raw_ply(self.out)}")
            print_stage2(train_stage2(self.stage2, self.out))
            if self.export:
                print(f"[stage2] raw PLY: {export_raw_ply(self.out)}")


def print_stage1(s: dict, cfg: Stage1Config | None = None) -> None:
    """One line with the Stage 1 summary's main figures and one saying how they were measured."""
    keys = ("steps", "num_gaussians", "psnr_test", "dsm_mae_m", "dsm_completeness", "wall_s")
    parts = []
    for k in keys:
        if k in s and s[k] is not None:
            v = s[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    print("[stage1] " + "  ".join(parts))
    if cfg is not None:
        from skyfall.eval.report import DSM_SUMMARY_PROTOCOL, heldout_protocol

        a = cfg.appearance
        print(
            f"[stage1] psnr_test: held-out satellite views, {heldout_protocol(cfg.eval_appearance, a.test_embedding, a.enabled)}; "
            f"dsm_mae_m: {DSM_SUMMARY_PROTOCOL} (`skyfall eval` registers the DSM and scores whole images)"
        )


def print_stage2(summary: dict) -> None:
    """One line for the Stage 1 baseline and one per finished episode."""
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
