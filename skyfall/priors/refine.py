"""Image refiners behind one small protocol (Stage 2 refines its renders with one of these).

``ImageRefiner.refine(images [B, 3, H, W] in [0, 1], seeds=[...]) -> [B, 3, H, W] in [0, 1]``.
One seed per image: Stage 2 draws several samples of the same view with different seeds
("multi-sample diffusion"), and a fixed seed must reproduce its sample.

Implementations, registered by name in ``skyfall.registry.REFINERS``: ``IdentityRefiner`` (tests),
the diffusion refiners ``FlowEditRefiner`` / ``SDEditRefiner`` on FLUX.1-dev
(``skyfall.priors.flux_refiners``; built with options by ``make_refiner``) and the synthetic tile's
``IdealRefiner`` (a measuring instrument, ``skyfall.synth.oracles``). Stage 2 builds the one its
config names with ``REFINERS.build(name, stage2_config, tile_dir)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageRefiner(Protocol):
    """Refine rendered images; ``cameras`` is only used by pose-aware refiners (the ideal one)."""

    def refine(self, images: Tensor, *, seeds: Sequence[int] | None = None, cameras=None) -> Tensor: ...


class IdentityRefiner:
    """Returns its input unchanged (tests and the 'no refine' ablation)."""

    def refine(self, images: Tensor, *, seeds: Sequence[int] | None = None, cameras=None) -> Tensor:
        return images.clone()


def make_refiner(name: Literal["flowedit", "sdedit", "identity"], **options: Any) -> ImageRefiner:
    """Build a refiner by name.

    Args:
        name: 'flowedit' (the paper's), 'sdedit' (its ablation) or 'identity'.
        **options: ``config=`` a :class:`skyfall.config.priors.FlowEditConfig` / ``SDEditConfig``,
            ``model=`` an already loaded :class:`skyfall.priors.flux.FluxModel` (kept across Stage 2
            episodes), and/or any config field as a keyword (``n_max_end=-1``, ``memory_mode="cpu-offload"``,
            ``local_files_only=True``, ...), which overrides the config's value.

    Raises:
        ConfigError: unknown name or option. WeightsNotFoundError / MissingDependencyError: the FLUX
        weights or the diffusion packages are missing.
    """
    from skyfall.errors import ConfigError

    if name == "identity":
        if options:
            raise ConfigError(f"the identity refiner takes no options (got {', '.join(sorted(options))})")
        return IdentityRefiner()
    if name in ("flowedit", "sdedit"):
        from skyfall.config.priors import FlowEditConfig, SDEditConfig
        from skyfall.priors.flux_refiners import FlowEditRefiner, SDEditRefiner, config_with

        cls, cfg_cls = (
            (FlowEditRefiner, FlowEditConfig) if name == "flowedit" else (SDEditRefiner, SDEditConfig)
        )
        base = options.pop("config", None) or cfg_cls()
        if not isinstance(base, cfg_cls):
            raise ConfigError(
                f"refiner {name!r}: config must be a {cfg_cls.__name__}, got {type(base).__name__}"
            )
        model = options.pop("model", None)
        return cls(config_with(base, options), model=model)
    raise ConfigError(f"unknown refiner {name!r}; choose from flowedit, sdedit, identity")


# Registry factories: (Stage 2 config, tile folder) -> refiner.


def build_flowedit(config: Any, tile_dir: Any = None) -> ImageRefiner:
    """Registry factory of ``flowedit`` (options from ``config.flowedit``)."""
    return make_refiner("flowedit", config=config.flowedit)


def build_sdedit(config: Any, tile_dir: Any = None) -> ImageRefiner:
    """Registry factory of ``sdedit`` (options from ``config.sdedit``)."""
    return make_refiner("sdedit", config=config.sdedit)


def build_identity(config: Any = None, tile_dir: Any = None) -> ImageRefiner:
    """Registry factory of ``identity``."""
    return IdentityRefiner()
