"""DreamSim perceptual distance (Fu et al. 2023), scored per view like LPIPS (lower = more similar).

* **Distance**: ``1 - cos(embed(a), embed(b))`` of the two images' DreamSim embeddings, as
  ``dreamsim.PerceptualModel.forward`` computes it; in [0, 2], 0 for identical images.
* **Preprocessing**: the package's ``preprocess`` resizes a PIL image to 224 x 224 (bicubic) and scales it
  to [0, 1]; each backbone's own normalisation (ImageNet for DINO, OpenAI CLIP for the CLIP towers) is
  applied inside ``model.embed``. Here renders are float tensors, so the resize is torch's antialiased
  bicubic (the filter PIL uses), clamped back to [0, 1] as PIL's uint8 output is.
* **Model**: the ``dreamsim`` package's default "ensemble" (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP
  ViT-B/16, LoRA-tuned). ``dreamsim(pretrained=True, cache_dir=...)`` downloads whatever is missing
  from its cache folder, so ``load_dreamsim`` checks every file it would read first and returns the
  reason (with the command that fetches them) instead of ever letting an evaluation download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

DREAMSIM_SIZE = 224
DREAMSIM_TYPE = "ensemble"
DREAMSIM_MODELS = "DreamSim ensemble (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16, LoRA)"
# Files the ensemble reads from its cache folder: the backbones and ensemble_lora/ come from the package's
# release zip; facebookresearch_dino_main/ and checkpoints/ are what torch.hub keeps there for the DINO
# backbone (dreamsim points torch.hub at the cache folder), and torch.hub downloads them too when absent.
ENSEMBLE_FILES: tuple[str | tuple[str, ...], ...] = (
    "dino_vitb16_pretrain.pth",
    "open_clip_vitb16_pretrain.pth.tar",
    "clip_vitb16_pretrain.pth.tar",
    "ensemble_lora/adapter_config.json",
    ("ensemble_lora/adapter_model.safetensors", "ensemble_lora/adapter_model.bin"),
    "facebookresearch_dino_main/hubconf.py",
    "checkpoints/dino_vitbase16_pretrain.pth",
)


def default_cache_dir() -> Path:
    """Where DreamSim weights are looked for by default: TORCH_HOME/hub/dreamsim (next to LPIPS' AlexNet)."""
    return Path(torch.hub.get_dir()) / "dreamsim"


def missing_files(cache_dir: str | Path) -> list[str]:
    """Files of the DreamSim ensemble absent from ``cache_dir`` (alternatives joined by '|')."""
    root = Path(cache_dir)
    missing = []
    for entry in ENSEMBLE_FILES:
        alts = (entry,) if isinstance(entry, str) else entry
        if not any((root / a).is_file() for a in alts):
            missing.append("|".join(alts))
    return missing


def fetch_command(cache_dir: str | Path) -> str:
    """The one-off command (on a machine with internet) that fills ``cache_dir`` with every file needed."""
    return (
        f"python -c \"from dreamsim import dreamsim; dreamsim(pretrained=True, cache_dir='{cache_dir}', "
        "device='cpu')\""
    )


def package_installed() -> bool:
    """Whether the ``dreamsim`` package can be found (located, not imported: importing it is slow)."""
    try:
        return importlib.util.find_spec("dreamsim") is not None
    except (ImportError, ValueError):
        return False


def weights_status(cache_dir: str | Path | None = None) -> str:
    """One line for ``skyfall doctor``: whether `skyfall eval` can score DreamSim, and how to fix it if not."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if not package_installed():
        return "package not installed (skyfall eval reports DreamSim unavailable) -> pip install dreamsim"
    missing = missing_files(cache)
    if missing:
        return (
            f"weights missing in {cache} ({len(missing)} of {len(ENSEMBLE_FILES)} files; skyfall eval reports "
            f"DreamSim unavailable) -> {fetch_command(cache)}"
        )
    return f"weights present in {cache}"


@dataclass
class DreamSimMetric:
    """DreamSim distance around an embedding function (the package's ``model.embed``, or a stand-in).

    ``embed`` takes [B, 3, 224, 224] float images in [0, 1] on ``device`` and returns [B, D] embeddings.
    """

    embed: Callable[[Tensor], Tensor]
    name: str = "custom"
    device: str = "cpu"
    size: int = DREAMSIM_SIZE

    def preprocess(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, size, size] float32 on ``device`` (see the module docstring)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DreamSim expects [B, 3, H, W] images, got {tuple(x.shape)}")
        x = x.detach().float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
            )
            x = x.clamp(0, 1)
        return x.to(self.device)

    @torch.no_grad()
    def embeddings(self, x: Tensor) -> Tensor:
        """Embeddings of [B, 3, H, W] images in [0, 1]. [B, D] float64 on the CPU"""
        e = self.embed(self.preprocess(x))
        return e.reshape(x.shape[0], -1).double().cpu()

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """DreamSim distance of image pairs.

        Args:
            a: [B, 3, H, W] images in [0, 1].
            b: same shape.

        Returns:
            [B] float64 distances in [0, 2].
        """
        if a.shape != b.shape:
            raise ValueError(f"DreamSim needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        # Embedded one batch at a time, as PerceptualModel.forward does: identical images then get
        # bit-identical embeddings.
        cos = F.cosine_similarity(self.embeddings(a), self.embeddings(b), dim=-1, eps=1e-8)
        # Rounding can put 1 - cos a hair outside its range.
        return (1.0 - cos).clamp(0.0, 2.0)

    def image_distance(self, pred: Tensor, gt: Tensor) -> float:
        """DreamSim of one image pair [H, W, 3] (channels last, the renderer's layout) in [0, 1]."""
        return float(self.distance(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None])[0])


def load_dreamsim(cache_dir: str | Path | None = None, device: str = "cpu") -> DreamSimMetric | str:
    """Build the DreamSim ensemble from ``cache_dir``, or return why it is unavailable (never downloads).

    Args:
        cache_dir: the package's ``cache_dir`` (default: ``default_cache_dir()``).
        device: torch device of the model.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if not package_installed():
        return "the dreamsim package is not installed (pip install dreamsim)"
    missing = missing_files(cache)
    if missing:
        what = (
            f"not found in {cache} (missing {', '.join(missing)}; not downloaded)"
            if cache.is_dir()
            else f"folder {cache} does not exist (not downloaded)"
        )
        return f"DreamSim weights {what}: fetch them once with {fetch_command(cache)} or pass --dreamsim-cache DIR"
    # dreamsim points torch.hub at its cache folder for the DINO backbone; put it back afterwards so
    # that later torch.hub lookups (LPIPS' AlexNet) still see the user's folder.
    hub_dir = torch.hub.get_dir()
    try:
        # The package reports "Using cached ..." on stdout, where `skyfall eval` prints its table.
        with contextlib.redirect_stdout(sys.stderr):
            from dreamsim import dreamsim

            model, _ = dreamsim(pretrained=True, cache_dir=os.fspath(cache), device=device)
    except ImportError as e:
        return f"cannot import dreamsim ({e}; pip install dreamsim)"
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot load DreamSim weights from {cache}: {first[:200]}"
    finally:
        torch.hub.set_dir(hub_dir)
    return DreamSimMetric(model.embed, name=f"dreamsim {DREAMSIM_TYPE} ({cache})", device=device)
