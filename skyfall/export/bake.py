"""Viewer-ready splats from a trained scene: bake the 3D filter and the appearance model, sanitise.

Viewers know nothing about Mip-Splatting's 3D filter or the per-image appearance MLP. Like
Skyfall-GS's ``GaussianModel.save_fused_ply`` (called by its ``create_fused_ply.py``) we write

* ``scale = log(sqrt(s^2 + f^2))`` and ``opacity = logit(sigmoid(o) * coef3d)`` (the filter baked in,
  no ``filter_3D`` column);
* the SH coefficients after the appearance model for one novel-view embedding ('mean' by default;
  an index reproduces the reference, which hard-codes ``a_{min(6, N-1)}``). [FIX] The reference only
  applies the appearance model when it loads a checkpoint (``--load_from_checkpoints``); here the
  bake is chosen independently of where the parameters come from;
* only the SH bands the renderer evaluates (``active_sh_degree``), so viewers show what we render.

Then non-finite or degenerate rows are dropped and counted, so one NaN never empties a file (gsplat
1.5.x ``export_splats`` reduces its NaN test over the 1-D opacity tensor to a scalar, so a single NaN
opacity drops every splat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from skyfall.gaussians.appearance import AppearanceModel
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.gaussians.sh import sh0_to_rgb

# sigmoid(o) in float32 saturates near 1 - 6e-8; keep logits finite and representable.
_OPACITY_EPS = 1e-7


@dataclass
class Splats:
    """Gaussians as files store them (numpy, float32), gsplat names.

    Attributes:
        means: [N, 3] positions.
        quats: [N, 4] rotations, wxyz (normalised for baked splats, raw for round-trip exports).
        scales: [N, 3] log standard deviations.
        opacities: [N] opacity logits.
        sh: [N, K, 3] SH coefficients, band 0 first (``f_dc = sh[:, 0]``), K = (degree + 1)^2.
        filter_3d: [N] Mip-Splatting 3D filter (raw exports only), or None once baked.
    """

    means: np.ndarray
    quats: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray
    filter_3d: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def subset(self, index: np.ndarray) -> Splats:
        """Rows ``index`` (bool mask or integer indices) of every array."""
        return Splats(
            self.means[index],
            self.quats[index],
            self.scales[index],
            self.opacities[index],
            self.sh[index],
            None if self.filter_3d is None else self.filter_3d[index],
        )

    def rgb(self) -> np.ndarray:
        """[N, 3] view-independent colour ``0.5 + C0 f_dc`` (unclamped), as viewers decode band 0."""
        return sh0_to_rgb(self.sh[:, 0, :])

    def alpha(self) -> np.ndarray:
        """[N] opacity in [0, 1]."""
        return 1.0 / (1.0 + np.exp(-self.opacities.astype(np.float64)))


def _np32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def splats_from_params(params: dict[str, Tensor], filter_3d: Tensor | None = None) -> Splats:
    """Raw trainer parameters (gsplat names, as in checkpoints) -> ``Splats`` without any baking."""
    sh = torch.cat([params["sh0"], params["shN"]], dim=1)
    return Splats(
        _np32(params["means"]),
        _np32(params["quats"]),
        _np32(params["scales"]),
        _np32(params["opacities"]).reshape(-1),
        _np32(sh),
        None if filter_3d is None else _np32(filter_3d).reshape(-1),
    )


@torch.no_grad()
def bake(
    params: dict[str, Tensor],
    filter_3d: Tensor | None,
    *,
    appearance: AppearanceModel | None = None,
    embedding: Tensor | None = None,
    sh_degree: int | None = None,
) -> Splats:
    """Fuse the 3D filter and the appearance model into plain 3DGS parameters.

    Args:
        params: ``means`` [N,3], ``quats`` [N,4], ``scales`` [N,3] (log), ``opacities`` [N] (logit),
            ``sh0`` [N,1,3], ``shN`` [N,K-1,3] and, with ``appearance``, ``app_features`` [N,D].
        filter_3d: [N] 3D filter sizes, or None (nothing to bake).
        appearance: the appearance model, or None to keep the raw SH.
        embedding: [image_dim] image embedding for the bake (e.g. ``Scene.novel_embedding("mean")``);
            required with ``appearance``.
        sh_degree: SH degree to keep (the renderer's active degree); None keeps all bands.

    Returns:
        Baked ``Splats`` (normalised quaternions, ``filter_3d`` None); not yet sanitised.
    """
    sh = torch.cat([params["sh0"], params["shN"]], dim=1).float()
    if appearance is not None:
        if embedding is None:
            raise ValueError("bake(): an appearance model needs an embedding")
        sh = appearance(sh, params["app_features"].float(), embedding.to(sh.device))
    if sh_degree is not None:
        sh = sh[:, : (sh_degree + 1) ** 2]
    # float64: logit(a * coef) of near-opaque splats and log of tiny scales lose digits in float32
    log_s = params["scales"].double()
    logit_o = params["opacities"].double()
    f = None if filter_3d is None else filter_3d.double()
    s_eff, a_eff = apply_3d_filter(log_s, logit_o, f)
    a_eff = a_eff.clamp(_OPACITY_EPS, 1.0 - _OPACITY_EPS)
    q = params["quats"].double()
    q = q / q.norm(dim=-1, keepdim=True)  # a zero quaternion becomes NaN and is dropped by sanitize
    return Splats(
        _np32(params["means"]),
        _np32(q),
        _np32(torch.log(s_eff)),
        _np32(torch.logit(a_eff)),
        _np32(sh),
        None,
    )


def sanitize(splats: Splats) -> tuple[Splats, int]:
    """Drop Gaussians with any non-finite value (or a zero quaternion); return them and the count dropped."""
    n = len(splats)
    ok = np.isfinite(splats.means).all(1)
    ok &= np.isfinite(splats.quats).all(1) & (np.abs(splats.quats).sum(1) > 0)
    ok &= np.isfinite(splats.scales).all(1)
    ok &= np.isfinite(splats.opacities)
    ok &= np.isfinite(splats.sh.reshape(n, -1)).all(1)
    if splats.filter_3d is not None:
        ok &= np.isfinite(splats.filter_3d)
    dropped = int(n - ok.sum())
    return (splats if dropped == 0 else splats.subset(ok)), dropped


@torch.no_grad()
def render_splats(splats: Splats, cameras) -> np.ndarray:  # noqa: ANN001
    """What a viewer shows: baked splats (as read back from a file) alpha-blended from ``cameras``
    (a ``Cameras``) with the rasteriser of ``skyfall.render``; uint8 images [C, H, W, 3]."""
    from skyfall.render import render

    t = {
        k: torch.from_numpy(np.ascontiguousarray(getattr(splats, k))).float()
        for k in ("means", "quats", "scales", "opacities", "sh")
    }
    out = render(
        t["means"], t["quats"], t["scales"], t["opacities"], t["sh"],
        cameras.viewmats.float(), cameras.Ks.float(), cameras.width, cameras.height,
        sh_degree=splats.sh_degree, absgrad=False,
    )  # fmt: skip
    return (out.colors.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
