"""The training loop both stages drive.

A ``Trainer`` owns the trained state (Gaussians with their Adam optimizers, the appearance model and
its optimizer, the densification strategy's state, the satellite-view and pseudo-camera stacks, RNG
states, counters) and runs steps over a ``Phase``: what a stretch of training uses. Stage 1 is one
phase over the satellite views; each Stage 2 episode is one phase over refined and satellite views
(``skyfall.train.stage2``).

One step: draw a view, render it, ``L_rgb + lambda_op L_op (+ lambda_depth L_depth on refined
views) + w_pd L_pd`` (pseudo-camera depth), backward, the strategy's densification, one Adam step.

Resume is exact: a checkpoint holds every piece of state the next step reads, so an interrupted run
continued from its latest checkpoint ends in the same state as an uninterrupted one.

A plain step (no log, densification, filter refresh, pseudo depth or checkpoint) reads nothing from
the device, so that on a GPU the host queues the next step while this one runs: its statistics stay
tensors until a log step reads them, and its loss checks (finiteness, the divergence guard) wait in a
queue (`Trainer.flush_checks`). The trade-off: a non-finite or runaway loss is reported, with the
step it happened at, when the next step that reads the device anyway checks the queue: a log step
(at most ``log_every`` steps later), a densification, filter-refresh or pseudo-depth step (before
its backward), an evaluation, and every checkpoint, so a non-finite state is never saved.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from skyfall import interrupts
from skyfall.config.presets import to_dict
from skyfall.config.training import Stage1Config
from skyfall.data.cameras import Cameras
from skyfall.data.orbits import linear_schedule, sample_pseudo_cameras
from skyfall.data.tile import Tile, load_tile
from skyfall.devices import resolve_device
from skyfall.errors import SkyfallError
from skyfall.eval.image_metrics import masked_mse, psnr_from_mse
from skyfall.gaussians.appearance import AppearanceModel, fourier_init_embeddings
from skyfall.gaussians.filters import compute_3d_filter
from skyfall.gaussians.init import height_field_points, init_from_points
from skyfall.gaussians.model import GaussianModel
from skyfall.gaussians.strategy import GOFStrategy
from skyfall.losses import (
    GRAY_WEIGHTS,
    flatten_loss,
    multiview_ncc_loss,
    opacity_entropy,
    pearson_depth_loss,
    photometric_loss,
    source_views,
)
from skyfall.priors.depth import DepthEstimator, make_depth_estimator
from skyfall.render import RenderOutput
from skyfall.scene import Scene
from skyfall.storage.checkpoints import (
    capture_rng_state,
    checkpoint_path,
    checkpoint_step,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    remove_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from skyfall.storage.run_dir import RunDir, atomic_write_text
from skyfall.train.syncs import host_reads

MAX_UNCHECKED = 1000
"""At most this many steps' loss checks wait for `Trainer.flush_checks` (``train_step`` called
outside ``train``, where no log step runs them)."""


class NonFiniteLossError(SkyfallError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class DivergenceError(SkyfallError):
    """The optimisation ran away (Gaussians far outside the scene, or the loss exploding); the run
    stops before checkpointing the diverged state."""


@dataclass
class DivergenceGuard:
    """Stops a run whose optimisation ran away before the diverged state is checkpointed.

    Two signs, each far outside what a converging run shows: half of the Gaussians farther from the
    scene's centre than ``max_radius_factor`` times its radius (a learning rate orders of magnitude
    too high sends them kilometres away while the loss stays finite), or the photometric loss above
    ``loss_factor`` times its running median and above ``loss_floor`` for ``patience`` consecutive
    steps. The floor is above what any render with colours in [0, 1] can score ((1 - l) L1 +
    l (1 - SSIM) <= 1 + l <= 2 for lambda_dssim l), so the transparent scene right after an opacity
    reset, whose loss jumps several times over for a hundred steps, never trips it: only colours
    running out of range do.
    """

    center: Tensor
    radius: float
    max_radius_factor: float = 10.0
    loss_factor: float = 5.0
    loss_floor: float = 2.5
    patience: int = 20
    window: int = 500

    def __post_init__(self) -> None:
        self.history: deque[float] = deque(maxlen=self.window)
        self.high = 0

    def loss(self, l_rgb: float) -> str | None:
        """Record one step's photometric loss; the reason to stop, or None."""
        if len(self.history) >= 50:
            median = statistics.median(self.history)
            if l_rgb > max(self.loss_factor * median, self.loss_floor):
                self.high += 1
                if self.high >= self.patience:
                    return (
                        f"the photometric loss stayed above {self.loss_factor:g}x its running median "
                        f"({median:.3g}) for {self.patience} steps (now {l_rgb:.3g})"
                    )
                return None  # a spike does not enter the median it is judged against
        self.high = 0
        self.history.append(l_rgb)
        return None

    def extent(self, means: Tensor) -> str | None:
        """The reason to stop if the Gaussians left the scene, else None."""
        if means.shape[0] == 0:
            return None
        d = float((means.detach() - self.center.to(means.device)).norm(dim=-1).median())
        if not math.isfinite(d) or d > self.max_radius_factor * self.radius:
            return (
                f"half of the Gaussians are more than {d:.3g} m from the scene centre "
                f"(its radius is {self.radius:.3g} m)"
            )
        return None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class ViewSample:
    """One training view."""

    camera: Cameras
    image: Tensor
    """[3, H, W] in [0, 1]."""
    mask: Tensor | None
    """[H, W] bool valid pixels, or None (all valid)."""
    embedding: Tensor | int | None
    """Appearance embedding: a training-view index, a vector, or None (no appearance model)."""
    depth: tuple[Tensor, Tensor] | None = None
    """(depth [H, W], valid [H, W]) target of a refined view when its depth loss is on."""
    index: int | None = None
    """The training satellite view it shows (None: another kind of view)."""


@dataclass
class StepStats:
    """A step's logged statistics, kept on the device until a log step reads them (`read`)."""

    loss: Tensor
    l_rgb: Tensor
    l_pd: Tensor | None
    """The weighted pseudo-depth loss, None on steps without one."""
    mse: Tensor
    """The render's masked squared error (float64), whose PSNR is logged."""
    n: int
    """Gaussians after the step."""

    def read(self) -> dict[str, float | int]:
        """The logged numbers: loss, l_rgb, l_pd (NaN without), psnr, n, in one read from the device."""
        parts = [self.loss, self.l_rgb, self.mse] + ([self.l_pd] if self.l_pd is not None else [])
        values = torch.stack([t.double() for t in parts]).tolist()
        return {
            "loss": values[0],
            "l_rgb": values[1],
            "l_pd": values[3] if self.l_pd is not None else math.nan,
            "psnr": psnr_from_mse(values[2]),
            "n": self.n,
        }


@dataclass
class PseudoSchedule:
    """When pseudo-camera depth supervision runs, at which pose, with which weight.

    A pseudo view is due at steps ``start < step <= last`` that are multiples of ``interval``; its
    elevation and radius move linearly from the first to the second value of each pair over
    ``start .. end`` (radius times ``radius_scale``); the weight ramps up linearly over ``ramp`` steps
    after ``start``.
    """

    start: int
    end: int
    last: int
    interval: int
    weight: float
    ramp: int
    elevation: tuple[float, float]
    radius: tuple[float, float]
    size: int
    target_std: float
    radius_scale: float = 1.0

    def pose(self, step: int) -> tuple[float, float] | None:
        """(elevation degrees, radius) of the pseudo cameras at ``step``, or None when none is due."""
        if not (step % self.interval == 0 and self.start < step <= self.last):
            return None
        return (
            linear_schedule(step, self.start, self.end, *self.elevation),
            self.radius_scale * linear_schedule(step, self.start, self.end, *self.radius),
        )

    def weight_at(self, step: int) -> float:
        return min((step - self.start) / max(self.ramp, 1), 1.0) * self.weight


@dataclass
class Phase:
    """What one stretch of training uses (Stage 1's run or one Stage 2 episode)."""

    end: int
    """Last global step of the phase."""
    views: Callable[[int], ViewSample]
    """Draws the training view of a step."""
    strategy: GOFStrategy
    """Densification, opacity resets and 3D-filter refreshes."""
    opacity_weight: float | Callable[[int], float]
    """Weight of the binary-entropy opacity regulariser (or a function of the global step)."""
    cooldown_weight: float
    """Its weight during the cool-down after an opacity reset."""
    pseudo: PseudoSchedule | None
    """Pseudo-camera depth supervision, or None."""
    lambda_depth: float = 0.0
    """Weight of the depth loss on views that carry a depth target."""


class Trainer:
    """Trained state plus the step and the loop over a phase.

    Args:
        cfg: the Stage 1 config (model, appearance, pseudo-camera and logging settings).
        data: tile folder.
        out: run directory.
        depth_estimator: overrides the one named in ``cfg.pseudo.estimator`` (tests).
        progress: show tqdm progress bars.
    """

    def __init__(
        self,
        cfg: Stage1Config,
        data: str | Path,
        out: str | Path,
        *,
        depth_estimator: DepthEstimator | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.data = Path(data)
        self.run_dir = RunDir(out)
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.tile: Tile = load_tile(self.data, resolution=cfg.resolution)
        if len(self.tile.train) == 0:
            raise SkyfallError(f"{self.data}: the tile has no training views")
        self._depth_estimator = depth_estimator
        self.wall_offset = 0.0
        self._t0 = time.perf_counter()
        self.counters = {"pseudo_used": 0, "pseudo_skipped": 0, "pseudo_would_skip_reference": 0}
        self.extra_state: Callable[[], dict[str, Any]] = dict
        """Stage-specific checkpoint entries (Stage 2's episode bookkeeping)."""
        self.prune_floor = 0
        """Step checkpoints at or below this step are never pruned."""
        self.tb = None
        self.checkpoint: Path | None = None
        """The checkpoint the state was restored from (None: a fresh start)."""
        tr = self.tile.train
        self.images = tr.images.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # [N,3,H,W]
        self.masks = tr.masks.to(self.device)  # [N,H,W]
        self.cameras: Cameras = tr.cameras
        self.mv_sources: list[list[int]] | None = None
        """Each training view's source views for the multi-view term (chosen on first use)."""
        self._mv_index: list[Tensor] = []
        self._gray: Tensor | None = None
        """The training views in grey [N, H, W] for the multi-view term (made on first use)."""
        # The views' cameras on the device, world-to-camera matrices included (inverted on the host
        # view by view, as a step would): a step then copies nothing from the host, and on a GPU
        # every such copy waits for the work queued before it.
        self._c2w = self.cameras.camtoworlds.to(self.device)
        self._Ks = self.cameras.Ks.to(self.device)
        self._viewmats = torch.cat([self.cameras[j].viewmats for j in range(len(self.cameras))]).to(
            self.device
        )
        self.filter_cameras: Cameras | list[Cameras] = self.cameras
        """Cameras that define the 3D filter (Stage 2 adds each episode's refined views)."""
        pts = self.tile.points.double()
        center = pts.median(dim=0).values if len(pts) else torch.zeros(3, dtype=torch.float64)
        radius = float((pts - center).norm(dim=-1).quantile(0.99)) if len(pts) > 1 else 0.0
        self.guard = DivergenceGuard(center.float().to(self.device), max(radius, cfg.scene_extent))
        self._unchecked: list[tuple[int, Tensor, Tensor]] = []
        """(step, loss, photometric loss) of the steps whose checks wait for `flush_checks`."""

    # ------------------------------------------------------------------ state

    def init_from_points(self) -> None:
        """Fresh state: Gaussians from the tile's points, a new appearance model, step 0."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        points, colors = self.tile.points, self.tile.colors
        if cfg.init_grid > 0:
            gp, gc = height_field_points(points, colors, cfg.init_grid)
            points = torch.cat([points.double(), torch.from_numpy(gp)])
            colors = torch.cat([colors, torch.from_numpy(gc)])  # both uint8
        # The cap never goes below a point's Mip-Splatting 3D filter size: a smaller start would only
        # be more transparent (the filter's opacity compensation), i.e. invisible on coarse tiles.
        # That filter is the model's initial one (the means are these points in float32).
        with torch.no_grad():
            filter_3d = compute_3d_filter(
                points.to(self.device).float(), self.filter_cameras, rule=cfg.filter_rule
            ).to(self.device)
        cap = np.maximum(cfg.init_max_scale, filter_3d.double().cpu().numpy())
        params = init_from_points(
            points,
            colors,
            sh_degree=cfg.sh_degree,
            max_scale=cap,
            flat=cfg.init_flat,
        )
        if cfg.appearance.enabled:
            params["app_features"] = fourier_init_embeddings(
                points.float(), n_freqs=cfg.appearance.n_fourier_freqs
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
        self.strategy_state: dict[str, Any] | None = None  # the first phase's strategy initialises it
        self.step = 0
        self.model.filter_3d = filter_3d

    def _make_appearance(self) -> AppearanceModel | None:
        a = self.cfg.appearance
        if not a.enabled:
            self.app_optimizer = None
            return None
        model = AppearanceModel(len(self.tile.train), a.image_dim, 6 * a.n_fourier_freqs).to(self.device)
        if self.cfg.compile == "appearance":
            model.compile_modulation()
        self.app_optimizer = torch.optim.Adam(
            model.param_groups(a.image_lr, a.mlp_lr), eps=self.cfg.optim.adam_eps
        )
        return model

    def recompute_filter(self) -> None:
        """The Mip-Splatting 3D filter of every Gaussian over ``filter_cameras``."""
        with torch.no_grad():
            self.model.filter_3d = compute_3d_filter(
                self.model.params["means"].detach(), self.filter_cameras, rule=self.cfg.filter_rule
            ).to(self.device)

    @property
    def scene(self) -> Scene:
        return Scene(self.model, self.appearance, eps2d=self.cfg.eps2d)

    def depth_estimator(self) -> DepthEstimator:
        if self._depth_estimator is None:
            p = self.cfg.pseudo
            self._depth_estimator = make_depth_estimator(p.estimator, tile_dir=self.data, config=p.model)
        return self._depth_estimator

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": "stage1",
            "step": self.step,
            "model": self.model.state_dict(),
            "appearance": None if self.appearance is None else self.appearance.state_dict(),
            "app_optimizer": None if self.app_optimizer is None else self.app_optimizer.state_dict(),
            "view_stack": list(self.view_stack),
            "pseudo_stack": [[c2w, k] for c2w, k in self.pseudo_stack],
            "cooldown_until": self.strategy_state["cooldown_until"],
            "counters": dict(self.counters),
            "rng": capture_rng_state(),
            "config": to_dict(self.cfg),
            "wall_s": self.wall(),
            **self.extra_state(),
        }

    def load(self, path: Path | None = None) -> dict[str, Any]:
        """Restore a checkpoint (either stage's); returns it for the stage's own entries.

        ``path`` None: the newest checkpoint that loads; damaged newer ones are set aside with a
        warning (`load_latest_checkpoint`).
        """
        if path is None:
            path, st = load_latest_checkpoint(self.run_dir.ckpts, self.device, set_aside=True)
        else:
            st = load_checkpoint(path, map_location=self.device)
        self.checkpoint = path
        self.model = GaussianModel.from_state_dict(st["model"], device=self.device)
        self.appearance = self._make_appearance()
        if self.appearance is not None:
            self.appearance.load_state_dict(st["appearance"])
            self.app_optimizer.load_state_dict(st["app_optimizer"])
        self.view_stack = [int(i) for i in st["view_stack"]]
        self.pseudo_stack = [(c2w, k) for c2w, k in st["pseudo_stack"]]
        self.strategy_state = {"cooldown_until": int(st["cooldown_until"])}
        self.counters = {k: int(v) for k, v in st["counters"].items()}
        self.step = int(st["step"])
        self.wall_offset = float(st["wall_s"])
        self._t0 = time.perf_counter()
        restore_rng_state(st["rng"])
        return st

    def save(self, *, milestone: bool = False) -> Path:
        """Checkpoint the current step atomically.

        A milestone (the end of a Stage 2 episode, the final Stage 1 checkpoint once Stage 2 starts) is
        never pruned; otherwise the oldest prunable step checkpoints beyond ``keep_checkpoints`` go.
        """
        self.check_divergence(self.step)  # also runs the queued loss checks: nothing non-finite is saved
        path = save_checkpoint(checkpoint_path(self.run_dir.ckpts, self.step), self.state_dict())
        if milestone:
            self.protect(self.step)
            return path
        keep = self.milestones()
        ckpts = [p for p in checkpoints(self.run_dir.ckpts) if checkpoint_step(p) not in keep]
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_checkpoints)]:
            if checkpoint_step(old) > self.prune_floor:
                remove_checkpoint(old)
        return path

    def _kept(self) -> str:
        """What a stopped run keeps, for its message."""
        last = latest_checkpoint(self.run_dir.ckpts)
        if last is None:
            return "no checkpoint was written yet, so a --resume starts again from step 0"
        return f"its last checkpoint {last} is kept (continue with --resume)"

    def check_divergence(self, it: int, *, extent: bool = True) -> None:
        """Run the queued loss checks (`flush_checks`), then, with ``extent``, raise `DivergenceError`
        if the Gaussians left the scene at step ``it``."""
        self.flush_checks()
        why = self.guard.extent(self.model.params["means"]) if extent else None
        if why:
            raise self._diverged(it, why)

    def flush_checks(self) -> None:
        """Check the queued steps' losses in step order, reading them all from the device at once.

        Raises `NonFiniteLossError` at the first non-finite loss; otherwise feeds each photometric loss
        to the divergence guard, as if every step had checked its own, and raises `DivergenceError`
        where it trips.
        """
        queued, self._unchecked = self._unchecked, []
        if not queued:
            return
        values = torch.stack([t.double() for _, loss, l_rgb in queued for t in (loss, l_rgb)]).tolist()
        for i, (it, _, _) in enumerate(queued):
            loss, l_rgb = values[2 * i], values[2 * i + 1]
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss at step {it} (rgb={l_rgb:.4g}); the run stopped; " + self._kept()
                )
            why = self.guard.loss(l_rgb)
            if why:
                raise self._diverged(it, why)

    def _diverged(self, it: int, why: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at step {it}: {why}; the run stopped and the diverged state was not "
            f"saved; {self._kept()} (lower the learning rates, e.g. --stage1.optim.means-lr-init)"
        )

    def protect(self, step: int) -> None:
        """Exempt the checkpoint of ``step`` from pruning (RUN/ckpts/milestones.json)."""
        ms = self.milestones() | {step}
        atomic_write_text(self.run_dir.ckpts / "milestones.json", json.dumps(sorted(ms)))

    def milestones(self) -> set[int]:
        f = self.run_dir.ckpts / "milestones.json"
        return set(json.loads(f.read_text())) if f.exists() else set()

    # ------------------------------------------------------------------ one step

    def satellite_view(self) -> ViewSample:
        """The next satellite view (shuffled stack, refilled when empty)."""
        if not self.view_stack:
            with host_reads():  # the CPU generator's draws
                self.view_stack = torch.randperm(len(self.tile.train)).tolist()
        j = self.view_stack.pop()
        w, h = self.cameras.width, self.cameras.height
        c = self.cfg.crop
        emb = j if self.appearance is not None else None
        vm = self._viewmats[j : j + 1]
        if c <= 0 or (c >= w and c >= h):
            cam = Cameras(self._c2w[j], self._Ks[j], w, h, world_to_camera=vm)
            return ViewSample(cam, self.images[j], self.masks[j], emb, index=j)
        cw, ch = min(c, w), min(c, h)
        with host_reads():
            x0 = int(torch.randint(0, w - cw + 1, (1,)))
            y0 = int(torch.randint(0, h - ch + 1, (1,)))
        k = self._Ks[j].clone()
        k[0, 2] -= x0  # a crop is the same camera with its principal point moved
        k[1, 2] -= y0
        cam = Cameras(self._c2w[j], k, cw, ch, world_to_camera=vm)
        img = self.images[j][:, y0 : y0 + ch, x0 : x0 + cw]
        mask = self.masks[j][y0 : y0 + ch, x0 : x0 + cw]
        return ViewSample(cam, img, mask, emb, index=j)

    def multiview_loss(self, it: int, view: ViewSample, out: RenderOutput) -> Tensor | None:
        """Multi-view photometric consistency of the step's rendered depth (``cfg.multiview``), or None
        when it is off, not started, or the view is not a training satellite view."""
        mv = self.cfg.multiview
        if mv.weight <= 0 or it < mv.start or view.index is None:
            return None
        if self.mv_sources is None:
            self.mv_sources = source_views(self.cameras.camtoworlds, mv.sources, mv.min_angle)
            self._mv_index = [torch.tensor(s, dtype=torch.long, device=self.device) for s in self.mv_sources]
            self._gray = (self.images * GRAY_WEIGHTS.to(self.images)[:, None, None]).sum(dim=1)
        if not self.mv_sources[view.index]:
            return None
        src = self._mv_index[view.index]
        alpha = out.alphas[0, ..., 0].detach()
        valid = alpha >= mv.alpha_min
        if view.mask is not None:
            valid = valid & view.mask.bool()
        gray = (view.image * GRAY_WEIGHTS.to(view.image)[:, None, None]).sum(dim=0)
        loss = multiview_ncc_loss(
            out.expected_depths[0, ..., 0],
            valid,
            gray,
            view.camera.Ks[0],
            view.camera.camtoworlds[0],
            self._gray[src],
            self.masks[src].bool(),
            self._Ks[src],
            self._c2w[src],
            patch=mv.patch,
            min_std=mv.min_std,
            aggregate=mv.aggregate,
        )
        return mv.weight * loss

    def pseudo_loss(
        self, step: int, schedule: PseudoSchedule, elevation: float, radius: float
    ) -> Tensor | None:
        """Pearson depth loss of one pseudo view against the depth prior (weighted), or None if skipped."""
        p = self.cfg.pseudo
        size = schedule.size
        if not self.pseudo_stack:
            cams = sample_pseudo_cameras(
                p.num_cams,
                elevation_deg=elevation,
                radius=radius,
                target_std=schedule.target_std,
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
            # Clamped before the depth model: the reference converts to uint8 without clamping, so
            # values above 1 wrap around to dark pixels.
            image = out.colors[0].clamp(0, 1).permute(2, 0, 1)[None]
            pred = self.depth_estimator()(image, p.fov, cam)
        valid = pred.valid[0] & (out.alphas[0, ..., 0].detach() > p.alpha_threshold)
        # 'accumulated' is the reference's D (RGB+D); 'expected' divides by alpha (see the config).
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
        return schedule.weight_at(step) * res.loss

    def train_step(self, it: int, phase: Phase) -> StepStats:
        """One optimisation step at global step ``it``; returns its statistics (still on the device).

        The step's loss checks are queued (`flush_checks`) and run here only when the step reads the
        device anyway (pseudo depth, densification, filter refresh), before its backward.
        """
        model = self.model
        model.update_position_lr(it)
        model.update_sh_degree(it)
        view = phase.views(it)
        out = self.scene.render(view.camera, view.embedding)
        img = out.colors[0].permute(2, 0, 1)
        l_rgb = photometric_loss(img, view.image, view.mask, lambda_dssim=self.cfg.lambda_dssim)
        in_cooldown = phase.strategy.in_cooldown(self.strategy_state, it)
        if in_cooldown:
            lam_op = phase.cooldown_weight
        else:
            lam_op = phase.opacity_weight(it) if callable(phase.opacity_weight) else phase.opacity_weight
        loss = l_rgb
        if lam_op > 0:
            loss = loss + lam_op * opacity_entropy(model.params["opacities"])
        if self.cfg.lambda_flatten > 0:
            loss = loss + self.cfg.lambda_flatten * flatten_loss(model.get_scales_opacities_eff()[0])
        if phase.lambda_depth > 0 and view.depth is not None:
            res = pearson_depth_loss(out.depths[0, ..., 0], *view.depth)
            if res.loss is not None:
                loss = loss + phase.lambda_depth * res.loss
        l_mv = self.multiview_loss(it, view, out)
        if l_mv is not None:
            loss = loss + l_mv
        l_pd = None
        pose = phase.pseudo.pose(it) if phase.pseudo is not None else None
        if pose is not None:
            l_pd = self.pseudo_loss(it, phase.pseudo, *pose)
            if l_pd is not None:
                loss = loss + l_pd
        self._unchecked.append((it, loss.detach(), l_rgb.detach()))
        if pose is not None or not phase.strategy.plain(it) or len(self._unchecked) >= MAX_UNCHECKED:
            # a non-finite state never reaches densification or the filter
            self.flush_checks()
        phase.strategy.step_pre_backward(model, self.strategy_state, it, out)
        loss.backward()
        with torch.no_grad():
            phase.strategy.step_post_backward(model, self.strategy_state, it, out, self.recompute_filter)
            # Parameters replaced by densification this step have no gradient; Adam skips them, as
            # in the reference (densify runs before the optimizer step there too).
            model.optimizer_step()
            model.zero_grad()
            if self.app_optimizer is not None:
                self.app_optimizer.step()
                self.app_optimizer.zero_grad(set_to_none=True)
            mse = masked_mse(out.colors[0].detach(), view.image.permute(1, 2, 0), view.mask)
        l_pd = l_pd.detach() if l_pd is not None else None
        return StepStats(loss.detach(), l_rgb.detach(), l_pd, mse, model.num_gaussians)

    # ------------------------------------------------------------------ the loop

    def train(
        self,
        phase: Phase,
        *,
        first: int,
        desc: str,
        checkpoint_every: int,
        save_at_end: bool = True,
        eval_every: int | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        """Steps ``self.step + 1 .. phase.end``: log every ``cfg.log_every`` steps (and the last),
        evaluate every ``eval_every`` (not at the end), checkpoint every ``checkpoint_every`` and,
        with ``save_at_end``, at the end. ``tags`` are added to every metrics line."""
        from tqdm import tqdm

        tags = tags or {}
        if self.strategy_state is None:
            self.strategy_state = phase.strategy.initialize_state()
        log_every = self.cfg.log_every
        bar = tqdm(
            total=phase.end - first,
            initial=self.step - first,
            desc=desc,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            with interrupts.deferred():
                for it in range(self.step + 1, phase.end + 1):
                    step_stats = self.train_step(it, phase)
                    self.step = it
                    bar.update(1)
                    log = it % log_every == 0 or it == phase.end
                    if log:
                        self.check_divergence(it)
                        stats = step_stats.read()
                        bar.set_postfix(
                            loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", n=stats["n"]
                        )
                        self.run_dir.log_metrics({"step": it, **tags, **stats, "wall_s": self.wall()})
                        self.tb_log(it, stats)
                    if eval_every and evaluate is not None and it % eval_every == 0 and it != phase.end:
                        self.flush_checks()
                        res = evaluate()
                        self.run_dir.log_metrics({"step": it, **res})
                        self.tb_log(it, res, prefix="eval")
                    saved = None
                    if (it == phase.end and save_at_end) or (it != phase.end and it % checkpoint_every == 0):
                        saved = self.save()
                    signum = interrupts.pending()
                    if signum is not None:
                        saved = saved or self.save()
                        raise interrupts.StopRequested(
                            signum,
                            f"stopped at step {it}; checkpoint {saved} saved (run the command again to "
                            "continue; train stage1/all need --resume)",
                        )
        finally:
            bar.close()

    # ------------------------------------------------------------------ logging

    def open_tensorboard(self) -> None:
        """Log scalars to RUN/tb from now on (``cfg.tensorboard``; needs the tensorboard package)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from skyfall.errors import MissingDependencyError

            raise MissingDependencyError(
                f"--tensorboard needs the tensorboard package: pip install tensorboard ({e})"
            ) from None
        self.tb = SummaryWriter(str(self.run_dir.root / "tb"))

    def tb_log(self, step: int, stats: dict, prefix: str = "train") -> None:
        if self.tb is None:
            return
        for k, v in stats.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def wall(self) -> float:
        """Training wall time so far, across resumes (seconds)."""
        return self.wall_offset + (time.perf_counter() - self._t0)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl lines written after ``step`` (they will be logged again)."""
        path = self.run_dir.root / "metrics.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))
