"""`skyfall view` helpers: splats from any file type, covariances for viser, a served scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.export import bake, sanitize, write_ply, write_ply_compressed, write_splat, write_spz
from skyfall.export.viewer import covariances, load_splats_any


def _splats(n: int = 64):
    g = torch.Generator().manual_seed(1)
    p = {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.2 + 0.05),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.3,
        "shN": torch.zeros(n, 3, 3),
    }
    return sanitize(bake(p, None))[0]


def test_covariances_are_r_s2_rt():
    s = _splats(8)
    cov = covariances(s)
    w, x, y, z = s.quats[0].astype(np.float64)
    r = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    np.testing.assert_allclose(
        cov[0], r @ np.diag(np.exp(2 * s.scales[0].astype(np.float64))) @ r.T, atol=1e-7
    )
    assert np.all(np.linalg.eigvalsh(cov) > 0)


@pytest.mark.parametrize("ext", [".ply", ".compressed.ply", ".splat", ".spz"])
def test_any_file_type_loads_with_y_down_up(tmp_path: Path, ext: str):
    s = _splats()
    writer = {
        ".ply": write_ply,
        ".compressed.ply": write_ply_compressed,
        ".splat": write_splat,
        ".spz": write_spz,
    }
    writer[ext](tmp_path / f"a{ext}", s)
    got, up = load_splats_any(tmp_path / f"a{ext}")
    assert up == "-y" and len(got) == len(s)
    # positions survive every format to within its quantisation (rows may be reordered)
    from scipy.spatial import cKDTree

    assert cKDTree(s.means).query(got.means)[0].max() < 0.01


def test_raw_ply_is_baked_for_viewing(tmp_path: Path):
    s = _splats()
    raw = type(s)(s.means, s.quats, s.scales, s.opacities, s.sh, np.full(len(s), 0.1, np.float32))
    write_ply(tmp_path / "raw.ply", raw)
    got, _ = load_splats_any(tmp_path / "raw.ply")
    np.testing.assert_allclose(np.exp(got.scales), np.sqrt(np.exp(2 * s.scales) + 0.01), rtol=1e-5)
    assert got.filter_3d is None


def test_serve_starts_a_viser_server(tmp_path: Path):
    pytest.importorskip("viser", reason="the viewer extra (viser) is not installed")
    import socket

    from skyfall.export.viewer import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = serve(_splats(), up="+z", port=port, block=False)
    try:
        import urllib.request

        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert len(html) > 100
    finally:
        server.stop()


def _non_loopback_ipv4() -> str | None:
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_view_listens_on_this_machine_only_unless_told(capsys: pytest.CaptureFixture):
    """The viewer has no authentication: loopback by default, a warning when opened to the network."""
    pytest.importorskip("viser", reason="the viewer extra (viser) is not installed")
    import socket
    import urllib.request

    from skyfall.export.viewer import serve

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    port = free_port()
    server = serve(_splats(), up="+z", port=port, block=False)
    try:
        assert server.get_host() == "127.0.0.1"
        assert len(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()) > 100
        ip = _non_loopback_ipv4()
        if ip is not None:  # another interface of this machine cannot reach it
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
    finally:
        server.stop()
    out = capsys.readouterr()
    assert f"http://localhost:{port}" in out.out and "warning" not in out.err

    port = free_port()
    server = serve(_splats(), up="+z", port=port, block=False, host="0.0.0.0")
    try:
        assert server.get_host() == "0.0.0.0"
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "--host 127.0.0.1" in err
