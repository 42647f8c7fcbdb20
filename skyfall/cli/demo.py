"""``skyfall demo``: the main job on the embedded default data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skyfall.cli.train import PresetName
from skyfall.config.training import Stage1Config


@dataclass
class Demo:
    """Run the main job on the embedded default: synthesize the default city tile (if missing), reconstruct it with Stage 1, export a viewer-ready PLY.

    The synthetic tile has exact ground truth, so the demo reports how good the reconstruction is
    (held-out satellite PSNR and DSM error). Everything lands in OUT: OUT/tile, OUT/run (checkpoints,
    metrics.jsonl, summary.json) and OUT/run/ply.
    """

    out: Path = Path("outputs/demo")
    """Output folder; the synthetic tile goes to OUT/tile and the run to OUT/run."""
    seed: int = 0
    """Random seed of the synthetic city."""
    resume: bool = False
    """Continue an interrupted demo run from its latest checkpoint."""
    preset: PresetName = "demo"
    """Named Stage 1 defaults (configs/NAME.yaml); the demo preset fits 2 CPU cores."""
    config: Path | None = None
    """A YAML file with a stage1: section layered on the preset."""
    stage1: Stage1Config = field(default_factory=Stage1Config)

    def main(self) -> None:
        from skyfall.export.run import export_run
        from skyfall.synth import write_synthetic_tile
        from skyfall.train.stage1 import train_stage1

        tile_dir = self.out / "tile"
        if (tile_dir / "transforms_train.json").exists():
            print(f"[demo] using the existing synthetic tile {tile_dir}")
        else:
            write_synthetic_tile(tile_dir, preset="default", seed=self.seed)
        run = self.out / "run"
        summary = train_stage1(self.stage1, tile_dir, run, resume=self.resume)
        ply = export_run(run, "ply").path
        s = summary["stage1"]

        def num(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
            # a metric that could not be measured (nothing rendered in the DSM grid) is null in the summary
            v = s.get(key)
            return "n/a" if v is None else format(scale * v, fmt)

        print(
            f"[demo] held-out satellite PSNR {num('psnr_test')} dB "
            f"({num('psnr_test_novel_embedding')} dB with the mean embedding), "
            f"DSM MAE {num('dsm_mae_m')} m ({num('dsm_completeness', 100, '.0f')} % of the "
            f"cells), {s['num_gaussians']} Gaussians, Stage 1 {s['wall_s'] / 60:.1f} min"
        )
        print(f"[demo] summary: {run / 'summary.json'}")
        print(f"[demo] viewer-ready PLY (3D filter + appearance baked, -Y up): {ply}")
        print(f"[demo] next: skyfall view {ply}   or   skyfall train stage2 --run {run} --preset demo")
