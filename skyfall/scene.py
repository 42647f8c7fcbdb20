"""A trained scene = Gaussian model + appearance model; renders views with a chosen embedding.

Trainers, evaluation, Stage 2 and export all render through ``render_views`` so that the appearance
embedding rule (``Scene.novel_embedding``: the mean trained embedding, or an index) is applied in
exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.gaussians.appearance import AppearanceModel
from skyfall.gaussians.model import GaussianModel
from skyfall.render import RenderOutput, render, render_median_depth


def parse_embedding(value: str | int, option: str = "appearance.test_embedding") -> str | int:
    """'mean' or an image index >= 0 (the config stores it as a string so the CLI accepts both).

    A ConfigError names ``option`` (how the user set the value) for anything else.
    """
    from skyfall.errors import ConfigError

    if value == "mean":
        return "mean"
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = None
    if index is None or index < 0 or isinstance(value, bool):
        raise ConfigError(f"{option} {value}: must be 'mean' or an image index >= 0")
    return index


@dataclass
class Scene:
    """Everything needed to render: Gaussians, the optional appearance model and render settings."""

    model: GaussianModel
    appearance: AppearanceModel | None
    eps2d: float = 0.1

    @classmethod
    def from_checkpoint(cls, state: dict, device: str | torch.device = "cpu") -> Scene:
        """Rebuild the scene of a loaded checkpoint dict (Stage 1 or Stage 2).

        The appearance model's sizes are read from its state dict, so any configuration round-trips;
        the 2D filter comes from the checkpoint's Stage 1 config.
        """
        model = GaussianModel.from_state_dict(state["model"], device=device)
        app = None
        sd = state.get("appearance")
        if sd:
            n, idim = sd["image_embeddings.weight"].shape
            w0 = sd["mlp.0.weight"]
            sh_dim = sd["mlp.4.weight"].shape[0] // 2
            app = AppearanceModel(n, idim, w0.shape[1] - sh_dim - idim, w0.shape[0], sh_dim)
            app.load_state_dict(sd)
            app = app.to(device).eval()
        eps2d = (state.get("config") or {}).get("eps2d", 0.1)
        return cls(model, app, eps2d=float(eps2d))

    def colors(self, embedding: Tensor | int | None) -> tuple[Tensor, int]:
        """SH coefficients [N, K, 3] for one appearance embedding, and the SH degree to evaluate.

        Args:
            embedding: an image index (training views), an embedding vector [D], or None (raw SH).
        """
        p = self.model.params
        sh = torch.cat([p["sh0"], p["shN"]], dim=1)
        if self.appearance is not None and embedding is not None:
            sh = self.appearance(sh, p["app_features"], embedding)
        return sh, self.model.active_sh_degree

    def novel_embedding(self, rule: str | int, option: str | None = None) -> Tensor | None:
        """Embedding used for views that are not training views ('mean' or an index).

        ``option``: the command-line option the rule came from; an index outside the trained images
        is then a ConfigError naming it and the valid range. Without it (the run's own
        ``appearance.test_embedding``), an index past the last image is clamped, the documented
        reference rule (``AppearanceModel.image_embedding``).
        """
        from skyfall.errors import ConfigError

        name = option or "appearance.test_embedding"
        n = None if self.appearance is None else self.appearance.n_images
        try:
            parsed = parse_embedding(rule, name)
        except ConfigError:
            if n is None:
                raise
            parsed = None
        if self.appearance is None:
            return None
        if parsed is None or (option is not None and isinstance(parsed, int) and parsed >= n):
            raise ConfigError(
                f"{name} {rule}: must be 'mean' or an image index 0..{n - 1} (the run has {n} training images)"
            )
        return self.appearance.image_embedding(parsed)

    def render(
        self,
        cameras: Cameras,
        embedding: Tensor | int | None,
        *,
        background: Tensor | None = None,
        absgrad: bool = True,
    ) -> RenderOutput:
        """Render ``cameras`` (all with the same embedding); black background by default."""
        p = self.model.params
        sh, degree = self.colors(embedding)
        dev = p["means"].device
        bg = background if background is not None else torch.zeros(3, device=dev)
        return render(
            p["means"],
            p["quats"],
            p["scales"],
            p["opacities"],
            sh,
            cameras.viewmats.to(dev),
            cameras.Ks.to(dev),
            cameras.width,
            cameras.height,
            sh_degree=degree,
            filter_3d=self.model.filter_3d,
            backgrounds=bg,
            eps2d=self.eps2d,
            absgrad=absgrad,
        )

    @torch.no_grad()
    def render_median_depth(self, cameras: Cameras, *, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """Median depth and alpha, each [C, H, W, 1]; see ``skyfall.render.render_median_depth``."""
        p = self.model.params
        dev = p["means"].device
        return render_median_depth(
            p["means"],
            p["quats"],
            p["scales"],
            p["opacities"],
            cameras.viewmats.to(dev),
            cameras.Ks.to(dev),
            cameras.width,
            cameras.height,
            filter_3d=self.model.filter_3d,
            eps2d=self.eps2d,
            normalized=normalized,
        )

    @torch.no_grad()
    def render_views(self, cameras: Cameras, embedding: Tensor | int | None) -> RenderOutput:
        """Render many cameras one at a time (bounded memory) and stack the results."""
        outs = [self.render(cameras[i], embedding, absgrad=False) for i in range(len(cameras))]
        return RenderOutput(
            colors=torch.cat([o.colors for o in outs]),
            depths=torch.cat([o.depths for o in outs]),
            expected_depths=torch.cat([o.expected_depths for o in outs]),
            alphas=torch.cat([o.alphas for o in outs]),
            means2d=torch.cat([o.means2d for o in outs]),
            radii=torch.cat([o.radii for o in outs]),
            visible=torch.cat([o.visible for o in outs]),
            backend=outs[0].backend,
        )
