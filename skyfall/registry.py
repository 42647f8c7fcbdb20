"""Named backends: Stage 2 image refiners and monocular depth estimators.

Each entry maps a name to ``"module:factory"``; the module is imported only when the backend is
built, so listing the names (``--help``, config validation) imports nothing heavy. A factory takes
the config that holds the backend's options and the tile folder (pose-aware oracles read the
synthetic city from it):

* refiner factories: ``factory(stage2_config, tile_dir) -> ImageRefiner``
  (``skyfall.priors.refine``);
* depth factories: ``factory(depth_model_config, tile_dir) -> DepthEstimator``
  (``skyfall.priors.depth``).

Adding a backend is one module with its class and factory plus one ``register`` line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Registry:
    """An ordered name -> lazily imported factory table."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[str, str]] = {}
        self._per_tile: set[str] = set()

    def register(self, name: str, target: str, description: str, *, per_tile: bool = False) -> None:
        """Register ``target`` (``"package.module:factory"``) under ``name``. ``per_tile``: the
        backend is built for one tile (an oracle of that tile), so a service shared by many tiles
        builds one per tile; the others are built once and serve every tile."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:factory', got {target!r}")
        self._entries[name] = (target, description)
        if per_tile:
            self._per_tile.add(name)

    def per_tile(self, name: str) -> bool:
        """Whether backend ``name`` is built per tile (see ``register``)."""
        return name in self._per_tile

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def describe(self) -> str:
        """One line per backend, for help texts."""
        return "; ".join(f"'{n}': {d}" for n, (_, d) in self._entries.items())

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name`` (imports its module); ConfigError for unknown names."""
        if name not in self._entries:
            from skyfall.errors import ConfigError

            raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")
        module, attr = self._entries[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, name: str, config: Any, tile_dir: str | Path | None = None) -> Any:
        """Build backend ``name`` from ``config`` (and the tile folder, for oracles)."""
        return self.factory(name)(config, tile_dir)


REFINERS = Registry("refiner")
REFINERS.register(
    "flowedit", "skyfall.priors.refine:build_flowedit", "FlowEdit on FLUX.1-dev (the paper's refiner)"
)
REFINERS.register(
    "sdedit", "skyfall.priors.refine:build_sdedit", "SDEdit on FLUX.1-dev (the paper's ablation)"
)
REFINERS.register(
    "top2ground",
    "skyfall.priors.refine:build_top2ground",
    "FlowEdit on FLUX.1-Depth-dev conditioned on rendered geometry and FLUX.1 Redux tokens of the satellite crop",
)
REFINERS.register(
    "difix",
    "skyfall.priors.refine:build_difix",
    "Difix3D's single-step fixer on SD-Turbo (the fast mode: one UNet step per image)",
)
REFINERS.register(
    "identity", "skyfall.priors.refine:build_identity", "returns the render unchanged (no refine)"
)
REFINERS.register(
    "ideal",
    "skyfall.synth.oracles:build_ideal_refiner",
    "synthetic tiles only: the ground-truth render of each pose (a measuring instrument, not a method)",
    per_tile=True,
)

DEPTH_ESTIMATORS = Registry("depth estimator")
DEPTH_ESTIMATORS.register(
    "moge", "skyfall.priors.depth_backends:build_moge", "MoGe (the reference's prior; from git)"
)
DEPTH_ESTIMATORS.register(
    "depth-anything", "skyfall.priors.depth_backends:build_depth_anything", "Depth Anything V2 metric outdoor"
)
DEPTH_ESTIMATORS.register(
    "ground-truth",
    "skyfall.synth.oracles:build_ground_truth_depth",
    "synthetic tiles only: the exact depth of each pose (a measuring instrument)",
    per_tile=True,
)
DEPTH_ESTIMATORS.register("tiny", "skyfall.priors.depth:build_tiny", "random tiny network (tests only)")
