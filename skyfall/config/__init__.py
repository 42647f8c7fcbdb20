"""Configuration: dataclasses whose attribute docstrings are the CLI help, and YAML presets.

* ``skyfall.config.training``: Stage 1 / Stage 2 hyper-parameters (``Stage1Config``, ``Stage2Config``
  and their parts).
* ``skyfall.config.priors``: the learned priors' options (FLUX refiners, depth models).
* ``skyfall.config.presets``: presets in ``configs/*.yaml`` and user files layered onto them.

No torch import anywhere in this package, so that ``skyfall --help`` stays instant.
"""

from skyfall.config.presets import TrainingConfig, from_dict, load_config, merge, preset_names, to_dict
from skyfall.config.priors import DepthModelConfig, FlowEditConfig, FluxConfig, SDEditConfig, Top2GroundConfig
from skyfall.config.training import (
    CURRICULA,
    AppearanceConfig,
    DensifyConfig,
    OptimConfig,
    PseudoDepthConfig,
    Stage1Config,
    Stage2Config,
    parse_curriculum,
)

__all__ = [
    "CURRICULA",
    "AppearanceConfig",
    "DensifyConfig",
    "DepthModelConfig",
    "FlowEditConfig",
    "FluxConfig",
    "Top2GroundConfig",
    "OptimConfig",
    "PseudoDepthConfig",
    "SDEditConfig",
    "Stage1Config",
    "Stage2Config",
    "TrainingConfig",
    "from_dict",
    "load_config",
    "merge",
    "parse_curriculum",
    "preset_names",
    "to_dict",
]
