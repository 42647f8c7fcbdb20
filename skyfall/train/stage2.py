"""Stage 2: Iterative Dataset Update (Skyfall-GS ``train.py:training_idu``).

The episode schedule around ``skyfall.train.loop``: for each curriculum episode (elevation, radius),
render orbit cameras around a GxG grid of look-at targets with the novel-view embedding, refine every
render N_s times (independent seeds), then train one phase on 75 % refined / 25 % satellite views
with the episode's schedules, continuing the global step count and the optimizer state of the
previous episode.

Everything is resumable. Renders and refined images are written to ``RUN/idu/epNN_.../`` as they are
produced (atomically), so an interrupted refinement phase skips finished images; training resumes
from the latest step checkpoint. Training always reads refined images back from their 8-bit PNGs, so
an uninterrupted run and a resumed one see identical data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from skyfall.config.presets import from_dict, to_dict
from skyfall.config.resume import check_resume
from skyfall.config.training import Stage1Config, Stage2Config, parse_curriculum
from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.data.guidance import best_satellite_view, ground_level, height_map, satellite_crop
from skyfall.data.orbits import orbit_eye
from skyfall.errors import ConfigError, SkyfallError
from skyfall.eval.heldout import gt_orbit_psnr, read_image
from skyfall.priors.depth import DepthEstimator
from skyfall.priors.refine import ImageRefiner, RefineGuidance
from skyfall.registry import REFINERS
from skyfall.scene import parse_embedding
from skyfall.storage.atomic import atomic_write
from skyfall.storage.checkpoints import latest_checkpoint
from skyfall.storage.run_dir import RunDir
from skyfall.storage.run_lock import run_lock
from skyfall.train.loop import Phase, PseudoSchedule, Trainer, ViewSample
from skyfall.train.stage1 import evaluate as stage1_evaluate
from skyfall.train.stage1 import stage1_strategy
from skyfall.train.syncs import host_reads


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


def idu_targets(cfg: Stage2Config, scale: float) -> Tensor:
    """[G*G, 3] look-at targets on z = 0 at ``-W/2 + k W/(G+1)``, k = 1..G in x (outer) and y (as the
    reference)."""
    g, width = cfg.grid_size, cfg.grid_width * scale
    ticks = [-width / 2 + k * width / (g + 1) for k in range(1, g + 1)]
    return torch.tensor([[x, y, 0.0] for x in ticks for y in ticks], dtype=torch.float64)


def idu_cameras(ep: Episode, cfg: Stage2Config, scale: float) -> tuple[Cameras, list[int]]:
    """Orbit cameras of an episode and, per camera, its view index (samples repeat each view).

    Around each target of `idu_targets`, N_v azimuths ``2 pi i / N_v`` (view index = target index *
    N_v + azimuth index); every pose repeated ``samples_per_view`` times.
    """
    az = torch.tensor([2 * math.pi * i / cfg.n_azimuths for i in range(cfg.n_azimuths)], dtype=torch.float64)
    c2ws = []
    for target in idu_targets(cfg, scale):
        eye = orbit_eye(target, ep.radius, ep.elevation, az)
        c2ws.append(look_at(eye, target.expand_as(eye)))
    views = torch.cat(c2ws)
    reps = cfg.samples_per_view
    c2w = views.repeat_interleave(reps, dim=0)
    view_index = [i for i in range(len(views)) for _ in range(reps)]
    k = intrinsics_from_fov(ep.fov, cfg.render_size, cfg.render_size)
    return Cameras(c2w, k, cfg.render_size, cfg.render_size), view_index


SATELLITE_CROP_PX = 384
"""Side of the satellite crop a refiner gets (SigLIP's input size in FLUX.1 Redux)."""


def sample_seed(run_seed: int, episode: int, index: int) -> int:
    """Deterministic, independent seed per refined sample (resume recomputes the same one)."""
    h = hashlib.sha256(f"{run_seed}/{episode}/{index}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _stack_guidance(per_image: list[RefineGuidance]) -> RefineGuidance:
    """One RefineGuidance for a group of images from each image's own (batch 1): every field that the
    images have, concatenated in order."""
    out = RefineGuidance()
    for f in dataclasses.fields(RefineGuidance):
        parts = [getattr(g, f.name) for g in per_image]
        if all(p is not None for p in parts):
            setattr(out, f.name, torch.cat(parts))
    return out


def _to_uint8(img: Tensor) -> np.ndarray:
    """[3,H,W] or [H,W,3] float in [0,1] -> HxWx3 uint8 with rounding (the reference adds 0.5)."""
    if img.shape[0] == 3:
        img = img.permute(1, 2, 0)
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _write_png_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


class IterativeDatasetUpdate:
    """Stage 2 on top of a finished Stage 1 run directory: the episode schedule around the loop.

    Args:
        cfg2: Stage 2 config.
        run: a Stage 1 run directory (its config.yml names the tile and the Stage 1 config).
        refiner: overrides ``cfg2.refiner`` (tests).
        depth_estimator: overrides the Stage 1 config's depth estimator (tests).
        progress: tqdm bars.
    """

    def __init__(
        self,
        cfg2: Stage2Config,
        run: str | Path,
        *,
        refiner: ImageRefiner | None = None,
        depth_estimator: DepthEstimator | None = None,
        progress: bool = True,
        allow_unfinished_stage1: bool = False,
    ):
        rd = RunDir(run)
        self.allow_unfinished_stage1 = allow_unfinished_stage1
        if not rd.config_path.exists():
            raise SkyfallError(f"{rd.config_path}: not a skyfall run directory (run Stage 1 first)")
        saved = rd.load_config()
        if "stage1" not in saved:
            raise SkyfallError(f"{rd.config_path}: no stage1 section (not a Stage 1 run's config.yml)")
        cfg1: Stage1Config = from_dict(Stage1Config, saved["stage1"], where=str(rd.config_path))
        tile = rd.tile_dir(saved)
        if tile is None:
            raise SkyfallError(
                f"{rd.config_path}: the run's tile {saved.get('data')!r} is not found (from here or "
                f"relative to the run folder); move the tile back, or edit 'data' in {rd.config_path}"
            )
        self.saved_stage2 = saved.get("stage2")
        self.trainer = Trainer(cfg1, tile, run, depth_estimator=depth_estimator, progress=progress)
        self.trainer.extra_state = self.state_dict
        self.cfg = cfg1
        self.cfg2 = cfg2
        self.progress = progress
        self._refiner = refiner
        self.scale = resolve_scale(cfg2, self.trainer.tile.points)
        self.episodes = episodes_from_config(cfg2, self.scale)
        self.stage1_steps: int | None = None
        self.episode: Episode | None = None
        self.first_step = 0
        self.idu_stack: list[int] = []
        self.idu_cams: Cameras | None = None
        self.idu_images: list[Tensor] = []
        self.idu_depths: list[tuple[Tensor, Tensor]] = []
        self._ground: float | None = None
        self._crops: dict[int, Tensor] = {}

    @property
    def run_dir(self) -> RunDir:
        return self.trainer.run_dir

    def refiner(self) -> ImageRefiner:
        if self._refiner is None:
            self._refiner = REFINERS.build(self.cfg2.refiner, self.cfg2, self.trainer.data)
        return self._refiner

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Stage 2's checkpoint entries (merged into the trainer's)."""
        return {
            "stage": "stage2",
            "episode": -1 if self.episode is None else self.episode.index,
            "first_step": self.first_step,
            "stage1_steps": self.stage1_steps,
            "idu_stack": list(self.idu_stack),
            "stage2_config": to_dict(self.cfg2),
        }

    def load(self, path: Path | None = None) -> dict[str, Any]:
        st = self.trainer.load(path)
        if st.get("stage") == "stage2":
            self.first_step = int(st["first_step"])
            self.stage1_steps = int(st["stage1_steps"])
            self.idu_stack = [int(i) for i in st["idu_stack"]]
        else:
            self.stage1_steps = int(st["step"])
        self.trainer.prune_floor = self.stage1_steps
        return st

    # ------------------------------------------------------------------ one episode's phase

    def sample_view(self, it: int) -> ViewSample:
        """With probability idu_ratio the next refined view (shuffled stack), else a satellite view."""
        with host_reads():  # the CPU generator's draws
            refined = float(torch.rand(())) < self.cfg2.idu_ratio
        if refined:
            if not self.idu_stack:
                with host_reads():
                    self.idu_stack = torch.randperm(len(self.idu_cams)).tolist()
            i = self.idu_stack.pop()
            # Refined views use the fixed novel-view embedding, detached: no gradient reaches it, but
            # the MLP and the per-Gaussian embeddings still learn (the reference renders them with
            # testing=True).
            emb = None
            app = self.trainer.appearance
            if app is not None:
                emb = app.image_embedding(parse_embedding(self.cfg.appearance.test_embedding)).detach()
            depth = self.idu_depths[i] if self.idu_depths else None
            return ViewSample(self.idu_cams[i], self.idu_images[i], None, emb, depth)
        return self.trainer.satellite_view()

    def phase(self, ep: Episode) -> Phase:
        """The training phase of episode ``ep`` (schedules relative to its first step)."""
        c, p = self.cfg2, self.cfg.pseudo
        end = self.first_step + c.episode_steps
        strategy = dataclasses.replace(
            stage1_strategy(self.cfg),
            start=self.first_step,
            until=self.first_step + c.densify_until,
            every=c.densify_interval,
            grad_threshold=c.grad_threshold,
            reset_every=c.opacity_reset_interval,
            reset_until=end - 100,  # the reference never resets in the last 100 steps of an episode
            cooldown_steps=c.opacity_cooldown_steps,
            refilter_until=end - self.cfg.densify.filter_recompute_interval,
            max_gaussians=0,  # Stage 2 densifies as the reference (Stage 1's cap is for sparse starts)
        )
        pseudo = None
        if p.enabled and c.pseudo_weight > 0:
            # Stage 2 has no start window and no ramp; the reference ignores --target_std here
            # (always 64), we honour it, scaled with the curriculum.
            pseudo = PseudoSchedule(
                start=self.first_step,
                end=end,
                last=end,
                interval=p.interval,
                weight=c.pseudo_weight,
                ramp=0,
                elevation=(c.pseudo_elevation_start, c.pseudo_elevation_end),
                radius=(c.pseudo_radius_start, c.pseudo_radius_end),
                size=c.pseudo_size or p.size,
                target_std=p.target_std * self.scale,
                radius_scale=self.scale,
            )
        return Phase(
            end=end,
            views=self.sample_view,
            strategy=strategy,
            opacity_weight=c.lambda_opacity,
            cooldown_weight=c.opacity_cooldown_lambda,
            pseudo=pseudo,
            lambda_depth=c.lambda_depth,
        )

    # ------------------------------------------------------------------ dataset update

    def episode_dir(self, ep: Episode) -> Path:
        return self.run_dir.root / "idu" / ep.name

    def _render_phase(self, ep: Episode, cams: Cameras) -> None:
        """Render every orbit camera once per view (samples share the render) into render/."""
        from tqdm import tqdm

        d = self.episode_dir(ep) / "render"
        d.mkdir(parents=True, exist_ok=True)
        scene = self.trainer.scene
        emb = scene.novel_embedding(self.cfg.appearance.test_embedding)
        reps = self.cfg2.samples_per_view
        todo = [i for i in range(0, len(cams), reps) if not (d / f"{i // reps:05d}.png").exists()]
        empty = 0
        for i in tqdm(todo, desc=f"{ep.name} render", disable=not self.progress, dynamic_ncols=True):
            out = scene.render(cams[i], emb, absgrad=False)
            empty += int(float(out.alphas.detach().mean()) < 0.05)
            _write_png_atomic(d / f"{i // reps:05d}.png", _to_uint8(out.colors[0]))
        if todo and empty == len(todo):
            # The reference refines blank renders without a word when Stage 1 collapsed.
            raise SkyfallError(
                f"{d}: every orbit render of {ep.name} is empty (mean alpha < 0.05); the model has collapsed "
                "or the curriculum cameras miss the scene (check --stage2.scale)"
            )

    def _refine_phase(self, ep: Episode, cams: Cameras, view_index: list[int]) -> None:
        """Refine each (view, sample) into refine/NNNNN.png, skipping finished ones.

        The unfinished (view, sample) pairs go to the refiner in groups of the selected refiner's
        ``batch_size`` (1 without one), in order: the samples of a view and then the next views. Each
        refined image is written as soon as its group returns, and every image keeps its own seed, so a
        run stopped inside a group resumes with the images that are missing, whatever they are grouped
        with now.
        """
        from tqdm import tqdm

        ed = self.episode_dir(ep)
        rdir = ed / "refine"
        rdir.mkdir(parents=True, exist_ok=True)
        refiner = self.refiner()
        wants = frozenset(getattr(refiner, "wants", ()))
        todo = [i for i in range(len(cams)) if not (rdir / f"{i:05d}.png").exists()]
        device = self.trainer.device
        size = self._refine_batch_size()
        guided: dict[int, RefineGuidance] = {}
        with tqdm(
            total=len(todo), desc=f"{ep.name} refine", disable=not self.progress, dynamic_ncols=True
        ) as bar:
            for start in range(0, len(todo), size):
                group = todo[start : start + size]
                renders = torch.cat(
                    [read_image(ed / "render" / f"{view_index[i]:05d}.png", device)[None] for i in group]
                )
                seeds = [sample_seed(self.cfg.seed, ep.index, i) for i in group]
                if wants:
                    # the samples of a view are consecutive and share its guidance: one render per view
                    for i in group:
                        if view_index[i] not in guided:
                            guided[view_index[i]] = self.guidance(cams[i], view_index[i], wants)
                    guidance = _stack_guidance([guided[view_index[i]] for i in group])
                    # only the last view may continue into the next group
                    guided = {view_index[group[-1]]: guided[view_index[group[-1]]]}
                    refined = refiner.refine(renders, seeds=seeds, cameras=cams[group], guidance=guidance)
                else:
                    refined = refiner.refine(renders, seeds=seeds, cameras=cams[group])
                for j, i in enumerate(group):
                    _write_png_atomic(rdir / f"{i:05d}.png", _to_uint8(refined[j]))
                bar.update(len(group))

    def _refine_batch_size(self) -> int:
        """(view, sample) pairs per refine() call: the selected refiner section's ``batch_size``, else 1."""
        section = getattr(self.cfg2, self.cfg2.refiner, None)
        return max(1, int(getattr(section, "batch_size", 1) or 1))

    @torch.no_grad()
    def guidance(self, camera: Cameras, view: int, wants: frozenset[str]) -> RefineGuidance:
        """What a conditioned refiner asks for (``refiner.wants``) about one orbit view.

        depth: the scene's expected z-depth at this pose (0 where alpha < 0.5); height: that surface's
        height above the tile's ground (`skyfall.data.guidance.height_map`); satellite: the crop of the
        training view that sees the view's look-at target most steeply, one look-at grid spacing wide
        (the ground the orbit views around that target show), ``SATELLITE_CROP_PX`` square (black when
        no training view sees the target). Recomputed from the scene, which does not change during the
        refinement phase, so a resumed refinement gets the same guidance.
        """
        tr = self.trainer
        g = RefineGuidance()
        if wants & {"depth", "height"}:
            scene = tr.scene
            out = scene.render(
                camera, scene.novel_embedding(self.cfg.appearance.test_embedding), absgrad=False
            )
            depth = torch.where(
                out.alphas[0, ..., 0] >= 0.5,
                out.expected_depths[0, ..., 0],
                torch.zeros_like(out.alphas[0, ..., 0]),
            )
            if "depth" in wants:
                g.depth = depth[None]
            if "height" in wants:
                g.height = height_map(depth, camera, self._ground_level())[None].to(depth.device)
        if "satellite" in wants:
            g.satellite = self._satellite_crop(view // self.cfg2.n_azimuths)[None]
        return g

    def _ground_level(self) -> float:
        """The tile's ground height (its points do not change: computed once)."""
        if self._ground is None:
            self._ground = ground_level(self.trainer.tile.points)
        return self._ground

    def _satellite_crop(self, target_index: int) -> Tensor:
        """The satellite crop of one look-at target, shared by its azimuths, samples and episodes (the
        targets and the training views are fixed for the run: computed once per target)."""
        if target_index not in self._crops:
            tr = self.trainer
            target = idu_targets(self.cfg2, self.scale)[target_index]
            n = best_satellite_view(tr.cameras, target, tr.masks.cpu())
            size = SATELLITE_CROP_PX
            if n is None:
                crop = torch.zeros(3, size, size, device=tr.device)
            else:
                side = self.cfg2.grid_width * self.scale / (self.cfg2.grid_size + 1)
                crop = satellite_crop(tr.images[n], tr.cameras[n], target, side, size)
            self._crops[target_index] = crop
        return self._crops[target_index]

    def _load_refined(self, ep: Episode, cams: Cameras) -> None:
        rdir = self.episode_dir(ep) / "refine"
        device = self.trainer.device
        self.idu_cams = cams
        self.idu_images = [read_image(rdir / f"{i:05d}.png", device) for i in range(len(cams))]
        self.idu_depths = []
        if self.cfg2.lambda_depth > 0:
            est = self.trainer.depth_estimator()
            for i, img in enumerate(self.idu_images):
                pred = est(img[None], ep.fov, cams[i])
                self.idu_depths.append((pred.depth[0], pred.valid[0]))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """Stage 1's metrics plus, on synthetic tiles, the PSNR of the 45-degree ground-truth orbit."""
        res = stage1_evaluate(self.trainer)
        scene = self.trainer.scene
        gt45 = gt_orbit_psnr(
            scene,
            self.trainer.data,
            scene.novel_embedding(self.cfg.appearance.test_embedding),
            progress=self.progress,
        )
        if gt45 is not None:
            res["psnr_gt_45"] = gt45
        return res

    # ------------------------------------------------------------------ the episodes

    def run(self) -> dict[str, Any]:
        with run_lock(self.run_dir.root):
            self.run_dir.remove_stale_temp()
            return self._run()

    def _check_resumable(self) -> None:
        """Refuse other Stage 2 settings than the ones this run's Stage 2 started with."""
        # Stage 2 has begun once its baseline is in summary.json; before that no option has acted yet.
        if self.saved_stage2 is not None and "stage2" in self.run_dir.read_summary():
            check_resume(
                "stage2", self.saved_stage2, RunDir.as_saved(to_dict(self.cfg2)), self.run_dir.config_path
            )

    def _check_stage1_finished(self, st: dict[str, Any]) -> None:
        if st.get("stage") == "stage2" or self.allow_unfinished_stage1:
            return
        if int(st["step"]) < self.cfg.steps:
            raise SkyfallError(
                f"{self.run_dir.root}: Stage 1 stopped at step {int(st['step'])} of {self.cfg.steps}; finish it "
                "with `skyfall train stage1 --resume ...`, or pass --allow-unfinished-stage1"
            )

    def _run(self) -> dict[str, Any]:
        tr = self.trainer
        self.run_dir.create()
        if latest_checkpoint(self.run_dir.ckpts) is None:
            raise SkyfallError(f"{self.run_dir.ckpts}: no checkpoint; run Stage 1 first")
        self._check_resumable()
        # Load the priors before anything else (and before the random streams are restored): a
        # missing model stops the run at once, not after an episode's renders.
        summary = self.run_dir.read_summary()
        if len(summary.get("stage2", {}).get("episodes", [])) < len(self.episodes):
            self.refiner()
            if (self.cfg.pseudo.enabled and self.cfg2.pseudo_weight > 0) or self.cfg2.lambda_depth > 0:
                tr.depth_estimator()
        st = self.load()
        self._check_stage1_finished(st)
        self.run_dir.save_config({**self.run_dir.load_config(), "stage2": to_dict(self.cfg2)})
        if st.get("stage") != "stage2":
            # Entering Stage 2: protect the final Stage 1 checkpoint (left as Stage 1 wrote it) and
            # record the Stage 1 baseline.
            tr.protect(tr.step)
            print(f"[stage2] evaluating the Stage 1 baseline (step {tr.step})", flush=True)
            base = self.evaluate()
            summary = self.run_dir.update_summary(stage2={"stage1_baseline": base, "episodes": []})
        else:
            tr.truncate_metrics(tr.step)  # lines after the checkpoint are logged again
        n_done = len(summary.get("stage2", {}).get("episodes", []))
        for ep in self.episodes[n_done:]:
            self.episode = ep
            cams, view_index = idu_cameras(ep, self.cfg2, self.scale)
            in_progress = st.get("stage") == "stage2" and int(st.get("episode", -1)) == ep.index
            if not in_progress:
                self.first_step = tr.step
                self.idu_stack = []
            self._render_phase(ep, cams)
            self._refine_phase(ep, cams, view_index)
            self._load_refined(ep, cams)
            phase = self.phase(ep)
            # the 3D filter covers the satellite and this episode's refined views
            tr.filter_cameras = [tr.cameras, cams]
            if not in_progress:
                # Per-episode restarts (as the reference): the position LR schedule and the filter over
                # satellite + refined cameras; the SH degree keeps its value. Not checkpointed here:
                # a resume before the first step checkpoint recomputes this start state exactly, and
                # the previous milestone stays as it was written.
                tr.model.restart_position_lr(self.first_step, self.cfg2.episode_steps)
                tr.recompute_filter()
            tr.train(
                phase,
                first=self.first_step,
                desc=f"{ep.name} train",
                checkpoint_every=self.cfg2.checkpoint_every,
                save_at_end=False,
                tags={"episode": ep.index},
            )
            tr.save(milestone=True)
            res = self.evaluate()
            entry = {
                "episode": ep.index,
                "elevation": ep.elevation,
                "radius": ep.radius,
                "step": tr.step,
                "num_gaussians": tr.model.num_gaussians,
                "wall_s": tr.wall(),
                **{k: v for k, v in res.items() if not isinstance(v, list)},
            }
            summary = self.run_dir.read_summary()
            summary.setdefault("stage2", {}).setdefault("episodes", []).append(entry)
            self.run_dir.update_summary(stage2=summary["stage2"])
            self.run_dir.log_metrics({"step": tr.step, "episode": ep.index, **entry})
            st = {}  # the next episode starts fresh (it is not "in progress")
        return self.run_dir.read_summary()


def train_stage2(cfg2: Stage2Config, run: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) Stage 2 on a finished Stage 1 run (``allow_unfinished_stage1`` to start from
    an unfinished one)."""
    cfg2.check()  # before anything is written: one line naming the option
    return IterativeDatasetUpdate(cfg2, run, **kwargs).run()
