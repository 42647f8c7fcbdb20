"""Run directory layout and its small text artefacts.

::

    RUN/
      config.yml          resolved config of the run (preset + overrides), written at start
      metrics.jsonl       one JSON object per logged step
      summary.json        machine-readable results (written atomically, updated per stage)
      ckpts/ckpt_NNNNNN.pt  atomic step checkpoints (skyfall.storage.checkpoints)
      ply/                exported splats
      .lock               held by the process training in the folder (skyfall.storage.run_lock)

A run folder belongs to one run: a fresh run starts only in an empty folder (or one it may clear,
``--overwrite``); ``--resume`` continues the run config.yml describes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from skyfall.errors import SkyfallError
from skyfall.storage.atomic import atomic_write_text, remove_stale_temp
from skyfall.storage.run_lock import LOCK_NAME


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


class RunDir:
    """Paths and writers for one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpts = self.root / "ckpts"
        self.ply = self.root / "ply"

    def create(self) -> RunDir:
        self.ckpts.mkdir(parents=True, exist_ok=True)
        return self

    def entries(self) -> list[str]:
        """Names in the run folder other than its lock file (sorted; [] when it does not exist)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name != LOCK_NAME)

    def is_run(self) -> bool:
        """Whether the folder holds a skyfall run (a config.yml or a ckpts/ folder)."""
        return self.config_path.is_file() or self.ckpts.is_dir()

    def check_fresh(self, overwrite: bool) -> None:
        """Refuse a fresh run in a folder that holds something, unless ``overwrite`` may clear it."""
        found = self.entries()
        if not found:
            return
        if not overwrite:
            what = "a run" if self.is_run() else "other files"
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise SkyfallError(
                f"{self.root}: not empty (holds {what}: {shown}); continue it with --resume, start again "
                "with --overwrite (deletes its contents), or choose another folder"
            )
        if not self.is_run():
            raise SkyfallError(
                f"{self.root}: --overwrite clears only skyfall run folders (with config.yml or ckpts/), and "
                f"this one holds {', '.join(found[:4])}; choose another folder"
            )

    def clear(self) -> None:
        """Delete everything in the run folder but its lock (``--overwrite``; caller holds the lock)."""
        import shutil

        for name in self.entries():
            p = self.root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def remove_stale_temp(self) -> int:
        """Delete temporary files that killed writes of this run left behind (caller holds the lock).

        Exports and evaluations write RUN/ply and RUN/eval without the lock, so those are left alone.
        """
        n = remove_stale_temp(self.root) + remove_stale_temp(self.ckpts)
        return n + remove_stale_temp(self.root / "idu", recursive=True)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def save_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(_jsonable(config), sort_keys=False))

    def save_run_config(self, stage: str, data: str | Path, config: dict) -> None:
        """config.yml of a fresh run: the stage, the tile folder and the resolved config.

        The tile is stored twice: absolute (the run works from any directory) and relative to the run
        folder (it still works after run and tile move together).
        """
        tile = Path(data).resolve()
        entry = {
            "stage": stage,
            "data": str(tile),
            "data_relative": os.path.relpath(tile, self.root.resolve()),
        }
        self.save_config({**entry, **config})

    def tile_dir(self, config: dict | None = None) -> Path | None:
        """The run's tile folder as config.yml names it, or None when it is not found.

        Tried in order: the absolute path, the path relative to the run folder, and (runs made before
        the relative path was stored) the path as written, relative to the current directory.
        """
        config = self.load_config() if config is None else config
        candidates = []
        if config.get("data"):
            candidates.append(Path(config["data"]))
        if config.get("data_relative"):
            candidates.append(self.root / config["data_relative"])
        for c in candidates:
            if c.is_dir():
                return c
        return None

    @staticmethod
    def as_saved(config: dict) -> dict:
        """``config`` as config.yml gives it back (for comparing a command line with a saved run)."""
        return yaml.safe_load(yaml.safe_dump(_jsonable(config), sort_keys=False)) or {}

    def load_config(self) -> dict:
        """The saved config.yml ({} when the run has none)."""
        if not self.config_path.is_file():
            return {}
        return yaml.safe_load(self.config_path.read_text()) or {}

    def log_metrics(self, record: dict) -> None:
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def read_summary(self) -> dict:
        if self.summary_path.exists():
            return json.loads(self.summary_path.read_text())
        return {}

    def update_summary(self, **entries: Any) -> dict:
        """Merge ``entries`` into summary.json (atomic) and return the new summary."""
        summary = self.read_summary()
        summary.update(_jsonable(entries))
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2))
        return summary
