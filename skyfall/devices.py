"""Choosing the torch device and the CPU thread count."""

from __future__ import annotations

import torch

from skyfall.errors import ConfigError


def resolve_device(device: str | None) -> torch.device:
    """A usable torch device: None or 'auto' = CUDA when available, else CPU.

    An explicit CUDA request without a GPU is a ConfigError (rather than a crash at the first tensor).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but no CUDA GPU is available (torch.cuda.is_available() is False)"
        )
    return dev
