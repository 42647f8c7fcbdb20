"""``skyfall city train CITY``: every tile of a city, as Ray tasks (``skyfall.city.train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from skyfall.config.presets import DEFAULT_PRESET, preset_names
from skyfall.config.training import Stage1Config, Stage2Config

PresetName = Literal[preset_names()]  # type: ignore[valid-type]


@dataclass
class CityTrain:
    """Train every tile of a city (Stage 1, then Stage 2) as Ray tasks, on a local Ray started for you
    or on a cluster (--address).

    Each tile trains in CITY/runs/<cell>/ exactly as `skyfall train all` would; finished tiles are
    skipped, and a tile whose worker died is retried and resumes from its newest checkpoint — run the
    command again after a crash to continue the city. Stage 2 refinements go to a pool of refiner
    actors (one per GPU) that load the diffusion model once each and serve every tile. Settings are
    saved in CITY/city_train.yml (reused when the command is run again without --preset/--config),
    each tile's log in CITY/tasks/<cell>/log.txt, the result in CITY/city_train.json. Needs
    `pip install "skyfall[city]"` (ray).
    """

    city: Annotated[Path, tyro.conf.Positional]
    """City folder (city.json, tiles/): from `skyfall synth CITY --city RxC` or `skyfall city prepare`."""
    preset: PresetName = DEFAULT_PRESET
    """Named defaults for every tile (configs/NAME.yaml; demo: CPU minutes per tile; tiny: tests)."""
    config: Path | None = None
    """A YAML file with stage1:/stage2: sections layered on the preset."""
    stages: tuple[Literal["stage1", "stage2"], ...] = ("stage1", "stage2")
    """Stages each tile runs (`--stages stage1` stops after Stage 1; running again with both adds Stage 2)."""
    address: str | None = None
    """Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray for this command."""
    workers: int | None = None
    """Local Ray: tiles trained at once (default: the idle cores / --cpus-per-tile)."""
    cpus_per_tile: int = 1
    """CPUs each tile task asks for (its torch threads)."""
    gpus_per_tile: float | None = None
    """GPUs each tile task asks for (default 0.5 when the cluster has GPUs, so a tile shares a GPU with a refiner actor; 0 without)."""
    memory_gb_per_tile: float | None = None
    """Memory each tile task asks Ray for, GB (default: no request)."""
    refiner_actors: int | None = None
    """Stage 2 refiner actors (default: one per GPU of the cluster, one without GPUs)."""
    gpus_per_refiner: float | None = None
    """GPUs each refiner actor holds (default 0.5 with GPUs, 0 without)."""
    max_retries: int = 2
    """Times a tile task is restarted after its worker died (it resumes from its checkpoint)."""
    cells: tuple[str, ...] = ()
    """Train only these cells (names in city.json, e.g. r000c001); default: all."""
    overwrite: bool = False
    """Delete the selected tiles' runs first and accept settings that differ from CITY/city_train.yml."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def main(self) -> None:
        from skyfall.city.train import train_city
        from skyfall.errors import SkyfallError

        r = train_city(
            self.city, self.stage1, self.stage2, stages=self.stages, address=self.address,
            workers=self.workers, cpus_per_tile=self.cpus_per_tile, gpus_per_tile=self.gpus_per_tile,
            memory_gb_per_tile=self.memory_gb_per_tile, refiner_actors=self.refiner_actors,
            gpus_per_refiner=self.gpus_per_refiner, max_retries=self.max_retries, cells=self.cells,
            overwrite=self.overwrite, preset=self.preset,
        )  # fmt: skip
        retried = {
            n: d["attempts"] for n, d in r.done.items() if d.get("attempts", 1) > 1 and n not in r.skipped
        }
        print(
            f"[city] {len(r.done) - len(r.skipped)} tiles trained, {len(r.skipped)} already done, "
            f"{len(r.failed)} failed; {r.wall_s:.1f} s (Ray start {r.ray_start_s:.1f} s)"
            + (
                f"; retried: {', '.join(f'{n} ({a} attempts)' for n, a in retried.items())}"
                if retried
                else ""
            )
        )
        if r.failed:
            raise SkyfallError(
                f"{len(r.failed)} tile(s) failed ({', '.join(r.failed)}); see CITY/tasks/<cell>/log.txt, fix "
                "the cause and run the command again: finished tiles are kept and the others resume"
            )
        print(f"[city] next: skyfall city export {self.city}")
