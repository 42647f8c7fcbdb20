"""Run directory layout and its small text artefacts.

::

    RUN/
      config.yml          resolved config of the run (preset + overrides), written at start
      metrics.jsonl       one JSON object per logged step
      summary.json        machine-readable results (written atomically, updated per stage)
      ckpts/ckpt_NNNNNN.pt  atomic step checkpoints (skyfall.storage.checkpoints)
      ply/                exported splats
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from skyfall.storage.atomic import atomic_write_text


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

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def save_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(_jsonable(config), sort_keys=False))

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
