"""The degree-0 spherical-harmonic constant and the band-0 (DC) <-> RGB conversions.

Inria 3DGS / gsplat convention: a Gaussian's view-independent colour is ``0.5 + SH_C0 * sh0``. This
module is the single definition for every layer that stores or decodes band 0 (initialisation, the
appearance model, the renderer's SH evaluation, the exporters).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from torch import Tensor

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical-harmonic constant ``1 / (2 sqrt(pi))``."""

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


def rgb_to_sh0(rgb: ArrayT) -> ArrayT:
    """Band-0 SH coefficients whose colour is ``rgb`` (numpy or torch, any shape, dtype kept)."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: ArrayT) -> ArrayT:
    """View-independent colour ``0.5 + SH_C0 * sh0`` (unclamped), as viewers decode band 0."""
    return 0.5 + SH_C0 * sh0
