"""`skyfall prepare` building blocks without real data: geodesy, RPC readers, pinhole fit, input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skyfall.data.cameras import look_at
from skyfall.prepare import ENUFrame, RPCModel, fit_pinhole
from skyfall.prepare.pinhole import project_pinhole
from skyfall.prepare.raster import ImageReadError, read_satellite_image
from skyfall.prepare.rpc import RPCError, read_rpc_file, rpc_from_array, rpc_from_nitf


def test_enu_round_trip_and_axes() -> None:
    frame = ENUFrame(31.13, 29.97, 50.0)
    rng = np.random.default_rng(0)
    enu = rng.uniform(-500, 500, size=(100, 3))
    lon, lat, h = frame.to_geodetic(enu)
    assert np.abs(frame.from_geodetic(lon, lat, h) - enu).max() < 1e-6
    # 0.001 deg north is ~110.9 m along +y at this latitude, nothing along x.
    p = frame.from_geodetic(np.array(31.13), np.array(29.971), np.array(50.0))
    assert abs(p[0]) < 1e-6 and 110.0 < p[1] < 111.5 and abs(p[2]) < 0.01
    up = frame.from_geodetic(np.array(31.13), np.array(29.97), np.array(80.0))
    assert np.allclose(up, [0, 0, 30.0], atol=1e-6)


def _toy_rpc() -> RPCModel:
    """A made-up but well-conditioned RPC: mostly linear with small cubic and rational terms."""
    rng = np.random.default_rng(1)
    samp_num = np.r_[0.01, 1.0, -0.1, 0.05, rng.normal(0, 1e-4, 16)]
    line_num = np.r_[-0.02, 0.05, -1.0, 0.2, rng.normal(0, 1e-4, 16)]
    den = np.r_[1.0, rng.normal(0, 1e-4, 19)]
    return RPCModel(line_num, den, samp_num, den.copy(), 31.13, 0.05, 29.97, 0.04, 100.0, 200.0,
                    5000.0, 5000.0, 6000.0, 6000.0)  # fmt: skip


def test_rpc_localize_inverts_project() -> None:
    rpc = _toy_rpc()
    lon = np.array([31.11, 31.13, 31.16])
    lat = np.array([29.95, 29.97, 29.99])
    h = np.array([0.0, 100.0, 250.0])
    col, row = rpc.project(lon, lat, h)
    lon2, lat2 = rpc.localize(col, row, h)
    assert np.abs(lon2 - lon).max() < 1e-10 and np.abs(lat2 - lat).max() < 1e-10
    c2, r2 = rpc.shifted(1.5, -2.0).project(lon, lat, h)
    assert np.allclose(c2 - col, 1.5) and np.allclose(r2 - row, -2.0)


def _write_formats(rpc: RPCModel, d: Path) -> dict[str, Path]:
    names = {"line_num": "line_num", "line_den": "line_den", "samp_num": "samp_num", "samp_den": "samp_den"}
    geom = ["type: ossimRpcModel", "polynomial_format: B"]
    scal = {"long_off": rpc.lon_off, "long_scale": rpc.lon_scale, "lat_off": rpc.lat_off,
            "lat_scale": rpc.lat_scale, "height_off": rpc.h_off, "height_scale": rpc.h_scale,
            "line_off": rpc.line_off, "line_scale": rpc.line_scale, "samp_off": rpc.samp_off,
            "samp_scale": rpc.samp_scale}  # fmt: skip
    geom += [f"{k}: {float(v)!r}" for k, v in scal.items()]
    for key in names:
        geom += [f"{key}_coeff_{i:02d}: {float(c)!r}" for i, c in enumerate(getattr(rpc, key))]
    (d / "a.geom").write_text("\n".join(geom))
    rpb = [f"{k} = {float(v)!r};" for k, v in {
        "lineOffset": rpc.line_off, "sampOffset": rpc.samp_off, "latOffset": rpc.lat_off,
        "longOffset": rpc.lon_off, "heightOffset": rpc.h_off, "lineScale": rpc.line_scale,
        "sampScale": rpc.samp_scale, "latScale": rpc.lat_scale, "longScale": rpc.lon_scale,
        "heightScale": rpc.h_scale}.items()]  # fmt: skip
    for key, name in (("line_num", "lineNumCoef"), ("line_den", "lineDenCoef"),
                      ("samp_num", "sampNumCoef"), ("samp_den", "sampDenCoef")):  # fmt: skip
        rpb.append(f"{name} = (\n" + ",\n".join(repr(float(c)) for c in getattr(rpc, key)) + ");")
    (d / "a.RPB").write_text("BEGIN_GROUP = IMAGE\n" + "\n".join(rpb) + "\nEND_GROUP = IMAGE\nEND;")
    # DIMAP: 1-based pixel offsets.
    xml = ["<Dimap_Document><Rational_Function_Model><Global_RFM><Inverse_Model>"]
    for key, stem in (("line_num", "LINE_NUM_COEFF"), ("line_den", "LINE_DEN_COEFF"),
                      ("samp_num", "SAMP_NUM_COEFF"), ("samp_den", "SAMP_DEN_COEFF")):  # fmt: skip
        xml += [f"<{stem}_{i + 1}>{float(c)!r}</{stem}_{i + 1}>" for i, c in enumerate(getattr(rpc, key))]
    xml.append("</Inverse_Model><RFM_Validity>")
    for tag, v in (("LONG_OFF", rpc.lon_off), ("LONG_SCALE", rpc.lon_scale), ("LAT_OFF", rpc.lat_off),
                   ("LAT_SCALE", rpc.lat_scale), ("HEIGHT_OFF", rpc.h_off), ("HEIGHT_SCALE", rpc.h_scale),
                   ("LINE_OFF", rpc.line_off + 1), ("LINE_SCALE", rpc.line_scale),
                   ("SAMP_OFF", rpc.samp_off + 1), ("SAMP_SCALE", rpc.samp_scale)):  # fmt: skip
        xml.append(f"<{tag}>{float(v)!r}</{tag}>")
    xml.append("</RFM_Validity></Global_RFM></Rational_Function_Model></Dimap_Document>")
    (d / "RPC_a.XML").write_text("".join(xml))
    (d / "a.json").write_text(json.dumps({"rpc": {
        "row_offset": rpc.line_off, "col_offset": rpc.samp_off, "lat_offset": rpc.lat_off,
        "lon_offset": rpc.lon_off, "alt_offset": rpc.h_off, "row_scale": rpc.line_scale,
        "col_scale": rpc.samp_scale, "lat_scale": rpc.lat_scale, "lon_scale": rpc.lon_scale,
        "alt_scale": rpc.h_scale, "row_num": rpc.line_num.tolist(), "row_den": rpc.line_den.tolist(),
        "col_num": rpc.samp_num.tolist(), "col_den": rpc.samp_den.tolist()}}))  # fmt: skip
    return {"geom": d / "a.geom", "rpb": d / "a.RPB", "dimap": d / "RPC_a.XML", "json": d / "a.json"}


def _tag_values(rpc: RPCModel) -> np.ndarray:
    return np.r_[0.0, 0.0, rpc.line_off, rpc.samp_off, rpc.lat_off, rpc.lon_off, rpc.h_off, rpc.line_scale,
                 rpc.samp_scale, rpc.lat_scale, rpc.lon_scale, rpc.h_scale, rpc.line_num, rpc.line_den,
                 rpc.samp_num, rpc.samp_den]  # fmt: skip


def _nitf_tre(rpc: RPCModel) -> bytes:
    head = ("1" + "0000.00" * 2 + f"{rpc.line_off:06.0f}{rpc.samp_off:05.0f}{rpc.lat_off:+08.4f}"
            f"{rpc.lon_off:+09.4f}{rpc.h_off:+05.0f}{rpc.line_scale:06.0f}{rpc.samp_scale:05.0f}"
            f"{rpc.lat_scale:+08.4f}{rpc.lon_scale:+09.4f}{rpc.h_scale:+05.0f}")  # fmt: skip
    coeffs = "".join(f"{c:+.6E}".replace("E-0", "E-").replace("E+0", "E+") for key in
                     ("line_num", "line_den", "samp_num", "samp_den") for c in getattr(rpc, key))  # fmt: skip
    body = head + coeffs
    return b"NITF02.10....RPC00B" + f"{len(body):05d}".encode() + body.encode()


def test_rpc_readers_agree(tmp_path: Path) -> None:
    rpc = _toy_rpc()
    files = _write_formats(rpc, tmp_path)
    lon, lat, h = np.array([31.12, 31.14]), np.array([29.96, 29.98]), np.array([20.0, 180.0])
    want = np.stack(rpc.project(lon, lat, h))
    for kind, f in files.items():
        got = np.stack(read_rpc_file(f).project(lon, lat, h))
        assert np.abs(got - want).max() < 1e-9, kind
    got = np.stack(rpc_from_array(_tag_values(rpc), "x.tif").project(lon, lat, h))
    assert np.abs(got - want).max() < 1e-9
    nitf = rpc_from_nitf(_nitf_tre(rpc), "x.ntf")
    assert nitf is not None
    # RPC00B stores 7 significant digits and rounded offsets/scales: agree to a small fraction of a pixel.
    assert np.abs(np.stack(nitf.project(lon, lat, h)) - want).max() < 0.05
    assert rpc_from_nitf(b"NITF02.10 no tre here", "y.ntf") is None


def test_rpc_reader_names_missing_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.geom"
    f.write_text("type: ossimRpcModel\nline_off: 10\n")
    with pytest.raises(RPCError, match=r"bad\.geom \[samp_off\]|bad\.geom \[long_off\]"):
        read_rpc_file(f)


def test_fit_pinhole_recovers_exact_camera() -> None:
    # A satellite-like pinhole: 700 km away, 30 deg off nadir, off-image principal point.
    k = np.array([[1.4e6, 0.0, -2.0e5], [0.0, 1.45e6, 3.0e4], [0.0, 0.0, 1.0]])
    centre = np.array([3.0e5, -2.0e5, 6.5e5])
    c2w = look_at(torch.from_numpy(centre), torch.zeros(3)).numpy()
    g = np.linspace(-150, 150, 7)
    xyz = np.stack(np.meshgrid(g, g, np.linspace(0, 100, 4), indexing="ij"), -1).reshape(-1, 3)
    uv = project_pinhole(k, c2w, xyz)
    fit = fit_pinhole(xyz, uv)
    assert fit.max_px < 1e-4 and abs(fit.skew) < 1e-6
    test = np.random.default_rng(0).uniform([-150, -150, 0], [150, 150, 100], size=(200, 3))
    assert np.abs(fit.project(test) - project_pinhole(k, c2w, test)).max() < 1e-4


def test_image_without_rpc_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "plain.png"
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(f)
    with pytest.raises(RPCError, match=r"plain\.png.*no RPC camera model"):
        read_satellite_image(f)


def test_unreadable_image_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.tif"
    f.write_bytes(b"II*\x00garbage" * 10)
    (tmp_path / "broken.geom").write_text("type: ossimRpcModel\n")
    with pytest.raises(ImageReadError, match=r"broken\.tif.*cannot be decoded"):
        read_satellite_image(f)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_satellite_image(tmp_path / "missing.tif")


def test_cli_prepare_bad_input_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "plain.png"
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(f)
    proc = subprocess.run(
        [sys.executable, "-m", "skyfall", "prepare", str(f), "--out", str(tmp_path / "t"), "--aoi", "31,29,100"],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no RPC camera model" in lines[0]
