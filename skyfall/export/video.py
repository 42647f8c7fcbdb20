"""Videos along camera paths (what Skyfall-GS's ``render_video.py`` does).

Frames are rendered with ``Scene.render`` (the same renderer and appearance rule as evaluation), written
as PNGs and an H.264 mp4 (imageio-ffmpeg, the ``video`` extra), plus a colourised depth video: the
Spectral colormap on inverse expected depth, normalised between its 1 % and 99 % quantiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.errors import MissingDependencyError
from skyfall.scene import Scene

# ColorBrewer "Spectral" (11 classes, low -> high), the reference's depth colormap.
_SPECTRAL = np.array(
    [
        [158, 1, 66],
        [213, 62, 79],
        [244, 109, 67],
        [253, 174, 97],
        [254, 224, 139],
        [255, 255, 191],
        [230, 245, 152],
        [171, 221, 164],
        [102, 194, 165],
        [50, 136, 189],
        [94, 79, 162],
    ],
    dtype=np.float64,
)


def spectral(t: np.ndarray) -> np.ndarray:
    """Spectral colormap of values in [0, 1] -> uint8 RGB.  [..., 3]"""
    x = np.clip(t, 0.0, 1.0) * (len(_SPECTRAL) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_SPECTRAL) - 2)
    w = (x - i)[..., None]
    return np.round(_SPECTRAL[i] * (1 - w) + _SPECTRAL[i + 1] * w).astype(np.uint8)


def colorize_depth(
    depth: np.ndarray, alpha: np.ndarray | None = None, lo_q: float = 0.01, hi_q: float = 0.99
) -> np.ndarray:
    """Colourise depth maps [..., H, W] as the reference: Spectral of inverse depth, quantile-normalised.

    Quantiles are taken over all frames together (pixels with alpha > 0.5 when ``alpha`` is given), so
    colours are stable through a video. Empty pixels are black.
    """
    valid = np.isfinite(depth) & (depth > 0)
    if alpha is not None:
        valid &= alpha > 0.5
    inv = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)
    if not valid.any():
        return np.zeros(depth.shape + (3,), np.uint8)
    lo, hi = np.quantile(inv[valid], [lo_q, hi_q])
    rgb = spectral((inv - lo) / max(hi - lo, 1e-12))
    rgb[~valid] = 0
    return rgb


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even width/height (yuv420p H.264 needs them)."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def require_video() -> None:
    """Raise MissingDependencyError unless mp4 output is possible (checked before a long render)."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary provider)
    except ImportError as e:
        raise MissingDependencyError(
            f"mp4 output needs imageio + imageio-ffmpeg: pip install 'skyfall[video]' ({e})"
        ) from e


def write_mp4(
    path: str | Path, frames: np.ndarray, fps: float, *, progress: bool = False, desc: str = ""
) -> Path:
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 (``progress``: a tqdm bar per frame)."""
    from tqdm import tqdm

    require_video()
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(
        str(path),
        fps=fps,
        codec="libx264",
        quality=8,
        macro_block_size=1,
        pixelformat="yuv420p",
        ffmpeg_log_level="error",
    )
    try:
        for f in tqdm(
            frames, desc=desc or f"encode {path.name}", unit="frame", disable=not progress, leave=False
        ):
            writer.append_data(_even(f))
    finally:
        writer.close()
    return path


@dataclass
class VideoResult:
    """Files written by ``render_video`` and the raw frames."""

    rgb_video: Path
    depth_video: Path | None
    frame_dir: Path | None
    frames: np.ndarray  # [T, H, W, 3] uint8
    depth_frames: np.ndarray | None = None  # [T, H, W, 3] uint8
    seconds_per_frame: float = 0.0
    pngs: list[Path] = field(default_factory=list)


@torch.no_grad()
def render_frames(
    scene: Scene,
    cameras: Cameras,
    embedding: Tensor | int | None,
    *,
    progress: bool = False,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render every camera: uint8 RGB [T,H,W,3], expected depth [T,H,W] and alpha [T,H,W] (float32).

    ``progress``: a tqdm bar (with ETA) per frame; ``on_frame(i, rgb)`` is called as each frame is
    done (e.g. to save it at once, so that an interrupted render keeps its frames).
    """
    from tqdm import tqdm

    rgb, depth, alpha = [], [], []
    for i in tqdm(range(len(cameras)), desc="render", unit="frame", disable=not progress, dynamic_ncols=True):
        out = scene.render(cameras[i], embedding, absgrad=False)
        rgb.append((out.colors[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        depth.append(out.expected_depths[0, ..., 0].float().cpu().numpy())
        alpha.append(out.alphas[0, ..., 0].float().cpu().numpy())
        if on_frame is not None:
            on_frame(i, rgb[-1])
    return np.stack(rgb), np.stack(depth), np.stack(alpha)


def render_video(
    scene: Scene,
    cameras: Cameras,
    out_dir: str | Path,
    *,
    name: str = "video",
    embedding: Tensor | int | None = None,
    fps: float = 24.0,
    depth: bool = True,
    save_frames: bool = True,
    progress: bool = False,
) -> VideoResult:
    """Render ``cameras`` and write OUT/<name>.mp4, OUT/<name>_depth.mp4 and OUT/<name>/NNNN.png.

    PNG frames are written as they are rendered; ``progress`` shows tqdm bars for the rendering and
    the encoding.
    """
    import time

    from PIL import Image

    require_video()  # before the rendering, which can take minutes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_dir, pngs = None, []
    if save_frames:
        frame_dir = out_dir / name
        frame_dir.mkdir(parents=True, exist_ok=True)

    def save(i: int, frame: np.ndarray) -> None:
        if frame_dir is not None:
            pngs.append(frame_dir / f"{i:04d}.png")
            Image.fromarray(frame).save(pngs[-1])

    t0 = time.perf_counter()
    rgb, dep, alpha = render_frames(scene, cameras, embedding, progress=progress, on_frame=save)
    spf = (time.perf_counter() - t0) / max(len(cameras), 1)
    video = write_mp4(out_dir / f"{name}.mp4", rgb, fps, progress=progress)
    depth_video, depth_rgb = None, None
    if depth:
        depth_rgb = colorize_depth(dep, alpha)
        depth_video = write_mp4(out_dir / f"{name}_depth.mp4", depth_rgb, fps, progress=progress)
    return VideoResult(video, depth_video, frame_dir, rgb, depth_rgb, spf, pngs)
