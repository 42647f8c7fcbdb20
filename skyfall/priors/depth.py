"""Monocular depth priors behind one small protocol.

``DepthEstimator``: images ``[B, 3, H, W]`` in [0, 1] plus the horizontal FoV -> ``DepthPrediction``
(depth ``[B, H, W]`` and a validity mask). The pseudo-camera loss only uses depth up to an affine map
(Pearson correlation), so relative depth is enough.

Backends are registered by name in ``skyfall.registry.DEPTH_ESTIMATORS``; build one with
``make_depth_estimator``:

* ``TinyDepth`` (here): a tiny randomly initialised CNN for tests (its output is meaningless but
  shaped, positive and deterministic).
* ``MoGeDepth`` / ``DepthAnythingDepth`` (real weights, ``skyfall.priors.depth_backends``): MoGe v1/v2
  (the reference's prior; the ``moge`` package comes from git) and Depth Anything V2 metric outdoor
  (transformers).
* ``GroundTruthDepth`` (``skyfall.synth.oracles``): the synthetic tile's exact depth for the camera
  pose, a measuring instrument that shows what the loss achieves with a perfect prior.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from skyfall.config.priors import DepthModelConfig
from skyfall.data.cameras import Cameras


@dataclass
class DepthPrediction:
    """Output of a depth estimator.

    Attributes:
        depth: [B, H, W] depth (camera z or any affine-related quantity); undefined where not valid.
        valid: [B, H, W] bool validity mask.
    """

    depth: Tensor
    valid: Tensor


@runtime_checkable
class DepthEstimator(Protocol):
    """Predict depth for images; ``cameras`` is only used by pose-aware (ground-truth) estimators."""

    needs_pose: bool

    def __call__(
        self, images: Tensor, fov_x_deg: float, cameras: Cameras | None = None
    ) -> DepthPrediction: ...


class TinyDepth(torch.nn.Module):
    """A tiny random CNN standing in for a real depth model in tests (offline, no weights)."""

    needs_pose = False

    def __init__(self, seed: int = 0, width: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 1, 3, padding=1),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    @torch.no_grad()
    def __call__(self, images: Tensor, fov_x_deg: float, cameras: Cameras | None = None) -> DepthPrediction:
        x = self.net(images.float())[:, 0]
        depth = torch.nn.functional.softplus(x) + 1.0
        return DepthPrediction(depth=depth, valid=torch.ones_like(depth, dtype=torch.bool))


def make_depth_estimator(
    name: str,
    *,
    tile_dir: str | Path | None = None,
    config: DepthModelConfig | None = None,
    **options: Any,
) -> DepthEstimator:
    """Build a registered depth estimator (``skyfall.registry.DEPTH_ESTIMATORS``) by name.

    Args:
        name: 'moge' (the reference's prior; needs the MoGe package from git), 'depth-anything'
            (Depth Anything V2 metric outdoor, transformers), 'ground-truth' (synthetic tiles), 'tiny'
            (tests), or any other registered name.
        tile_dir: the tile folder (pose-aware oracles such as 'ground-truth').
        config: the model options (:class:`skyfall.config.priors.DepthModelConfig`); defaults to its
            defaults.
        **options: any ``DepthModelConfig`` field (``model=``, ``moge_version=``,
            ``local_files_only=``, ``cache_dir=``, ``device=``, ``dtype=``), overriding ``config``.

    Raises:
        ConfigError: unknown name or option. MissingDependencyError: MoGe or transformers missing;
        WeightsNotFoundError (a MissingDependencyError): weights absent or gated.
    """
    from skyfall.errors import ConfigError
    from skyfall.registry import DEPTH_ESTIMATORS

    base = config if config is not None else DepthModelConfig()
    known = {f.name for f in dataclasses.fields(DepthModelConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"depth estimator {name!r}: unknown option(s) {', '.join(unknown)}")
    return DEPTH_ESTIMATORS.build(name, dataclasses.replace(base, **options), tile_dir)


def build_tiny(config: DepthModelConfig, tile_dir: str | Path | None) -> TinyDepth:
    """Registry factory of ``tiny``."""
    return TinyDepth()
