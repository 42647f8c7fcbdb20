"""Videos and camera paths: depth colourisation, mp4/PNG output, `skyfall path orbit`, `skyfall render`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.camera_path import read_camera_path
from skyfall.export.video import colorize_depth, render_video, spectral
from skyfall.gaussians.model import GaussianModel
from skyfall.scene import Scene
from skyfall.storage.checkpoints import checkpoint_path, save_checkpoint

imageio = pytest.importorskip("imageio.v2", reason="the video extra (imageio) is not installed")
pytest.importorskip("imageio_ffmpeg", reason="the video extra (imageio-ffmpeg) is not installed")


def small_scene(n: int = 400) -> Scene:
    g = torch.Generator().manual_seed(0)
    params = {
        "means": torch.rand(n, 3, generator=g) * torch.tensor([40.0, 40.0, 10.0])
        - torch.tensor([20.0, 20.0, 0.0]),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.full((n, 3), math.log(1.5)),
        "opacities": torch.full((n,), 2.0),
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.zeros(n, 3, 3),
    }
    return Scene(GaussianModel(params), None)


def test_spectral_endpoints_and_depth_normalisation():
    assert tuple(spectral(np.array(0.0))) == (158, 1, 66) and tuple(spectral(np.array(1.0))) == (94, 79, 162)
    depth = np.linspace(10, 100, 200).reshape(1, 10, 20)
    alpha = np.ones_like(depth)
    alpha[0, 0, :5] = 0  # empty pixels are black
    rgb = colorize_depth(depth, alpha)
    assert rgb.shape == (1, 10, 20, 3) and (rgb[0, 0, :5] == 0).all()
    # inverse depth: the nearest pixels get the high end of the map, the farthest the low end
    assert tuple(rgb[0, 0, 5]) == tuple(spectral(np.array(1.0)))
    assert tuple(rgb[0, -1, -1]) == tuple(spectral(np.array(0.0)))


def test_render_video_writes_mp4_depth_and_pngs(tmp_path: Path):
    from skyfall.cli.path import OrbitOptions

    cams = OrbitOptions(radius=60, elevation=40, fov=50, frames=5, width=63, height=48).cameras()
    res = render_video(small_scene(), cams, tmp_path, name="clip", fps=10)
    assert len(res.pngs) == 5 and all(p.exists() for p in res.pngs)
    frames = imageio.mimread(res.rgb_video)
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)  # odd width padded for yuv420p
    # H.264 is lossy: the decoded video stays close to the rendered frames
    assert np.abs(frames[2][:, :63].astype(float) - res.frames[2]).mean() < 6
    assert res.frames.mean() > 10  # not blank
    assert len(imageio.mimread(res.depth_video)) == 5


def test_path_orbit_cli_then_render_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    from skyfall.cli import entrypoint

    path = tmp_path / "orbit.json"
    entrypoint(
        [
            "path",
            "orbit",
            "--target",
            "0",
            "0",
            "2",
            "--radius",
            "50",
            "--elevation",
            "30",
            "--fov",
            "45",
            "--frames",
            "4",
            "--width",
            "40",
            "--height",
            "32",
            "--fps",
            "12",
            "--out",
            str(path),
        ]
    )
    doc = json.loads(path.read_text())
    assert doc["fps"] == 12 and doc["_radius"] == 50 and len(doc["camera_path"]) == 4
    cams = read_camera_path(path)
    centres = cams.centers.numpy()
    np.testing.assert_allclose(np.linalg.norm(centres - [0, 0, 2], axis=1), 50, rtol=1e-9)
    np.testing.assert_allclose(centres[0], [50 * math.cos(math.radians(30)), 0, 2 + 25], atol=1e-9)
    # a run directory with one checkpoint
    run = tmp_path / "run"
    scene = small_scene()
    save_checkpoint(
        checkpoint_path(run / "ckpts", 7),
        {"model": scene.model.state_dict(), "appearance": None, "config": {}, "step": 7},
    )
    entrypoint(["render", str(run), "--path", str(path), "--num-frames", "2"])
    out = capsys.readouterr().out
    assert "2 frames 40x32 @ 12 fps" in out
    assert len(imageio.mimread(run / "video" / "orbit.mp4")) == 2
    assert sorted(p.name for p in (run / "video" / "orbit").iterdir()) == ["0000.png", "0001.png"]
    assert (run / "video" / "orbit_depth.mp4").exists()
