"""Tile loader, COLMAP point reader and ``skyfall info``, on tiny tiles built in tmp_path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skyfall.data import Split, Tile, load_tile
from skyfall.data.cameras import Cameras, look_at
from skyfall.data.colmap import read_points3d_text
from skyfall.errors import ConfigError, TileFormatError

W, H = 8, 8
FOCAL = 100.0


def _rotation(axis: list[float], angle: float) -> np.ndarray:
    """Rodrigues rotation matrix. [3, 3]"""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _c2ws(n: int) -> np.ndarray:
    """n OpenCV cameras 50 m above the origin, slightly oblique, looking at it. [n, 4, 4]"""
    eyes = torch.tensor(
        [[3.0 * math.cos(i), 3.0 * math.sin(i), 50.0 + i] for i in range(n)], dtype=torch.float64
    )
    return look_at(eyes, torch.zeros(n, 3, dtype=torch.float64), up=torch.tensor([0.0, 1.0, 0.0])).numpy()


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    _write_json(path, data)


def make_tile(
    root: Path,
    n_train: int = 3,
    n_test: int = 1,
    size: tuple[int, int] = (W, H),
    rt: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> dict:
    """Write a tiny tile; returns what was written (cameras in the original frame, points, images).

    With ``rt = (R, T)`` the transforms carry R/T and the frames store ``transform_matrix_rotated``
    built the way SatelliteSfM's COLMAP converter does (``[R·Rc | R·c − T]``); points stay in the
    original frame.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    n = n_train + n_test
    c2ws = _c2ws(n)
    w, h = size
    images = rng.integers(16, 256, size=(n, h, w, 3), dtype=np.uint8)  # never exactly black
    frames = []
    for i in range(n):
        Image.fromarray(images[i]).save(root / "images" / f"img_{i}.png")
        frame = {"file_path": f"./images/img_{i}.png", "fl_x": FOCAL, "fl_y": FOCAL * 1.01}
        frame.update({"cx": w / 2 + 0.25 * i, "cy": h / 2 - 0.5})
        if rt is None:
            frame["transform_matrix"] = c2ws[i].tolist()
        else:
            r4 = np.eye(4)
            r4[:3, :3] = rt[0]
            rotated = r4 @ c2ws[i]
            rotated[:3, 3] -= rt[1]
            frame["transform_matrix_rotated"] = rotated.tolist()
            frame["transform_matrix"] = c2ws[i].tolist()
        frames.append(frame)
    top: dict = {"camera_model": "PINHOLE", "w": 123, "h": 456}  # w/h are deliberately wrong: not trusted
    if rt is not None:
        r4 = np.eye(4)
        r4[:3, :3] = rt[0]
        top.update({"R": r4.tolist(), "T": rt[1].tolist()})
    _write_json(root / "transforms_train.json", {**top, "frames": frames[:n_train]})
    if n_test:
        _write_json(root / "transforms_test.json", {**top, "frames": frames[n_train:]})
    points = rng.uniform(-1.5, 1.5, size=(20, 3))
    colors = rng.integers(0, 256, size=(20, 3))
    lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[]",
    ]
    for i, (p, c) in enumerate(zip(points, colors, strict=True)):
        track = " ".join(f"{j} {7 * j + i}" for j in range(i % 4))  # 0..3 observations
        lines.append(
            f"{i + 1} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r} {c[0]} {c[1]} {c[2]} 0.5 {track}".rstrip()
        )
    (root / "points3D.txt").write_text("\n".join(lines) + "\n")
    return {"c2ws": c2ws, "points": points, "colors": colors, "images": images, "frames": frames}


@pytest.fixture
def tile_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tile"
    make_tile(root)
    return root


# ----------------------------------------------------------------------------------------------
# happy paths


def test_load_basic_tile(tmp_path: Path) -> None:
    root = tmp_path / "tile"
    written = make_tile(root)
    tile = load_tile(root)
    assert isinstance(tile, Tile) and isinstance(tile.train, Split)
    assert (len(tile.train), len(tile.test)) == (3, 1)
    assert tile.train.names == ["img_0", "img_1", "img_2"] and tile.test.names == ["img_3"]
    assert tile.train.image_paths[1] == root / "images" / "img_1.png"
    assert (tile.width, tile.height) == (W, H)  # from the images, not the JSON's w/h
    assert tile.train.images.shape == (3, H, W, 3) and tile.train.images.dtype == torch.uint8
    assert tile.train.masks.shape == (3, H, W) and tile.train.masks.dtype == torch.bool
    assert torch.equal(tile.train.images, torch.from_numpy(written["images"][:3]))
    assert torch.equal(tile.test.images[0], torch.from_numpy(written["images"][3]))
    assert bool(tile.train.masks.all())  # no black pixels, no mask files
    cams = tile.train.cameras
    assert cams.camtoworlds.dtype == torch.float64 and cams.Ks.dtype == torch.float64
    torch.testing.assert_close(cams.camtoworlds, torch.from_numpy(written["c2ws"][:3]), rtol=0, atol=1e-12)
    for i, k in enumerate(cams.Ks):
        f = written["frames"][i]
        expected = [[f["fl_x"], 0, f["cx"]], [0, f["fl_y"], f["cy"]], [0, 0, 1]]
        torch.testing.assert_close(k, torch.tensor(expected, dtype=torch.float64))
    assert tile.points.dtype == torch.float64 and tile.colors.dtype == torch.uint8
    np.testing.assert_array_equal(tile.points.numpy(), written["points"])
    np.testing.assert_array_equal(tile.colors.numpy(), written["colors"])
    assert tile.normalization is None and tile.meta == {}


def test_test_split_is_optional(tile_dir: Path) -> None:
    (tile_dir / "transforms_test.json").unlink()
    tile = load_tile(tile_dir)
    assert len(tile.test) == 0 and len(tile.test.cameras) == 0
    assert tile.test.images.shape == (0, H, W, 3) and tile.test.masks.shape == (0, H, W)
    assert (tile.test.cameras.width, tile.test.cameras.height) == (W, H)


def test_empty_test_split_is_allowed(tile_dir: Path) -> None:
    _edit_json(tile_dir / "transforms_test.json", lambda d: d.update(frames=[]))
    assert len(load_tile(tile_dir).test) == 0


def test_synth_meta_is_parsed(tile_dir: Path) -> None:
    _write_json(tile_dir / "synth.json", {"preset": "tiny", "seed": 3})
    assert load_tile(tile_dir).meta == {"preset": "tiny", "seed": 3}


def test_missing_extension_falls_back_to_png(tile_dir: Path) -> None:
    (tile_dir / "images" / "img_0.png").rename(tile_dir / "images" / "img.0.png")
    _edit_json(tile_dir / "transforms_train.json", lambda d: d["frames"][0].update(file_path="images/img.0"))
    tile = load_tile(tile_dir)
    assert tile.train.image_paths[0] == tile_dir / "images" / "img.0.png"
    assert tile.train.names[0] == "img.0"


def test_mask_from_npy_and_from_black_pixels(tile_dir: Path) -> None:
    img = np.asarray(Image.open(tile_dir / "images" / "img_1.png")).copy()
    img[2, 3] = 0
    img[5, 5] = (0, 0, 1)  # almost black is still data
    Image.fromarray(img).save(tile_dir / "images" / "img_1.png")
    (tile_dir / "masks").mkdir()
    npy = np.ones((H, W), dtype=np.uint8)
    npy[0, :] = 0
    np.save(tile_dir / "masks" / "img_0.npy", npy)
    tile = load_tile(tile_dir)
    assert torch.equal(tile.train.masks[0], torch.from_numpy(npy.astype(bool)))
    expected = np.ones((H, W), dtype=bool)
    expected[2, 3] = False
    assert torch.equal(tile.train.masks[1], torch.from_numpy(expected))
    assert bool(tile.train.masks[2].all())


def test_rgba_alpha_becomes_mask(tile_dir: Path) -> None:
    rgb = np.array(Image.open(tile_dir / "images" / "img_0.png"))
    alpha = np.full((H, W), 255, dtype=np.uint8)
    alpha[:, :3] = 0
    alpha[7, 7] = 1  # any non-zero alpha is data
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tile_dir / "images" / "img_0.png")
    tile = load_tile(tile_dir)
    assert torch.equal(tile.train.masks[0], torch.from_numpy(alpha > 0))
    assert torch.equal(tile.train.images[0], torch.from_numpy(rgb))  # colour kept, alpha dropped
    # An explicit mask file and the alpha channel combine: both must say "valid".
    (tile_dir / "masks").mkdir()
    npy = np.ones((H, W), dtype=np.uint8)
    npy[4:, :] = 0
    np.save(tile_dir / "masks" / "img_0.npy", npy)
    tile = load_tile(tile_dir)
    assert torch.equal(tile.train.masks[0], torch.from_numpy((alpha > 0) & (npy > 0)))


def test_resolution_2_keeps_image_mask_and_intrinsics_consistent(tmp_path: Path) -> None:
    root = tmp_path / "tile"
    written = make_tile(root, n_train=2, n_test=0, size=(16, 12))
    # A white 2x2 block at rows 4-5, cols 8-9 of frame 0 and a mask hole on the same pixels.
    img = written["images"][0].copy()
    img[4:6, 8:10] = 255
    Image.fromarray(img).save(root / "images" / "img_0.png")
    (root / "masks").mkdir()
    npy = np.ones((12, 16), dtype=np.uint8)
    npy[4:6, 8:10] = 0
    np.save(root / "masks" / "img_0.npy", npy)

    full = load_tile(root)
    half = load_tile(root, resolution=2)
    assert (half.width, half.height) == (8, 6)
    assert half.train.images.shape == (2, 6, 8, 3) and half.train.masks.shape == (2, 6, 8)

    # The world point seen at the centre of the block (pixel corner (9, 5)) lands in pixel (4, 2) at r=2.
    cams = full.train.cameras[0]
    k, c2w = cams.Ks[0], cams.camtoworlds[0]
    ray = torch.linalg.solve(k, torch.tensor([9.0, 5.0, 1.0], dtype=torch.float64))
    world = c2w[:3, :3] @ (ray * 40.0) + c2w[:3, 3]
    uv_full, _ = cams.project(world[None])
    uv_half, _ = half.train.cameras[0].project(world[None])
    torch.testing.assert_close(uv_full[0, 0], torch.tensor([9.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(uv_half[0, 0], torch.tensor([4.5, 2.5], dtype=torch.float64))
    col, row = (int(x) for x in uv_half[0, 0].floor())
    assert half.train.images[0, row, col].tolist() == [255, 255, 255]
    assert not bool(half.train.masks[0, row, col])
    assert int(half.train.masks[0].sum()) == 8 * 6 - 1
    # Box filter: every downscaled pixel is the mean of its 2x2 block.
    box = written["images"][1].reshape(6, 2, 8, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(half.train.images[1].numpy() - box).max() <= 0.5 + 1e-9
    torch.testing.assert_close(half.train.cameras.Ks[:, :2], full.train.cameras.Ks[:, :2] / 2)


def test_resolution_on_sizes_not_divisible(tmp_path: Path) -> None:
    root = tmp_path / "tile"
    make_tile(root, n_train=1, n_test=1, size=(10, 6))
    full, quarter = load_tile(root), load_tile(root, resolution=4)
    # round(10 / 4) = 2, round(6 / 4) = 2: images, masks and cameras agree on the size.
    assert quarter.train.images.shape == (1, 2, 2, 3) and quarter.test.masks.shape == (1, 2, 2)
    assert (quarter.width, quarter.height) == (2, 2)
    # Intrinsics follow the full-extent mapping u' = u * w' / W per axis.
    k, k4 = full.train.cameras.Ks[0], quarter.train.cameras.Ks[0]
    torch.testing.assert_close(k4[0], k[0] * 2 / 10)
    torch.testing.assert_close(k4[1], k[1] * 2 / 6)
    with pytest.raises(ConfigError, match="too coarse"):
        load_tile(root, resolution=16)


@pytest.mark.parametrize("bad", [0, 3, -2, 6, True, 2.0])
def test_bad_resolution_is_a_config_error(tile_dir: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="resolution"):
        load_tile(tile_dir, resolution=bad)  # type: ignore[arg-type]


def test_rt_normalisation_keeps_projections(tmp_path: Path) -> None:
    r = _rotation([0.3, -0.5, 0.8], 0.7)
    t = np.array([4.0, -2.0, 7.5])
    root = tmp_path / "tile"
    written = make_tile(root, rt=(r, t))
    tile = load_tile(root)
    norm = tile.normalization
    assert norm is not None
    np.testing.assert_allclose(norm["R"], r, atol=1e-12)
    np.testing.assert_allclose(norm["T"], t)

    # The points follow y = s (R x - T) - z_min e_z, with the reference's percentile definitions.
    moved = written["points"] @ r.T - t
    scale = 256.0 / np.percentile(np.linalg.norm(moved, axis=1), 99)
    z_min = np.percentile(moved[:, 2] * scale, 1)
    assert norm["scale"] == pytest.approx(scale, rel=1e-12)
    assert norm["z_min"] == pytest.approx(z_min, rel=1e-12)
    expected = moved * scale - np.array([0.0, 0.0, z_min])
    np.testing.assert_allclose(tile.points.numpy(), expected, rtol=1e-12, atol=1e-9)
    assert np.percentile(np.linalg.norm(tile.points.numpy() - [0, 0, -z_min], axis=1), 99) == pytest.approx(
        256.0
    )
    assert np.percentile(tile.points[:, 2].numpy(), 1) == pytest.approx(0.0, abs=1e-9)

    # Every point projects to the same pixel before (original frame) and after normalisation.
    before = Cameras(torch.from_numpy(written["c2ws"][:3]), tile.train.cameras.Ks, W, H)
    uv0, z0 = before.project(torch.from_numpy(written["points"]))
    uv1, z1 = tile.train.cameras.project(tile.points)
    torch.testing.assert_close(uv1, uv0, rtol=0, atol=1e-8)
    torch.testing.assert_close(z1, z0 * scale, rtol=1e-10, atol=0)
    # Camera rotations are R times the originals, centres follow the points' similarity.
    rot = tile.test.cameras.camtoworlds[0, :3, :3].numpy()
    np.testing.assert_allclose(rot, r @ written["c2ws"][3][:3, :3], atol=1e-12)
    centre = (r @ written["c2ws"][3][:3, 3] - t) * scale - [0, 0, z_min]
    np.testing.assert_allclose(tile.test.cameras.centers[0].numpy(), centre, rtol=1e-12)


def test_rt_without_rotated_matrices_applies_rt_itself(tmp_path: Path) -> None:
    r = _rotation([1.0, 2.0, 0.5], -1.1)
    t = np.array([0.5, 1.0, -3.0])
    a, b = tmp_path / "a", tmp_path / "b"
    make_tile(a, rt=(r, t))
    make_tile(b, rt=(r, t))
    for name in ("transforms_train.json", "transforms_test.json"):
        _edit_json(b / name, lambda d: [f.pop("transform_matrix_rotated") for f in d["frames"]])
    ta, tb = load_tile(a), load_tile(b)
    torch.testing.assert_close(tb.train.cameras.camtoworlds, ta.train.cameras.camtoworlds, rtol=0, atol=1e-9)
    torch.testing.assert_close(tb.test.cameras.camtoworlds, ta.test.cameras.camtoworlds, rtol=0, atol=1e-9)


def test_loading_is_fast(tmp_path: Path) -> None:
    import time

    root = tmp_path / "tile"
    make_tile(root, n_train=20, n_test=0, size=(256, 256))
    start = time.perf_counter()
    tile = load_tile(root)
    elapsed = time.perf_counter() - start
    assert len(tile.train) == 20
    # 20 x 256^2 is ~0.05 s on an idle core; the bound leaves room for a loaded CI machine.
    assert elapsed < 2.0, elapsed


# ----------------------------------------------------------------------------------------------
# COLMAP reader


def test_read_points3d_text_tolerates_tracks_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "points3D.txt"
    f.write_text(
        "# comment\n\n1 1.5 -2 3e2 0 128 255 0.25\n  # indented comment\n7 0 0 0 1 2 3 -1 1 2 3 4 5 6 7 8\n"
    )
    xyz, rgb, err = read_points3d_text(f)
    assert xyz.dtype == np.float64 and rgb.dtype == np.uint8 and err.dtype == np.float64
    np.testing.assert_array_equal(xyz, [[1.5, -2.0, 300.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(rgb, [[0, 128, 255], [1, 2, 3]])
    np.testing.assert_array_equal(err, [0.25, -1.0])


# ----------------------------------------------------------------------------------------------
# errors: every case names the file and the field


def _frame_edit(key: str, value: object = None, index: int = 1, drop: bool = False) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        def change(d: dict) -> None:
            if drop:
                d["frames"][index].pop(key)
            else:
                d["frames"][index][key] = value

        _edit_json(root / "transforms_train.json", change)

    return edit


def _write_points(text: str) -> Callable[[Path], None]:
    return lambda root: (root / "points3D.txt").write_text(text)


def _good_rows(n: int) -> str:
    return "".join(f"{i} 0.1 0.2 0.3 10 20 30 0.5\n" for i in range(n))


_ID = np.eye(4).tolist()
_SCALED = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
_SHEARED = [[1.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
_SINGULAR = [[0.0] * 4, [0.0] * 4, [0.0] * 4, [0.0, 0.0, 0.0, 1.0]]
_NAN_MATRIX = [
    [float("nan"), 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
]
_BOTTOM = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
TM = "frames[1].transform_matrix"


def _img(i: int) -> str:
    return f"images/img_{i}.png"


# (id, mutation of a good tile, offending file relative to the tile, expected field)
ERROR_CASES: list[tuple[str, Callable[[Path], None], str, str | None]] = [
    ("train json missing", lambda r: (r / "transforms_train.json").unlink(), "transforms_train.json", None),
    (
        "invalid json",
        lambda r: (r / "transforms_train.json").write_text('{\n "frames": [,\n'),
        "transforms_train.json",
        "line 2",
    ),
    (
        "top level not object",
        lambda r: _write_json(r / "transforms_train.json", [1]),
        "transforms_train.json",
        None,
    ),
    (
        "frames missing",
        lambda r: _write_json(r / "transforms_train.json", {"w": 8}),
        "transforms_train.json",
        "frames",
    ),
    (
        "frames empty",
        lambda r: _write_json(r / "transforms_train.json", {"frames": []}),
        "transforms_train.json",
        "frames",
    ),
    (
        "frames not list",
        lambda r: _write_json(r / "transforms_train.json", {"frames": {}}),
        "transforms_train.json",
        "frames",
    ),
    ("frame not object", _frame_edit("x"), "transforms_train.json", None),  # replaced below
    ("fl_x missing", _frame_edit("fl_x", drop=True), "transforms_train.json", "frames[1].fl_x"),
    ("fl_y missing", _frame_edit("fl_y", drop=True), "transforms_train.json", "frames[1].fl_y"),
    ("cx missing", _frame_edit("cx", drop=True), "transforms_train.json", "frames[1].cx"),
    ("cy missing", _frame_edit("cy", drop=True), "transforms_train.json", "frames[1].cy"),
    (
        "file_path missing",
        _frame_edit("file_path", drop=True),
        "transforms_train.json",
        "frames[1].file_path",
    ),
    ("matrix missing", _frame_edit("transform_matrix", drop=True), "transforms_train.json", TM),
    ("fl_x non-numeric", _frame_edit("fl_x", "100"), "transforms_train.json", "frames[1].fl_x"),
    ("cx bool", _frame_edit("cx", True), "transforms_train.json", "frames[1].cx"),
    ("cy non-finite", _frame_edit("cy", float("inf")), "transforms_train.json", "frames[1].cy"),
    ("fl_x nan", _frame_edit("fl_x", float("nan")), "transforms_train.json", "frames[1].fl_x"),
    ("fl_y zero", _frame_edit("fl_y", 0.0), "transforms_train.json", "frames[1].fl_y"),
    ("fl_x negative", _frame_edit("fl_x", -5.0), "transforms_train.json", "frames[1].fl_x"),
    ("file_path not string", _frame_edit("file_path", 3), "transforms_train.json", "frames[1].file_path"),
    ("matrix 3x4", _frame_edit("transform_matrix", _ID[:3]), "transforms_train.json", TM),
    ("matrix ragged", _frame_edit("transform_matrix", [[1, 0], [0, 1, 0]]), "transforms_train.json", TM),
    ("matrix non-numeric", _frame_edit("transform_matrix", [["a"] * 4] * 4), "transforms_train.json", TM),
    ("matrix non-finite", _frame_edit("transform_matrix", _NAN_MATRIX), "transforms_train.json", TM),
    ("matrix singular", _frame_edit("transform_matrix", _SINGULAR), "transforms_train.json", TM),
    ("matrix scaled", _frame_edit("transform_matrix", _SCALED), "transforms_train.json", TM),
    ("matrix sheared", _frame_edit("transform_matrix", _SHEARED), "transforms_train.json", TM),
    ("matrix bottom row", _frame_edit("transform_matrix", _BOTTOM), "transforms_train.json", TM),
    ("image missing", lambda r: (r / _img(1)).unlink(), "transforms_train.json", "frames[1].file_path"),
    ("image corrupt", lambda r: (r / _img(2)).write_bytes(b"\x89PNG\r\n\x1a\nnot really"), _img(2), None),
    ("image truncated", lambda r: (r / _img(0)).write_bytes((r / _img(0)).read_bytes()[:60]), _img(0), None),
    ("image size mismatch", lambda r: Image.new("RGB", (8, 9), (9, 9, 9)).save(r / _img(2)), _img(2), "size"),
    (
        "test image size mismatch",
        lambda r: Image.new("RGB", (4, 8), (9, 9, 9)).save(r / _img(3)),
        _img(3),
        "size",
    ),
    ("16-bit image", lambda r: Image.new("I;16", (8, 8)).save(r / _img(1)), _img(1), "mode"),
    (
        "camera model",
        lambda r: _edit_json(r / "transforms_train.json", lambda d: d.update(camera_model="OPENCV_FISHEYE")),
        "transforms_train.json",
        "camera_model",
    ),
    (
        "R without T",
        lambda r: _edit_json(r / "transforms_train.json", lambda d: d.update(R=_ID)),
        "transforms_train.json",
        "T",
    ),
    (
        "R not rotation",
        lambda r: _edit_json(r / "transforms_train.json", lambda d: d.update(R=_SCALED, T=[0, 0, 0])),
        "transforms_train.json",
        "R",
    ),
    (
        "T wrong shape",
        lambda r: _edit_json(r / "transforms_train.json", lambda d: d.update(R=_ID, T=[0, 0])),
        "transforms_train.json",
        "T",
    ),
    (
        "test frame missing cx",
        lambda r: _edit_json(r / "transforms_test.json", lambda d: d["frames"][0].pop("cx")),
        "transforms_test.json",
        "frames[0].cx",
    ),
    (
        "test json invalid",
        lambda r: (r / "transforms_test.json").write_text("nope"),
        "transforms_test.json",
        "line 1",
    ),
    ("points missing", lambda r: (r / "points3D.txt").unlink(), "points3D.txt", None),
    ("points empty", _write_points("# only a comment\n\n"), "points3D.txt", None),
    (
        "points short line",
        _write_points(_good_rows(2) + "# c\n" + _good_rows(3) + "7 1 2 3 4\n"),
        "points3D.txt",
        "line 7",
    ),
    (
        "points non-numeric",
        _write_points(_good_rows(4) + "5 0.1 abc 0.3 1 2 3 0.5\n"),
        "points3D.txt",
        "line 5",
    ),
    (
        "points non-finite",
        _write_points(_good_rows(2) + "3 0.1 nan 0.3 1 2 3 0.5\n"),
        "points3D.txt",
        "line 3",
    ),
    ("points inf", _write_points("1 inf 0 0 1 2 3 0.5\n" + _good_rows(2)), "points3D.txt", "line 1"),
    ("points bad colour", _write_points(_good_rows(1) + "2 0 0 0 1 256 3 0.5\n"), "points3D.txt", "line 2"),
    (
        "R/T with degenerate points",
        lambda r: (
            _edit_json(r / "transforms_train.json", lambda d: d.update(R=_ID, T=[0.1, 0.2, 0.3])),
            _write_points(_good_rows(5))(r),
        ),
        "points3D.txt",
        None,
    ),
    ("synth meta invalid", lambda r: (r / "synth.json").write_text("{"), "synth.json", "line 1"),
]


def _frame_not_object(root: Path) -> None:
    _edit_json(root / "transforms_train.json", lambda d: d["frames"].__setitem__(1, [1, 2]))


ERROR_CASES[6] = ("frame not object", _frame_not_object, "transforms_train.json", "frames[1]")


def _mask_case(mask: np.ndarray) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / "masks").mkdir()
        np.save(root / "masks" / "img_1.npy", mask)

    return edit


ERROR_CASES += [
    ("mask size mismatch", _mask_case(np.ones((8, 7), np.uint8)), "masks/img_1.npy", "shape"),
    ("mask not 2-D", _mask_case(np.ones((8, 8, 1), np.uint8)), "masks/img_1.npy", "shape"),
]


def _check_error(err: TileFormatError, file: Path, field: str | None) -> None:
    assert err.file == file
    assert err.field == field
    text = str(err)
    assert str(file) in text
    if field is not None:
        assert f"[{field}]" in text
    assert "\n" not in text and text.endswith(".")
    # One sentence: the message proper has no sentence break inside.
    assert ". " not in err.message.rstrip(".").replace("e.g. ", ""), err.message


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_tile_raises_tile_format_error(tile_dir: Path, case: tuple) -> None:
    _, mutate, rel, field = case
    mutate(tile_dir)
    with pytest.raises(TileFormatError) as info:
        load_tile(tile_dir)
    _check_error(info.value, tile_dir / rel, field)


def test_missing_tile_dir(tmp_path: Path) -> None:
    with pytest.raises(TileFormatError) as info:
        load_tile(tmp_path / "nowhere")
    _check_error(info.value, tmp_path / "nowhere", None)


# ----------------------------------------------------------------------------------------------
# skyfall info


def test_info_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from skyfall.cli.info import Info

    root = tmp_path / "tile"
    make_tile(root, size=(16, 8))
    _write_json(root / "synth.json", {"preset": "tiny", "dates": [1, 2, 3], "gt": {"a": 1}})
    Info(tile=root, resolution=2).main()
    out = capsys.readouterr().out
    assert "train 3, test 1" in out
    assert "8 x 4 px" in out
    assert "normalised   no" in out
    assert "preset=tiny, dates=[3 items], gt={1 keys}" in out
    # Focal 100 px (x) and 101 px (y) halved, distances ~50-53 m: GSD ~ 1 m/px.
    assert "fx 50, fy 50.5 px" in out
    gsd_line = next(line for line in out.splitlines() if line.startswith("approx. GSD"))
    lo, hi = (float(x) for x in gsd_line.split()[2:5:2])
    assert 0.95 < lo < hi < 1.1


def test_info_cli_bad_tile_exits_2_with_one_line(tile_dir: Path) -> None:
    _edit_json(tile_dir / "transforms_train.json", lambda d: d["frames"][0].pop("fl_y"))
    proc = subprocess.run(
        [sys.executable, "-m", "skyfall", "info", str(tile_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(tile_dir / "transforms_train.json") in lines[0] and "frames[0].fl_y" in lines[0]
