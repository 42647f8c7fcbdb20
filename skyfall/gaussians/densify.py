"""GOF-variant adaptive density control and the filter-aware opacity reset (Skyfall-GS ``densify_and_prune``).

Our own implementation of the reference's ``densify_and_prune`` / ``reset_opacity`` on a
``GaussianModel``; gsplat's ``DefaultStrategy`` implements a different rule (grad *or* absgrad,
other constants) and is not used.

Statistics are accumulated per rendered view with ``accumulate_stats``; every ``densify_every`` steps
the trainer calls ``densify_and_prune`` (which resets the statistics), then recomputes the 3D filter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from skyfall.errors import SkyfallError
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.gaussians.model import STAT_BUFFERS, GaussianModel

# torch.quantile refuses inputs with more than 2**24 elements.
_TORCH_QUANTILE_MAX = 1 << 24


class CollapseError(SkyfallError):
    """The number of Gaussians fell below a floor (e.g. everything pruned after an opacity reset)."""


@dataclass(frozen=True)
class DensifyReport:
    """What one ``densify_and_prune`` call did."""

    n_before: int
    n_cloned: int
    n_split: int
    """Number of parents split (each replaced by ``split_n`` children)."""
    n_pruned: int
    n_after: int


def check_gaussian_count(n: int, floor: int, *, context: str = "") -> None:
    """Raise ``CollapseError`` when the model has fewer than ``floor`` Gaussians."""
    if n < floor:
        where = f" {context}" if context else ""
        raise CollapseError(
            f"only {n} Gaussians left{where}, below the floor of {floor}: the reconstruction collapsed "
            "(typical causes: too few views, a too strong opacity loss after an opacity reset)"
        )


# ---------------------------------------------------------------------------------- parameter ops


def _swap_param(
    model: GaussianModel,
    name: str,
    new_value: Tensor,
    state_fn: Callable[[Tensor], Tensor],
) -> None:
    """Replace parameter ``name`` by ``new_value`` and map its Adam row-state tensors with ``state_fn``.

    Adam keys its state by the Parameter object, so the state moves to the new Parameter. Per-row
    state tensors (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are those shaped like the
    parameter; the scalar ``step`` is kept.
    """
    opt = model.optimizers[name]
    if len(opt.param_groups) != 1 or len(opt.param_groups[0]["params"]) != 1:
        raise RuntimeError(f"optimizer of {name!r} must have exactly one param_group with one parameter")
    old = opt.param_groups[0]["params"][0]
    new_param = nn.Parameter(new_value.contiguous())
    state = opt.state.pop(old, None)
    if state is not None:
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old.shape:
                state[key] = state_fn(value)
        opt.state[new_param] = state
    opt.param_groups[0]["params"][0] = new_param
    model.params[name] = new_param


@torch.no_grad()
def _cat_params(model: GaussianModel, new: Mapping[str, Tensor], new_filter_3d: Tensor) -> None:
    """Append Gaussians: parameters, Adam moments (zeros for the new rows), 3D filter and statistics.

    Args:
        model: the model, modified in place.
        new: one tensor per parameter key, each with M rows.
        new_filter_3d: [M] 3D filter of the new Gaussians.
    """
    if set(new) != set(model.params.keys()):
        raise ValueError(
            f"new Gaussians need exactly the keys {sorted(model.params.keys())}, got {sorted(new)}"
        )
    m = new_filter_3d.shape[0]
    for name in list(model.params.keys()):
        old = model.params[name].detach()
        ext = new[name].to(old)
        _swap_param(
            model, name, torch.cat([old, ext]), lambda s, m=m: torch.cat([s, s.new_zeros((m,) + s.shape[1:])])
        )
    model.filter_3d = torch.cat([model.filter_3d, new_filter_3d.to(model.filter_3d)])
    for buf in STAT_BUFFERS:
        t = getattr(model, buf)
        setattr(model, buf, torch.cat([t, t.new_zeros(m)]))


@torch.no_grad()
def _keep_params(model: GaussianModel, keep: Tensor) -> None:
    """Keep only the Gaussians where ``keep`` [N] (bool) is True, in parameters, Adam state and buffers."""
    for name in list(model.params.keys()):
        _swap_param(model, name, model.params[name].detach()[keep], lambda s: s[keep])
    model.filter_3d = model.filter_3d[keep]
    for buf in STAT_BUFFERS:
        setattr(model, buf, getattr(model, buf)[keep])


def _quat_to_rotmat(quats: Tensor) -> Tensor:
    """[M, 4] wxyz quaternions (any norm) -> [M, 3, 3] rotation matrices."""
    w, x, y, z = nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))  # fmt: skip


# ---------------------------------------------------------------------------------- statistics


@torch.no_grad()
def accumulate_stats(
    model: GaussianModel,
    means2d_grad: Tensor,  # [N, 2]
    means2d_absgrad: Tensor,  # [N, 2]
    radii: Tensor,  # [N] or [N, 2]
    visible: Tensor,  # [N]
    width: int,
    height: int,
    *,
    n_cameras: int = 1,
) -> None:
    """Add one rendered view's screen-space gradients to the densification statistics.

    The reference accumulates ‖∂L/∂μ_ndc‖ where μ_ndc is the projected centre in NDC (the
    rasteriser's ``dL_dmean2D`` carries the factor ∂pix/∂ndc = W/2, H/2), and, for GOF's abs-grad,
    the norm of the 2-vector (Σ_pixels |∂L_p/∂x_ndc|, Σ_pixels |∂L_p/∂y_ndc|). gsplat's ``means2d``
    gradients (and its ``absgrad``, the same per-pixel absolute sums) are in pixel units, so both are
    brought to NDC units by *multiplying* x by W/2 and y by H/2 (chain rule; gsplat's DefaultStrategy
    does the same), after which the reference thresholds (τ = 1e-4 / 2e-4) apply unchanged.

    Args:
        model: the model whose statistics are updated in place.
        means2d_grad: [N, 2] ∂L/∂means2d in pixel units (gsplat ``info["means2d"].grad``).
        means2d_absgrad: [N, 2] per-pixel absolute gradient sums in pixel units (gsplat ``absgrad``).
        radii: [N] screen radii in pixels, or gsplat >= 1.5's [N, 2] per-axis radii (their max is
            used, the reference's radius being the larger-eigenvalue extent).
        visible: [N] bool, Gaussians rendered in this view (the reference's ``radii > 0``).
        width, height: image size in pixels.
        n_cameras: views batched into one loss mean; their gradients are 1/C of a single view's.
    """
    # Every row, with the invisible ones adding 0 (index-free): boolean indexing would make the host
    # wait for the device to size its result, and a tensor made from Python numbers is a host copy.
    scale = means2d_grad.new_full((2,), 0.5 * width * n_cameras)
    scale[1] = 0.5 * height * n_cameras
    vis = visible.bool()
    g = (means2d_grad * scale).norm(dim=-1)
    ga = (means2d_absgrad * scale).norm(dim=-1)
    model.grad_accum += torch.where(vis, g, 0.0).to(model.grad_accum)
    model.absgrad_accum += torch.where(vis, ga, 0.0).to(model.absgrad_accum)
    model.denom += vis.to(model.denom.dtype)
    r = radii.amax(dim=-1) if radii.dim() == 2 else radii
    r = r.to(model.max_radii2d)
    model.max_radii2d = torch.where(vis, torch.maximum(model.max_radii2d, r), model.max_radii2d)


def _quantile(values: Tensor, q: float) -> float:
    """Linear-interpolation quantile (torch's default); numpy past torch.quantile's size limit."""
    if values.numel() <= _TORCH_QUANTILE_MAX:
        return float(torch.quantile(values, q))
    return float(np.quantile(values.detach().cpu().numpy(), q))


def densify_selection(model: GaussianModel, grad_threshold: float) -> tuple[Tensor, Tensor, float]:
    """The GOF selection: (grad >= τ) OR (absgrad >= Q), Q the (1 - ratio)-quantile of absgrad.

    ``ratio`` is the fraction of Gaussians with grad >= τ, so the abs-grad rule selects about as many
    Gaussians as the plain rule. Gaussians never seen (denom 0) have grad = absgrad = 0.

    Returns:
        selected [N] bool, the mean grads [N] and Q.
    """
    denom = model.denom
    safe = denom.clamp_min(1.0)
    grads = torch.where(denom > 0, model.grad_accum / safe, torch.zeros_like(denom))
    absgrads = torch.where(denom > 0, model.absgrad_accum / safe, torch.zeros_like(denom))
    ratio = float((grads >= grad_threshold).float().mean())
    q = _quantile(absgrads, 1.0 - ratio)
    selected = (grads >= grad_threshold) | (absgrads >= q)
    return selected, grads, q


# ---------------------------------------------------------------------------------- densify & prune


@torch.no_grad()
def densify_and_prune(
    model: GaussianModel,
    *,
    grad_threshold: float,
    scene_extent: float = 128.0,
    percent_dense: float = 0.01,
    min_opacity: float = 0.005,
    max_screen_size: float | None = 20.0,
    max_world_scale_frac: float | None = 0.1,
    split_n: int = 2,
    reset_radii_before_prune: bool = True,
    generator: torch.Generator | None = None,
    max_new: int | None = None,
) -> DensifyReport:
    """Clone, split, then prune, in the reference order; statistics are reset afterwards.

    1. Select with ``densify_selection`` on the current N Gaussians.
    2. **Clone** the selected with max raw scale ≤ ``percent_dense·scene_extent`` (1.28 m): exact copies
       (all parameters incl. ``app_features`` and the 3D filter) appended at the end.
    3. **Split** the selected with max raw scale > that threshold, judged on the enlarged set with the
       clones excluded (the reference pads the selection with False for them): ``split_n`` children
       each, centred at μ + R·ε with ε ~ N(0, diag(s²)) (s = raw scales, R = the Gaussian's rotation),
       scales s/(0.8·split_n) (= s/1.6), other parameters copied; children appended, parents removed.
    4. **Prune** raw sigmoid(opacity) < ``min_opacity``, OR max_radii2d > ``max_screen_size``, OR max raw
       scale > ``max_world_scale_frac·scene_extent`` (12.8 m). Scales and opacities here are the raw ones
       (without the 3D filter), as in the reference.

    Parity note: the reference zeroes its max_radii2D inside ``densification_postfix``, i.e. *before*
    its prune, so its 20-px screen-size rule never removes anything. ``reset_radii_before_prune=True``
    (default) reproduces that; False applies the screen-size rule with the accumulated radii (children
    and clones have radius 0). The reference applies the world-scale rule only when
    ``max_screen_size`` is set; here the two rules are switched independently (None or 0 disables one).

    Quirk kept from the reference: when Q = 0 (e.g. no view was accumulated at all) every Gaussian is
    selected.

    Args:
        model: modified in place.
        grad_threshold: τ on the mean NDC gradient norm (1e-4 JAX, 2e-4 NYC and Stage 2).
        scene_extent: metres; the reference hard-codes 128 whatever the tile size.
        percent_dense: clone/split boundary as a fraction of ``scene_extent``.
        min_opacity: prune threshold on the raw opacity.
        max_screen_size: prune threshold on the max screen radius (pixels), or None.
        max_world_scale_frac: prune threshold on the max raw scale as a fraction of ``scene_extent``.
        split_n: children per split Gaussian.
        reset_radii_before_prune: reproduce the reference's dead screen-size rule (see above).
        generator: torch RNG for the split samples (on the model's device).
        max_new: at most this many Gaussians densified (each clone or split adds one), those with the
            largest mean gradients; None = no limit (the reference). A budget for sparse starts, where
            the plain rule multiplies the count.

    Returns:
        A ``DensifyReport`` with the counts.
    """
    n_before = model.num_gaussians
    if n_before == 0:
        return DensifyReport(0, 0, 0, 0, 0)
    selected, grads, _ = densify_selection(model, grad_threshold)
    if max_new is not None and int(selected.sum()) > max_new:
        # keep the max_new selected Gaussians with the largest mean gradient
        score = torch.where(selected, grads, torch.full_like(grads, -1.0))
        keep = torch.zeros_like(selected)
        keep[torch.topk(score, max_new).indices] = True
        selected = selected & keep
    split_limit = percent_dense * scene_extent

    # --- clone
    max_scale = model.params["scales"].detach().exp().amax(dim=-1)
    clone_mask = selected & (max_scale <= split_limit)
    n_cloned = int(clone_mask.sum())
    _cat_params(
        model,
        {k: v.detach()[clone_mask] for k, v in model.params.items()},
        model.filter_3d[clone_mask],
    )

    # --- split (the clones appended above are never split: their selection flag is padded False)
    max_scale = model.params["scales"].detach().exp().amax(dim=-1)
    split_mask = torch.cat([selected, selected.new_zeros(n_cloned)]) & (max_scale > split_limit)
    n_split = int(split_mask.sum())
    p = {k: v.detach()[split_mask] for k, v in model.params.items()}
    stds = p["scales"].exp().repeat(split_n, 1)
    eps = torch.normal(torch.zeros_like(stds), stds, generator=generator)
    rot = _quat_to_rotmat(p["quats"]).repeat(split_n, 1, 1)
    children = {k: v.repeat((split_n,) + (1,) * (v.dim() - 1)) for k, v in p.items()}
    children["means"] = children["means"] + (rot @ eps[..., None])[..., 0]
    children["scales"] = torch.log(stds / (0.8 * split_n))
    _cat_params(model, children, model.filter_3d[split_mask].repeat(split_n))
    _keep_params(model, ~torch.cat([split_mask, split_mask.new_zeros(split_n * n_split)]))

    # --- prune
    if reset_radii_before_prune:
        model.max_radii2d.zero_()
    prune = torch.sigmoid(model.params["opacities"].detach()) < min_opacity
    if max_screen_size:  # None or 0 disables (DensifyConfig.size_threshold uses 0)
        prune |= model.max_radii2d > max_screen_size
    if max_world_scale_frac:
        prune |= model.params["scales"].detach().exp().amax(dim=-1) > max_world_scale_frac * scene_extent
    n_pruned = int(prune.sum())
    _keep_params(model, ~prune)

    model.reset_stats()
    return DensifyReport(n_before, n_cloned, n_split, n_pruned, model.num_gaussians)


@torch.no_grad()
def prune_transparent(model: GaussianModel, min_opacity: float, *, floor: int = 0) -> int:
    """Remove Gaussians whose *effective* opacity (3D filter applied, what a viewer blends) is below
    ``min_opacity``; returns how many were removed.

    Without densification nothing ever prunes, and the entropy term leaves most of a sparse start at
    the 1e-3 clamp plus a few semi-transparent, large splats: invisible to the median depth, but a
    haze over the ground in any alpha-blended read-out (the expected depth, a web viewer). ``floor``
    keeps at least that many Gaussians (the most opaque ones).
    """
    _, opac = model.get_scales_opacities_eff()
    opac = opac.reshape(-1)
    prune = opac < min_opacity
    n_keep = model.num_gaussians - int(prune.sum())
    if n_keep < floor:
        keep_idx = torch.topk(opac, min(floor, model.num_gaussians)).indices
        prune = torch.ones_like(prune)
        prune[keep_idx] = False
    n = int(prune.sum())
    if n:
        _keep_params(model, ~prune)
    return n


@torch.no_grad()
def reset_opacity(model: GaussianModel, value: float = 0.01) -> None:
    """Filter-aware opacity reset (Mip-Splatting / the reference's ``reset_opacity``).

    The *effective* opacity becomes min(α_eff, value); the stored raw opacity is that divided by the
    filter coefficient α_eff/α, so the rendered opacity is exactly min(α_eff, value). The Adam moments
    of the opacities are zeroed (the step count is kept), as in ``replace_tensor_to_optimizer``.
    """
    raw = model.params["opacities"].detach()
    _, alpha_eff = apply_3d_filter(model.params["scales"].detach(), raw, model.filter_3d)
    alpha = torch.sigmoid(raw)
    # Where α_eff < value nothing changes (kept bit-exact). Elsewhere raw α = value / coef with
    # coef = α_eff / α; both are > 0 there, so no 0/0 for underflowed opacities or filter coefficients.
    lowered = alpha_eff >= value
    new_alpha = value * alpha / torch.where(lowered, alpha_eff, torch.ones_like(alpha_eff))
    new_raw = torch.where(lowered, torch.logit(new_alpha.clamp_max(1.0)), raw)
    _swap_param(model, "opacities", new_raw, torch.zeros_like)
