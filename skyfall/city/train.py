"""Training every tile of a city on Ray: one task per tile, one refiner actor per GPU.

The driver (``train_city``) reads the manifest, skips the tiles that are finished (each finished tile
leaves ``tasks/<cell>/done.json``), and submits one Ray task per remaining tile with its resource
request (CPUs, GPUs, memory). A task runs the tile's Stage 1 and then Stage 2 in the tile's run folder
exactly as `skyfall train all` does, resuming from the run's newest checkpoint when the folder holds
one — so a task that Ray retries after its worker died (``max_retries``), and a whole city run
started again after the driver or a node was lost, continue where each tile stopped instead of
starting over. A tile that fails with an error of its own (bad data, divergence) is not retried:
the error is reported with the tile's name and the other tiles go on.

Stage 2 refinements go through a pool of long-lived refiner actors (``RefinerService``), one per GPU
by default: each loads the diffusion model once and serves every tile's refinement requests, so N
GPUs refine in parallel while other tiles train, and the model is loaded N times rather than once per
tile. A tile's Stage 2 sees the pool as an ordinary refiner (``PooledRefiner``); its requests carry
the tile folder, so per-tile oracles (the synthetic ``ideal`` refiner) work through the pool too.

Tasks pass paths, not arrays: the city folder must be on storage every node sees. Only refinement
requests (one render, its guidance) travel through Ray's object store.

``ray`` is imported only here and only when a city is trained (``pip install "skyfall[city]"``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyfall.city.folders import CityFolder
from skyfall.city.manifest import CityCell
from skyfall.errors import ConfigError, MissingDependencyError, SkyfallError

DONE_NAME = "done.json"
"""Written into a tile's task folder (atomically) when its task finished every stage asked for."""
ATTEMPTS_NAME = "attempts.jsonl"
"""One line per start of a tile's task (a retried task adds a line): pid, host, step it resumed from."""
CONFIG_NAME = "city_train.yml"
SUMMARY_NAME = "city_train.json"
STAGES = ("stage1", "stage2")


def require_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(
            'city training runs on Ray, which is not installed: pip install "skyfall[city]"'
        ) from e
    return ray


# ----------------------------------------------------------------------------- tile state


def tile_done(folder: CityFolder, cell: CityCell | str, stages: Sequence[str]) -> dict | None:
    """The finished-tile record of ``cell`` if its task completed at least ``stages``, else None."""
    path = folder.task(cell) / DONE_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and set(stages) <= set(doc.get("stages", ())) else None


def tile_attempts(folder: CityFolder, cell: CityCell | str) -> list[dict]:
    """The starts of ``cell``'s task recorded in its run folder (oldest first)."""
    path = folder.task(cell) / ATTEMPTS_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a killed worker
    return out


def _last_step(run: Path) -> int | None:
    """The step of the newest line of RUN/metrics.jsonl (read from its tail), or None."""
    path = run / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


# ----------------------------------------------------------------------------- refiner pool


class RefinerService:
    """One Stage 2 refiner held for many tiles (a Ray actor: ``ray.remote(RefinerService)``).

    A refiner registered ``per_tile`` (an oracle of one tile) is built per tile folder and the few
    most recent kept; any other (the diffusion refiners) is built once and serves every tile.
    """

    KEEP_PER_TILE = 4

    def __init__(self, stage2: dict[str, Any]):
        from skyfall.config.presets import from_dict
        from skyfall.config.training import Stage2Config

        self.cfg2 = from_dict(Stage2Config, stage2, where="city stage2 config")
        self._shared: Any = None
        self._tiles: dict[str, Any] = {}
        self.calls = 0
        self.seconds = 0.0

    def _refiner(self, tile: str) -> Any:
        from skyfall.registry import REFINERS

        name = self.cfg2.refiner
        if not REFINERS.per_tile(name):
            if self._shared is None:
                self._shared = REFINERS.build(name, self.cfg2, tile)
            return self._shared
        if tile not in self._tiles:
            while len(self._tiles) >= self.KEEP_PER_TILE:
                self._tiles.pop(next(iter(self._tiles)))
            self._tiles[tile] = REFINERS.build(name, self.cfg2, tile)
        return self._tiles[tile]

    def wants(self, tile: str) -> list[str]:
        return sorted(getattr(self._refiner(tile), "wants", ()))

    def refine(self, tile: str, images: Any, seeds: list[int] | None, cameras: Any, guidance: Any) -> Any:
        t0 = time.perf_counter()
        out = self._refiner(tile).refine(images, seeds=seeds, cameras=cameras, guidance=guidance)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out.cpu()

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "calls": self.calls, "seconds": round(self.seconds, 3)}


class PooledRefiner:
    """A tile's view of the refiner pool: an ``ImageRefiner`` whose calls are served by the actors.

    Requests go round the pool starting at the tile's own index, so concurrent tiles spread over the
    actors; each call waits for its result (Stage 2 writes every refinement before training on it).
    """

    def __init__(self, actors: Sequence[Any], tile: str | Path, start: int = 0):
        ray = require_ray()
        if not actors:
            raise ValueError("PooledRefiner needs at least one actor")
        self.actors = list(actors)
        self.tile = str(tile)
        self._next = start
        self.wants = frozenset(ray.get(self.actors[start % len(self.actors)].wants.remote(self.tile)))

    def refine(self, images: Any, *, seeds: Any = None, cameras: Any = None, guidance: Any = None) -> Any:
        ray = require_ray()
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        seeds = None if seeds is None else [int(s) for s in seeds]
        out = ray.get(actor.refine.remote(self.tile, images.detach().cpu(), seeds, cameras, guidance))
        return out.to(images.device)


# ----------------------------------------------------------------------------- one tile


def train_tile(
    city: str,
    name: str,
    stage1: dict[str, Any],
    stage2: dict[str, Any],
    stages: Sequence[str],
    actors: Sequence[Any] | None,
    index: int,
    threads: int,
) -> dict[str, Any]:
    """Train (or resume) one cell's tile: the body of a Ray task (runs on a worker).

    Output goes to ``tasks/<cell>/log.txt``; every start is recorded in ``tasks/<cell>/attempts.jsonl``;
    ``tasks/<cell>/done.json`` is written last, when every stage is done.
    """
    import socket

    import torch

    from skyfall.config.presets import from_dict
    from skyfall.config.training import Stage1Config, Stage2Config
    from skyfall.storage.atomic import atomic_write_text
    from skyfall.storage.run_dir import RunDir
    from skyfall.train.stage1 import export_raw_ply, train_stage1
    from skyfall.train.stage2 import train_stage2

    torch.set_num_threads(max(1, int(threads)))
    folder = CityFolder(city)
    run, task = folder.run(name), folder.task(name)
    task.mkdir(parents=True, exist_ok=True)
    rd = RunDir(run)
    resume = rd.is_run()
    t0 = time.perf_counter()
    with open(task / ATTEMPTS_NAME, "a") as f:
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "time": time.time(),
                    "resume": resume,
                    "from_step": _last_step(run),
                }  # fmt: skip
            )
            + "\n"
        )
    cfg1 = from_dict(Stage1Config, stage1, where="city stage1 config")
    cfg2 = from_dict(Stage2Config, stage2, where="city stage2 config")
    log = open(task / "log.txt", "a", buffering=1)  # noqa: SIM115 (held for the whole task)
    out, err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = log
    try:
        summary = rd.read_summary() if resume else {}
        if "stage1" in stages and "stage2" not in summary:
            s1 = train_stage1(cfg1, folder.tile(name), run, resume=resume, progress=False)
            export_raw_ply(run)
            summary = s1
        if "stage2" in stages:
            refiner = None if not actors else PooledRefiner(actors, folder.tile(name), start=index)
            summary = train_stage2(cfg2, run, refiner=refiner, progress=False)
            export_raw_ply(run)
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()
    s1 = summary.get("stage1", {})
    eps = summary.get("stage2", {}).get("episodes", [])
    record = {
        "cell": name,
        "stages": list(stages),
        "wall_s": round(time.perf_counter() - t0, 2),
        "attempts": len(tile_attempts(folder, name)),
        "stage1": {k: s1.get(k) for k in ("steps", "num_gaussians", "psnr_test", "dsm_mae_m", "wall_s")},
        "stage2_episodes": len(eps),
        "stage2_last": eps[-1] if eps else None,
    }
    atomic_write_text(task / DONE_NAME, json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------- the driver


@dataclass
class CityTrainResult:
    """What a city run did: per-tile records (finished now or before), failures, timings."""

    done: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    ray_start_s: float = 0.0
    refiners: list[dict] = field(default_factory=list)


def _resources(ray: Any) -> dict[str, float]:
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _check_config(folder: CityFolder, saved: dict[str, Any], overwrite: bool) -> None:
    """A city continued with other training settings would mix runs: refuse as a tile's resume does."""
    from skyfall.config.presets import read_yaml
    from skyfall.config.resume import check_resume

    path = folder.root / CONFIG_NAME
    if overwrite or not path.is_file():
        return
    old = read_yaml(path)
    for section in STAGES:
        check_resume(section, old.get(section, {}), saved[section], path)


def train_city(
    city: str | Path,
    stage1: Any,
    stage2: Any,
    *,
    stages: Sequence[str] = STAGES,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_tile: int = 1,
    gpus_per_tile: float | None = None,
    memory_gb_per_tile: float | None = None,
    refiner_actors: int | None = None,
    gpus_per_refiner: float | None = None,
    max_retries: int = 2,
    cells: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    preset: str | None = None,
) -> CityTrainResult:
    """Train every tile of ``city`` on Ray (module docstring).

    Args:
        city: the city folder (``city.json``, ``tiles/``).
        stage1, stage2: resolved ``Stage1Config`` / ``Stage2Config`` for every tile.
        stages: which stages each tile runs (``("stage1",)`` stops after Stage 1).
        address: an existing Ray cluster ("auto", "ray://host:10001", ...); None starts a local Ray
            with ``workers`` x ``cpus_per_tile`` CPUs (and the machine's GPUs), stopped at the end.
        workers: local Ray only: tiles trained at once (default: the idle cores / cpus_per_tile).
        cpus_per_tile, gpus_per_tile, memory_gb_per_tile: each tile task's resource request
            (gpus_per_tile default: 0.5 when the cluster has GPUs, so a tile and a refiner share one).
        refiner_actors: Stage 2 refiner actors (default: one per GPU, else one).
        gpus_per_refiner: each refiner actor's GPU share (default 0.5 with GPUs; 0 on CPU).
        max_retries: times Ray restarts a tile whose worker died (it resumes from its checkpoint).
        cells: train only these cells (names); default all.
        overwrite: delete the runs of the selected cells first and accept changed settings.
    """
    from tqdm import tqdm

    from skyfall.config.presets import to_dict
    from skyfall.devices import choose_threads
    from skyfall.storage.atomic import atomic_write_text

    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"--stages must name stage1 and/or stage2, got {list(stages)}")
    stages = tuple(s for s in STAGES if s in stages)
    for name, v, lo in (("--cpus-per-tile", cpus_per_tile, 1), ("--max-retries", max_retries, 0)):
        if int(v) < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {v}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if "stage2" in stages:
        stage2.check()
    folder = CityFolder(city)
    manifest = folder.manifest()
    selected = list(manifest.cells)
    if cells:
        names = {c.name for c in selected}
        unknown = [c for c in cells if c not in names]
        if unknown:
            raise ConfigError(f"--cells: {', '.join(unknown)} not in {folder.manifest_path}")
        selected = [c for c in selected if c.name in set(cells)]
    for cell in selected:
        tile = folder.tile(cell)
        if not (tile / "transforms_train.json").is_file():
            raise ConfigError(
                f"{tile}: the tile of cell {cell.name} is missing (write the city with `skyfall synth CITY "
                "--city RxC` or `skyfall city prepare`)"
            )
    saved = {
        "description": "settings of every tile of this city (skyfall city train)",
        "city": {"preset": preset, "stages": list(stages)},
        "stage1": to_dict(stage1),
        "stage2": to_dict(stage2),
    }
    _check_config(folder, saved, overwrite)
    if overwrite:
        import shutil

        for cell in selected:
            for path in (folder.run(cell), folder.task(cell)):
                if path.exists():
                    shutil.rmtree(path)
    import yaml

    atomic_write_text(folder.root / CONFIG_NAME, yaml.safe_dump(saved, sort_keys=False))

    result = CityTrainResult()
    todo = []
    for cell in selected:
        rec = tile_done(folder, cell, stages)
        if rec is not None:
            result.done[cell.name] = rec
            result.skipped.append(cell.name)
        else:
            todo.append(cell)
    t0 = time.perf_counter()
    if not todo:
        print(f"[city] {len(selected)} tiles already trained ({', '.join(stages)}); nothing to do")
        result.wall_s = time.perf_counter() - t0
        return result

    ray = require_ray()
    started_here = False
    if not ray.is_initialized():
        if address is None:
            threads = choose_threads(None).threads if workers is None else None
            n = workers or max(1, min(len(todo), (threads or 1) // max(1, cpus_per_tile)))
            ray.init(
                num_cpus=n * cpus_per_tile,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                object_store_memory=256 * 1024**2,
            )
        else:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        started_here = True
    result.ray_start_s = time.perf_counter() - t0
    try:
        res = _resources(ray)
        n_gpus = res.get("GPU", 0.0)
        g_tile = (0.5 if n_gpus else 0.0) if gpus_per_tile is None else float(gpus_per_tile)
        g_ref = (0.5 if n_gpus else 0.0) if gpus_per_refiner is None else float(gpus_per_refiner)
        actors = []
        if "stage2" in stages:
            n_act = refiner_actors if refiner_actors is not None else max(1, int(n_gpus))
            service = ray.remote(RefinerService)
            actors = [
                service.options(num_cpus=0, num_gpus=g_ref, max_restarts=max_retries, max_task_retries=max_retries)
                .remote(to_dict(stage2))
                for _ in range(max(1, n_act))
            ]  # fmt: skip
        task = ray.remote(train_tile)
        opts: dict[str, Any] = {"num_cpus": cpus_per_tile, "num_gpus": g_tile, "max_retries": max_retries}
        if memory_gb_per_tile:
            opts["memory"] = int(memory_gb_per_tile * 1024**3)
        pending = {}
        for cell in todo:
            ref = task.options(**opts, name=f"skyfall-tile-{cell.name}").remote(
                str(folder.root), cell.name, to_dict(stage1), to_dict(stage2), stages, actors,
                manifest.cells.index(cell), cpus_per_tile,
            )  # fmt: skip
            pending[ref] = cell.name
        print(
            f"[city] {len(todo)} tiles to train ({', '.join(stages)}), {len(result.skipped)} already done; "
            f"Ray {res.get('CPU', 0):g} CPUs {n_gpus:g} GPUs, each tile {cpus_per_tile} CPU {g_tile:g} GPU, "
            f"{len(actors)} refiner actor(s)" + ("" if "stage2" in stages else " (Stage 1 only)"),
            flush=True,
        )
        _wait(ray, pending, folder, result, progress, tqdm)
        for a in actors:
            try:
                result.refiners.append(ray.get(a.stats.remote(), timeout=30))
            except Exception:  # noqa: BLE001 (a dead actor has no stats; the tiles' results stand)
                pass
    finally:
        if started_here:
            ray.shutdown()
    result.wall_s = time.perf_counter() - t0
    doc = {
        "tiles": {**result.done},
        "failed": result.failed,
        "skipped": result.skipped,
        "wall_s": round(result.wall_s, 2),
        "ray_start_s": round(result.ray_start_s, 2),
        "refiners": result.refiners,
    }
    atomic_write_text(folder.root / SUMMARY_NAME, json.dumps(doc, indent=1) + "\n")
    return result


def _wait(
    ray: Any, pending: dict, folder: CityFolder, result: CityTrainResult, progress: bool, tqdm: Any
) -> None:
    """Collect the tile tasks as they finish, with one bar over tiles and the running tiles' steps."""
    total = len(pending)
    bar = tqdm(total=total, desc="[city] tiles", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001 (reported per tile; the other tiles go on)
                    msg = _task_error(e)
                    result.failed[name] = msg
                    tqdm.write(f"[city] {name}: failed: {msg}")
                else:
                    result.done[name] = rec
                    s1 = rec.get("stage1", {})
                    tqdm.write(
                        f"[city] {name}: done in {rec['wall_s']:.1f} s ({rec['attempts']} attempt(s)); "
                        f"stage 1 psnr_test={s1.get('psnr_test')} dsm_mae_m={s1.get('dsm_mae_m')}"
                        + (f"; {rec['stage2_episodes']} Stage 2 episodes" if rec["stage2_episodes"] else "")
                    )
                bar.update(1)
            steps = []
            for name in pending.values():
                st = _last_step(folder.run(name))
                steps.append(f"{name} {'-' if st is None else st}")
            bar.set_postfix_str("steps: " + ", ".join(steps[:6]) + (" ..." if len(steps) > 6 else ""))
    finally:
        bar.close()


def _task_error(e: BaseException) -> str:
    """The tile's own error message when the task raised one (a SkyfallError says what to do)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, SkyfallError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
