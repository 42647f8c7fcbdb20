"""Live browser viewer with viser (the ``viewer`` extra): ``skyfall view RUN|FILE``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.export.bake import Splats


def load_splats_any(source: str | Path, embedding: str | None = None) -> tuple[Splats, str]:
    """Viewer-ready splats from a run directory (ENU, Z-up) or a splat file (assumed -Y-up).

    Returns:
        ``(splats, up)`` with ``up`` the world up direction for the viewer ('+z' or '-y').
    """
    from skyfall.export import formats

    p = Path(source)
    if p.is_dir():
        from skyfall.export.run import baked_splats, load_run

        splats, _ = baked_splats(load_run(p), embedding)
        return splats, "+z"
    name = p.name.lower()
    if not p.exists():
        raise ConfigError(f"{p}: no such run directory or splat file")
    if name.endswith(".ply"):
        with open(p, "rb") as f:
            head = f.read(4096)
        is_compressed = b"element chunk" in head
        splats = formats.read_ply_compressed(p) if is_compressed else formats.read_ply(p)
        if splats.filter_3d is not None:  # a raw PLY: bake the filter so it looks as rendered
            import torch

            from skyfall.export.bake import bake

            sh = torch.from_numpy(splats.sh)
            params = {
                "means": torch.from_numpy(splats.means),
                "quats": torch.from_numpy(splats.quats),
                "scales": torch.from_numpy(splats.scales),
                "opacities": torch.from_numpy(splats.opacities),
                "sh0": sh[:, :1],
                "shN": sh[:, 1:],
            }
            splats = bake(params, torch.from_numpy(splats.filter_3d))
    elif name.endswith(".splat"):
        splats = formats.read_splat(p)
    elif name.endswith(".spz"):
        splats = formats.read_spz(p)
    else:
        raise ConfigError(f"{p}: unknown splat file type (expected .ply, .splat or .spz)")
    return splats, "-y"


def covariances(splats: Splats) -> np.ndarray:
    """World covariances ``R diag(s^2) R^T`` [N, 3, 3] from normalised wxyz quaternions and log scales."""
    from scipy.spatial.transform import Rotation

    q = splats.quats.astype(np.float64)
    rot = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy wants xyzw
    s2 = np.exp(2.0 * splats.scales.astype(np.float64))
    return np.einsum("nij,nj,nkj->nik", rot, s2, rot)


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(splats: Splats, up: str = "+z", port: int = 8080, block: bool = True, host: str = "127.0.0.1"):  # noqa: ANN201
    """Show ``splats`` in a viser server on ``host:port``; blocks until Ctrl-C when ``block``.

    The default host is the loopback interface: the server has no authentication and accepts any
    websocket, so it is reachable only from this machine unless ``host`` says otherwise (then a
    warning says so). Returns the ``viser.ViserServer`` (when not blocking).
    """
    try:
        import viser
    except ImportError as e:
        raise MissingDependencyError(
            f"`skyfall view` needs viser: pip install 'skyfall[viewer]' ({e})"
        ) from e
    import time

    server = viser.ViserServer(host=host, port=port, verbose=False)
    server.scene.set_up_direction(up)
    rgb = np.clip(splats.rgb(), 0.0, 1.0).astype(np.float32)
    server.scene.add_gaussian_splats(
        "/splats",
        centers=splats.means.astype(np.float32),
        covariances=covariances(splats).astype(np.float32),
        rgbs=rgb,
        opacities=splats.alpha().astype(np.float32)[:, None],
    )
    shown = "localhost" if host in (*LOCAL_HOSTS, "0.0.0.0", "::", "") else host
    print(f"[view] {len(splats)} splats at http://{shown}:{port} (Ctrl-C to stop)")
    if host not in LOCAL_HOSTS:
        print(
            f"[view] warning: listening on {host}, not only this machine: anyone who can reach port {port} "
            "can open the viewer (no authentication); use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
        )
    if block:
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            server.stop()
    return server
