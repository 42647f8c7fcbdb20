"""Real monocular depth models behind :class:`skyfall.priors.depth.DepthEstimator`.

* :class:`MoGeDepth`: MoGe (the reference's prior; v1 ``Ruicheng/moge-vitl``, v2 selectable). MoGe is not
  on PyPI, so the ``moge`` package is imported lazily and its absence is one error with the install
  command. Depth is recovered with the known horizontal FoV, as the reference does.
* :class:`DepthAnythingDepth`: Depth Anything V2 *metric* (outdoor) through transformers, installable
  from PyPI alone. A metric head outputs depth; relative checkpoints output disparity, which is not
  affinely related to depth (1/disparity is undefined up to an unknown shift), so they are refused.

Both load from a Hub id (through the Hugging Face cache) or a local path, honour
``local_files_only``, and turn missing weights into one :class:`skyfall.priors.hub.WeightsNotFoundError`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from skyfall.config.priors import DEPTH_ANYTHING_METRIC_OUTDOOR, MOGE_V1, MOGE_V2, DepthModelConfig
from skyfall.devices import resolve_device
from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.priors.depth import DepthEstimator, DepthPrediction
from skyfall.priors.flux import torch_dtype
from skyfall.priors.hub import load_weights, resolve_file, transformers_dtype_kwargs

MOGE_INSTALL = 'pip install "git+https://github.com/microsoft/MoGe.git"'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(depth: Tensor, valid: Tensor) -> DepthPrediction:
    """Validity = the model's mask AND finite, positive depth; invalid depth set to 0 (never inf/NaN)."""
    depth = depth.float()
    valid = valid.bool() & torch.isfinite(depth) & (depth > 0)
    return DepthPrediction(depth=torch.where(valid, depth, torch.zeros_like(depth)), valid=valid)


def _import_moge(version: int) -> type:
    """MoGeModel class of the requested generation (upstream layout, or the v1-only fork's)."""
    try:
        if version == 2:
            from moge.model.v2 import MoGeModel
        else:
            try:
                from moge.model.v1 import MoGeModel
            except ImportError:  # the Skyfall-GS fork (jayin92/MoGe) exposes v1 as moge.model.MoGeModel
                from moge.model import MoGeModel
    except ImportError as e:
        raise MissingDependencyError(
            f"the 'moge' depth estimator needs the MoGe package (not on PyPI): {MOGE_INSTALL} "
            f"(or use --stage1.pseudo.estimator depth-anything) [{e}]"
        ) from e
    return MoGeModel


class MoGeDepth:
    """MoGe v1/v2: ``infer(image, fov_x=...)`` per batch; depth is +inf where MoGe's mask is off.

    Args:
        model: Hub id, a local folder holding ``model.pt``, or the ``model.pt`` file; None = the
            version's default (v1 ``Ruicheng/moge-vitl``, v2 ``Ruicheng/moge-2-vitl``).
        version: 1 (the reference) or 2 (metric scale; a deviation).
        local_files_only: do not contact the Hub.
        cache_dir: Hugging Face cache folder (None = HF_HOME / HF_HUB_CACHE default).
        device: None = cuda when available.
        dtype: 'float16' runs MoGe's fp16 path where it has one; else float32.
        resolution_level: MoGe's 0..9 inference resolution (9 = the reference's).
    """

    needs_pose = False

    def __init__(
        self,
        model: str | None = None,
        *,
        version: int = 1,
        local_files_only: bool = False,
        cache_dir: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        resolution_level: int = 9,
    ):
        if version not in (1, 2):
            raise ConfigError(f"moge_version: {version!r} must be 1 or 2")
        cls = _import_moge(version)
        model = model or (MOGE_V1 if version == 1 else MOGE_V2)
        path = resolve_file(
            model, "model.pt", f"MoGe v{version}", local_files_only=local_files_only, cache_dir=cache_dir
        )
        self.device = resolve_device(device)
        self.fp16 = torch_dtype(dtype) == torch.float16
        self.model = cls.from_pretrained(str(path)).to(self.device).eval()
        self.resolution_level = resolution_level
        params = inspect.signature(self.model.infer).parameters
        self._extra = {"use_fp16": self.fp16} if "use_fp16" in params else {}

    @torch.no_grad()
    def __call__(self, images: Tensor, fov_x_deg: float, cameras: object = None) -> DepthPrediction:
        """Images [B, 3, H, W] in [0, 1] -> depth [B, H, W] (0 where invalid) and validity."""
        # [FIX] clamp: the reference converts unclamped renders to uint8, so values > 1 wrap around
        x = images.to(self.device, torch.float32).clamp(0.0, 1.0)
        out = self.model.infer(
            x, fov_x=float(fov_x_deg), resolution_level=self.resolution_level, force_projection=True,
            apply_mask=True, **self._extra,
        )  # fmt: skip
        depth = out["depth"].reshape(images.shape[0], *images.shape[-2:])
        mask = out.get("mask", torch.ones_like(depth, dtype=torch.bool)).reshape(depth.shape)
        res = _finish(depth, mask)
        return DepthPrediction(res.depth.to(images.device), res.valid.to(images.device))


def dpt_resize_shape(h: int, w: int, target: int, multiple: int = 14) -> tuple[int, int]:
    """Input size of the Depth Anything processor (DPT rule, keep_aspect_ratio, ensure_multiple_of).

    Of the two scale factors target/h and target/w, the one closer to 1 ("scale as little as possible")
    scales both sides, and each side is rounded to the nearest multiple of ``multiple`` (at least one).
    """
    sh, sw = target / h, target / w
    s = sw if abs(1 - sw) < abs(1 - sh) else sh

    def constrain(v: float) -> int:
        return max(multiple, round(v / multiple) * multiple)

    return constrain(s * h), constrain(s * w)


class DepthAnythingDepth:
    """Depth Anything V2 (metric head) via ``AutoModelForDepthEstimation``; preprocessing done in torch.

    Args:
        model: Hub id or local folder; None = ``depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf``.
        local_files_only: do not contact the Hub.
        cache_dir: Hugging Face cache folder (None = HF_HOME / HF_HUB_CACHE default).
        device: None = cuda when available.
        dtype: weights/compute dtype.
        input_size: the processor's target side (518 for Depth Anything V2).
    """

    needs_pose = False

    def __init__(
        self,
        model: str | None = None,
        *,
        local_files_only: bool = False,
        cache_dir: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        input_size: int = 518,
    ):
        try:
            from transformers import AutoModelForDepthEstimation
        except ImportError as e:
            raise MissingDependencyError(
                f"the 'depth-anything' depth estimator needs transformers: pip install 'skyfall[depth]' [{e}]"
            ) from e
        model = model or DEPTH_ANYTHING_METRIC_OUTDOOR
        self.device, self.dtype = resolve_device(device), torch_dtype(dtype)
        net = load_weights(
            lambda: AutoModelForDepthEstimation.from_pretrained(
                model, local_files_only=local_files_only, cache_dir=cache_dir,
                **transformers_dtype_kwargs(self.dtype),
            ),  # fmt: skip
            model, "Depth Anything", local_files_only=local_files_only, cache_dir=cache_dir,
        )  # fmt: skip
        self._setup(net, model, input_size)

    @classmethod
    def from_module(
        cls, net: torch.nn.Module, *, device: str | None = None, dtype: str = "float32", input_size: int = 518
    ) -> DepthAnythingDepth:
        """Wrap an already built ``DepthAnythingForDepthEstimation`` (benchmarks with random weights)."""
        self = cls.__new__(cls)
        self.device, self.dtype = resolve_device(device), torch_dtype(dtype)
        self._setup(net.to(self.dtype), "<module>", input_size)
        return self

    def _setup(self, net: torch.nn.Module, model: str, input_size: int) -> None:
        kind = getattr(net.config, "depth_estimation_type", "relative")
        if kind != "metric":
            raise ConfigError(
                f"depth-anything model {model!r} has a {kind!r} head: it predicts disparity, not depth, which the "
                "Pearson depth loss cannot use; pick a Metric checkpoint, e.g. "
                + DEPTH_ANYTHING_METRIC_OUTDOOR
            )
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.input_size = input_size
        self.patch = int(getattr(net.config, "patch_size", 14))
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: Tensor, fov_x_deg: float, cameras: object = None) -> DepthPrediction:
        """Images [B, 3, H, W] in [0, 1] -> metric depth [B, H, W] (FoV unused: the metric head infers scale)."""
        h, w = images.shape[-2:]
        x = images.to(self.device, torch.float32).clamp(0.0, 1.0)
        size = dpt_resize_shape(h, w, self.input_size, self.patch)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        x = ((x - self._mean) / self._std).to(self.dtype)
        pred = self.model(pixel_values=x).predicted_depth.float()  # [B, h', w']
        depth = F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        res = _finish(depth, torch.ones_like(depth, dtype=torch.bool))
        return DepthPrediction(res.depth.to(images.device), res.valid.to(images.device))


# Registry factories (skyfall.registry.DEPTH_ESTIMATORS): (DepthModelConfig, tile folder) -> estimator.


def build_moge(config: DepthModelConfig, tile_dir: str | Path | None) -> DepthEstimator:
    """Registry factory of ``moge``."""
    return MoGeDepth(config.model, version=config.moge_version, **_hub_options(config))


def build_depth_anything(config: DepthModelConfig, tile_dir: str | Path | None) -> DepthEstimator:
    """Registry factory of ``depth-anything``."""
    return DepthAnythingDepth(config.model, **_hub_options(config))


def _hub_options(config: DepthModelConfig) -> dict[str, Any]:
    return dict(
        local_files_only=config.local_files_only,
        cache_dir=config.cache_dir,
        device=config.device,
        dtype=config.dtype,
    )
