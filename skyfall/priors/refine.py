"""Image refiners behind one small protocol (Stage 2 refines its renders with one of these).

``ImageRefiner.refine(images [B, 3, H, W] in [0, 1], seeds=[...]) -> [B, 3, H, W] in [0, 1]``.
One seed per image: Stage 2 draws several samples of the same view with different seeds
("multi-sample diffusion"), and a fixed seed must reproduce its sample.

Implementations: ``IdentityRefiner`` (tests), the synthetic tile's ``IdealRefiner`` (a measuring
instrument, in ``skyfall.train.stage2``), and the diffusion refiners (FlowEdit, SDEdit on FLUX).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageRefiner(Protocol):
    """Refine rendered images; ``cameras`` is only used by pose-aware refiners (the ideal one)."""

    def refine(self, images: Tensor, *, seeds: Sequence[int] | None = None, cameras=None) -> Tensor: ...


class IdentityRefiner:
    """Returns its input unchanged (tests and the 'no refine' ablation)."""

    def refine(self, images: Tensor, *, seeds: Sequence[int] | None = None, cameras=None) -> Tensor:
        return images.clone()
