"""PLY files: the one binary PLY writer, and the raw training PLY (Inria 3DGS layout plus ``filter_3D``).

`write_ply_elements` is the only place that writes PLY (through plyfile); the raw training PLY here
and the viewer exports in `skyfall.export.formats` (Inria and PlayCanvas compressed PLY) all use it.

The raw training PLY is what Skyfall-GS's ``GaussianModel.save_ply`` writes: binary little endian, one ``vertex`` element of float32 properties in this order::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3 [filter_3D]

Values are the raw parameters (log scales, opacity logits, unnormalised wxyz quaternions, normals 0).
``f_rest`` is channel-major: all red coefficients of bands 1..K-1, then green, then blue, i.e.
``shN`` [N, K-1, 3] transposed to [N, 3, K-1] before flattening (as Inria's ``save_ply`` and gsplat's
``export_splats`` do).

This file is *not* viewer-ready (no 3D filter baked in, appearance not applied); the exporter writes
the fused form. ``app_features`` are not stored here (checkpoints hold them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from torch import Tensor

from skyfall.errors import SkyfallError
from skyfall.storage.atomic import atomic_write


class PlyFormatError(SkyfallError):
    """A PLY file lacks a property (or element) the Gaussian layout needs."""


def raw_ply_property_names(num_rest: int, with_filter: bool) -> list[str]:
    """Property names in file order for ``num_rest`` = 3(K-1) ``f_rest`` values."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(num_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    if with_filter:
        names.append("filter_3D")
    return names


def write_ply_elements(
    path: str | Path, elements: Sequence[tuple[str, np.ndarray, Sequence[str]]], comments: Sequence[str] = ()
) -> Path:
    """Write a binary little-endian PLY atomically, one element per ``(name, table, properties)``.

    Args:
        path: output file.
        elements: in file order; ``table`` is [count, P] of one numeric dtype (float32 -> ``float``,
            uint32 -> ``uint``, uint8 -> ``uchar``) and ``properties`` its P column names in order.
        comments: header ``comment`` lines (no newlines).

    Returns:
        The path written.

    The rows are written as one contiguous block per element (a structured view of the table, no
    per-row Python), so 1M splats take about as long as the disk write.
    """
    ply_elements = []
    for name, table, props in elements:
        dtype = np.dtype(table.dtype).newbyteorder("<")
        table = np.ascontiguousarray(table, dtype=dtype)
        if table.ndim != 2 or table.shape[1] != len(props):
            raise ValueError(
                f"PLY element {name!r}: table {table.shape} does not match {len(props)} properties"
            )
        rows = table.view(np.dtype([(p, dtype) for p in props])).reshape(table.shape[0])
        ply_elements.append(PlyElement.describe(rows, name))
    ply = PlyData(ply_elements, text=False, byte_order="<", comments=list(comments))
    with atomic_write(path) as f:
        ply.write(f)
    return Path(path)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def write_raw_ply(path: str | Path, params: dict[str, Tensor], filter_3d: Tensor | None) -> Path:
    """Write Gaussian parameters (gsplat names) as a raw Inria PLY, atomically.

    Args:
        path: output file.
        params: ``means`` [N,3], ``sh0`` [N,1,3], ``shN`` [N,K-1,3], ``opacities`` [N], ``scales`` [N,3],
            ``quats`` [N,4]; other keys are ignored.
        filter_3d: [N] 3D filter (appended as ``filter_3D``), or None to omit the property.

    Returns:
        The path written.
    """
    means = _np(params["means"])
    n = means.shape[0]
    f_dc = _np(params["sh0"]).reshape(n, 3)
    f_rest = _np(params["shN"].transpose(1, 2)).reshape(n, -1)  # channel-major
    columns = [
        means,
        np.zeros((n, 3), np.float32),
        f_dc,
        f_rest,
        _np(params["opacities"]).reshape(n, 1),
        _np(params["scales"]).reshape(n, 3),
        _np(params["quats"]).reshape(n, 4),
    ]
    if filter_3d is not None:
        columns.append(_np(filter_3d).reshape(n, 1))
    names = raw_ply_property_names(f_rest.shape[1], filter_3d is not None)
    return write_ply_elements(path, [("vertex", np.concatenate(columns, axis=1).astype("<f4"), names)])


def _indexed(names: list[str], prefix: str) -> list[str]:
    found = [p for p in names if p.startswith(prefix) and p[len(prefix) :].isdigit()]
    return sorted(found, key=lambda p: int(p[len(prefix) :]))


def read_ply(path: str | Path) -> tuple[dict[str, Tensor], Tensor | None]:
    """Read an Inria-layout PLY (raw or fused) back into gsplat-named float32 tensors.

    Properties are found by name, so files without ``nx ny nz`` (gsplat's writer) also load.

    Returns:
        ``(params, filter_3d)``: params with ``means, sh0, shN, opacities, scales, quats`` and the [N]
        ``filter_3D`` column, or None when the file has none.
    """
    path = Path(path)
    ply = PlyData.read(str(path))
    if "vertex" not in ply:
        raise PlyFormatError(f"{path}: no 'vertex' element")
    v = ply["vertex"]
    names = [p.name for p in v.properties]

    def cols(props: list[str]) -> Tensor:
        missing = [p for p in props if p not in names]
        if missing:
            raise PlyFormatError(f"{path}: missing vertex properties {missing}")
        return torch.from_numpy(np.stack([np.asarray(v[p], dtype=np.float32) for p in props], axis=1))

    n = v.count
    rest = _indexed(names, "f_rest_")
    if len(rest) % 3 != 0:
        raise PlyFormatError(f"{path}: {len(rest)} f_rest properties, not a multiple of 3")
    k1 = len(rest) // 3
    params = {
        "means": cols(["x", "y", "z"]),
        "sh0": cols(["f_dc_0", "f_dc_1", "f_dc_2"]).reshape(n, 1, 3),
        "shN": (cols(rest) if rest else torch.zeros(n, 0)).reshape(n, 3, k1).transpose(1, 2).contiguous(),
        "opacities": cols(["opacity"])[:, 0].contiguous(),
        "scales": cols(["scale_0", "scale_1", "scale_2"]),
        "quats": cols(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }
    filter_3d = cols(["filter_3D"])[:, 0].contiguous() if "filter_3D" in names else None
    return params, filter_3d
