"""skyfall's own kernels: a torch reference for each op plus an optional fused CUDA extension.

``ssim`` dispatches to the fused kernel (``cuda_ext/csrc``) for CUDA tensors when the extension
loads, and to the torch reference otherwise. ``extension_status()`` reports which one is active.
"""

from __future__ import annotations

from skyfall.kernels._backend import extension_status
from skyfall.kernels.ops import ssim

__all__ = ["extension_status", "ssim"]
