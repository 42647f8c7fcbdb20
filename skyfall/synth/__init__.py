"""Procedural synthetic city tiles with exact ground truth: the project's embedded default data.

``write_synthetic_tile`` writes a tile in the reference format (plus ``gt/``); ``SyntheticCity``
renders the same city from any pinhole camera. Names are imported lazily (PEP 562) so that importing
``skyfall.synth`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyfall.synth.city import SyntheticCity
    from skyfall.synth.writer import PRESETS, write_synthetic_tile

__all__ = ["PRESETS", "SyntheticCity", "write_synthetic_tile"]

_WHERE = {"SyntheticCity": "skyfall.synth.city", "write_synthetic_tile": "skyfall.synth.writer",
          "PRESETS": "skyfall.synth.writer"}  # fmt: skip


def __getattr__(name: str):  # noqa: ANN202
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'skyfall.synth' has no attribute {name!r}")
