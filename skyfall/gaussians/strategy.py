"""Densification as a strategy object, in the shape of gsplat's ``gsplat/strategy/default.py``.

``GOFStrategy`` holds the schedule and thresholds; its mutable state (the opacity-reset cool-down)
lives in the dict that ``initialize_state`` returns, which the trainer checkpoints. The operations
themselves are ``skyfall.gaussians.densify``'s (our GOF rule: grad OR abs-grad quantile, the
reference's clone/split/prune order), applied to a ``GaussianModel`` (parameters + one Adam each,
gsplat's layout).

Stage 1 uses one strategy for its whole run; each Stage 2 episode uses one whose windows are the
episode's (``dataclasses.replace`` of the Stage 1 one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from skyfall.gaussians.densify import (
    accumulate_stats,
    check_gaussian_count,
    densify_and_prune,
    prune_transparent,
    reset_opacity,
)
from skyfall.gaussians.model import GaussianModel


@dataclass
class GOFStrategy:
    """When to densify, reset opacities and recompute the 3D filter, and with which thresholds.

    Windows are in absolute steps. While ``step < until`` the view statistics are accumulated, the
    model is densified every ``every`` steps after ``start``, and opacities are reset every
    ``reset_every`` steps (before ``reset_until``). After ``until``, the 3D filter is recomputed every
    ``refilter_every`` steps while ``step < refilter_until``; during densification it is recomputed
    after every densification.
    """

    start: int = 1000
    """Densify only after this step."""
    until: int = 21_000
    """Accumulate statistics, densify and reset only before this step (0: never)."""
    every: int = 100
    """Densify every this many steps."""
    grad_threshold: float = 1e-4
    """Mean NDC-space gradient threshold tau."""
    percent_dense: float = 0.01
    """Clone when max scale <= this x scene extent, else split."""
    min_opacity: float = 0.005
    """Prune below this opacity."""
    size_threshold: float = 20.0
    """Prune above this max screen radius in pixels (0 disables)."""
    max_world_scale_frac: float = 0.1
    """Prune when the max scale exceeds this x scene extent."""
    scene_extent: float = 128.0
    """Metres; scales the clone/split boundary and the world-size prune."""
    reset_every: int = 3000
    """Reset opacities every this many steps (absolute step multiples)."""
    reset_until: int | None = None
    """No reset at or after this step (None: ``until``)."""
    reset_value: float = 0.01
    """Effective opacity ceiling after a reset."""
    cooldown_steps: int = 500
    """Steps after a reset during which the trainer uses the cool-down opacity weight."""
    refilter_every: int = 100
    """After densification, recompute the 3D filter every this many steps."""
    refilter_until: int = 2**62
    """... before this step."""
    min_gaussians: int = 100
    """CollapseError when densification leaves fewer Gaussians."""
    max_gaussians: int = 0
    """Densify only up to this many Gaussians (those with the largest gradients first); 0 = no cap."""
    prune_every: int = 0
    """Outside the densification window (and after ``start``), remove Gaussians whose effective
    opacity is below ``prune_opacity`` every this many steps (0: never, the reference)."""
    prune_opacity: float = 0.0
    """Effective-opacity threshold of that pruning."""

    def initialize_state(self) -> dict[str, Any]:
        """Mutable state carried between steps (and through checkpoints)."""
        return {"cooldown_until": -1}

    def step_pre_backward(self, model: GaussianModel, state: dict[str, Any], step: int, info: Any) -> None:
        """Keep the projected centres' gradient, which the densification statistics read.

        Args:
            info: the step's ``RenderOutput`` (``means2d`` is a non-leaf tensor of the graph).
        """
        if step < self.until:
            if not info.means2d.requires_grad:
                raise RuntimeError("densification needs a render with gradients (means2d has none)")
            info.means2d.retain_grad()

    def densify_due(self, step: int) -> bool:
        """Densification (then a 3D-filter refresh) after ``step``'s backward."""
        return self.start < step < self.until and step % self.every == 0

    def reset_due(self, step: int) -> bool:
        """An opacity reset after ``step``'s backward."""
        reset_until = self.until if self.reset_until is None else self.reset_until
        return step < self.until and step % self.reset_every == 0 and step < reset_until

    def prune_due(self, step: int) -> bool:
        """Pruning of transparent Gaussians (outside the densification window) after ``step``."""
        return (
            step >= self.until
            and bool(self.prune_every)
            and step > self.start
            and step % self.prune_every == 0
        )

    def refilter_due(self, step: int) -> bool:
        """A scheduled 3D-filter refresh (outside the densification window) after ``step``."""
        return step >= self.until and step % self.refilter_every == 0 and step < self.refilter_until

    def plain(self, step: int) -> bool:
        """True when ``step_post_backward`` at ``step`` at most accumulates statistics: nothing that
        changes the set of Gaussians, their opacities or their filter (and reads the device)."""
        return not (
            self.densify_due(step) or self.reset_due(step) or self.prune_due(step) or self.refilter_due(step)
        )

    def in_cooldown(self, state: dict[str, Any], step: int) -> bool:
        """True during the cool-down after an opacity reset."""
        return step < state["cooldown_until"]

    @torch.no_grad()
    def step_post_backward(
        self,
        model: GaussianModel,
        state: dict[str, Any],
        step: int,
        info: Any,
        refilter: Callable[[], None],
    ) -> None:
        """Statistics, densification, opacity reset and filter refresh after step ``step``'s backward.

        Args:
            model: the Gaussians and their optimizers, modified in place.
            state: ``initialize_state()``'s dict, updated in place.
            step: the global step just computed.
            info: the step's ``RenderOutput`` (one camera; ``means2d`` holds ``.grad`` / ``.absgrad``).
            refilter: recomputes the model's 3D filter from the trainer's cameras.
        """
        if step < self.until:
            _, height, width, _ = info.colors.shape
            accumulate_stats(
                model,
                info.means2d.grad[0],
                info.means2d.absgrad[0],
                info.radii[0],
                info.visible[0],
                width,
                height,
            )
            if self.densify_due(step):
                densify_and_prune(
                    model,
                    grad_threshold=self.grad_threshold,
                    scene_extent=self.scene_extent,
                    percent_dense=self.percent_dense,
                    min_opacity=self.min_opacity,
                    max_screen_size=self.size_threshold or None,
                    max_world_scale_frac=self.max_world_scale_frac,
                    max_new=max(0, self.max_gaussians - model.num_gaussians) if self.max_gaussians else None,
                )
                refilter()
                check_gaussian_count(
                    model.num_gaussians, self.min_gaussians, context=f"after densification at step {step}"
                )
            if self.reset_due(step):
                # the 3D filter just recomputed above is the one the filter-aware reset must see
                reset_opacity(model, self.reset_value)
                state["cooldown_until"] = step + self.cooldown_steps
        else:
            if self.prune_due(step):
                if prune_transparent(model, self.prune_opacity, floor=self.min_gaussians):
                    refilter()
            if self.refilter_due(step):
                refilter()
