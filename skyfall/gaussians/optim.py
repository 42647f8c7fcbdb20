"""Optimizer settings of the Gaussian parameters (no torch import: the CLI's config uses it).

The values are the reference's (Skyfall-GS ``arguments/__init__.py`` OptimizationParams); the
position LR is multiplied by the scene extent and decays log-linearly (``skyfall.gaussians.model``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """Learning rates and the position-LR schedule."""

    means_lr_init: float = 1.6e-4
    """Initial position LR, multiplied by the scene extent (original flag: --position_lr_init)."""
    means_lr_final: float = 1.6e-6
    """Final position LR, multiplied by the scene extent (--position_lr_final)."""
    means_lr_delay_mult: float = 0.01
    """Position-LR warm-up multiplier (--position_lr_delay_mult); inactive while delay steps is 0."""
    means_lr_delay_steps: int = 0
    """Position-LR warm-up length in steps (reference: 0, i.e. no warm-up)."""
    means_lr_max_steps: int = 30_000
    """Steps over which the position LR decays log-linearly (--position_lr_max_steps)."""
    sh0_lr: float = 2.5e-3
    """LR of the SH DC coefficients (--feature_lr)."""
    shN_lr: float = 2.5e-3 / 20
    """LR of the higher SH bands (feature_lr / 20)."""
    opacities_lr: float = 0.05
    """LR of the opacity logits (--opacity_lr)."""
    scales_lr: float = 1e-3
    """LR of the log scales (--scaling_lr; the README value 0.001, not the 0.005 default)."""
    quats_lr: float = 1e-3
    """LR of the rotations (--rotation_lr)."""
    adam_eps: float = 1e-15
    """Adam epsilon for every Gaussian parameter."""
