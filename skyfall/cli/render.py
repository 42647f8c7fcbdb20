"""``skyfall render RUN``: mp4 + PNG frames + depth video along a camera path or an orbit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from skyfall.cli.path import OrbitOptions


@dataclass
class Render:
    """Render a video of a run along a camera-path JSON (`--path`, the reference's format), an orbit, or a descent.

    Writes OUT/<name>.mp4, OUT/<name>_depth.mp4 (Spectral colormap on inverse depth) and PNG frames
    OUT/<name>/NNNN.png. Without `--path`, an orbit is used; its target and radius default to the
    scene's centre and size. `--descent` plays the altitude ladder of `skyfall export-views`: one
    camera column from 350 m down to street level, looking at a target on open ground.
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
    descent: bool = False
    """Render a descent from the ladder's top (350 m) to street level (1.7 m) instead of an orbit; uses
    --orbit.frames/width/height/fov/fps for the frames (the column: the first street-level camera of
    `skyfall export-views`' ladder, placed on the rendered DSM)."""
    auto_target: bool = True
    """Orbit only: aim at the scene centre and use 1.5x its horizontal size as radius (ignoring
    --orbit.target/--orbit.radius)."""
    orbit: Annotated[OrbitOptions, tyro.conf.arg(name="orbit")] = field(
        default_factory=lambda: OrbitOptions(frames=60, width=256, height=256)
    )

    def check(self) -> None:
        """One ConfigError naming the option for a value no render could use (before loading the run)."""
        from skyfall.errors import ConfigError

        if self.num_frames < 0:
            raise ConfigError(f"--num-frames must be >= 0 (0: every frame), got {self.num_frames}")
        if self.path is not None and self.descent:
            raise ConfigError("--path and --descent are two different camera paths: choose one")
        if self.descent and self.orbit.frames < 2:
            raise ConfigError(f"--descent needs --orbit.frames >= 2, got {self.orbit.frames}")
        if self.path is None:
            o = self.orbit
            for flag, value in (
                ("frames", o.frames),
                ("width", o.width),
                ("height", o.height),
                ("fps", o.fps),
            ):
                if value < 1:
                    raise ConfigError(f"--orbit.{flag} must be >= 1, got {value}")
            if not 0 < o.fov < 180:
                raise ConfigError(f"--orbit.fov must be in (0, 180) degrees, got {o.fov}")
            if not self.auto_target and not o.radius > 0:
                raise ConfigError(f"--orbit.radius must be > 0, got {o.radius}")

    def main(self) -> None:
        import dataclasses
        import json

        import torch

        from skyfall.data.camera_path import read_camera_path
        from skyfall.errors import TileFormatError
        from skyfall.export.run import load_run
        from skyfall.export.video import render_video, require_video

        self.check()
        require_video()
        if self.path is not None:
            cams = read_camera_path(self.path)
            fps = json.loads(self.path.read_text()).get("fps", 24)
            if not isinstance(fps, (int, float)) or not fps > 0:
                raise TileFormatError(self.path, "fps", f"must be a number > 0, got {fps!r}")
            fps = float(fps)
        loaded = load_run(self.run)
        scene = loaded.scene
        if self.embedding is None:
            rule = loaded.default_embedding
            emb = scene.novel_embedding(rule)
        else:
            rule = self.embedding
            emb = scene.novel_embedding(rule, "--embedding")
        if self.path is not None:
            name = self.name or self.path.stem
        elif self.descent:
            cams, info = _descent(self.run, scene, self.orbit)
            fps, name = float(self.orbit.fps), self.name or "descent"
            print(
                f"[render] descent {info['top_m']:g} m -> {info['bottom_m']:g} m to target "
                f"({info['target'][0]:.1f}, {info['target'][1]:.1f}) from azimuth {info['azimuth_deg']:.0f} deg, "
                f"{info['standoff_m']:.0f} m away",
                flush=True,
            )
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
        out = self.out or Path(self.run) / "video"
        print(
            f"[render] {len(cams)} frames {cams.width}x{cams.height}, embedding {rule} -> {out}/{name}.mp4",
            flush=True,
        )
        res = render_video(
            scene,
            cams,
            out,
            name=name,
            embedding=emb,
            fps=fps,
            depth=self.depth,
            save_frames=self.frames_png,
            progress=True,
        )
        print(
            f"[render] {res.rgb_video}"
            + (f", {res.depth_video}" if res.depth_video else "")
            + f"  {len(cams)} frames {cams.width}x{cams.height} @ {fps:g} fps, {res.seconds_per_frame:.2f} s/frame"
        )


def _descent(run: Path, scene, orbit: OrbitOptions):  # noqa: ANN001, ANN202 (Cameras, dict)
    """The descent cameras of a run: the ladder on its rendered DSM, then its first street-level column."""
    from skyfall.data.descent import descent_cameras
    from skyfall.errors import SkyfallError
    from skyfall.export.views import ladder_cameras, run_extent

    ladder, hf = ladder_cameras(
        scene, run_extent(run, scene), targets=2, azimuths=4, fov=orbit.fov, size=orbit.width, progress=True
    )
    if len({v.altitude_m for v in ladder.views}) < 2:
        raise SkyfallError(f"{run}: the ladder has no two altitudes to descend between ({ladder.summary()})")
    if not any(v.band == "ground" for v in ladder.views):
        # a coarse reconstruction may leave no street-level spot that sees a target: descend as low as it allows
        print(
            f"[render] no street-level camera position ({ladder.summary()}); descending to the lowest placed"
        )
    frames = max(2, orbit.frames - 2 * (orbit.frames // 10))
    return descent_cameras(
        hf,
        ladder,
        frames=frames,
        hold=orbit.frames // 10,
        fov_deg=orbit.fov,
        width=orbit.width,
        height_px=orbit.height,
    )
