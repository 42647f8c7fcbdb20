"""Raw Inria PLY: exact round trip, property names and order, channel-major f_rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from skyfall.storage.ply import PlyFormatError, raw_ply_property_names, read_ply, write_raw_ply


def _params(n: int, deg: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g) * 300,
        "scales": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, (deg + 1) ** 2 - 1, 3, generator=g),
    }


@pytest.mark.parametrize("deg", [0, 1, 3])
@pytest.mark.parametrize("with_filter", [True, False])
def test_round_trip_is_exact(tmp_path: Path, deg: int, with_filter: bool):
    p = _params(50, deg)
    f3d = torch.rand(50) * 0.1 if with_filter else None
    path = write_raw_ply(
        tmp_path / "sub" / "point_cloud.ply", {**p, "app_features": torch.zeros(50, 24)}, f3d
    )
    q, f = read_ply(path)
    assert set(q) == set(p)
    for k in p:
        assert q[k].dtype == torch.float32 and q[k].shape == p[k].shape, k
        assert torch.equal(q[k], p[k]), k
    if with_filter:
        assert torch.equal(f, f3d)
    else:
        assert f is None
    assert [x.name for x in tmp_path.joinpath("sub").iterdir()] == ["point_cloud.ply"]


def test_property_names_order_and_binary_little_endian(tmp_path: Path):
    n = 7
    path = write_raw_ply(tmp_path / "a.ply", _params(n, 1), torch.zeros(n))
    ply = PlyData.read(str(path))
    assert not ply.text and ply.byte_order == "<"
    assert [e.name for e in ply.elements] == ["vertex"] and ply["vertex"].count == n
    names = [p.name for p in ply["vertex"].properties]
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    expected += [f"f_rest_{i}" for i in range(9)]
    expected += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "filter_3D"]
    assert names == expected == raw_ply_property_names(9, True)
    assert all(p.val_dtype in ("f4", "float32", "float") for p in ply["vertex"].properties)
    assert not np.asarray(ply["vertex"]["nx"]).any()
    with open(path, "rb") as fh:
        head = fh.read(4096)
    assert b"format binary_little_endian 1.0" in head
    body = path.stat().st_size - (head.index(b"end_header\n") + len(b"end_header\n"))
    assert body == n * len(expected) * 4  # 27 float32 per splat


def test_f_rest_is_channel_major(tmp_path: Path):
    p = _params(2, 1)
    # shN[i, band, channel] = 100 i + 10 channel + band
    band = torch.arange(3.0)[None, :, None]
    channel = torch.arange(3.0)[None, None, :]
    p["shN"] = 100 * torch.arange(2.0)[:, None, None] + 10 * channel + band
    p["sh0"] = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])
    v = PlyData.read(str(write_raw_ply(tmp_path / "a.ply", p, None)))["vertex"]
    rest = [float(v[f"f_rest_{j}"][1]) for j in range(9)]
    assert rest == [100.0, 101.0, 102.0, 110.0, 111.0, 112.0, 120.0, 121.0, 122.0]  # R1 R2 R3 G1 .. B3
    assert [float(v[f"f_dc_{c}"][0]) for c in range(3)] == [1.0, 2.0, 3.0]
    assert torch.equal(read_ply(tmp_path / "a.ply")[0]["shN"], p["shN"])


def test_reads_files_without_normals_and_reports_missing_properties(tmp_path: Path):
    n = 3
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    names += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    table = np.arange(n * len(names), dtype="<f4").reshape(n, len(names))
    vertex = table.view(np.dtype([(k, "<f4") for k in names])).reshape(n)
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "g.ply"))
    q, f = read_ply(tmp_path / "g.ply")
    assert f is None and q["shN"].shape == (n, 0, 3)
    torch.testing.assert_close(q["opacities"], torch.from_numpy(table[:, 6].copy()))
    torch.testing.assert_close(q["quats"], torch.from_numpy(table[:, 10:14].copy()))

    bad = table[:, :6].copy().view(np.dtype([(k, "<f4") for k in names[:6]])).reshape(n)
    PlyData([PlyElement.describe(bad, "vertex")]).write(str(tmp_path / "bad.ply"))
    with pytest.raises(PlyFormatError, match=r"bad\.ply.*opacity"):
        read_ply(tmp_path / "bad.ply")
