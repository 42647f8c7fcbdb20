"""skyfall: satellite images of a city tile -> explorable, photorealistic 3D Gaussian splats.

A reimplementation of Skyfall-GS (ECCV 2026). The public API is small and flat; heavy modules
(torch, gsplat, diffusers) are imported only when a name that needs them is first used, so
``import skyfall`` and ``skyfall --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "Cameras": "skyfall.data.cameras",
    "Tile": "skyfall.data.tile",
    "load_tile": "skyfall.data.tile",
    "render": "skyfall.render",
    "RenderOutput": "skyfall.render",
    "TileFormatError": "skyfall.errors",
    "SkyfallError": "skyfall.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skyfall' has no attribute {name!r}")
