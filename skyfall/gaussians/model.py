"""Per-Gaussian parameters, their Adam optimizers and learning-rate schedules (the reference's values).

The parameters live in one ``torch.nn.ParameterDict`` with gsplat names (``means``, ``scales`` (log),
``quats`` (wxyz), ``opacities`` (logit), ``sh0`` [N,1,3], ``shN`` [N,K-1,3], optional ``app_features``
[N,24]). Every entry is per-Gaussian and has its own Adam optimizer with exactly one param_group, the
layout gsplat's strategies expect, so densification can resize parameters and Adam moments together
(see ``skyfall.gaussians.densify``). The model knows nothing about rendering.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import Tensor, nn

from skyfall.gaussians.filters import apply_3d_filter
from skyfall.gaussians.optim import OptimConfig

REQUIRED_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")
OPTIONAL_KEYS = ("app_features",)
STAT_BUFFERS = ("grad_accum", "absgrad_accum", "denom", "max_radii2d")


def expon_lr(
    step: int | float,
    lr_init: float,
    lr_final: float,
    max_steps: int,
    delay_steps: int = 0,
    delay_mult: float = 1.0,
) -> float:
    """Log-linear LR decay with an optional sine warm-up (the reference's ``get_expon_lr_func``).

    ``lr(t) = delay(t) * exp((1 - u) log lr_init + u log lr_final)`` with ``u = clip(t / max_steps, 0, 1)``
    and ``delay(t) = delay_mult + (1 - delay_mult) sin(pi/2 clip(t / delay_steps, 0, 1))`` when
    ``delay_steps > 0`` (else 1). Negative steps, or both LRs 0, give 0.
    """
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    if delay_steps > 0:
        warm = min(max(step / delay_steps, 0.0), 1.0)
        delay = delay_mult + (1.0 - delay_mult) * math.sin(0.5 * math.pi * warm)
    else:
        delay = 1.0
    u = min(max(step / max_steps, 0.0), 1.0)
    return delay * math.exp(math.log(lr_init) * (1.0 - u) + math.log(lr_final) * u)


def _clone_tree(obj: Any) -> Any:
    """Deep copy of nested dicts/lists whose tensors are detached clones (state dicts must not alias)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return copy.deepcopy(obj)


class GaussianModel:
    """Gaussian parameters + one Adam per parameter + densification statistics and the 3D filter.

    Attributes:
        params: ``nn.ParameterDict`` of per-Gaussian parameters (gsplat names).
        optimizers: one ``torch.optim.Adam`` per key of ``params``, one param_group each.
        config: the ``skyfall.gaussians.optim.OptimConfig`` (LRs, position schedule, Adam eps).
        scene_extent, app_features_lr, sh_degree_interval: see ``__init__``.
        max_sh_degree: SH degree of ``shN``; ``active_sh_degree`` grows to it during training.
        filter_3d: [N] Mip-Splatting 3D filter standard deviations (metres); zeros = no filter.
        grad_accum, absgrad_accum, denom, max_radii2d: [N] densification statistics (float32).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        optim: OptimConfig | None = None,
        *,
        scene_extent: float = 128.0,
        app_features_lr: float = 5e-3,
        sh_degree_interval: int = 1000,
        filter_3d: Tensor | None = None,
        device: torch.device | str | None = None,
    ):
        """Wrap initial parameters (e.g. from ``init_from_points``) and build the optimizers.

        Args:
            params: per-Gaussian tensors with the keys ``REQUIRED_KEYS`` and optionally ``app_features``.
            optim: LRs and the position schedule (``skyfall.gaussians.optim.OptimConfig``); defaults to its defaults.
            scene_extent: metres; the position LRs are multiplied by it ("spatial_lr_scale", hard-coded
                128 in the reference whatever the tile size; ``Stage1Config.scene_extent``).
            app_features_lr: LR of ``app_features`` (--embedding_lr; ``AppearanceConfig.gaussian_lr``).
            sh_degree_interval: steps per increase of the active SH degree (``Stage1Config.sh_increase_every``).
            filter_3d: [N] initial 3D filter; zeros when None.
            device: where to keep everything; defaults to the device of ``params["means"]``.
        """
        self.config = optim if optim is not None else OptimConfig()
        self.scene_extent = float(scene_extent)
        self.app_features_lr = float(app_features_lr)
        self.sh_degree_interval = int(sh_degree_interval)
        device = torch.device(device) if device is not None else params["means"].device
        self._set_params({k: v.detach().to(device) for k, v in params.items()})
        n = self.num_gaussians
        self.filter_3d = (
            torch.zeros(n, device=device)
            if filter_3d is None
            else filter_3d.detach().to(device).float().clone()
        )
        self.reset_stats()
        self.active_sh_degree = 0
        self._pos_first_step = 0
        self._pos_max_steps = self.config.means_lr_max_steps
        self.optimizers = self._make_optimizers()

    # ------------------------------------------------------------------ construction helpers

    def _set_params(self, params: Mapping[str, Tensor]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in params]
        unknown = [k for k in params if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
        if missing or unknown:
            raise ValueError(f"Gaussian params: missing keys {missing}, unknown keys {unknown}")
        n = params["means"].shape[0]
        bad = {k: tuple(v.shape) for k, v in params.items() if v.shape[0] != n}
        if bad:
            raise ValueError(f"every Gaussian parameter must have {n} rows; got {bad}")
        k_sh = params["shN"].shape[1] + 1
        degree = math.isqrt(k_sh) - 1
        if (degree + 1) ** 2 != k_sh:
            raise ValueError(f"shN has {k_sh - 1} coefficients, which is not (d+1)^2 - 1 for any degree d")
        self.max_sh_degree = degree
        # Copies: a model never shares storage with the tensors (or state dict) it was built from.
        self.params = nn.ParameterDict(
            {k: nn.Parameter(v.detach().float().clone()) for k, v in params.items()}
        )

    def lr_of(self, name: str) -> float:
        """Configured constant LR of parameter ``name``; for ``means`` the schedule's value at step 0."""
        if name == "means":
            return self.position_lr(self._pos_first_step)
        if name == "app_features":
            return self.app_features_lr
        return float(getattr(self.config, f"{name}_lr"))

    def _make_optimizers(self) -> dict[str, torch.optim.Adam]:
        return {
            name: torch.optim.Adam(
                [{"params": [p], "lr": self.lr_of(name), "name": name}], eps=self.config.adam_eps
            )
            for name, p in self.params.items()
        }

    # ------------------------------------------------------------------ basic properties

    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    def get_scales_opacities_eff(self) -> tuple[Tensor, Tensor]:
        """Activated scales [N, 3] and opacities [N] with the 3D filter applied (differentiable)."""
        return apply_3d_filter(self.params["scales"], self.params["opacities"], self.filter_3d)

    def reset_stats(self) -> None:
        """Zero the densification statistics at the current size."""
        n, dev = self.num_gaussians, self.device
        for name in STAT_BUFFERS:
            setattr(self, name, torch.zeros(n, device=dev))

    # ------------------------------------------------------------------ schedules

    def position_lr(self, step: int) -> float:
        """Position LR at global step ``step`` of the current schedule (see ``restart_position_lr``)."""
        c, s = self.config, self.scene_extent
        return expon_lr(
            step - self._pos_first_step,
            c.means_lr_init * s,
            c.means_lr_final * s,
            self._pos_max_steps,
            c.means_lr_delay_steps,
            c.means_lr_delay_mult,
        )

    def update_position_lr(self, step: int) -> float:
        """Set the ``means`` optimizer's LR for ``step`` (call once per iteration); returns it."""
        lr = self.position_lr(step)
        for group in self.optimizers["means"].param_groups:
            group["lr"] = lr
        return lr

    def restart_position_lr(self, first_step: int, max_steps: int) -> None:
        """Restart the position schedule at ``first_step``, decaying over ``max_steps`` (Stage 2 episodes).

        The reference rebuilds the scheduler per IDU episode with ``idu_position_lr_max_steps`` and
        evaluates it at ``it - first_iter`` (``training_idu``).
        """
        self._pos_first_step = int(first_step)
        self._pos_max_steps = int(max_steps)

    def update_sh_degree(self, step: int) -> int:
        """Active SH degree after ``step``: +1 every ``sh_degree_interval`` steps, capped, never lowered."""
        scheduled = step // self.sh_degree_interval if step > 0 else 0
        self.active_sh_degree = min(self.max_sh_degree, max(self.active_sh_degree, scheduled))
        return self.active_sh_degree

    # ------------------------------------------------------------------ optimisation

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """One Adam step of every parameter."""
        for opt in self.optimizers.values():
            opt.step()

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: params, Adam states, 3D filter, statistics, schedules.

        Only tensors, plain containers, numbers and strings (loadable with ``weights_only=True``).
        Tensors are detached copies, so training on does not alter a state dict held in memory.
        """
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizers": {k: _clone_tree(opt.state_dict()) for k, opt in self.optimizers.items()},
            "filter_3d": self.filter_3d.detach().clone(),
            "stats": {name: getattr(self, name).detach().clone() for name in STAT_BUFFERS},
            "active_sh_degree": int(self.active_sh_degree),
            "position_lr_schedule": {"first_step": self._pos_first_step, "max_steps": self._pos_max_steps},
            "config": asdict(self.config),
            "scene_extent": self.scene_extent,
            "app_features_lr": self.app_features_lr,
            "sh_degree_interval": self.sh_degree_interval,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` (any number of Gaussians) onto this model's device."""
        dev = self.device
        known = {f.name for f in fields(OptimConfig)}
        self.config = OptimConfig(**{k: v for k, v in state["config"].items() if k in known})
        self.scene_extent = float(state["scene_extent"])
        self.app_features_lr = float(state["app_features_lr"])
        self.sh_degree_interval = int(state["sh_degree_interval"])
        self._set_params({k: v.to(dev) for k, v in state["params"].items()})
        self.filter_3d = state["filter_3d"].to(dev).float().clone()
        for name in STAT_BUFFERS:
            setattr(self, name, state["stats"][name].to(dev).float().clone())
        self.active_sh_degree = int(state["active_sh_degree"])
        self._pos_first_step = int(state["position_lr_schedule"]["first_step"])
        self._pos_max_steps = int(state["position_lr_schedule"]["max_steps"])
        self.optimizers = self._make_optimizers()
        for name, opt in self.optimizers.items():
            # Adam.load_state_dict also restores the stored LRs (the reference keeps them on restore).
            opt.load_state_dict(_clone_tree(state["optimizers"][name]))

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: torch.device | str | None = None
    ) -> GaussianModel:
        """Build a model directly from a ``state_dict()``."""
        model = cls(state["params"], device=device)
        model.load_state_dict(state)
        return model
