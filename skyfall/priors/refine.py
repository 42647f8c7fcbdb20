"""Image refiners behind one small protocol (Stage 2 refines its renders with one of these).

``ImageRefiner.refine(images [B, 3, H, W] in [0, 1], seeds=[...]) -> [B, 3, H, W] in [0, 1]``.
One seed per image: Stage 2 draws several samples of the same view with different seeds
("multi-sample diffusion"), and a fixed seed must reproduce its sample.

A conditioned refiner also reads a :class:`RefineGuidance` (rendered depth or height, the satellite
crop of the view's target). It declares what it reads in a ``wants`` attribute (a frozenset, subset of
``{"depth", "height", "satellite"}``; absent = nothing), so the caller computes only that; the others
accept ``guidance=`` and ignore it.

Implementations, registered by name in ``skyfall.registry.REFINERS``: ``IdentityRefiner`` (tests),
the diffusion refiners ``FlowEditRefiner`` / ``SDEditRefiner`` on FLUX.1-dev
(``skyfall.priors.flux_refiners``; built with options by ``make_refiner``), the conditioned
``Top2GroundRefiner`` on FLUX.1-Depth-dev + Redux (``skyfall.priors.top2ground``), the single-step
``DifixRefiner`` (Difix3D on SD-Turbo, the fast mode; ``skyfall.priors.difix``) and the synthetic
tile's ``IdealRefiner`` (a measuring instrument, ``skyfall.synth.oracles``). Stage 2 builds the one its
config names with ``REFINERS.build(name, stage2_config, tile_dir)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from skyfall.priors.guidance import RefineGuidance


@runtime_checkable
class ImageRefiner(Protocol):
    """Refine rendered images; ``cameras`` is only used by pose-aware refiners (the ideal one),
    ``guidance`` only by conditioned ones (those with a ``wants`` attribute)."""

    def refine(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        cameras=None,  # noqa: ANN001
        guidance: RefineGuidance | None = None,
    ) -> Tensor: ...


class IdentityRefiner:
    """Returns its input unchanged (tests and the 'no refine' ablation)."""

    def refine(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        cameras=None,  # noqa: ANN001
        guidance: RefineGuidance | None = None,
    ) -> Tensor:
        return images.clone()


def make_refiner(name: str, *, tile_dir: str | Path | None = None, **options: Any) -> ImageRefiner:
    """Build a registered refiner (``skyfall.registry.REFINERS``) by name, with options.

    Args:
        name: 'flowedit' (the paper's), 'sdedit' (its ablation), 'top2ground' (geometry + satellite
            conditioned), 'difix' (single-step, the fast mode), 'identity', 'ideal' (synthetic tiles;
            needs ``tile_dir``) or any other registered name.
        tile_dir: the tile folder (pose-aware oracles).
        **options: for refiners with an options section in ``Stage2Config`` (``flowedit``, ``sdedit``,
            ``top2ground``, ``difix``): ``config=`` a :class:`skyfall.config.priors.FlowEditConfig` /
            ``SDEditConfig`` / ``Top2GroundConfig`` / ``DifixConfig``, ``model=``
            an already loaded :class:`skyfall.priors.flux.FluxModel` (kept across Stage 2 episodes;
            :class:`skyfall.priors.difix.DifixModel` for ``difix``),
            and/or any config field as a keyword (``n_max_end=-1``, ``memory_mode="cpu-offload"``,
            ``local_files_only=True``, ...), which overrides the config's value.

    Raises:
        ConfigError: unknown name or option. WeightsNotFoundError / MissingDependencyError: the FLUX
        (or Difix) weights or the diffusion packages are missing.
    """
    from skyfall.config.training import Stage2Config
    from skyfall.errors import ConfigError
    from skyfall.registry import REFINERS

    factory = REFINERS.factory(name)
    cfg2 = Stage2Config()
    section = getattr(cfg2, name, None)
    if not dataclasses.is_dataclass(section):
        if options:
            raise ConfigError(f"the {name} refiner takes no options (got {', '.join(sorted(options))})")
        return factory(cfg2, tile_dir)
    from skyfall.config.presets import merge

    model = options.pop("model", None)
    base = options.pop("config", None) or section
    if not isinstance(base, type(section)):
        raise ConfigError(
            f"refiner {name!r}: config must be a {type(section).__name__}, got {type(base).__name__}"
        )
    return factory(
        dataclasses.replace(cfg2, **{name: merge(base, options, where=f"refiner {name!r}")}),
        tile_dir,
        model=model,
    )


# Registry factories: (Stage 2 config, tile folder) -> refiner.


def build_flowedit(config: Any, tile_dir: Any = None, *, model: Any = None) -> ImageRefiner:
    """Registry factory of ``flowedit`` (options from ``config.flowedit``; ``model``: a loaded FLUX)."""
    from skyfall.priors.flux_refiners import FlowEditRefiner

    return FlowEditRefiner(config.flowedit, model=model)


def build_sdedit(config: Any, tile_dir: Any = None, *, model: Any = None) -> ImageRefiner:
    """Registry factory of ``sdedit`` (options from ``config.sdedit``; ``model``: a loaded FLUX)."""
    from skyfall.priors.flux_refiners import SDEditRefiner

    return SDEditRefiner(config.sdedit, model=model)


def build_top2ground(config: Any, tile_dir: Any = None, *, model: Any = None) -> ImageRefiner:
    """Registry factory of ``top2ground`` (options from ``config.top2ground``; ``model``: a loaded FLUX
    control model holding its prompts)."""
    from skyfall.priors.top2ground import Top2GroundRefiner

    return Top2GroundRefiner(config.top2ground, model=model)


def build_difix(config: Any, tile_dir: Any = None, *, model: Any = None) -> ImageRefiner:
    """Registry factory of ``difix`` (options from ``config.difix``; ``model``: a loaded
    :class:`skyfall.priors.difix.DifixModel`)."""
    from skyfall.priors.difix import DifixRefiner

    return DifixRefiner(config.difix, model=model)


def build_identity(config: Any = None, tile_dir: Any = None) -> ImageRefiner:
    """Registry factory of ``identity``."""
    return IdentityRefiner()
