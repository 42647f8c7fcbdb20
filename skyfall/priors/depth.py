"""Monocular depth priors behind one small protocol.

``DepthEstimator``: images ``[B, 3, H, W]`` in [0, 1] plus the horizontal FoV -> ``DepthPrediction``
(depth ``[B, H, W]`` and a validity mask). The pseudo-camera loss only uses depth up to an affine map
(Pearson correlation), so relative depth is enough.

Backends here:

* ``GroundTruthDepth``: the synthetic tile's exact depth for the camera pose (a measuring instrument
  for synthetic tiles: it shows what the loss achieves with a perfect prior).
* ``TinyDepth``: a tiny randomly initialised CNN for tests (its output is meaningless but shaped,
  positive and deterministic).

* ``MoGeDepth`` / ``DepthAnythingDepth`` (real weights, ``skyfall.priors.depth_backends``): MoGe v1/v2
  (the reference's prior; the ``moge`` package comes from git) and Depth Anything V2 metric outdoor
  (transformers). Build any of them with ``make_depth_estimator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.priors.config import DepthModelConfig


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


class GroundTruthDepth:
    """Exact depth of a synthetic tile for the requested camera poses (images are ignored)."""

    needs_pose = True

    def __init__(self, tile_dir: str | Path):
        from skyfall.synth import SyntheticCity

        self.city = SyntheticCity.from_tile(tile_dir)

    def __call__(self, images: Tensor, fov_x_deg: float, cameras: Cameras | None = None) -> DepthPrediction:
        if cameras is None:
            raise ValueError("GroundTruthDepth needs the camera poses of the images")
        out = self.city.render(cameras)
        depth = torch.as_tensor(out["depth"], dtype=torch.float32, device=images.device)
        valid = torch.isfinite(depth)
        return DepthPrediction(depth=torch.where(valid, depth, torch.zeros_like(depth)), valid=valid)


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
    model: str | None = None,
    moge_version: int = 1,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    config: DepthModelConfig | None = None,
) -> DepthEstimator:
    """Build a depth estimator by name.

    Args:
        name: 'ground-truth' (synthetic tiles), 'tiny' (tests), 'moge' (the reference's prior; needs the
            MoGe package from git) or 'depth-anything' (Depth Anything V2 metric outdoor, transformers).
        tile_dir: the tile folder ('ground-truth' only).
        model: Hub id or local path of the weights; None = the backend's default.
        moge_version: 1 (reference, ``Ruicheng/moge-vitl``) or 2 (``Ruicheng/moge-2-vitl``).
        local_files_only: never contact the Hub (local cache / path only).
        cache_dir: Hugging Face cache folder; None = the HF_HOME / HF_HUB_CACHE default.
        device: None = cuda when available, else cpu.
        dtype: 'float32' | 'float16' | 'bfloat16'.
        config: a :class:`skyfall.priors.config.DepthModelConfig` supplying the model options instead.

    Raises:
        ConfigError: unknown name / bad option. MissingDependencyError: MoGe or transformers missing;
        WeightsNotFoundError (a MissingDependencyError): weights absent or gated.
    """
    from skyfall.errors import ConfigError

    if config is not None:
        model, moge_version, local_files_only = config.model, config.moge_version, config.local_files_only
        cache_dir, device, dtype = config.cache_dir, config.device, config.dtype
    if name == "ground-truth":
        if tile_dir is None or not (Path(tile_dir) / "synth.json").exists():
            raise ConfigError(
                "the 'ground-truth' depth estimator needs a synthetic tile (with synth.json); "
                "use 'moge' or 'depth-anything' for real tiles"
            )
        return GroundTruthDepth(tile_dir)
    if name == "tiny":
        return TinyDepth()
    common = dict(local_files_only=local_files_only, cache_dir=cache_dir, device=device, dtype=dtype)
    if name == "moge":
        from skyfall.priors.depth_backends import MoGeDepth

        return MoGeDepth(model, version=moge_version, **common)
    if name == "depth-anything":
        from skyfall.priors.depth_backends import DepthAnythingDepth

        return DepthAnythingDepth(model, **common)
    raise ConfigError(
        f"unknown depth estimator {name!r}; choose from ground-truth, tiny, moge, depth-anything"
    )
