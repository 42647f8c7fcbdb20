"""Export: filter/appearance bake, sanitising, up-axis rotation, file formats (vs gsplat where it has
them), the export CLI and a run round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.cameras import Cameras, look_at
from skyfall.export import (
    Splats,
    bake,
    read_ply,
    read_ply_compressed,
    read_splat,
    read_spz,
    rotate_splats,
    sanitize,
    to_up_axis,
    write_ply,
    write_ply_compressed,
    write_splat,
    write_spz,
)
from skyfall.export.upaxis import Z_UP_TO_NEG_Y_UP, quat_multiply, rotmat_to_quat, sh_rotation_matrices
from skyfall.gaussians.appearance import AppearanceModel
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.render import render
from skyfall.render.sh import sh_to_rgb

C0 = 0.28209479177387814


def random_params(n: int = 500, degree: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g) * 5,
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.3 + 0.02),
        "opacities": torch.randn(n, generator=g) * 2,
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, k - 1, 3, generator=g) * 0.2,
        "app_features": torch.randn(n, 24, generator=g),
    }


def random_splats(n: int = 500, degree: int = 1, seed: int = 0) -> Splats:
    p = random_params(n, degree, seed)
    s, _ = sanitize(bake(p, torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.05))
    return s


def _rotmat(q: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


# ----------------------------------------------------------------------------- bake + sanitise


def test_bake_matches_filter_and_appearance_exactly():
    p = random_params(300)
    filt = torch.rand(300) * 0.1
    app = AppearanceModel(5, gaussian_dim=24)
    emb = app.image_embedding("mean").detach()
    s = bake(p, filt, appearance=app, embedding=emb)
    s_eff, a_eff = apply_3d_filter(p["scales"], p["opacities"], filt)
    np.testing.assert_allclose(np.exp(s.scales), s_eff.numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.alpha(), a_eff.numpy(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        sh = app(torch.cat([p["sh0"], p["shN"]], 1), p["app_features"], emb)
    np.testing.assert_allclose(s.sh, sh.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(s.quats, axis=1), 1.0, atol=1e-6)
    assert s.filter_3d is None
    # baking changes things: the unbaked scales differ where the filter is large
    assert np.abs(s.scales - p["scales"].numpy()).max() > 1e-3


def test_baked_splats_render_like_the_filtered_scene():
    p = random_params(200)
    filt = torch.rand(200) * 0.3
    c2w = look_at(torch.tensor([[0.0, -20.0, 12.0]]), torch.zeros(1, 3))
    k = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]], dtype=torch.float64)
    cam = Cameras(c2w, k, 64, 48)
    sh = torch.cat([p["sh0"], p["shN"]], 1)
    ref = render(
        p["means"],
        p["quats"],
        p["scales"],
        p["opacities"],
        sh,
        cam.viewmats,
        cam.Ks,
        64,
        48,
        sh_degree=1,
        filter_3d=filt,
        absgrad=False,
    ).colors
    s = bake(p, filt)
    out = render(
        *(torch.from_numpy(a) for a in (s.means, s.quats, s.scales, s.opacities, s.sh)),
        cam.viewmats,
        cam.Ks,
        64,
        48,
        sh_degree=1,
        absgrad=False,
    ).colors
    assert ref.max() > 0.2
    assert (ref - out).abs().max() < 2e-4


def test_bake_keeps_only_the_active_sh_degree():
    p = random_params(50, degree=3)
    assert bake(p, None, sh_degree=1).sh.shape == (50, 4, 3)
    assert bake(p, None).sh.shape == (50, 16, 3)


def test_one_nan_drops_one_row_not_the_file(tmp_path: Path):
    p = random_params(100)
    p["opacities"][7] = float("nan")
    p["means"][11, 2] = float("inf")
    p["quats"][13] = 0.0
    s, dropped = sanitize(bake(p, None))
    assert dropped == 3 and len(s) == 97
    write_ply(tmp_path / "a.ply", s)
    back = read_ply(tmp_path / "a.ply")
    assert len(back) == 97 and np.isfinite(back.opacities).all()


# ----------------------------------------------------------------------------- up axis


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_rotation_preserves_rendered_colour_and_geometry(degree: int):
    s = random_splats(200, degree)
    r = Z_UP_TO_NEG_Y_UP
    t = rotate_splats(s, r)
    np.testing.assert_allclose(t.means, s.means @ r.T, atol=1e-5)
    # rotmat(q') = R rotmat(q)
    np.testing.assert_allclose(
        _rotmat(t.quats.astype(np.float64)), r @ _rotmat(s.quats.astype(np.float64)), atol=1e-5
    )
    d = torch.nn.functional.normalize(torch.randn(200, 3, dtype=torch.float64), dim=-1)
    before = sh_to_rgb(degree, d, torch.from_numpy(s.sh).double())
    after = sh_to_rgb(degree, d @ torch.from_numpy(r).T, torch.from_numpy(t.sh).double())
    assert (before - after).abs().max() < 1e-5
    # up: ENU +z becomes -y
    np.testing.assert_allclose(r @ [0, 0, 1], [0, -1, 0])


def test_degree1_sh_rotation_equals_closed_form_rule():
    # closed-form degree-1 rule: a = (-c3, -c1, c2) rotates as a vector,
    # a' = R a, c'3 = -a'x, c'1 = -a'y, c'2 = a'z
    r = Z_UP_TO_NEG_Y_UP
    c = np.random.default_rng(0).normal(size=3)
    a = r @ np.array([-c[2], -c[0], c[1]])
    expected = np.array([-a[1], a[2], -a[0]])
    np.testing.assert_allclose(sh_rotation_matrices(r, 1)[0] @ c, expected, atol=1e-10)


def test_quaternion_of_rotation():
    q = rotmat_to_quat(Z_UP_TO_NEG_Y_UP)
    np.testing.assert_allclose(q, [math.cos(math.pi / 4), math.sin(math.pi / 4), 0, 0], atol=1e-12)
    np.testing.assert_allclose(quat_multiply(q, np.array([1.0, 0, 0, 0])), q)


def test_up_z_is_identity_and_bad_up_is_a_config_error():
    from skyfall.errors import ConfigError

    s = random_splats(20)
    assert to_up_axis(s, "z") is s
    with pytest.raises(ConfigError):
        to_up_axis(s, "x")


# ----------------------------------------------------------------------------- formats


def test_ply_round_trip_and_layout(tmp_path: Path):
    from plyfile import PlyData

    s = random_splats(300, degree=2)
    write_ply(tmp_path / "a.ply", s)
    names = [p.name for p in PlyData.read(str(tmp_path / "a.ply"))["vertex"].properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(names) == 9 + 24 + 8
    b = read_ply(tmp_path / "a.ply")
    for f in ("means", "quats", "scales", "opacities", "sh"):
        np.testing.assert_array_equal(getattr(b, f), getattr(s, f))


def _gsplat_export(s: Splats, fmt: str) -> bytes:
    exporter = pytest.importorskip("gsplat.exporter", reason="gsplat (optional) not installed")
    t = {k: torch.from_numpy(getattr(s, k).copy()) for k in ("means", "quats", "scales", "opacities", "sh")}
    return exporter.export_splats(
        t["means"], t["scales"], t["quats"], t["opacities"], t["sh"][:, :1], t["sh"][:, 1:], format=fmt
    )


def test_ply_values_equal_gsplat_exporter(tmp_path: Path):
    s = random_splats(400)
    (tmp_path / "g.ply").write_bytes(_gsplat_export(s, "ply"))
    write_ply(tmp_path / "a.ply", s)
    g, a = read_ply(tmp_path / "g.ply"), read_ply(tmp_path / "a.ply")
    for f in ("means", "quats", "scales", "opacities", "sh"):
        np.testing.assert_allclose(getattr(a, f), getattr(g, f), atol=1e-6)


def test_splat_records_equal_gsplat_exporter(tmp_path: Path):
    s = random_splats(400)
    (tmp_path / "g.splat").write_bytes(_gsplat_export(s, "splat"))
    write_splat(tmp_path / "a.splat", s)
    g, a = read_splat(tmp_path / "g.splat"), read_splat(tmp_path / "a.splat")
    assert len(a) == len(g) == 400
    key = lambda x: np.lexsort(x.means.T)  # noqa: E731  (orders differ: gsplat Morton, ours by size)
    ga, aa = g.subset(key(g)), a.subset(key(a))
    np.testing.assert_allclose(aa.means, ga.means)
    np.testing.assert_allclose(aa.scales, ga.scales, atol=1e-5)
    assert np.abs(aa.rgb() - ga.rgb()).max() <= 1.01 / 255
    assert np.abs(aa.alpha() - ga.alpha()).max() <= 1.01 / 255
    # our own decode is within the format's quantisation of the input
    ref = s.subset(key(s))
    assert np.abs(aa.rgb() - np.clip(ref.rgb(), 0, 1)).max() <= 0.51 / 255 + 1e-6
    assert np.abs(np.abs((aa.quats * ref.quats).sum(1)) - 1).max() < 1e-3


def test_compressed_ply_decodes_close_to_input_and_to_gsplat(tmp_path: Path):
    s = random_splats(1000)
    write_ply_compressed(tmp_path / "a.compressed.ply", s)
    a = read_ply_compressed(tmp_path / "a.compressed.ply")
    from scipy.spatial import cKDTree

    # rows are Morton-sorted: match each decoded splat to its input by nearest position
    idx = cKDTree(s.means).query(a.means)[1]
    ref = s.subset(idx)
    extent = float((s.means.max(0) - s.means.min(0)).max())
    assert np.abs(a.means - ref.means).max() < extent / 1023
    assert np.abs(a.scales - ref.scales).max() < 0.01
    assert np.abs(a.rgb() - ref.rgb()).max() < 0.01
    assert np.abs(a.alpha() - ref.alpha()).max() <= 0.51 / 255 + 1e-6
    assert np.abs((a.quats * ref.quats).sum(1)).min() > 0.999
    assert np.abs(a.sh[:, 1:] - ref.sh[:, 1:]).max() <= 4 / 255 + 1e-6
    (tmp_path / "g.compressed.ply").write_bytes(_gsplat_export(s, "ply_compressed"))
    g = read_ply_compressed(tmp_path / "g.compressed.ply")
    keep = s.alpha() > 1 / 255  # gsplat drops nearly transparent splats; we keep every splat
    assert len(g) == int(keep.sum()) and len(a) == len(s)
    dist, gi = cKDTree(g.means).query(a.means[keep[idx]])
    assert dist.max() < 2 * extent / 1023
    assert np.abs(g.rgb()[gi] - a.rgb()[keep[idx]]).max() < 0.02


def test_spz_round_trip(tmp_path: Path):
    s = random_splats(500)
    write_spz(tmp_path / "a.spz", s)
    b = read_spz(tmp_path / "a.spz")
    assert len(b) == 500
    assert np.abs(b.means - s.means).max() < 1e-3
    assert np.abs(b.scales - s.scales).max() <= 1 / 32 + 1e-6
    assert np.abs(b.alpha() - s.alpha()).max() <= 0.51 / 255 + 1e-6
    assert np.abs(b.rgb() - np.clip(s.rgb(), 0.5 - 127.5 * C0 / 38.25, 0.5 + 127.5 * C0 / 38.25)).max() < 0.01
    assert np.abs((b.quats * s.quats).sum(1)).min() > 0.99
    assert np.abs(b.sh[:, 1:] - s.sh[:, 1:]).max() < 0.05
    # header: magic, version 2, count, degree, antialiased flag
    import gzip
    import struct

    magic, version, n, deg, _fb, flags, _ = struct.unpack_from(
        "<IIIBBBB", gzip.decompress((tmp_path / "a.spz").read_bytes())
    )
    assert (magic, version, n, deg, flags) == (0x5053474E, 2, 500, 1, 1)


# ----------------------------------------------------------------------------- runs and CLI


def test_raw_ply_round_trips_the_checkpoint(tiny_run: Path, tmp_path: Path):
    from skyfall.export import export_run, load_run

    res = export_run(tiny_run, "raw-ply", up="z", out=tmp_path / "raw.ply")
    m = load_run(tiny_run).scene.model
    b = read_ply(res.path)
    assert b.filter_3d is not None
    np.testing.assert_array_equal(b.means, m.params["means"].detach().numpy())
    np.testing.assert_array_equal(b.filter_3d, m.filter_3d.numpy())
    np.testing.assert_array_equal(b.scales, m.params["scales"].detach().numpy())


def test_export_cli_writes_every_format(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from skyfall.cli import entrypoint

    for fmt, ext in [("ply", ".ply"), ("splat", ".splat"), ("ply-compressed", ".ply"), ("spz", ".spz")]:
        out = tmp_path / f"x_{fmt}{ext}"
        entrypoint(["export", str(tiny_run), "--format", fmt, "--out", str(out)])
        assert out.stat().st_size > 0 and "0 non-finite dropped" in capsys.readouterr().out
    n = len(read_ply(tmp_path / "x_ply.ply"))
    assert n == len(read_splat(tmp_path / "x_splat.splat")) == len(read_spz(tmp_path / "x_spz.spz"))
    assert n == len(read_ply_compressed(tmp_path / "x_ply-compressed.ply"))
    with pytest.raises(SystemExit) as e:
        entrypoint(["export", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_export_default_is_baked_and_y_up(tiny_run: Path):
    from skyfall.export import baked_splats, export_run, load_run

    res = export_run(tiny_run)
    assert res.path == tiny_run / "ply" / "export.ply" and res.up == "y" and res.embedding == "mean"
    f = read_ply(res.path)
    enu, _ = baked_splats(load_run(tiny_run))
    np.testing.assert_allclose(f.means, enu.means @ Z_UP_TO_NEG_Y_UP.T, atol=1e-4)
    assert f.filter_3d is None
    assert b"embedding=mean up=y baked" in res.path.read_bytes()[:400]
