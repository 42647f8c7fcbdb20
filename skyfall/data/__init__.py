"""Input data: camera convention (``cameras``), tile loading (``tile``, ``colmap``), camera paths.

``load_tile``, ``Tile`` and ``Split`` are re-exported lazily so that ``import skyfall.data`` stays
cheap (no Pillow/numpy work until a tile is actually loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyfall.data.tile import Split, Tile, load_tile

__all__ = ["Split", "Tile", "load_tile"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from skyfall.data import tile

        return getattr(tile, name)
    raise AttributeError(f"module 'skyfall.data' has no attribute {name!r}")
