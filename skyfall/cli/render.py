"""``skyfall render RUN``: mp4 + PNG frames + depth video along a camera path or an orbit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from skyfall.cli.path import OrbitOptions


@dataclass
class Render:
    """Render a video of a run along a camera-path JSON (`--path`, the reference's format) or an orbit.

    Writes OUT/<name>.mp4, OUT/<name>_depth.mp4 (Spectral colormap on inverse depth) and PNG frames
    OUT/<name>/NNNN.png. Without `--path`, an orbit is used; its target and radius default to the
    scene's centre and size.
    """

    run: tyro.conf.Positional[Path]
    """Run directory."""
    path: Path | None = None
    """Camera-path JSON (reference format, e.g. written by `skyfall path orbit`)."""
    out: Path | None = None
    """Output folder (default RUN/video)."""
    name: str | None = None
    """File stem (default: the path file's stem, or 'orbit')."""
    num_frames: int = 0
    """0 = every frame of the path, else an evenly spaced subset of this many."""
    embedding: str | None = None
    """Appearance embedding: 'mean' or an image index (default: the run's test_embedding)."""
    depth: bool = True
    """Also write the colourised depth video."""
    frames_png: bool = True
    """Also write the frames as PNG files."""
    auto_target: bool = True
    """Orbit only: aim at the scene centre and use 1.5x its horizontal size as radius (ignoring
    --orbit.target/--orbit.radius)."""
    orbit: Annotated[OrbitOptions, tyro.conf.arg(name="orbit")] = field(
        default_factory=lambda: OrbitOptions(frames=60, width=256, height=256)
    )

    def main(self) -> None:
        import dataclasses

        import torch

        from skyfall.data.camera_path import read_camera_path
        from skyfall.export.run import load_run
        from skyfall.export.video import render_video
        from skyfall.scene import parse_embedding

        loaded = load_run(self.run)
        scene = loaded.scene
        if self.path is not None:
            import json

            cams = read_camera_path(self.path)
            fps = float(json.loads(self.path.read_text()).get("fps", 24))
            name = self.name or self.path.stem
        else:
            orbit = self.orbit
            if self.auto_target:
                means = scene.model.params["means"].detach()
                ok = torch.isfinite(means).all(1)
                centre = means[ok].median(dim=0).values
                lo, hi = torch.quantile(means[ok, :2], torch.tensor([0.02, 0.98]), dim=0)
                size = float((hi - lo).max())
                orbit = dataclasses.replace(orbit, target=tuple(float(v) for v in centre), radius=1.5 * size)
            cams, fps, name = orbit.cameras(), float(orbit.fps), self.name or "orbit"
        if self.num_frames > 0 and self.num_frames < len(cams):
            idx = torch.linspace(0, len(cams) - 1, self.num_frames).round().long().tolist()
            cams = cams[idx]
        rule = loaded.default_embedding if self.embedding is None else self.embedding
        emb = scene.novel_embedding(parse_embedding(rule))
        out = self.out or Path(self.run) / "video"
        res = render_video(
            scene, cams, out, name=name, embedding=emb, fps=fps, depth=self.depth, save_frames=self.frames_png
        )
        print(
            f"[render] {res.rgb_video}"
            + (f", {res.depth_video}" if res.depth_video else "")
            + f"  {len(cams)} frames {cams.width}x{cams.height} @ {fps:g} fps, {res.seconds_per_frame:.2f} s/frame"
        )
