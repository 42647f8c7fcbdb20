"""Stage 2: Iterative Dataset Update (reference-pipeline.md §3, ``train.py:training_idu``).

For each curriculum episode (elevation, radius): render orbit cameras around a GxG grid of look-at
targets with the novel-view embedding, refine every render N_s times (independent seeds), then train
on 75 % refined / 25 % satellite views with the episode's schedules, continuing the global step count
and the optimizer state of the previous episode.

Everything is resumable. Renders and refined images are written to ``RUN/idu/epNN_.../`` as they are
produced (atomically), so an interrupted refinement phase skips finished images; training resumes
from the latest step checkpoint. Training always reads refined images back from their 8-bit PNGs, so
an uninterrupted run and a resumed one see identical data.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from skyfall.config import Stage1Config, Stage2Config, from_dict, parse_curriculum, to_dict
from skyfall.data.camera_path import read_camera_path
from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.data.orbits import linear_schedule, orbit_eye
from skyfall.errors import ConfigError, SkyfallError
from skyfall.priors.refine import ImageRefiner
from skyfall.render import RenderOutput
from skyfall.storage.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from skyfall.storage.run_dir import RunDir, atomic_write_text
from skyfall.eval.image_metrics import psnr
from skyfall.scene import parse_embedding
from skyfall.train.stage1 import Stage1Trainer


@dataclass
class Episode:
    """One curriculum episode."""

    index: int
    elevation: float
    radius: float
    fov: float

    @property
    def name(self) -> str:
        return f"ep{self.index:02d}_e{self.elevation:g}_r{self.radius:g}"


def episodes_from_config(cfg: Stage2Config, scale: float) -> list[Episode]:
    """The curriculum as a list of episodes, radii multiplied by ``scale``."""
    preset_fov, eps = parse_curriculum(cfg.curriculum)
    fov = cfg.fov if cfg.fov is not None else (preset_fov if preset_fov is not None else 60.0)
    out = [Episode(i, e, r * scale, fov) for i, (e, r) in enumerate(eps)]
    return out[: cfg.max_episodes] if cfg.max_episodes is not None else out


def resolve_scale(cfg: Stage2Config, points: Tensor) -> float:
    """Curriculum scale factor: a number, or 'auto' from the point cloud's horizontal extent.

    The reference's values (grid width 512, radii 250-300) fit its ~256 m JAX tiles; 'auto' rescales
    them by (tile width / 256), with the width taken as twice the 99th percentile of |x|, |y|.
    """
    if cfg.scale == "auto":
        xy = points[:, :2].abs().double()
        half = float(torch.quantile(xy.reshape(-1), 0.99)) if xy.numel() else 128.0
        return max(2 * half / 256.0, 1e-3)
    try:
        value = float(cfg.scale)
    except ValueError:
        raise ConfigError(f"stage2 scale must be a number or 'auto', got {cfg.scale!r}") from None
    if value <= 0:
        raise ConfigError(f"stage2 scale must be > 0, got {value}")
    return value


def idu_cameras(ep: Episode, cfg: Stage2Config, scale: float) -> tuple[Cameras, list[int]]:
    """Orbit cameras of an episode and, per camera, its view index (samples repeat each view).

    Targets on z = 0 at ``-W/2 + k W/(G+1)``, k = 1..G in x and y (reference §3.1); N_v azimuths
    ``2 pi i / N_v`` around each; every pose repeated ``samples_per_view`` times.
    """
    g, width = cfg.grid_size, cfg.grid_width * scale
    ticks = [-width / 2 + k * width / (g + 1) for k in range(1, g + 1)]
    c2ws = []
    for x in ticks:
        for y in ticks:
            target = torch.tensor([x, y, 0.0], dtype=torch.float64)
            az = torch.tensor(
                [2 * math.pi * i / cfg.n_azimuths for i in range(cfg.n_azimuths)], dtype=torch.float64
            )
            eye = orbit_eye(target, ep.radius, ep.elevation, az)
            c2ws.append(look_at(eye, target.expand_as(eye)))
    views = torch.cat(c2ws)
    reps = cfg.samples_per_view
    c2w = views.repeat_interleave(reps, dim=0)
    view_index = [i for i in range(len(views)) for _ in range(reps)]
    k = intrinsics_from_fov(ep.fov, cfg.render_size, cfg.render_size)
    return Cameras(c2w, k, cfg.render_size, cfg.render_size), view_index


def sample_seed(run_seed: int, episode: int, index: int) -> int:
    """Deterministic, independent seed per refined sample (resume recomputes the same one)."""
    h = hashlib.sha256(f"{run_seed}/{episode}/{index}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _to_uint8(img: Tensor) -> np.ndarray:
    """[3,H,W] or [H,W,3] float in [0,1] -> HxWx3 uint8 with rounding (the reference adds 0.5)."""
    if img.shape[0] == 3:
        img = img.permute(1, 2, 0)
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _write_png_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def _read_png(path: Path, device: torch.device) -> Tensor:
    """PNG -> [3,H,W] float in [0,1]."""
    array = np.array(Image.open(path).convert("RGB"))  # a writable copy
    return torch.from_numpy(array).to(device).permute(2, 0, 1).float() / 255.0


class IdealRefiner:
    """MEASURING INSTRUMENT, not a method: returns the synthetic tile's ground-truth render of each pose.

    It shows what the iterative dataset update achieves with a perfect prior. ``noise`` adds a
    per-sample colour perturbation (seeded) to mimic diffusion variance between samples.
    """

    def __init__(self, tile_dir: str | Path, noise: float = 0.0, supersample: int = 2):
        from skyfall.synth import SyntheticCity

        if not (Path(tile_dir) / "synth.json").exists():
            raise ConfigError(f"{tile_dir}: the 'ideal' refiner needs a synthetic tile (synth.json)")
        self.city = SyntheticCity.from_tile(tile_dir)
        self.noise = float(noise)
        self.supersample = supersample

    def refine(self, images: Tensor, *, seeds=None, cameras: Cameras | None = None) -> Tensor:
        if cameras is None:
            raise ValueError("IdealRefiner needs the camera of every image")
        out = self.city.render(cameras, date=None, supersample=self.supersample)
        rgb = torch.as_tensor(out["rgb"], dtype=torch.float32).permute(0, 3, 1, 2)
        if self.noise > 0:
            for i in range(len(rgb)):
                g = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
                gain = 1 + self.noise * torch.randn(3, 1, 1, generator=g)
                rgb[i] = (rgb[i] * gain + self.noise * 0.5 * torch.randn(rgb[i].shape, generator=g)).clamp(
                    0, 1
                )
        return rgb.to(images.device)


def make_stage2_refiner(cfg: Stage2Config, tile_dir: Path) -> ImageRefiner:
    if cfg.refiner == "ideal":
        return IdealRefiner(tile_dir, noise=cfg.ideal_noise)
    from skyfall.priors.refine import make_refiner

    if cfg.refiner == "flowedit":
        return make_refiner("flowedit", config=cfg.flowedit)
    if cfg.refiner == "sdedit":
        return make_refiner("sdedit", config=cfg.sdedit)
    return make_refiner(cfg.refiner)


class Stage2Trainer(Stage1Trainer):
    """Iterative Dataset Update on top of a finished Stage 1 run directory.

    Args:
        cfg2: Stage 2 config.
        run: a Stage 1 run directory (its config.yml names the tile and the Stage 1 config).
        refiner: overrides ``cfg2.refiner`` (tests).
        progress: tqdm bars.
    """

    def __init__(
        self,
        cfg2: Stage2Config,
        run: str | Path,
        *,
        refiner: ImageRefiner | None = None,
        depth_estimator=None,
        progress: bool = True,
    ):
        rd = RunDir(run)
        if not rd.config_path.exists():
            raise SkyfallError(f"{rd.config_path}: not a skyfall run directory (run Stage 1 first)")
        saved = rd.load_config()
        cfg1: Stage1Config = from_dict(Stage1Config, saved["stage1"])
        super().__init__(
            cfg1, saved["data"], run, resume=True, depth_estimator=depth_estimator, progress=progress
        )
        self.cfg2 = cfg2
        self._refiner = refiner
        self.scale = resolve_scale(cfg2, self.tile.points)
        self.episodes = episodes_from_config(cfg2, self.scale)
        self.stage1_steps = None
        self.episode: Episode | None = None
        self.first_step = 0
        self.idu_stack: list[int] = []

    # ------------------------------------------------------------------ hooks (episode-relative schedules)

    def refiner(self) -> ImageRefiner:
        if self._refiner is None:
            self._refiner = make_stage2_refiner(self.cfg2, self.data)
        return self._refiner

    def sample_view(self, it: int):
        # With probability idu_ratio the next refined view (shuffled stack), else the next satellite view.
        if float(torch.rand(())) < self.cfg2.idu_ratio:
            if not self.idu_stack:
                self.idu_stack = torch.randperm(len(self.idu_cams)).tolist()
            i = self.idu_stack.pop()
            cam = self.idu_cams[i]
            # Refined views use the fixed novel-view embedding, detached: no gradient reaches it, but
            # the MLP and the per-Gaussian embeddings still learn (reference: testing=True, §3.3).
            emb = None
            if self.appearance is not None:
                emb = self.appearance.image_embedding(
                    parse_embedding(self.cfg.appearance.test_embedding)
                ).detach()
            self._current_idu = i
            return cam, self.idu_images[i], None, emb
        self._current_idu = None
        return super().sample_view(it)

    def extra_loss(self, it: int, out: RenderOutput) -> Tensor | None:
        if self.cfg2.lambda_depth <= 0 or self._current_idu is None:
            return None
        from skyfall.losses import pearson_depth_loss

        d, v = self.idu_depths[self._current_idu]
        res = pearson_depth_loss(out.depths[0, ..., 0], d, v)
        return None if res.loss is None else self.cfg2.lambda_depth * res.loss

    def lambda_opacity(self, it: int) -> float:
        c = self.cfg2
        return c.opacity_cooldown_lambda if it < self.cooldown_until else c.lambda_opacity

    def pseudo_pose(self, it: int) -> tuple[float, float] | None:
        c, p = self.cfg2, self.cfg.pseudo
        if not (p.enabled and c.pseudo_weight > 0 and it % p.interval == 0):
            return None
        end = self.first_step + c.episode_steps
        return (
            linear_schedule(it, self.first_step, end, c.pseudo_elevation_start, c.pseudo_elevation_end),
            self.scale
            * linear_schedule(it, self.first_step, end, c.pseudo_radius_start, c.pseudo_radius_end),
        )

    def pseudo_weight(self, it: int) -> float:
        # Stage 2 has no start window and no ramp (reference §3.3).
        return self.cfg2.pseudo_weight

    @property
    def pseudo_size(self) -> int:
        return self.cfg2.pseudo_size or self.cfg.pseudo.size

    @property
    def pseudo_target_std(self) -> float:
        # [FIX] §8 #3: the reference ignores --target_std in Stage 2 (always 64); we honour it (scaled).
        return self.cfg.pseudo.target_std * self.scale

    def densify_schedule(self, it: int) -> tuple[bool, bool, bool]:
        c = self.cfg2
        active = it < self.first_step + c.densify_until
        end = self.first_step + c.episode_steps
        return (
            active,
            active and it % c.densify_interval == 0,
            active and it % c.opacity_reset_interval == 0 and it < end - 100,
        )

    def filter_due(self, it: int) -> bool:
        c = self.cfg2
        end = self.first_step + c.episode_steps
        return (
            it % self.cfg.densify.filter_recompute_interval == 0
            and it < end - self.cfg.densify.filter_recompute_interval
        )

    @property
    def grad_threshold(self) -> float:
        return self.cfg2.grad_threshold

    @property
    def cooldown_steps(self) -> int:
        return self.cfg2.opacity_cooldown_steps

    def filter_cameras(self) -> list[Cameras]:
        # Satellite + refined views (reference §3.3), grouped by image size.
        if self.episode is None or not hasattr(self, "idu_cams"):
            return [self.cameras]
        return [self.cameras, self.idu_cams]

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        st = super().state()
        st.update(
            stage="stage2",
            episode=-1 if self.episode is None else self.episode.index,
            first_step=self.first_step,
            stage1_steps=self.stage1_steps,
            idu_stack=list(self.idu_stack),
            stage2_config=to_dict(self.cfg2),
        )
        return st

    def load(self, path: Path) -> dict:
        st = load_checkpoint(path, map_location=self.device)
        super().load(path)
        if st.get("stage") == "stage2":
            self.first_step = int(st["first_step"])
            self.stage1_steps = int(st["stage1_steps"])
            self.idu_stack = [int(i) for i in st["idu_stack"]]
        else:
            self.stage1_steps = int(st["step"])
        return st

    def save_milestone(self) -> Path:
        """A checkpoint that pruning never removes (the end of each episode)."""
        path = save_checkpoint(checkpoint_path(self.run_dir.ckpts, self.step), self.state())
        self._protect(self.step)
        return path

    def _protect(self, step: int) -> None:
        ms = self._milestones()
        ms.add(step)
        atomic_write_text(self.run_dir.ckpts / "milestones.json", json.dumps(sorted(ms)))

    def _milestones(self) -> set[int]:
        f = self.run_dir.ckpts / "milestones.json"
        return set(json.loads(f.read_text())) if f.exists() else set()

    def save(self) -> Path:
        path = save_checkpoint(checkpoint_path(self.run_dir.ckpts, self.step), self.state())
        keep = self._milestones()
        ckpts = [
            p for p in sorted(self.run_dir.ckpts.glob("ckpt_*.pt")) if int(p.stem.split("_")[1]) not in keep
        ]
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_checkpoints)]:
            if int(old.stem.split("_")[1]) > (self.stage1_steps or 0):
                old.unlink()
        return path

    # ------------------------------------------------------------------ dataset update phases

    def episode_dir(self, ep: Episode) -> Path:
        return self.run_dir.root / "idu" / ep.name

    def _render_phase(self, ep: Episode, cams: Cameras) -> None:
        """Render every orbit camera once per view (samples share the render) into render/."""
        from tqdm import tqdm

        d = self.episode_dir(ep) / "render"
        d.mkdir(parents=True, exist_ok=True)
        emb = self.scene.novel_embedding(self.cfg.appearance.test_embedding)
        reps = self.cfg2.samples_per_view
        todo = [i for i in range(0, len(cams), reps) if not (d / f"{i // reps:05d}.png").exists()]
        empty = 0
        for i in tqdm(todo, desc=f"{ep.name} render", disable=not self.progress, dynamic_ncols=True):
            out = self.scene.render(cams[i], emb, absgrad=False)
            empty += int(float(out.alphas.detach().mean()) < 0.05)
            _write_png_atomic(d / f"{i // reps:05d}.png", _to_uint8(out.colors[0]))
        if todo and empty == len(todo):
            # [FIX] §8 #13: the reference refines blank renders without a word when Stage 1 collapsed.
            raise SkyfallError(
                f"{d}: every orbit render of {ep.name} is empty (mean alpha < 0.05); the model has collapsed "
                "or the curriculum cameras miss the scene (check --stage2.scale)"
            )

    def _refine_phase(self, ep: Episode, cams: Cameras, view_index: list[int]) -> None:
        """Refine each (view, sample) into refine/NNNNN.png, skipping finished ones."""
        from tqdm import tqdm

        ed = self.episode_dir(ep)
        rdir = ed / "refine"
        rdir.mkdir(parents=True, exist_ok=True)
        refiner = self.refiner()
        todo = [i for i in range(len(cams)) if not (rdir / f"{i:05d}.png").exists()]
        for i in tqdm(todo, desc=f"{ep.name} refine", disable=not self.progress, dynamic_ncols=True):
            render = _read_png(ed / "render" / f"{view_index[i]:05d}.png", self.device)[None]
            seed = sample_seed(self.cfg.seed, ep.index, i)
            refined = refiner.refine(render, seeds=[seed], cameras=cams[i])
            _write_png_atomic(rdir / f"{i:05d}.png", _to_uint8(refined[0]))

    def _load_refined(self, ep: Episode, cams: Cameras) -> None:
        rdir = self.episode_dir(ep) / "refine"
        self.idu_cams = cams
        self.idu_images = [_read_png(rdir / f"{i:05d}.png", self.device) for i in range(len(cams))]
        self.idu_depths = []
        if self.cfg2.lambda_depth > 0:
            est = self.depth_estimator()
            for i, img in enumerate(self.idu_images):
                pred = est(img[None], ep.fov, cams[i])
                self.idu_depths.append((pred.depth[0], pred.valid[0]))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        res = super().evaluate()
        gt = Path(self.data) / "gt" / "views" / "orbit_e45_r250"
        if (gt / "camera_path.json").exists():
            cams = read_camera_path(gt / "camera_path.json")
            emb = self.scene.novel_embedding(self.cfg.appearance.test_embedding)
            vals = []
            for i in range(len(cams)):
                with torch.no_grad():
                    out = self.scene.render(cams[i], emb, absgrad=False)
                img = _read_png(gt / "images" / f"{i:05d}.png", self.device).permute(1, 2, 0)
                vals.append(psnr(out.colors[0], img))
            res["psnr_gt_45"] = float(np.mean(vals))
        return res

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.run_dir.create()
        self._setup_data()
        self._t0 = time.perf_counter()
        ckpt = latest_checkpoint(self.run_dir.ckpts)
        if ckpt is None:
            raise SkyfallError(f"{self.run_dir.ckpts}: no checkpoint; run Stage 1 first")
        st = self.load(ckpt)
        self._t0 = time.perf_counter()
        summary = self.run_dir.read_summary()
        if st.get("stage") != "stage2":
            # Entering Stage 2: protect the final Stage 1 checkpoint (left as Stage 1 wrote it) and
            # record the Stage 1 baseline.
            self._protect(self.step)
            base = self.evaluate()
            summary = self.run_dir.update_summary(stage2={"stage1_baseline": base, "episodes": []})
        n_done = len(summary.get("stage2", {}).get("episodes", []))
        for ep in self.episodes[n_done:]:
            self.episode = ep
            cams, view_index = idu_cameras(ep, self.cfg2, self.scale)
            in_progress = st.get("stage") == "stage2" and int(st.get("episode", -1)) == ep.index
            if not in_progress:
                self.first_step = self.step
                self.idu_stack = []
            self._render_phase(ep, cams)
            self._refine_phase(ep, cams, view_index)
            self._load_refined(ep, cams)
            if not in_progress:
                # Per-episode restarts (reference §3.3): the position LR schedule and the filter over
                # satellite + refined cameras; the SH degree keeps its value.
                # Not checkpointed here: a resume before the first step checkpoint recomputes this
                # start state exactly, and the previous milestone stays as it was written.
                self.model.restart_position_lr(self.first_step, self.cfg2.episode_steps)
                self._recompute_filter()
            end = self.first_step + self.cfg2.episode_steps
            bar = tqdm(
                total=self.cfg2.episode_steps,
                initial=self.step - self.first_step,
                desc=f"{ep.name} train",
                disable=not self.progress,
                dynamic_ncols=True,
            )
            try:
                for it in range(self.step + 1, end + 1):
                    stats = self.train_step(it)
                    self.step = it
                    bar.update(1)
                    if it % self.cfg.log_every == 0 or it == end:
                        bar.set_postfix(
                            loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", n=stats["n"]
                        )
                        self.run_dir.log_metrics(
                            {"step": it, "episode": ep.index, **stats, "wall_s": self._wall()}
                        )
                    if it % self.cfg2.checkpoint_every == 0 and it != end:
                        self.save()
            finally:
                bar.close()
            self.save_milestone()
            res = self.evaluate()
            entry = {
                "episode": ep.index,
                "elevation": ep.elevation,
                "radius": ep.radius,
                "step": self.step,
                "num_gaussians": self.model.num_gaussians,
                "wall_s": self._wall(),
                **{k: v for k, v in res.items() if not isinstance(v, list)},
            }
            summary = self.run_dir.read_summary()
            summary.setdefault("stage2", {}).setdefault("episodes", []).append(entry)
            self.run_dir.update_summary(stage2=summary["stage2"])
            self.run_dir.log_metrics({"step": self.step, "episode": ep.index, **entry})
            st = {}  # the next episode starts fresh (it is not "in progress")
        return self.run_dir.read_summary()


def train_stage2(cfg2: Stage2Config, run: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Build a ``Stage2Trainer`` for a finished Stage 1 run and run (or resume) it."""
    return Stage2Trainer(cfg2, run, **kwargs).run()
