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
    """Continue an interrupted demo run from its latest checkpoint (a finished one is not trained again).
    Running the demo again on an OUT that holds its run does this too."""
    overwrite: bool = False
    """Start the demo run in OUT/run again: its contents are deleted first (the tile is kept)."""
    preset: PresetName = "demo"
    """Named Stage 1 defaults (configs/NAME.yaml); the demo preset fits 2 CPU cores."""
    config: Path | None = None
    """A YAML file with a stage1: section layered on the preset."""
    stage1: Stage1Config = field(default_factory=Stage1Config)

    def check(self, tile_dir: Path, run: Path) -> None:
        """One ConfigError naming the option before anything is written or computed."""
        import json

        from skyfall.errors import ConfigError

        if self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues OUT/run and --overwrite deletes it: choose one")
        self.stage1.check()
        meta = tile_dir / "synth.json"
        if meta.is_file():
            made = json.loads(meta.read_text())
            if made.get("seed") != self.seed:
                raise ConfigError(
                    f"--seed {self.seed}: {tile_dir} holds the city of seed {made.get('seed')}; pass "
                    f"--seed {made.get('seed')} or another --out"
                )

    def main(self) -> None:
        import time

        from skyfall.eval.report import DSM_SUMMARY_PROTOCOL, embedding_label, heldout_protocol
        from skyfall.export.run import export_run
        from skyfall.storage.run_dir import RunDir
        from skyfall.synth import write_synthetic_tile
        from skyfall.train.stage1 import train_stage1

        tile_dir = self.out / "tile"
        run = self.out / "run"
        self.check(tile_dir, run)
        ran: list[str] = []  # what this invocation computed, with its wall time
        if (tile_dir / "transforms_train.json").exists():
            print(f"[demo] using the existing synthetic tile {tile_dir}")
        else:
            t = time.perf_counter()
            write_synthetic_tile(tile_dir, preset="default", seed=self.seed)
            ran.append(f"tile synthesis {_minutes(time.perf_counter() - t)}")
        # Running the demo again continues (or just reports) its run rather than refusing the folder;
        # --resume's checks still refuse other settings, naming the option.
        resume = self.resume or (not self.overwrite and RunDir(run).config_path.is_file())
        if resume and not self.resume:
            print(f"[demo] continuing the run in {run} (--overwrite to start it again)")
        step_before = _latest_step(run) if resume else 0
        t = time.perf_counter()
        summary = train_stage1(self.stage1, tile_dir, run, resume=resume, overwrite=self.overwrite)
        stage1_s = time.perf_counter() - t
        s = summary["stage1"]
        step_after = _latest_step(run)
        if step_after > step_before:
            ran.append(f"Stage 1 steps {step_before}-{step_after} with its evaluation {_minutes(stage1_s)}")
        else:
            ran.append(
                f"Stage 1 already finished at step {step_after}, nothing trained (it took "
                f"{_minutes(s['wall_s'])} when it ran)"
            )
        t = time.perf_counter()
        ply = export_run(run, "ply").path
        ran.append(f"PLY export {_minutes(time.perf_counter() - t)}")

        def num(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
            # a metric that could not be measured (nothing rendered in the DSM grid) is null in the summary
            v = s.get(key)
            return "n/a" if v is None else format(scale * v, fmt)

        # The protocol of the summary is the run's own (its config.yml), not necessarily these options.
        cfg1 = _run_stage1_config(run)
        appearance = cfg1.get("appearance", {})
        rule = appearance.get("test_embedding", self.stage1.appearance.test_embedding)
        psnr_protocol = heldout_protocol(
            cfg1.get("eval_appearance", self.stage1.eval_appearance),
            rule,
            appearance.get("enabled", self.stage1.appearance.enabled),
        )
        print(
            f"[demo] held-out satellite PSNR {num('psnr_test')} dB ({psnr_protocol}; "
            f"{num('psnr_test_novel_embedding')} dB with the {embedding_label(rule)}, whole image), "
            f"DSM MAE {num('dsm_mae_m')} m ({DSM_SUMMARY_PROTOCOL}; {num('dsm_completeness', 100, '.0f')} % of "
            f"the cells), {s['num_gaussians']} Gaussians"
        )
        print(f"[demo] this run: {', '.join(ran)}")
        print(f"[demo] summary: {run / 'summary.json'}")
        print(f"[demo] viewer-ready PLY (3D filter + appearance baked, -Y up): {ply}")
        print(
            f"[demo] next: skyfall view {ply}   or   skyfall eval {run} (every view with one embedding, DSM "
            f"registered)   or   skyfall train stage2 --run {run} --preset demo"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _latest_step(run: Path) -> int:
    """Step of the run's newest checkpoint (0 when it has none)."""
    from skyfall.storage.checkpoints import checkpoint_step, latest_checkpoint

    ckpt = latest_checkpoint(run / "ckpts")
    return 0 if ckpt is None else checkpoint_step(ckpt)


def _run_stage1_config(run: Path) -> dict:
    from skyfall.storage.run_dir import RunDir

    return RunDir(run).load_config().get("stage1") or {}
