"""What a conditioned refiner may use besides the render (its own module: the refiners and the
protocol in ``skyfall.priors.refine`` both import it)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class RefineGuidance:
    """What a conditioned refiner may use besides the render, per image of the batch."""

    depth: Tensor | None = None
    """[B, H, W] rendered expected depth (camera-space z, metres; 0 where nothing was rendered)."""
    height: Tensor | None = None
    """[B, H, W] height of the rendered surface above the ground (metres; 0 where nothing)."""
    satellite: Tensor | None = None
    """[B, 3, h, w] in [0, 1]: the satellite crop that sees the view's look-at target."""
