"""Real-browser test: our exported splat files, loaded by real web viewers (PlayCanvas engine, Spark) in
headless Chromium, look like our own renderer at the same camera.

Checks per screenshot against ``skyfall.render`` (antialiased, eps2d 0.3 like the viewers' dilation):
splat-coverage mask IoU >= 0.8, mean colour within 0.06 per channel, and a coarse 8x6 colour grid within
0.08 mean absolute difference (catches mirrored scenes, whose coverage and mean colour may agree).
Negative controls: files with known bugs (mirrored axis, linear scales, raw RGB in f_dc) must fail.

Needs Python playwright, a system Chromium and ``npm ci`` in tests/web_viewer (``.ci/run`` installs all
three); skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.cameras import Cameras, look_at
from skyfall.export import Splats, bake, sanitize, to_up_axis, write_splats
from skyfall.export.upaxis import RDF_TO_RUB, up_rotation
from skyfall.render import render

_spec = importlib.util.spec_from_file_location(
    "web_driver", Path(__file__).parent / "web_viewer" / "driver.py"
)
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]
_REASON = driver.unavailable_reason()
if _REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=f"browser test skipped: {_REASON}"))

W, H = 320, 240
IOU_MIN = 0.8
MEAN_TOL = 0.06
GRID_TOL = 0.1
GRID = (16, 12)  # 20x20-pixel cells
# Which frame each format stores, relative to the exported (--up) frame.
FILE_FRAME = {"ply": np.eye(3), "ply-compressed": np.eye(3), "splat": np.eye(3), "spz": RDF_TO_RUB}
EXT = {"ply": ".ply", "ply-compressed": ".compressed.ply", "splat": ".splat", "spz": ".spz"}


# ----------------------------------------------------------------------------- scenes and cameras


def blocks_scene() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ENU (z-up) coloured-block scene as raw trainer parameters + a 3D filter to bake.

    A grey 9x9 m plate at z = 0, a red block west (x = -2.5), a blue block east, a green tower north
    (y = +2.5) and a yellow cube south: asymmetric, so mirrored axes show.
    """
    pts, cols = [], []

    def box(lo: tuple, hi: tuple, rgb: tuple, step: float = 0.25) -> None:
        axes = [np.arange(a, b + 1e-9, step) for a, b in zip(lo, hi, strict=True)]
        g = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        # keep the surface shell only (interior Gaussians are hidden anyway)
        on = np.zeros(len(g), bool)
        for d in range(3):
            on |= np.isclose(g[:, d], lo[d]) | np.isclose(g[:, d], axes[d][-1])
        pts.append(g[on])
        cols.append(np.tile(rgb, (int(on.sum()), 1)))

    box((-4.5, -4.5, 0.0), (4.5, 4.5, 0.0), (0.55, 0.55, 0.55))
    box((-3.25, -0.75, 0.0), (-1.75, 0.75, 1.5), (0.85, 0.1, 0.1))
    box((1.75, -0.75, 0.0), (3.25, 0.75, 1.5), (0.1, 0.2, 0.85))
    box((-0.5, 2.0, 0.0), (0.5, 3.0, 3.0), (0.1, 0.75, 0.15))
    box((-0.5, -3.0, 0.0), (0.5, -2.0, 1.0), (0.9, 0.8, 0.1))
    p = torch.tensor(np.concatenate(pts), dtype=torch.float32)
    c = torch.tensor(np.concatenate(cols), dtype=torch.float32)
    n = len(p)
    params = {
        "means": p,
        "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        "scales": torch.full((n, 3), math.log(0.12)),
        "opacities": torch.full((n,), 3.0),
        "sh0": ((c - 0.5) / 0.28209479177387814)[:, None, :],
        "shN": torch.zeros(n, 3, 3),
    }
    return params, torch.full((n,), 0.05)


def orbit_camera(center: np.ndarray, distance: float, elev: float, azim: float, fov: float) -> Cameras:
    """One ENU camera looking at ``center`` (vertical FoV ``fov``, principal point at the centre)."""
    e, a = math.radians(elev), math.radians(azim)
    eye = center + distance * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    c2w = look_at(torch.tensor(eye), torch.tensor(center, dtype=torch.float64))
    f = 0.5 * H / math.tan(math.radians(fov) / 2)
    return Cameras(c2w, torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64), W, H)


def page_camera(cam: Cameras, frame: np.ndarray, center: np.ndarray, fov: float) -> dict:
    """The same camera in a file's coordinates (``frame``: ENU -> file rotation) for the web page."""
    eye = cam.camtoworlds[0, :3, 3].numpy()
    return {
        "eye": frame @ eye,
        "target": frame @ center,
        "up": frame @ np.array([0.0, 0.0, 1.0]),
        "fov": fov,
        "near": 0.05 * np.linalg.norm(eye - center),
        "far": 20 * np.linalg.norm(eye - center),
    }


def reference_render(splats: Splats, cam: Cameras) -> np.ndarray:
    """Our renderer on the baked (ENU) splats: RGB [H, W, 3] in [0, 1]."""
    out = render(
        torch.from_numpy(splats.means),
        torch.from_numpy(splats.quats),
        torch.from_numpy(splats.scales),
        torch.from_numpy(splats.opacities),
        torch.from_numpy(splats.sh),
        cam.viewmats,
        cam.Ks,
        W,
        H,
        sh_degree=splats.sh_degree,
        eps2d=0.3,
        backend="torch",
        absgrad=False,
    )
    return out.colors[0].clamp(0, 1).numpy()


# ----------------------------------------------------------------------------- comparison


def compare(ref: np.ndarray, shot: np.ndarray) -> dict:
    """Coverage IoU, mean-colour difference and coarse-grid colour difference of two RGB images."""
    m_ref, m_shot = ref.max(-1) > 0.1, shot.max(-1) > 0.1
    inter, union = (m_ref & m_shot).sum(), (m_ref | m_shot).sum()
    both = m_ref & m_shot
    mean_diff = np.abs(ref[both].mean(0) - shot[both].mean(0)).max() if both.any() else 1.0
    grid = lambda im: im.reshape(GRID[1], H // GRID[1], GRID[0], W // GRID[0], 3).mean((1, 3))  # noqa: E731
    cell_diff = np.abs(grid(ref) - grid(shot)).max(-1)  # [12, 16] worst channel per cell
    return {
        "iou": float(inter / max(union, 1)),
        "mean_diff": float(mean_diff),
        "grid_p95": float(np.quantile(cell_diff, 0.95)),
        "coverage_ref": float(m_ref.mean()),
    }


def passes(m: dict) -> bool:
    return m["iou"] >= IOU_MIN and m["mean_diff"] <= MEAN_TOL and m["grid_p95"] <= GRID_TOL


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    b = driver.ViewerBrowser(tmp_path_factory.mktemp("web_data"))
    yield b
    b.close()


def _write(browser, splats_enu: Splats, fmt: str, name: str, up: str = "y") -> str:
    file_splats = to_up_axis(splats_enu, up)
    path = browser.data_dir / f"{name}{EXT[fmt]}"
    write_splats(path, file_splats, fmt)
    return path.name


def _frame(fmt: str, up: str = "y") -> np.ndarray:
    return FILE_FRAME[fmt] @ up_rotation(up)


def _check(
    browser,
    page: str,
    splats_enu: Splats,
    fmt: str,
    cam_args: tuple,
    name: str,
    save: Path | None = None,
    file_splats_enu: Splats | None = None,
) -> dict:
    """Export ``file_splats_enu`` (default ``splats_enu``), shoot it in ``page`` and compare the
    screenshot with our render of ``splats_enu`` at the same camera."""
    center, dist, elev, azim, fov = cam_args
    cam = orbit_camera(center, dist, elev, azim, fov)
    fname = _write(browser, splats_enu if file_splats_enu is None else file_splats_enu, fmt, name)
    shot, probe = browser.shoot(page, fname, page_camera(cam, _frame(fmt), center, fov), W, H)
    ref = reference_render(splats_enu, cam)
    if save is not None:
        from PIL import Image

        Image.fromarray((np.concatenate([ref, shot], 1) * 255).round().astype(np.uint8)).save(save)
    m = compare(ref, shot)
    m["seconds"] = probe["seconds"]
    print(f"{page} {fmt} {name}: {m}")
    return m


@pytest.fixture(scope="module")
def blocks() -> Splats:
    params, filt = blocks_scene()
    splats, dropped = sanitize(bake(params, filt))
    assert dropped == 0
    return splats


BLOCKS_CAM = (np.array([0.0, 0.0, 0.8]), 13.0, 40.0, -70.0, 50.0)


@pytest.fixture(scope="module")
def tile_splats(tiny_run) -> tuple[Splats, tuple]:
    """The tiny synthetic tile's Stage-1 reconstruction, baked (3D filter + mean appearance)."""
    from skyfall.export.run import baked_splats, load_run

    splats, _ = baked_splats(load_run(tiny_run))
    centre = np.median(splats.means, axis=0)
    lo, hi = np.quantile(splats.means[:, :2], [0.05, 0.95], axis=0)
    half = float((hi - lo).max()) / 2
    fov = 45.0
    return splats, (centre, 2.4 * half / math.tan(math.radians(fov / 2)), 55.0, -60.0, fov)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "page,fmt",
    [
        ("playcanvas.html", "ply"),
        ("playcanvas.html", "ply-compressed"),
        ("spark.html", "ply"),
        ("spark.html", "splat"),
        ("spark.html", "spz"),
    ],
)
def test_blocks_scene_matches_our_renderer(
    browser, blocks: Splats, page: str, fmt: str, tmp_path: Path
) -> None:
    m = _check(browser, page, blocks, fmt, BLOCKS_CAM, f"blocks_{fmt}", tmp_path / "cmp.png")
    assert m["coverage_ref"] > 0.15, m  # the scene fills a good part of the frame
    assert passes(m), f"{page} {fmt}: {m} (side by side: {tmp_path / 'cmp.png'})"


@pytest.mark.parametrize("page,fmt", [("playcanvas.html", "ply"), ("spark.html", "spz")])
def test_tile_reconstruction_matches_our_renderer(
    browser, tile_splats, page: str, fmt: str, tmp_path: Path
) -> None:
    splats, cam_args = tile_splats
    m = _check(browser, page, splats, fmt, cam_args, f"tile_{fmt}", tmp_path / "cmp.png")
    assert m["coverage_ref"] > 0.1, m
    assert passes(m), f"{page} {fmt}: {m} (side by side: {tmp_path / 'cmp.png'})"


def _mirrored(s: Splats) -> Splats:
    return replace(s, means=s.means * np.array([-1.0, 1.0, 1.0], np.float32))


def _linear_scales(s: Splats) -> Splats:
    return replace(s, scales=np.exp(s.scales))


def _raw_rgb_dc(s: Splats) -> Splats:
    sh = s.sh.copy()
    sh[:, 0] = np.clip(s.rgb(), 0, 1)
    return replace(s, sh=sh)


@pytest.mark.parametrize(
    "bug", [_mirrored, _linear_scales, _raw_rgb_dc], ids=["mirrored", "linear_scales", "raw_rgb_dc"]
)
def test_known_export_bugs_fail_the_check(browser, blocks: Splats, bug, tmp_path: Path) -> None:
    # The bug corrupts what goes into the file (before the correct rotation and writer); the reference
    # is our render of the correct splats.
    m = _check(
        browser,
        "playcanvas.html",
        blocks,
        "ply",
        BLOCKS_CAM,
        f"bug{bug.__name__}",
        file_splats_enu=bug(blocks),
    )
    assert not passes(m), f"bug {bug.__name__} not detected: {m}"
