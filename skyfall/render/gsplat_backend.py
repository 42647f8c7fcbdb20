"""The only module that talks to gsplat (pinned to gsplat 1.5.3 semantics; imported lazily).

Inputs arrive activated and already in each camera's re-centred camera space
(``camera_space.py``): gsplat gets identity viewmats, camera-space covariances and principal
points at the image centre, so its float32 maths never sees satellite-sized numbers. Colours are
precomputed (SH is evaluated by ``skyfall.render.sh`` in world space, because gsplat's own view
directions would be computed in the sheared camera space).
"""

from __future__ import annotations

from torch import Tensor

from skyfall.render.camera_space import quat_scale_to_covar, to_camera_space


def rasterize_gsplat(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N]
    rgb: Tensor,  # [C, N, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    backgrounds: Tensor | None,  # [C, 3]
    eps2d: float,
    antialiased: bool,
    near_plane: float,
    far_plane: float,
    absgrad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render RGB+D with ``gsplat.rasterization``; same return layout as ``rasterize_torch``."""
    import gsplat
    import torch

    n_cam = viewmats.shape[0]
    cam = to_camera_space(means, quat_scale_to_covar(quats, scales), viewmats, Ks, width, height)
    eye = torch.eye(4, dtype=cam.means.dtype, device=cam.means.device)
    kwargs = dict(
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=None,
        packed=False,
        render_mode="RGB+D",
        absgrad=absgrad,
        rasterize_mode="antialiased" if antialiased else "classic",
    )
    if n_cam == 1:
        out, alphas, meta = gsplat.rasterization(
            cam.means[0],
            None,
            None,
            opacities,
            rgb,
            eye[None],
            cam.Ks,
            width,
            height,
            covars=cam.covars[0],
            backgrounds=backgrounds,
            **kwargs,
        )
        means2d = meta["means2d"]  # [1, N, 2]: exposed directly, so retain_grad()/absgrad just work
        radii = meta["radii"]
    else:
        # One batch entry per camera (each with its own camera-space means).
        out, alphas, meta = gsplat.rasterization(
            cam.means,
            None,
            None,
            opacities[None].expand(n_cam, -1),
            rgb[:, None],
            eye.expand(n_cam, 1, 4, 4),
            cam.Ks[:, None],
            width,
            height,
            covars=cam.covars,
            backgrounds=None if backgrounds is None else backgrounds[:, None],
            **kwargs,
        )
        out, alphas, radii = out[:, 0], alphas[:, 0], meta["radii"][:, 0]
        means2d = _mirror(meta["means2d"], n_cam)
    return out, alphas, means2d, radii


def _mirror(inner: Tensor, n_cam: int) -> Tensor:
    """A [C, N, 2] leaf whose ``.grad``/``.absgrad`` are copied from gsplat's [C, 1, N, 2] means2d.

    gsplat's batched call owns the means2d tensor of the graph and a reshaped view of it would not be
    part of the graph, so a hook forwards the gradient (and gsplat's absgrad, set on ``inner`` by the
    rasteriser's backward before the hook runs) to the tensor we expose.
    """
    exposed = inner.detach().reshape(n_cam, -1, 2).requires_grad_(inner.requires_grad)
    if inner.requires_grad:

        def _hook(grad: Tensor) -> None:
            g = grad.reshape(exposed.shape)
            exposed.grad = g.clone() if exposed.grad is None else exposed.grad + g
            if getattr(inner, "absgrad", None) is not None:
                exposed.absgrad = inner.absgrad.reshape(exposed.shape)

        inner.register_hook(_hook)
    return exposed
