"""Distribution metrics on 512^2 patches: CLIP-FID and CMMD (as Skyfall-GS's ``eval.py``).

* **Patches**: every image is cut into ``p x p`` patches (p = 512) with one stride
  ``min((H - p) // 8, (W - p) // 15)`` in both directions (at least 9 x 16 patches on large frames).
  [FIX] Images smaller than 512 (our CPU-sized ground-truth views) use ``p = min(H, W)``; a zero stride
  means a single patch along that axis.
* **CLIP-FID** (clean-fid ``compute_fid(mode="clean", model_name="clip_vit_b_32")``): patch -> PIL
  bicubic resize to the model's input size (224) -> CLIP normalisation -> projected image embedding
  (not normalised) -> Fréchet distance between the Gaussians fitted to both sets.
* **CMMD** (``cmmd_pytorch``): CLIP ViT-L/14-336 image embeddings (torch bicubic resize to 336 of the
  [0, 1] patch, CLIP normalisation, L2-normalised), then the **biased** MMD² estimator with the Gaussian
  RBF kernel ``k(x, y) = exp(-||x - y||² / (2 sigma²))``, sigma = 10, times 1000.

CLIP weights come from local files only (``from_pretrained(..., local_files_only=True)``): a Hugging
Face model id in the local cache or a model folder. ``load_clip`` returns the reason when they are absent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from skyfall.eval.options import CLIP_FID_MODEL, CMMD_MODEL  # noqa: F401 (clean-fid clip_vit_b_32; cmmd_pytorch)

PATCH = 512
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
# OpenAI CLIP normalisation (used when a model folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------- patches


def patch_stride(h: int, w: int, patch: int = PATCH) -> int:
    """The reference's single stride ``min((h - patch) // 8, (w - patch) // 15)`` (>= 0)."""
    return max(0, min((h - patch) // 8, (w - patch) // 15))


def patch_grid(h: int, w: int, patch: int = PATCH) -> tuple[int, list[tuple[int, int]]]:
    """Patch side and top-left corners (row-major) of the reference patch grid of an ``h x w`` image.

    The side is reduced to ``min(h, w)`` for smaller images ([FIX], module docstring).
    """
    p = min(patch, h, w)
    s = patch_stride(h, w, p)
    ys = [0] if s == 0 else range(0, h - p + 1, s)
    xs = [0] if s == 0 else range(0, w - p + 1, s)
    return p, [(y, x) for y in ys for x in xs]


def extract_patches(image: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Cut one image [H, W, 3] uint8 into its patches [M, p, p, 3] (see ``patch_grid``)."""
    p, corners = patch_grid(image.shape[0], image.shape[1], patch)
    return np.stack([image[y : y + p, x : x + p] for y, x in corners])


# ----------------------------------------------------------------------------------------- statistics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||² + tr(S1 + S2 - 2 sqrtm(S1 S2))`` as clean-fid computes it.

    Args:
        mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances.
    """
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Few samples per altitude band give singular covariances; handled just below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (few samples): regularise as clean-fid does.
        off = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + off) @ (sigma2 + off))
    covmean = np.real(covmean)  # imaginary parts are numerical noise
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D] (``np.cov(rowvar=False)``, N-1 normalisation)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def mmd2_rbf(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """Biased MMD² with a Gaussian RBF kernel, times ``scale`` (the CMMD statistic).

    ``scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y))`` with all pairs, diagonals included,
    ``k(a, b) = exp(-||a - b||² / (2 sigma²))``.

    Args:
        x: [N, D] reference embeddings. y: [M, D] embeddings to compare.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def k_mean(a: np.ndarray, b: np.ndarray) -> float:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-gamma * np.maximum(d2, 0.0)).mean())

    return scale * (k_mean(x, x) + k_mean(y, y) - 2.0 * k_mean(x, y))


# ------------------------------------------------------------------------------------------ embedders


@dataclass
class ClipEmbedder:
    """A CLIP vision tower with projection, preprocessing as clean-fid (``"clip_fid"``) or cmmd (``"cmmd"``)."""

    model: torch.nn.Module
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str
    name: str
    batch: int = 16

    @torch.no_grad()
    def embed(self, patches: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 patches.

        Args:
            patches: [M, h, w, 3] uint8.

        Returns:
            [M, D] float64 (L2-normalised in "cmmd" mode).
        """
        dev = next(self.model.parameters()).device
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(patches), self.batch):
            chunk = patches[i : i + self.batch]
            if self.mode == "clip_fid":
                # clean-fid: PIL bicubic resize of the uint8 image (re-quantised), then /255.
                from PIL import Image

                arr = np.stack(
                    [
                        np.asarray(Image.fromarray(p).resize((self.size, self.size), Image.BICUBIC))
                        for p in chunk
                    ]
                )
                x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
            else:
                # cmmd_pytorch: [0, 1] floats, torch bicubic interpolation (no antialias).
                x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
            x = ((x - mean) / std).to(dev)
            e = self.model(pixel_values=x).image_embeds.double().cpu()
            if self.mode == "cmmd":
                e = e / torch.linalg.norm(e, dim=-1, keepdim=True)
            out.append(e.numpy())
        return np.concatenate(out)

    def embed_image(self, image: np.ndarray, patch: int = PATCH) -> np.ndarray:
        """Embeddings of all patches of one image [H, W, 3] uint8, cut batch by batch. [M, D]"""
        p, corners = patch_grid(image.shape[0], image.shape[1], patch)
        out = []
        for i in range(0, len(corners), self.batch):
            out.append(
                self.embed(np.stack([image[y : y + p, x : x + p] for y, x in corners[i : i + self.batch]]))
            )
        return np.concatenate(out)

    @classmethod
    def from_model(cls, model: torch.nn.Module, mode: str, name: str = "custom") -> ClipEmbedder:
        """Wrap an in-memory ``CLIPVisionModelWithProjection`` (tests build tiny random ones)."""
        if mode not in ("clip_fid", "cmmd"):
            raise ValueError(f"mode must be 'clip_fid' or 'cmmd', got {mode!r}")
        return cls(model.eval(), int(model.config.image_size), CLIP_MEAN, CLIP_STD, mode, name)


def load_clip(name_or_path: str | Path, mode: str, device: str = "cpu") -> ClipEmbedder | str:
    """Load a CLIP vision model from local files only; returns the reason string when unavailable."""
    try:
        from transformers import CLIPVisionModelWithProjection
    except ImportError:
        return "transformers is not installed (pip install 'skyfall[eval]')"
    src = str(name_or_path)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"CLIP weights {src!r} not in the local cache ({first[:160]}); not downloaded"
    emb = ClipEmbedder.from_model(model.to(device), mode, name=src)
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(src, local_files_only=True)
        emb.mean, emb.std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, ImportError):
        pass  # no preprocessor config: OpenAI CLIP statistics
    return emb


def distribution_metrics(
    real_feats_fid: np.ndarray | None,
    fake_feats_fid: np.ndarray | None,
    real_feats_cmmd: np.ndarray | None,
    fake_feats_cmmd: np.ndarray | None,
) -> dict[str, float]:
    """CLIP-FID and CMMD from precomputed patch embeddings (None = metric unavailable -> omitted)."""
    out: dict[str, float] = {}
    if real_feats_fid is not None and fake_feats_fid is not None:
        out["clip_fid"] = fid_from_features(real_feats_fid, fake_feats_fid)
    if real_feats_cmmd is not None and fake_feats_cmmd is not None:
        out["cmmd"] = mmd2_rbf(real_feats_cmmd, fake_feats_cmmd)
    return out


def as_tensor_image(img: Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8 array (how renders enter the patch pipeline)."""
    return (img.detach().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
