"""What a conditioned refiner gets: height maps of exact poses, the satellite crop around a target,
and Stage 2 handing both to the refiner for each orbit view."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.camera_path import read_camera_path
from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.data.guidance import best_satellite_view, ground_level, height_map, satellite_crop, world_points


def _gt_view(tile: Path, name: str = "orbit_e45_r250", i: int = 0) -> tuple[Cameras, torch.Tensor]:
    folder = tile / "gt" / "views" / name
    cams = read_camera_path(folder / "camera_path.json")
    depth = torch.from_numpy(np.load(folder / "depth" / f"{i:05d}.npy"))
    return cams[i], depth


def test_world_points_round_trip_through_the_camera(tiny_tile: Path):
    cam, depth = _gt_view(tiny_tile)
    pts = world_points(depth, cam)
    valid = torch.isfinite(pts).all(-1)
    assert valid.float().mean() > 0.5
    uv, z = cam.project(pts[valid])
    h, w = depth.shape
    v, u = torch.nonzero(valid, as_tuple=True)
    assert torch.allclose(uv[0, :, 0], u.double() + 0.5, atol=1e-6)
    assert torch.allclose(uv[0, :, 1], v.double() + 0.5, atol=1e-6)
    assert torch.allclose(z[0], depth[valid].double(), rtol=1e-6)


def test_height_map_of_a_ground_truth_depth_matches_the_ground_truth_dsm(tiny_tile: Path):
    """Seen from 45 degrees, most pixels are roofs or ground: their height is the DSM's there."""
    cam, depth = _gt_view(tiny_tile)
    georef = json.loads((tiny_tile / "gt" / "dsm.json").read_text())
    dsm = np.load(tiny_tile / "gt" / "dsm.npy")
    ground = 0.0  # the synthetic city's ground is z = 0
    heights = height_map(depth, cam, ground)
    pts = world_points(depth, cam)
    ok = torch.isfinite(pts).all(-1)
    x, y = pts[ok][:, 0].numpy(), pts[ok][:, 1].numpy()
    j = np.floor((x - georef["x_min"]) / georef["resolution"]).astype(int)
    i = np.floor((georef["y_max"] - y) / georef["resolution"]).astype(int)
    inside = (i >= 0) & (i < georef["height"]) & (j >= 0) & (j < georef["width"])
    err = np.abs(heights[ok].numpy()[inside] - np.clip(dsm[i[inside], j[inside]] - ground, 0, None))
    assert np.median(err) < 0.3 and np.mean(err < 1.0) > 0.7, (np.median(err), np.mean(err < 1.0))
    assert float(heights[~ok].abs().max()) == 0.0  # nothing rendered: height 0
    assert float(heights.min()) >= 0.0


def test_ground_level_is_a_low_quantile_robust_to_strays():
    pts = torch.zeros(1000, 3)
    pts[:, 2] = torch.linspace(0, 30, 1000)
    pts[:5, 2] = -500.0  # stray points below the ground
    assert 0.0 <= ground_level(pts) < 1.0


def _ramp_image(h: int, w: int) -> torch.Tensor:
    """[3, H, W]: channel 0 = x of each pixel centre, channel 1 = its y, channel 2 = 1."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)]).float()


def test_satellite_crop_is_centred_on_the_target_and_as_wide_as_asked():
    k = intrinsics_from_fov(10.0, 200, 160)
    eye = torch.tensor([[30.0, -20.0, 1000.0]])
    cam = Cameras(look_at(eye, torch.tensor([[0.0, 0.0, 0.0]])), k[None], 200, 160)
    target = torch.tensor([12.0, -7.0, 3.0])
    (u, v), z = cam.project(target[None])[0][0, 0].tolist(), float(cam.project(target[None])[1][0, 0])
    size, side = 64, 40.0
    crop = satellite_crop(_ramp_image(160, 200), cam, target, side, size)
    assert crop.shape == (3, size, size)
    # the crop's centre (between its two middle pixels) is the target's projection
    cx = float(crop[0, size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean())
    cy = float(crop[1, size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean())
    assert abs(cx - u) < 1e-3 and abs(cy - v) < 1e-3
    # its width is side_m at the view's ground sampling distance at the target
    span = float(crop[0, size // 2, -1] - crop[0, size // 2, 0])
    assert span == pytest.approx(side * float(k[0, 0]) / z * (size - 1) / size, rel=1e-4)
    # outside the image: zeros
    far = satellite_crop(_ramp_image(160, 200), cam, torch.tensor([500.0, 0.0, 0.0]), side, size)
    assert float(far.abs().max()) == 0.0


def test_best_satellite_view_is_the_steepest_that_sees_the_point():
    k = intrinsics_from_fov(20.0, 100, 100)[None].expand(3, 3, 3)
    target = torch.zeros(1, 3)
    eyes = torch.tensor([[0.0, 400.0, 900.0], [0.0, 100.0, 1000.0], [600.0, 0.0, 800.0]])
    cams = Cameras(look_at(eyes, target.expand(3, 3)), k.clone(), 100, 100)
    assert best_satellite_view(cams, torch.zeros(3)) == 1
    masks = torch.ones(3, 100, 100, dtype=torch.bool)
    masks[1] = False  # view 1 has no valid pixel there
    assert best_satellite_view(cams, torch.zeros(3), masks) == 0
    assert best_satellite_view(cams, torch.tensor([5000.0, 0.0, 0.0])) is None


class _Recorder:
    """A refiner that wants every guidance and returns the render, recording what it got."""

    wants = frozenset({"depth", "height", "satellite"})

    def __init__(self):
        self.calls: list[tuple] = []

    def refine(self, images, *, seeds=None, cameras=None, guidance=None):  # noqa: ANN001, ANN201
        self.calls.append((cameras, guidance))
        return images.clone()


def test_stage2_hands_each_orbit_view_its_own_depth_height_and_satellite_crop(
    tiny_run: Path, tiny_config, tmp_path: Path
):
    import dataclasses

    from skyfall.export.run import load_run
    from skyfall.train.stage2 import SATELLITE_CROP_PX, IterativeDatasetUpdate, idu_targets

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    loaded = load_run(run)  # the scene the first episode's refinement sees
    cfg2 = dataclasses.replace(tiny_config.stage2, max_episodes=1, episode_steps=2)
    rec = _Recorder()
    idu = IterativeDatasetUpdate(cfg2, run, refiner=rec, progress=False)
    idu.run()
    n_views = cfg2.grid_size**2 * cfg2.n_azimuths
    assert len(rec.calls) == n_views * cfg2.samples_per_view
    tile = idu.trainer.tile
    ground = ground_level(tile.points)
    emb = loaded.scene.novel_embedding(tiny_config.stage1.appearance.test_embedding)
    for i, (cam, g) in enumerate(rec.calls[:: cfg2.samples_per_view]):
        out = loaded.scene.render(cam, emb, absgrad=False)
        depth = torch.where(out.alphas[0, ..., 0] >= 0.5, out.expected_depths[0, ..., 0], 0.0)
        assert torch.allclose(g.depth[0], depth, atol=1e-4)
        assert torch.allclose(g.height[0], height_map(depth, cam, ground), atol=1e-3)
        target = idu_targets(cfg2, idu.scale)[i // cfg2.n_azimuths]
        n = best_satellite_view(tile.train.cameras, target, tile.train.masks)
        side = cfg2.grid_width * idu.scale / (cfg2.grid_size + 1)
        images = tile.train.images.permute(0, 3, 1, 2).float() / 255.0
        want = satellite_crop(images[n], tile.train.cameras[n], target, side, SATELLITE_CROP_PX)
        assert g.satellite.shape == (1, 3, SATELLITE_CROP_PX, SATELLITE_CROP_PX)
        assert torch.allclose(g.satellite[0], want, atol=1e-5)
    # both samples of a view get the same guidance
    a, b = rec.calls[0][1], rec.calls[1][1]
    assert torch.equal(a.height, b.height) and torch.equal(a.satellite, b.satellite)
