"""Per-image appearance model: WildGaussians' ``EmbeddingModel`` with ``appearance_model_sh=False``,
as Skyfall-GS uses it (``scene/gaussian_model.py:EmbeddingModel``, ``_get_fourier_features``).

Each Gaussian i carries a learnable embedding g_i (initialised by `fourier_init_embeddings`, stored
with the Gaussian parameters, inherited by split/clone children) and each training image j a learned
embedding a_j (here). A small MLP maps ``[min(F_DC, 1), g_i, a_j]`` to a per-Gaussian colour offset o
and multiplier m applied to the SH coefficients before SH evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from skyfall.gaussians.sh import SH_C0


def fourier_init_embeddings(
    points: Tensor,  # [N, 3]
    n_freqs: int = 4,
    noise_std: float = 1e-4,
    generator: torch.Generator | None = None,
) -> Tensor:  # [N, 6 * n_freqs]
    """Initial per-Gaussian appearance embeddings: Fourier features of the normalised positions.

    1. centre the points on their mean;
    2. divide each axis by the 0.97-quantile of its absolute value;
    3. ``p = x * 0.5 + 0.5``;
    4. frequencies ``2^k`` for k = 0..n_freqs-1, each used twice, with phase offsets 0 and π/2
       (i.e. sin then cos): feature ``sin(2π p f + offset)``;
    5. add N(0, noise_std²) noise.

    Feature order (axis-major, as WildGaussians' ``get_fourier_features`` flattens ``[N, 3, 2F]``):
    ``[x: sin(2π p 1), cos(2π p 1), sin(2π p 2), cos(2π p 2), ..., y: ..., z: ...]``, so column
    ``axis * 2F + 2k + j`` holds ``sin(2π p_axis 2^k + j π/2)``.

    Args:
        points: [N, 3] initial Gaussian centres.
        n_freqs: number of octaves F (4 in the reference, giving 24 features).
        noise_std: standard deviation of the additive Gaussian noise (0 disables it).
        generator: optional RNG for the noise.

    Returns:
        [N, 6 * n_freqs] float32 embeddings (on the points' device).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    x = points.to(torch.float32)
    x = x - x.mean(dim=0, keepdim=True)
    scale = torch.quantile(x.abs(), 0.97, dim=0)
    # a degenerate axis (all points equal, e.g. a flat initial cloud) would divide 0 by 0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    p = x / scale * 0.5 + 0.5
    freqs = torch.repeat_interleave(2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device), 2)
    offsets = torch.tensor([0.0, 0.5 * math.pi] * n_freqs, dtype=x.dtype, device=x.device)
    feats = torch.sin(p[:, :, None] * freqs * (2.0 * math.pi) + offsets).reshape(x.shape[0], 6 * n_freqs)
    if noise_std > 0:
        # draw on the generator's device so a CPU generator also works for CUDA points
        device = generator.device if generator is not None else x.device
        noise = torch.randn(feats.shape, generator=generator, dtype=feats.dtype, device=device)
        feats = feats + noise_std * noise.to(feats.device)
    return feats


class AppearanceModel(nn.Module):
    """Per-image embeddings plus the colour MLP (the reference's ``EmbeddingModel``).

    Args:
        n_images: number of training images (one embedding each).
        image_dim: per-image embedding size (``appearance_embedding_dim = 32``).
        gaussian_dim: per-Gaussian embedding size (6 × 4 Fourier frequencies = 24).
        hidden: MLP width (128).
        sh_dim: colour channels (3).
    """

    def __init__(
        self, n_images: int, image_dim: int = 32, gaussian_dim: int = 24, hidden: int = 128, sh_dim: int = 3
    ) -> None:
        super().__init__()
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        self.n_images = n_images
        self.image_dim = image_dim
        self.gaussian_dim = gaussian_dim
        self.sh_dim = sh_dim
        self.image_embeddings = nn.Embedding(n_images, image_dim)
        nn.init.normal_(self.image_embeddings.weight, mean=0.0, std=0.01)
        # PyTorch default (Kaiming-uniform) initialisation, as the reference.
        self.mlp = nn.Sequential(
            nn.Linear(sh_dim + gaussian_dim + image_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * sh_dim),
        )

    def image_embedding(self, index: int | Literal["mean"]) -> Tensor:  # [image_dim]
        """Embedding of one image, or the mean of all trained embeddings.

        An integer index is clamped to ``n_images - 1``: the reference hard-codes the test-time
        embedding to ``a_{min(6, N-1)}`` (it computes the mean, then overwrites it), so
        ``image_embedding(6)`` reproduces it; ``"mean"`` is the [FIX] default.
        """
        weight = self.image_embeddings.weight
        if isinstance(index, str):
            if index != "mean":
                raise ValueError(f"index must be an int or 'mean', got {index!r}")
            return weight.mean(dim=0)
        if index < 0:
            raise ValueError(f"image index must be >= 0, got {index}")
        return weight[min(int(index), self.n_images - 1)]

    def forward(
        self,
        sh: Tensor,  # [N, K, 3] full SH coefficients (band 0 first)
        gaussian_emb: Tensor,  # [N, gaussian_dim]
        image_emb: Tensor | int,  # [image_dim] embedding, or a training-image index
    ) -> Tensor:  # [N, K, 3]
        """Appearance-modulated SH coefficients.

        ``x = [min(F_DC, 1), g_i, a_j]``, ``[o, m] = 0.01 MLP(x)``, ``F' = min(F, 1) ⊙ m`` (m broadcast
        over the K bands, per colour channel), ``F'_DC += o / C0``, then ``F' = min(F', 1)``. m is used
        raw (no ``1 +``), as the reference and WildGaussians do.

        Args:
            sh: [N, K, 3] SH coefficients, ``K = (degree + 1)^2``.
            gaussian_emb: [N, gaussian_dim] per-Gaussian embeddings.
            image_emb: [image_dim] image embedding (e.g. from `image_embedding`) or an image index
                (looked up without clamping).

        Returns:
            [N, K, 3] modulated coefficients, to be evaluated as ``max(SH(F', dir) + 0.5, 0)``.
        """
        n = sh.shape[0]
        assert sh.dim() == 3 and sh.shape[2] == self.sh_dim, sh.shape
        assert gaussian_emb.shape == (n, self.gaussian_dim), gaussian_emb.shape
        if isinstance(image_emb, int):
            if not 0 <= image_emb < self.n_images:
                raise IndexError(f"image index {image_emb} out of range [0, {self.n_images})")
            image_emb = self.image_embeddings.weight[image_emb]
        assert image_emb.shape == (self.image_dim,), image_emb.shape
        return self._modulate(sh, gaussian_emb, image_emb)

    def _modulate(self, sh: Tensor, gaussian_emb: Tensor, image_emb: Tensor) -> Tensor:
        """`forward`'s arithmetic on an embedding vector (what `compile_modulation` compiles)."""
        n = sh.shape[0]
        sh_clamped = sh.clamp(max=1.0)
        x = torch.cat(
            [
                sh_clamped[:, 0, :],
                gaussian_emb.to(sh.dtype),
                image_emb.to(sh.dtype).expand(n, self.image_dim),
            ],
            dim=-1,
        )
        offset, mult = (0.01 * self.mlp(x)).split(self.sh_dim, dim=-1)
        out = sh_clamped * mult[:, None, :]
        out = torch.cat([out[:, :1, :] + (offset / SH_C0)[:, None, :], out[:, 1:, :]], dim=1)
        return out.clamp(max=1.0)

    def compile_modulation(self) -> None:
        """``torch.compile`` the modulation (the MLP and the elementwise operations around it, forward
        and backward; any number of Gaussians): fewer kernel launches per call, which is what a GPU
        step's host time is made of. Equal to the uncompiled arithmetic up to float rounding; the
        parameters and the state dict are unchanged."""
        self._modulate = torch.compile(self._modulate, dynamic=True)

    def param_groups(self, embedding_lr: float = 1e-3, mlp_lr: float = 5e-4) -> list[dict[str, Any]]:
        """Optimizer parameter groups with the reference learning rates (embeddings 1e-3, MLP 5e-4).

        The per-Gaussian embeddings (lr 5e-3) are not part of this module.
        """
        return [
            {
                "name": "appearance_embeddings",
                "params": list(self.image_embeddings.parameters()),
                "lr": embedding_lr,
            },
            {"name": "appearance_mlp", "params": list(self.mlp.parameters()), "lr": mlp_lr},
        ]
