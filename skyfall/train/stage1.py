"""Stage 1: fit 3D Gaussians to a tile's satellite views (reference-pipeline.md §2, ``train.py:training``).

One training view per step, drawn without replacement from a shuffled stack; loss
``L_rgb + lambda_op L_op + ramp * w_pd * L_pd``; GOF densification, filter-aware opacity resets with
the cool-down, the 3D-filter recompute schedule and the SH degree schedule, all as the reference.

Resume is exact: a checkpoint holds every piece of state the next step reads (parameters, Adam
moments, appearance model and its optimizer, densification statistics, 3D filter, the view and
pseudo-camera stacks, the opacity cool-down, RNG states, counters), so an interrupted run continued
from its latest checkpoint ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from skyfall.config import Stage1Config, to_dict
from skyfall.data.cameras import Cameras
from skyfall.data.orbits import linear_schedule, sample_pseudo_cameras
from skyfall.data.tile import Tile, load_tile
from skyfall.errors import SkyfallError
from skyfall.gaussians.appearance import AppearanceModel, fourier_init_embeddings
from skyfall.gaussians.densify import accumulate_stats, check_gaussian_count, densify_and_prune, reset_opacity
from skyfall.gaussians.filters import compute_3d_filter
from skyfall.gaussians.init import init_from_points
from skyfall.gaussians.model import GaussianModel
from skyfall.losses import opacity_entropy, pearson_depth_loss, photometric_loss
from skyfall.priors.depth import DepthEstimator, make_depth_estimator
from skyfall.render import RenderOutput
from skyfall.storage.checkpoints import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from skyfall.storage.run_dir import RunDir
from skyfall.eval.dsm import dsm_errors, load_gt_dsm, render_dsm
from skyfall.eval.image_metrics import psnr
from skyfall.scene import Scene


class NonFiniteLossError(SkyfallError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SkyfallError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stage1Trainer:
    """Fit a tile; ``run()`` trains (or resumes) and returns the summary dict.

    Args:
        cfg: the resolved Stage 1 config.
        data: tile folder.
        out: run directory (created).
        resume: continue from the latest checkpoint in ``out/ckpts`` (error if there is none).
        depth_estimator: overrides the one named in ``cfg.pseudo.estimator`` (tests).
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        cfg: Stage1Config,
        data: str | Path,
        out: str | Path,
        *,
        resume: bool = False,
        depth_estimator: DepthEstimator | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.data = Path(data)
        self.run_dir = RunDir(out)
        self.resume = resume
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.tile: Tile = load_tile(self.data, resolution=cfg.resolution)
        if len(self.tile.train) == 0:
            raise SkyfallError(f"{self.data}: the tile has no training views")
        self._depth_estimator = depth_estimator
        self.wall_offset = 0.0
        self.counters = {"pseudo_used": 0, "pseudo_skipped": 0, "pseudo_would_skip_reference": 0}

    # ------------------------------------------------------------------ setup

    def _setup_data(self) -> None:
        tr = self.tile.train
        dev = self.device
        self.images = tr.images.to(dev).permute(0, 3, 1, 2).float() / 255.0  # [N,3,H,W]
        self.masks = tr.masks.to(dev)  # [N,H,W]
        self.cameras: Cameras = tr.cameras
        self.W, self.H = tr.cameras.width, tr.cameras.height

    def _fresh_state(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        params = init_from_points(
            self.tile.points, self.tile.colors, sh_degree=cfg.sh_degree, max_scale=cfg.init_max_scale
        )
        if cfg.appearance.enabled:
            params["app_features"] = fourier_init_embeddings(
                self.tile.points.float(), n_freqs=cfg.appearance.n_fourier_freqs
            )
        self.model = GaussianModel(
            params,
            cfg.optim,
            scene_extent=cfg.scene_extent,
            app_features_lr=cfg.appearance.gaussian_lr,
            sh_degree_interval=cfg.sh_increase_every,
            device=self.device,
        )
        self.appearance = self._make_appearance()
        self.view_stack: list[int] = []
        self.pseudo_stack: list[tuple[Tensor, Tensor]] = []
        self.cooldown_until = -1
        self.step = 0
        self._recompute_filter()

    def _make_appearance(self) -> AppearanceModel | None:
        a = self.cfg.appearance
        if not a.enabled:
            self.app_optimizer = None
            return None
        model = AppearanceModel(len(self.tile.train), a.image_dim, 6 * a.n_fourier_freqs).to(self.device)
        self.app_optimizer = torch.optim.Adam(
            model.param_groups(a.image_lr, a.mlp_lr), eps=self.cfg.optim.adam_eps
        )
        return model

    def _recompute_filter(self) -> None:
        with torch.no_grad():
            self.model.filter_3d = compute_3d_filter(
                self.model.params["means"].detach(), self.filter_cameras(), rule=self.cfg.filter_rule
            ).to(self.device)

    @property
    def scene(self) -> Scene:
        return Scene(self.model, self.appearance, eps2d=self.cfg.eps2d)

    def depth_estimator(self) -> DepthEstimator:
        if self._depth_estimator is None:
            self._depth_estimator = make_depth_estimator(self.cfg.pseudo.estimator, tile_dir=self.data)
        return self._depth_estimator

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "stage": "stage1",
            "step": self.step,
            "model": self.model.state_dict(),
            "appearance": None if self.appearance is None else self.appearance.state_dict(),
            "app_optimizer": None if self.app_optimizer is None else self.app_optimizer.state_dict(),
            "view_stack": list(self.view_stack),
            "pseudo_stack": [[c2w, k] for c2w, k in self.pseudo_stack],
            "cooldown_until": self.cooldown_until,
            "counters": dict(self.counters),
            "rng": capture_rng_state(),
            "config": to_dict(self.cfg),
            "wall_s": self.wall_offset + (time.perf_counter() - self._t0),
        }

    def save(self) -> Path:
        path = save_checkpoint(checkpoint_path(self.run_dir.ckpts, self.step), self.state())
        ckpts = sorted(self.run_dir.ckpts.glob("ckpt_*.pt"))
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_checkpoints)]:
            old.unlink()
        return path

    def load(self, path: Path) -> None:
        st = load_checkpoint(path, map_location=self.device)
        self.model = GaussianModel.from_state_dict(st["model"], device=self.device)
        self.appearance = self._make_appearance()
        if self.appearance is not None:
            self.appearance.load_state_dict(st["appearance"])
            self.app_optimizer.load_state_dict(st["app_optimizer"])
        self.view_stack = [int(i) for i in st["view_stack"]]
        self.pseudo_stack = [(c2w, k) for c2w, k in st["pseudo_stack"]]
        self.cooldown_until = int(st["cooldown_until"])
        self.counters = {k: int(v) for k, v in st["counters"].items()}
        self.step = int(st["step"])
        self.wall_offset = float(st["wall_s"])
        restore_rng_state(st["rng"])

    # ------------------------------------------------------------------ one step

    def _next_view(self) -> int:
        if not self.view_stack:
            self.view_stack = torch.randperm(len(self.tile.train)).tolist()
        return self.view_stack.pop()

    # Hooks that Stage 2 overrides (its schedules are relative to an episode, its views mixed).

    def sample_view(self, it: int) -> tuple[Cameras, Tensor, Tensor | None, Tensor | int | None]:
        """The next training view: (camera, image [3,H,W], mask [H,W] or None, appearance embedding)."""
        j = self._next_view()
        cam = Cameras(self.cameras.camtoworlds[j], self.cameras.Ks[j], self.W, self.H)
        return cam, self.images[j], self.masks[j], (j if self.appearance is not None else None)

    def lambda_opacity(self, it: int) -> float:
        return self.cfg.opacity_cooldown_lambda if it < self.cooldown_until else self.cfg.lambda_opacity

    def pseudo_pose(self, it: int) -> tuple[float, float] | None:
        """(elevation, radius) of pseudo cameras at ``it``, or None when no pseudo view is due."""
        p = self.cfg.pseudo
        if not (p.enabled and p.weight > 0 and it % p.interval == 0 and p.start < it < p.end):
            return None
        return (
            linear_schedule(it, p.start, p.end, p.elevation_start, p.elevation_end),
            linear_schedule(it, p.start, p.end, p.radius_start, p.radius_end),
        )

    def pseudo_weight(self, it: int) -> float:
        p = self.cfg.pseudo
        return min((it - p.start) / max(p.ramp, 1), 1.0) * p.weight

    def densify_schedule(self, it: int) -> tuple[bool, bool, bool]:
        """(accumulate stats, densify now, reset opacity now) at step ``it``."""
        d = self.cfg.densify
        active = it < d.until
        return (
            active,
            active and it > d.start and it % d.interval == 0,
            active and it % d.opacity_reset_interval == 0,
        )

    def filter_due(self, it: int) -> bool:
        d = self.cfg.densify
        return (
            it >= d.until
            and it % d.filter_recompute_interval == 0
            and it < self.cfg.steps - d.filter_recompute_interval
        )

    @property
    def grad_threshold(self) -> float:
        return self.cfg.densify.grad_threshold

    @property
    def cooldown_steps(self) -> int:
        return self.cfg.opacity_cooldown_steps

    def filter_cameras(self) -> Cameras:
        """Cameras that define the 3D filter (Stage 1: the satellite views)."""
        return self.cameras

    def _pseudo_loss(self, it: int, elev: float, radius: float) -> Tensor | None:
        p = self.cfg.pseudo
        size = self.pseudo_size
        if not self.pseudo_stack:
            cams = sample_pseudo_cameras(
                p.num_cams,
                elevation_deg=elev,
                radius=radius,
                target_std=self.pseudo_target_std,
                n_azimuths=p.n_azimuths,
                fov_deg=p.fov,
                size=size,
            )
            self.pseudo_stack = [(cams.camtoworlds[i], cams.Ks[i]) for i in range(len(cams))]
        c2w, k = self.pseudo_stack.pop()
        cam = Cameras(c2w, k, size, size)
        # The reference renders pseudo views with a random training image's appearance.
        emb = int(torch.randint(0, len(self.tile.train), (1,)))
        out = self.scene.render(cam, emb if self.appearance is not None else None, absgrad=False)
        with torch.no_grad():
            # [FIX] §8 #2: clamp the render before it reaches the depth model (the reference wraps
            # values > 1 around when converting to uint8).
            image = out.colors[0].clamp(0, 1).permute(2, 0, 1)[None]
            pred = self.depth_estimator()(image, p.fov, cam)
        valid = pred.valid[0] & (out.alphas[0, ..., 0].detach() > p.alpha_threshold)
        # 'accumulated' is the reference's D (RGB+D); 'expected' divides by alpha, see the config
        rendered = out.depths if p.render_depth == "accumulated" else out.expected_depths
        res = pearson_depth_loss(
            rendered[0, ..., 0],
            pred.depth[0],
            valid,
            min_valid_fraction=p.min_valid_fraction,
            policy=p.invalid_policy,
        )
        self.counters["pseudo_would_skip_reference"] += int(res.would_skip_reference)
        if res.loss is None:
            self.counters["pseudo_skipped"] += 1
            return None
        self.counters["pseudo_used"] += 1
        return self.pseudo_weight(it) * res.loss

    @property
    def pseudo_size(self) -> int:
        return self.cfg.pseudo.size

    @property
    def pseudo_target_std(self) -> float:
        return self.cfg.pseudo.target_std

    def train_step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        model = self.model
        model.update_position_lr(it)
        model.update_sh_degree(it)
        cam, gt, mask, emb = self.sample_view(it)
        out = self.scene.render(cam, emb)
        img = out.colors[0].permute(2, 0, 1)
        l_rgb = photometric_loss(img, gt, mask, lambda_dssim=cfg.lambda_dssim)
        lam_op = self.lambda_opacity(it)
        loss = l_rgb
        if lam_op > 0:
            loss = loss + lam_op * opacity_entropy(model.params["opacities"])
        extra = self.extra_loss(it, out)
        if extra is not None:
            loss = loss + extra
        l_pd = None
        pose = self.pseudo_pose(it)
        if pose is not None:
            l_pd = self._pseudo_loss(it, *pose)
            if l_pd is not None:
                loss = loss + l_pd
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss at step {it} (rgb={float(l_rgb):.4g}); the run stopped and keeps its last "
                f"checkpoint in {self.run_dir.ckpts}"
            )
        loss.backward()

        with torch.no_grad():
            d = cfg.densify
            accumulate, densify_now, reset_now = self.densify_schedule(it)
            if accumulate:
                accumulate_stats(
                    model,
                    out.means2d.grad[0],
                    out.means2d.absgrad[0],
                    out.radii[0],
                    out.visible[0],
                    cam.width,
                    cam.height,
                )
            if densify_now:
                densify_and_prune(
                    model,
                    grad_threshold=self.grad_threshold,
                    scene_extent=cfg.scene_extent,
                    percent_dense=d.percent_dense,
                    min_opacity=d.min_opacity,
                    max_screen_size=d.size_threshold or None,
                    max_world_scale_frac=d.max_world_scale_frac,
                )
                self._recompute_filter()
                check_gaussian_count(
                    model.num_gaussians, cfg.min_gaussians, context=f" after densification at step {it}"
                )
            if reset_now:
                reset_opacity(model, d.opacity_reset_value)
                self.cooldown_until = it + self.cooldown_steps
            if not accumulate and self.filter_due(it):
                self._recompute_filter()
            # Parameters replaced by densification this step have no gradient; Adam skips them, as
            # in the reference (densify runs before the optimizer step there too).
            model.optimizer_step()
            model.zero_grad()
            if self.app_optimizer is not None:
                self.app_optimizer.step()
                self.app_optimizer.zero_grad(set_to_none=True)
            train_psnr = psnr(out.colors[0].detach(), gt.permute(1, 2, 0), mask)
        return {
            "loss": float(loss.detach()),
            "l_rgb": float(l_rgb.detach()),
            "l_pd": float(l_pd.detach()) if l_pd is not None else math.nan,
            "psnr": train_psnr,
            "n": model.num_gaussians,
        }

    def extra_loss(self, it: int, out: RenderOutput) -> Tensor | None:
        """Additional loss terms of subclasses (Stage 2's depth loss on refined views)."""
        return None

    # ------------------------------------------------------------------ evaluation

    def _fit_embedding(self, cam: Cameras, gt: Tensor, mask: Tensor, start: Tensor) -> Tensor:
        """Fit an appearance embedding to ``mask`` pixels of a held-out view, the model frozen."""
        emb = start.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=0.02)
        for _ in range(self.cfg.eval_fit_steps):
            out = self.scene.render(cam, emb, absgrad=False).colors[0]
            loss = ((out - gt) ** 2)[mask].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.model.zero_grad()
        self.appearance.zero_grad(set_to_none=True)
        return emb.detach()

    def evaluate(self) -> dict[str, float]:
        """Held-out satellite PSNR and, on synthetic tiles, the DSM error.

        ``psnr_test`` follows ``cfg.eval_appearance`` (default: the embedding fitted on the left half of
        each held-out view, PSNR on the right half); ``psnr_test_novel_embedding`` always uses the
        novel-view embedding on the whole view.
        """
        res: dict[str, float] = {}
        scene = self.scene
        test = self.tile.test
        if len(test) > 0:
            emb = scene.novel_embedding(self.cfg.appearance.test_embedding)
            novel, fitted = [], []
            for i in range(len(test)):
                cam = test.cameras[i]
                gt = test.images[i].to(self.device).float() / 255.0
                mask = test.masks[i].to(self.device)
                with torch.no_grad():
                    novel.append(psnr(scene.render(cam, emb, absgrad=False).colors[0], gt, mask))
                if self.cfg.eval_appearance == "fit-left-half" and emb is not None:
                    left = torch.zeros_like(mask)
                    left[:, : cam.width // 2] = True
                    fit = self._fit_embedding(cam, gt, mask & left, emb)
                    with torch.no_grad():
                        out = scene.render(cam, fit, absgrad=False)
                    fitted.append(psnr(out.colors[0], gt, mask & ~left))
            res["psnr_test_novel_embedding"] = float(np.mean(novel))
            res["psnr_test"] = float(np.mean(fitted)) if fitted else res["psnr_test_novel_embedding"]
            res["psnr_test_views"] = fitted or novel
        gt = load_gt_dsm(self.data)
        if gt is not None:
            dsm, georef = gt
            with torch.no_grad():
                res.update(dsm_errors(render_dsm(scene, georef, depth="median"), dsm))
                # the alpha-normalised expected depth too, for comparison with earlier runs
                expected = dsm_errors(render_dsm(scene, georef, depth="expected"), dsm)
                res["dsm_mae_expected_depth_m"] = expected["dsm_mae_m"]
        return res

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.create()
        self._setup_data()
        self._t0 = time.perf_counter()
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir.ckpts)
            if ckpt is None:
                raise SkyfallError(f"--resume: no checkpoint in {self.run_dir.ckpts}")
            self.load(ckpt)
            self._truncate_metrics(self.step)
        else:
            self._fresh_state()
            self.run_dir.save_config({"stage": "stage1", "data": str(self.data), "stage1": to_dict(cfg)})
        self._t0 = time.perf_counter()
        self.tb = self._tensorboard()
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc="stage1", disable=not self.progress, dynamic_ncols=True
        )
        last_eval: dict[str, float] = {}
        try:
            for it in range(self.step + 1, cfg.steps + 1):
                stats = self.train_step(it)
                self.step = it
                bar.update(1)
                if it % cfg.log_every == 0 or it == cfg.steps:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", n=stats["n"])
                    self.run_dir.log_metrics({"step": it, **stats, "wall_s": self._wall()})
                    self._tb_log(it, stats)
                if it % cfg.eval_every == 0 and it != cfg.steps:
                    last_eval = self.evaluate()
                    self.run_dir.log_metrics({"step": it, **last_eval})
                    self._tb_log(it, last_eval, prefix="eval")
                if it % cfg.checkpoint_every == 0 or it == cfg.steps:
                    self.save()
        finally:
            bar.close()
        last_eval = self.evaluate()
        self._tb_log(self.step, last_eval, prefix="eval")
        if self.tb is not None:
            self.tb.close()
        summary = {
            "stage1": {
                "steps": self.step,
                "num_gaussians": self.model.num_gaussians,
                "wall_s": self._wall(),
                "device": str(self.device),
                **last_eval,
                **self.counters,
            }
        }
        self.run_dir.log_metrics({"step": self.step, **last_eval})
        # Flat keys too, so scripts can read summary["psnr_test"] without knowing the stage.
        flat = {
            k: summary["stage1"][k]
            for k in ("psnr_test", "dsm_mae_m", "num_gaussians", "steps", "wall_s")
            if k in summary["stage1"]
        }
        return self.run_dir.update_summary(**summary, **flat)

    def _tensorboard(self):  # noqa: ANN202
        """A TensorBoard SummaryWriter in RUN/tb when ``cfg.tensorboard``, else None."""
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from skyfall.errors import MissingDependencyError

            raise MissingDependencyError(
                f"--tensorboard needs the tensorboard package: pip install tensorboard ({e})"
            ) from None
        return SummaryWriter(str(self.run_dir.root / "tb"))

    def _tb_log(self, step: int, stats: dict, prefix: str = "train") -> None:
        if getattr(self, "tb", None) is None:
            return
        for k, v in stats.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def _wall(self) -> float:
        return self.wall_offset + (time.perf_counter() - self._t0)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl lines written after ``step`` (they will be logged again)."""
        import json

        path = self.run_dir.root / "metrics.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def export_raw_ply(run: str | Path) -> Path:
    """Write RUN/ply/stage1_raw.ply from the latest checkpoint: raw parameters plus the filter_3D column.

    Raw means not viewer-ready (the appearance model and the 3D filter are not baked in); it
    round-trips exactly and matches the reference's ``point_cloud.ply``.
    """
    from skyfall.storage.ply import write_raw_ply

    rd = RunDir(run)
    ckpt = latest_checkpoint(rd.ckpts)
    if ckpt is None:
        raise SkyfallError(f"no checkpoint in {rd.ckpts}")
    st = load_checkpoint(ckpt)
    path = rd.ply / "stage1_raw.ply"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw_ply(path, st["model"]["params"], st["model"]["filter_3d"])
    return path


def train_stage1(cfg: Stage1Config, data: str | Path, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Convenience wrapper: build a ``Stage1Trainer`` and run it."""
    return Stage1Trainer(cfg, data, out, **kwargs).run()


__all__ = ["Stage1Trainer", "train_stage1", "export_raw_ply", "NonFiniteLossError"]
