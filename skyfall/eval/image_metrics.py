"""Full-reference image metrics with the definitions of Skyfall-GS's ``eval.py`` (pyiqa defaults).

* **PSNR**: RGB, data range 1, ``10 log10(1 / (mse + 1e-8))`` over all pixels (pyiqa ``psnr``), or over
  the pixels of a mask (held-out satellite views have no-data borders).
* **SSIM**: pyiqa ``ssim`` = SSIM on the **Y channel of YIQ** (``0.299 R + 0.587 G + 0.114 B``), scaled to
  [0, 255] and **rounded**, 11x11 Gaussian window (sigma 1.5, MATLAB ``fspecial``), 'valid' filtering
  (no padding), ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, the contrast-structure term clamped at
  0 (``relu``), no downsampling; the mean of the SSIM map. This is *not* the training loss's SSIM
  (RGB, same-padding) in ``skyfall.kernels``.
* **LPIPS** (AlexNet, v0.1): implemented here without torchvision; the AlexNet backbone and the
  linear heads are read from local files only (never downloaded). ``load_lpips`` returns the reason
  when they are missing.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_YIQ_Y = (0.299, 0.587, 0.114)
PSNR_EPS = 1e-8  # pyiqa's psnr epsilon


def _nchw(img: Tensor) -> Tensor:
    """[H, W, 3] or [N, H, W, 3] (channels last, the renderer's layout) -> [N, 3, H, W] float64."""
    if img.dim() == 3:
        img = img[None]
    return img.permute(0, 3, 1, 2).double()


def masked_mse(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """The squared error behind `psnr`, as a float64 tensor: nothing is read from the device.

    Args:
        pred: [H, W, 3] prediction (clamped to [0, 1]).
        gt: [H, W, 3] reference.
        mask: optional [H, W] bool; only these pixels count.

    Returns:
        The mean squared error (0-dim); NaN when ``mask`` has no pixel.
    """
    err = (pred.double().clamp(0, 1) - gt.double()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)[..., None].expand_as(err)
    n = m.sum()
    return torch.where(n > 0, (err * m).sum() / n, torch.full_like(n, math.nan))


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of images in [0, 1] (NaN stays NaN)."""
    return -10.0 * math.log10(mse + PSNR_EPS)


def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1].

    Args:
        pred: [H, W, 3] prediction (clamped to [0, 1]).
        gt: [H, W, 3] reference.
        mask: optional [H, W] bool; only these pixels count.

    Returns:
        The PSNR; NaN when ``mask`` has no pixel (no error was measured, so there is no PSNR, and
        NaN keeps the view out of means that skip non-finite values).
    """
    return psnr_from_mse(float(masked_mse(pred, gt, mask)))


def rgb_to_y255(img: Tensor) -> Tensor:
    """pyiqa ``to_y_channel(img, 255, 'yiq')``: YIQ luma scaled to [0, 255] and rounded. [N,3,H,W] -> [N,1,H,W]"""
    w = torch.tensor(_YIQ_Y, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return ((img * w).sum(1, keepdim=True) * 255.0).round()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)``: normalised 2-D Gaussian. [size, size] float64"""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    # fspecial zeroes values below eps * max before normalising (no effect at sigma 1.5, kept for parity).
    g = torch.where(g < torch.finfo(torch.float64).eps * g.max(), torch.zeros_like(g), g)
    return g / g.sum()


def ssim_map(pred: Tensor, gt: Tensor) -> Tensor:
    """SSIM map with the pyiqa definition (see the module docstring).

    Args:
        pred: [H, W, 3] or [N, H, W, 3] in [0, 1].
        gt: same shape.

    Returns:
        [N, H - 10, W - 10] float64 map ('valid' filtering).
    """
    x = rgb_to_y255(_nchw(pred).clamp(0, 1))
    y = rgb_to_y255(_nchw(gt).clamp(0, 1))
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    win = gaussian_window().to(x.device)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(a: Tensor) -> Tensor:
        return F.conv2d(a, win)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    cs = F.relu((2 * sxy + c2) / (sxx + syy + c2))
    return (((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs)[:, 0]


def ssim(pred: Tensor, gt: Tensor) -> float:
    """Mean SSIM (pyiqa ``ssim``) of one image pair [H, W, 3] in [0, 1]."""
    return float(ssim_map(pred, gt).mean())


# ---------------------------------------------------------------------------------------------- LPIPS

# AlexNet ``features`` of torchvision: (conv index, in, out, kernel, stride, padding); LPIPS taps the
# ReLU after each conv; max-pools (3, stride 2) precede conv 2 and conv 3.
_ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
               (10, 256, 256, 3, 1, 1))  # fmt: skip
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet checkpoint name in the torch hub cache


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet backbone (the ``lpips`` package's ``LPIPS(net='alex')``), torchvision-free.

    ``forward(pred, gt)`` takes [N, 3, H, W] images in [0, 1] and returns [N] distances.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _ALEX_CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, _, o, _, _, _ in _ALEX_CONVS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def features(self, x: Tensor) -> list[Tensor]:
        """ReLU outputs of the 5 AlexNet convs for images in [0, 1]. [N,3,H,W] -> 5 x [N,C_k,H_k,W_k]"""
        h = ((2 * x - 1) - self.shift) / self.scale
        feats = []
        for k, conv in enumerate(self.convs):
            if k in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            feats.append(h)
        return feats

    @torch.no_grad()
    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        total = torch.zeros(pred.shape[0], device=pred.device)
        for lin, f0, f1 in zip(self.lins, self.features(pred), self.features(gt), strict=True):
            # Unit-normalise along channels (eps as in lpips.normalize_tensor), squared difference,
            # learned per-channel weights (1x1 conv), spatial mean.
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n0 - n1) ** 2).mean((1, 2, 3))
        return total

    def load_weights(self, backbone: dict[str, Tensor], lins: dict[str, Tensor]) -> None:
        """Load torchvision AlexNet (``features.{i}.weight|bias``) and lpips (``lin{k}.model.1.weight``) tensors."""
        for k, (idx, *_rest) in enumerate(_ALEX_CONVS):
            self.convs[k].weight.data.copy_(backbone[f"features.{idx}.weight"])
            self.convs[k].bias.data.copy_(backbone[f"features.{idx}.bias"])
            self.lins[k].weight.data.copy_(lins[f"lin{k}.model.1.weight"])


def default_lpips_paths() -> tuple[Path, Path | None]:
    """Where local LPIPS weights are looked for: the torch hub AlexNet checkpoint, lpips' bundled heads."""
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    lin = None
    spec = importlib.util.find_spec("lpips")  # located, not imported (importing it needs torchvision)
    if spec is not None and spec.origin is not None:
        lin = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    return backbone, lin


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper prefixes (``module.``, ``net.``) some checkpoints carry."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "net."):
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_lpips(
    backbone_path: str | Path | None = None, lin_path: str | Path | None = None, device: str = "cpu"
) -> LPIPS | str:
    """Build LPIPS(alex) from local weight files, or return why it is unavailable (never downloads).

    Args:
        backbone_path: torchvision AlexNet state dict (default: the torch hub cache file).
        lin_path: lpips v0.1 ``alex.pth`` linear heads (default: inside an installed ``lpips`` package).
    """
    d_backbone, d_lin = default_lpips_paths()
    backbone_path = Path(backbone_path) if backbone_path else d_backbone
    lin_path = Path(lin_path) if lin_path else d_lin
    if not backbone_path.is_file():
        return f"AlexNet weights not found at {backbone_path} (not downloaded; pass --lpips-backbone)"
    if lin_path is None or not lin_path.is_file():
        return f"LPIPS v0.1 alex linear heads not found ({lin_path or 'lpips package not installed'}; pass --lpips-lin)"
    try:
        backbone = _strip(torch.load(backbone_path, map_location="cpu", weights_only=True))
        lins = _strip(torch.load(lin_path, map_location="cpu", weights_only=True))
        model = LPIPS()
        model.load_weights(backbone, lins)
    except (OSError, RuntimeError, KeyError) as e:
        return f"cannot load LPIPS weights ({backbone_path}, {lin_path}): {e}"
    return model.eval().to(device)


@torch.no_grad()
def lpips_distance(model: LPIPS, pred: Tensor, gt: Tensor) -> float:
    """LPIPS of one image pair [H, W, 3] in [0, 1]."""
    dev = next(model.parameters()).device
    x = pred.clamp(0, 1).permute(2, 0, 1)[None].float().to(dev)
    y = gt.clamp(0, 1).permute(2, 0, 1)[None].float().to(dev)
    return float(model(x, y)[0])
