"""The one rendering entry point: ``render(...)`` -> ``RenderOutput``.

Two backends with the same semantics (gsplat 1.5.3, ``packed=False``, ``render_mode="RGB+D"``):

* ``"gsplat"``: gsplat's CUDA rasteriser (``gsplat_backend.py``, the only module importing gsplat);
* ``"torch"``: our pure-torch rasteriser (``torch_backend.py``), used on CPU.

``backend="auto"`` picks gsplat for CUDA tensors and torch otherwise. The choice is made from the
tensors' device and the presence of the package, never by catching gsplat's import-time errors
(they differ between environments: without CUDA, gsplat 1.5.3 imports but fails later when it tries
to build or load its CUDA extension).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.render.camera_space import camera_centers
from skyfall.render.sh import sh_to_rgb

__all__ = ["RenderOutput", "render", "render_median_depth", "resolve_backend"]


@dataclass
class RenderOutput:
    """Rendered images and per-Gaussian screen-space data.

    Attributes:
        colors: [C, H, W, 3] RGB (background added as ``bg * (1 - alpha)``).
        depths: [C, H, W, 1] accumulated depth ``D = sum_i T_i a_i z_i`` (not divided by alpha).
        expected_depths: [C, H, W, 1] ``D / clamp(alpha, 1e-10)``.
        alphas: [C, H, W, 1] accumulated opacity ``1 - T_final``.
        means2d: [C, N, 2] pixel coordinates. With grads enabled, ``.grad`` exists after backward and
            ``.absgrad`` (sum over pixels of per-pixel ``|dL/d means2d|``) when ``absgrad=True``.
        radii: [C, N] int32 pixel radius (max over x/y); 0 = not rendered.
        visible: [C, N] bool, ``radii > 0``.
        backend: "torch" or "gsplat".
    """

    colors: Tensor
    depths: Tensor
    expected_depths: Tensor
    alphas: Tensor
    means2d: Tensor
    radii: Tensor
    visible: Tensor
    backend: str


def gsplat_available() -> bool:
    """Whether the optional gsplat package is installed (not whether its CUDA build works)."""
    return importlib.util.find_spec("gsplat") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend for ``backend`` ("auto" | "torch" | "gsplat") and the tensors' device."""
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
    if backend == "torch":
        return "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ConfigError(
                f"backend='gsplat' needs CUDA tensors, got tensors on {device}; use backend='torch' or 'auto'"
            )
        if not gsplat_available():
            raise MissingDependencyError(
                "backend='gsplat' needs the gsplat package: pip install 'skyfall[cuda]' (gsplat==1.5.3)"
            )
        return "gsplat"
    raise ConfigError(f"unknown render backend {backend!r}; expected 'auto', 'torch' or 'gsplat'")


def _view_colors(
    means: Tensor, colors: Tensor, sh_degree: int | None, viewmats: Tensor, n_cam: int
) -> Tensor:
    """[C, N, 3] colours from SH coefficients (directions in float64 when the viewmats are) or RGB."""
    n = means.shape[0]
    if sh_degree is None:
        if colors.dim() == 2 and colors.shape == (n, 3):
            return colors[None].expand(n_cam, n, 3)
        if colors.dim() == 3 and colors.shape == (n_cam, n, 3):
            return colors
        raise ValueError(f"RGB colors must be [N, 3] or [C, N, 3], got {tuple(colors.shape)}")
    if colors.dim() != 3 or colors.shape[0] != n or colors.shape[-1] != 3:
        raise ValueError(f"SH colors must be [N, K, 3], got {tuple(colors.shape)}")
    prec = torch.promote_types(means.dtype, viewmats.dtype)
    campos = camera_centers(viewmats.to(device=means.device, dtype=prec))
    # mean - centre subtracts ~1e6 m numbers for satellites: do it in the precision dtype
    dirs = (means.to(prec)[None] - campos[:, None]).to(means.dtype)
    return sh_to_rgb(sh_degree, dirs, colors[None])


def render(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, unnormalised
    scales: Tensor,  # [N, 3] log scales
    opacities: Tensor,  # [N] logits
    colors: Tensor,  # [N, K, 3] SH (sh_degree set) or RGB [N, 3] / [C, N, 3]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera (float64 for satellites)
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    filter_3d: Tensor | None = None,  # [N]
    backgrounds: Tensor | None = None,  # [C, 3] or [3]
    eps2d: float = 0.1,
    rasterize_mode: Literal["antialiased", "classic"] = "antialiased",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    absgrad: bool = True,
    backend: Literal["auto", "torch", "gsplat"] = "auto",
) -> RenderOutput:
    """Render Gaussians from raw trainer parameters into C cameras.

    Activations happen here: ``exp`` of the log scales, ``sigmoid`` of the opacity logits and the
    optional Mip-Splatting 3D filter (``apply_3d_filter``). Defaults follow Skyfall-GS's renderer
    (``gaussian_renderer/__init__.py:render``): its Mip-Splatting 2D filter (``kernel_size 0.1``) is
    gsplat's ``antialiased`` mode with eps2d 0.1, depth is accumulated (``sum T_i a_i z_i``, not
    divided by alpha), far plane 1e10.

    Returns:
        RenderOutput (see its docstring).
    """
    if rasterize_mode not in ("antialiased", "classic"):
        raise ConfigError(f"rasterize_mode must be 'antialiased' or 'classic', got {rasterize_mode!r}")
    name = resolve_backend(backend, means.device)
    n_cam = viewmats.shape[0]
    if viewmats.shape[1:] != (4, 4) or Ks.shape != (n_cam, 3, 3):
        raise ValueError(
            f"viewmats must be [C, 4, 4] and Ks [C, 3, 3], got {tuple(viewmats.shape)}, {tuple(Ks.shape)}"
        )
    scales_eff, opac_eff = apply_3d_filter(scales, opacities, filter_3d)
    rgb = _view_colors(means, colors, sh_degree, viewmats, n_cam).to(means.dtype)
    if backgrounds is not None:
        backgrounds = backgrounds.to(device=means.device, dtype=means.dtype)
        if backgrounds.dim() == 1:
            backgrounds = backgrounds[None].expand(n_cam, -1)
    kwargs = dict(
        backgrounds=backgrounds,
        eps2d=float(eps2d),
        antialiased=rasterize_mode == "antialiased",
        near_plane=float(near_plane),
        far_plane=float(far_plane),
        absgrad=absgrad,
    )
    if name == "gsplat":
        from skyfall.render.gsplat_backend import rasterize_gsplat as rasterize
    else:
        from skyfall.render.torch_backend import rasterize_torch as rasterize
    out, alphas, means2d, radii2 = rasterize(
        means, quats, scales_eff, opac_eff, rgb, viewmats, Ks, int(width), int(height), **kwargs
    )
    if means2d.requires_grad and not means2d.is_leaf:
        means2d.retain_grad()
    radii = radii2.max(dim=-1).values.to(torch.int32)
    depths = out[..., 3:4]
    return RenderOutput(
        colors=out[..., :3],
        depths=depths,
        expected_depths=depths / alphas.clamp_min(1e-10),
        alphas=alphas,
        means2d=means2d,
        radii=radii,
        visible=radii > 0,
        backend=name,
    )


@torch.no_grad()
def render_median_depth(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] log scales
    opacities: Tensor,  # [N] logits
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    filter_3d: Tensor | None = None,
    eps2d: float = 0.1,
    rasterize_mode: Literal["antialiased", "classic"] = "antialiased",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    normalized: bool = False,
) -> tuple[Tensor, Tensor]:
    """Median depth [C, H, W, 1] and accumulated alpha [C, H, W, 1], no gradients.

    The median depth is the camera z of the Gaussian where transmittance falls to 0.5 (NaN where it
    never does); with ``normalized`` the level is half of the pixel's own alpha, the median of its
    weight distribution (defined wherever anything is rendered). Same projection and compositing
    rules as ``render``.

    gsplat 1.5.3 has no median-depth mode, so this runs the torch compositor on any device; it is an
    evaluation tool (DSM extraction), not a training path.
    """
    from skyfall.render.torch_backend import median_depth_torch

    scales_eff, opac_eff = apply_3d_filter(scales, opacities, filter_3d)
    return median_depth_torch(
        means,
        quats,
        scales_eff,
        opac_eff,
        viewmats,
        Ks,
        int(width),
        int(height),
        eps2d=float(eps2d),
        antialiased=rasterize_mode == "antialiased",
        near_plane=float(near_plane),
        far_plane=float(far_plane),
        normalized=normalized,
    )
