"""Export a run directory: load the latest checkpoint, bake, sanitise, rotate, write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skyfall.errors import ConfigError, SkyfallError
from skyfall.export.bake import Splats, bake, sanitize, splats_from_params
from skyfall.export.formats import FORMATS, write_ply, write_splats
from skyfall.export.upaxis import to_up_axis
from skyfall.scene import Scene
from skyfall.storage.checkpoints import load_latest_checkpoint
from skyfall.storage.run_dir import RunDir


@dataclass
class LoadedRun:
    """A run's latest checkpoint rebuilt as a ``Scene``."""

    scene: Scene
    checkpoint: Path
    step: int
    config: dict[str, Any]

    @property
    def default_embedding(self) -> str:
        """The run's configured novel-view embedding rule ('mean' or an index as text)."""
        return str(self.config.get("appearance", {}).get("test_embedding", "mean"))


def load_run(run: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the Gaussian and appearance models of RUN's latest checkpoint."""
    rd = RunDir(run)
    if not rd.ckpts.is_dir():
        raise SkyfallError(f"{rd.ckpts}: no checkpoint (is {rd.root} a run directory?)")
    ckpt, st = load_latest_checkpoint(rd.ckpts, map_location=device)
    cfg = st.get("config", {}) or {}
    return LoadedRun(Scene.from_checkpoint(st, device), ckpt, int(st.get("step", 0)), cfg)


def baked_splats(
    loaded: LoadedRun, embedding: str | int | None = None, option: str = "--embedding"
) -> tuple[Splats, int]:
    """Viewer-ready splats of a loaded run (3D filter and appearance baked, non-finite rows dropped).

    ``embedding`` None bakes the run's ``appearance.test_embedding``; a given one must name a trained
    image or 'mean' (a ConfigError naming ``option`` otherwise).
    """
    scene = loaded.scene
    if embedding is None:
        emb = scene.novel_embedding(loaded.default_embedding)
    else:
        emb = scene.novel_embedding(embedding, option)
    p = {k: v.detach() for k, v in scene.model.params.items()}
    splats = bake(
        p,
        scene.model.filter_3d,
        appearance=scene.appearance,
        embedding=emb,
        sh_degree=scene.model.active_sh_degree,
    )
    return sanitize(splats)


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    path: Path
    format: str
    written: int
    dropped: int
    seconds: float
    embedding: str
    up: str


def default_output(run: str | Path, fmt: str, up: str) -> Path:
    """RUN/ply/export[_raw][_zup]<ext> (``_zup`` marks files left in the ENU frame)."""
    stem = "export_raw" if fmt == "raw-ply" else "export"
    return RunDir(run).ply / f"{stem}{'_zup' if up == 'z' else ''}{FORMATS[fmt]}"


def export_run(
    run: str | Path,
    fmt: str = "ply",
    *,
    up: str = "y",
    embedding: str | int | None = None,
    out: str | Path | None = None,
) -> ExportResult:
    """Export RUN's latest checkpoint as a splat file.

    Args:
        run: run directory.
        fmt: one of ``FORMATS``: 'ply' (viewer-ready, default), 'raw-ply' (raw parameters +
            ``filter_3D``, for round trips; appearance not applied), 'splat', 'ply-compressed', 'spz'.
        up: 'y' rotates ENU Z-up to the -Y-up frame viewers assume; 'z' keeps ENU.
        embedding: appearance bake: 'mean', an image index, or None for the run's ``test_embedding``.
        out: output file (default ``default_output``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    loaded = load_run(run)
    rule = str(loaded.default_embedding if embedding is None else embedding)
    if fmt == "raw-ply":
        if embedding is not None:
            # Validated all the same: a typo must not pass unnoticed because this format ignores it.
            loaded.scene.novel_embedding(embedding, "--embedding")
        model = loaded.scene.model
        splats, dropped = sanitize(splats_from_params(dict(model.params), model.filter_3d))
        rule = "none"
    else:
        splats, dropped = baked_splats(loaded, embedding)
    if len(splats) == 0:
        # A viewer shows an empty file as a black page; say why instead of writing one.
        raise SkyfallError(
            f"{loaded.checkpoint}: no Gaussian to export ({dropped} with non-finite parameters dropped); the "
            "model of this checkpoint is empty or diverged, nothing was written"
        )
    splats = to_up_axis(splats, up)
    path = Path(out) if out is not None else default_output(run, fmt, up)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("ply", "raw-ply"):
        comment = (
            f"skyfall step={loaded.step} embedding={rule} up={up} {'raw' if fmt == 'raw-ply' else 'baked'}"
        )
        write_ply(path, splats, comment=comment)
    else:
        write_splats(path, splats, fmt)
    return ExportResult(path, fmt, len(splats), dropped, time.perf_counter() - t0, rule, up)
