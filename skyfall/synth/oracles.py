"""Oracles of the synthetic city: exact depth and ground-truth renders for any camera pose.

They are measuring instruments, not methods: plugged in where a learned prior goes (the depth
estimator of the pseudo-camera loss, the Stage 2 refiner), they show what the pipeline achieves
with a perfect prior. Both need a synthetic tile (its ``synth.json`` rebuilds the city) and are
registered in ``skyfall.registry`` as ``ground-truth`` (depth) and ``ideal`` (refiner).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.errors import ConfigError
from skyfall.priors.depth import DepthPrediction
from skyfall.priors.guidance import RefineGuidance
from skyfall.synth.city import SyntheticCity

_ALTERNATIVES = {
    "the 'ground-truth' depth estimator": "--stage1.pseudo.estimator moge|depth-anything (a learned prior; "
    "`skyfall doctor` says which weights are cached) or --stage1.pseudo.no-enabled",
    "the 'ideal' refiner": "--stage2.refiner flowedit|sdedit (FLUX.1-dev weights) or difix (nvidia/difix, one step; "
    "see `skyfall doctor`) or identity",
}


def _require_synthetic(tile_dir: str | Path | None, what: str) -> Path:
    if tile_dir is None or not (Path(tile_dir) / "synth.json").exists():
        raise ConfigError(
            f"{tile_dir}: {what} needs a synthetic tile (with synth.json); for other tiles use "
            f"{_ALTERNATIVES[what]}"
        )
    return Path(tile_dir)


class GroundTruthDepth:
    """Exact depth of a synthetic tile for the requested camera poses (images are ignored)."""

    needs_pose = True

    def __init__(self, tile_dir: str | Path):
        self.city = SyntheticCity.from_tile(
            _require_synthetic(tile_dir, "the 'ground-truth' depth estimator")
        )

    def __call__(self, images: Tensor, fov_x_deg: float, cameras: Cameras | None = None) -> DepthPrediction:
        if cameras is None:
            raise ValueError("GroundTruthDepth needs the camera poses of the images")
        out = self.city.render(cameras)
        depth = torch.as_tensor(out["depth"], dtype=torch.float32, device=images.device)
        valid = torch.isfinite(depth)
        return DepthPrediction(depth=torch.where(valid, depth, torch.zeros_like(depth)), valid=valid)


class IdealRefiner:
    """Returns the synthetic tile's ground-truth render of each pose: a perfect refiner.

    ``noise`` adds a per-sample colour perturbation (seeded) to mimic diffusion variance between
    samples.
    """

    def __init__(self, tile_dir: str | Path, noise: float = 0.0, supersample: int = 2):
        self.city = SyntheticCity.from_tile(_require_synthetic(tile_dir, "the 'ideal' refiner"))
        self.noise = float(noise)
        self.supersample = supersample

    def refine(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        cameras: Cameras | None = None,
        guidance: RefineGuidance | None = None,
    ) -> Tensor:
        """The ground-truth render of each camera (``images`` gives only the device; ``guidance`` is unused)."""
        if cameras is None:
            raise ValueError("IdealRefiner needs the camera of every image")
        out = self.city.render(cameras, date=None, supersample=self.supersample)
        rgb = torch.as_tensor(out["rgb"], dtype=torch.float32).permute(0, 3, 1, 2)
        if self.noise > 0:
            for i in range(len(rgb)):
                g = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
                gain = 1 + self.noise * torch.randn(3, 1, 1, generator=g)
                noisy = rgb[i] * gain + self.noise * 0.5 * torch.randn(rgb[i].shape, generator=g)
                rgb[i] = noisy.clamp(0, 1)
        return rgb.to(images.device)


def build_ground_truth_depth(config: Any, tile_dir: str | Path | None) -> GroundTruthDepth:
    """Registry factory of the ``ground-truth`` depth estimator."""
    return GroundTruthDepth(_require_synthetic(tile_dir, "the 'ground-truth' depth estimator"))


def build_ideal_refiner(config: Any, tile_dir: str | Path | None) -> IdealRefiner:
    """Registry factory of the ``ideal`` refiner (``config.ideal_noise``: colour noise per sample)."""
    return IdealRefiner(_require_synthetic(tile_dir, "the 'ideal' refiner"), noise=config.ideal_noise)
