"""Stage 1: fit 3D Gaussians to a tile's satellite views (Skyfall-GS ``train.py:training``).

One phase of ``skyfall.train.loop``: one satellite view per step, drawn without replacement from a
shuffled stack; loss ``L_rgb + lambda_op L_op + ramp * w_pd L_pd``; GOF densification with
filter-aware opacity resets and the cool-down, the 3D-filter recompute schedule and the SH degree
schedule, all as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from skyfall.config.presets import to_dict
from skyfall.config.resume import check_resume, check_same_tile
from skyfall.config.training import Stage1Config
from skyfall.dsm import opaque_weight_share
from skyfall.errors import SkyfallError
from skyfall.eval.dsm import dsm_errors, load_gt_dsm, render_dsm
from skyfall.eval.heldout import heldout_psnr
from skyfall.gaussians.strategy import GOFStrategy
from skyfall.priors.depth import DepthEstimator
from skyfall.storage.checkpoints import checkpoint_step, latest_checkpoint, load_latest_checkpoint
from skyfall.storage.run_dir import RunDir
from skyfall.storage.run_lock import run_lock
from skyfall.train.loop import NonFiniteLossError, Phase, PseudoSchedule, Trainer


def stage1_strategy(cfg: Stage1Config) -> GOFStrategy:
    """The densification strategy of a Stage 1 run (Stage 2 episodes derive theirs from it)."""
    d = cfg.densify
    return GOFStrategy(
        start=d.start,
        until=d.until,
        every=d.interval,
        grad_threshold=d.grad_threshold,
        percent_dense=d.percent_dense,
        min_opacity=d.min_opacity,
        size_threshold=d.size_threshold,
        max_world_scale_frac=d.max_world_scale_frac,
        scene_extent=cfg.scene_extent,
        reset_every=d.opacity_reset_interval,
        reset_value=d.opacity_reset_value,
        cooldown_steps=cfg.opacity_cooldown_steps,
        refilter_every=d.filter_recompute_interval,
        refilter_until=cfg.steps - d.filter_recompute_interval,
        min_gaussians=cfg.min_gaussians,
        max_gaussians=d.max_gaussians,
        prune_every=d.prune_interval,
        prune_opacity=d.prune_opacity,
    )


def stage1_phase(trainer: Trainer) -> Phase:
    """Stage 1 as one phase: satellite views, Stage 1 schedules, pseudo depth in its window."""
    cfg, p = trainer.cfg, trainer.cfg.pseudo
    pseudo = None
    if p.enabled and p.weight > 0:
        pseudo = PseudoSchedule(
            start=p.start,
            end=p.end,
            last=p.end - 1,
            interval=p.interval,
            weight=p.weight,
            ramp=p.ramp,
            elevation=(p.elevation_start, p.elevation_end),
            radius=(p.radius_start, p.radius_end),
            size=p.size,
            target_std=p.target_std,
        )
    return Phase(
        end=cfg.steps,
        views=lambda it: trainer.satellite_view(),
        strategy=stage1_strategy(cfg),
        opacity_weight=opacity_schedule(cfg),
        cooldown_weight=cfg.opacity_cooldown_lambda,
        pseudo=pseudo,
    )


def opacity_schedule(cfg: Stage1Config) -> float | Callable[[int], float]:
    """The opacity regulariser's weight: constant, or the linear ramp of ``lambda_opacity_end``."""
    if cfg.lambda_opacity_end is None:
        return cfg.lambda_opacity
    a, b = cfg.opacity_ramp_start, max(cfg.steps, cfg.opacity_ramp_start + 1)
    lo, hi = cfg.lambda_opacity, cfg.lambda_opacity_end

    def weight(step: int) -> float:
        t = min(max((step - a) / (b - a), 0.0), 1.0)
        return lo + t * (hi - lo)

    return weight


@torch.no_grad()
def _dsm_metrics(trainer: Trainer) -> dict[str, float]:
    gt = load_gt_dsm(trainer.data)
    if gt is None:
        return {}
    dsm, georef = gt
    bar = trainer.progress
    res = dsm_errors(render_dsm(trainer.scene, georef, depth="median", progress=bar), dsm)
    # What a viewer blends: the alpha-normalised expected depth, and how much of the blended weight
    # comes from near-opaque Gaussians (the rest is haze the median read-out does not see).
    expected = render_dsm(trainer.scene, georef, depth="expected", progress=bar)
    res["dsm_mae_expected_depth_m"] = dsm_errors(expected, dsm)["dsm_mae_m"]
    res["opaque_weight_share"] = opaque_weight_share(trainer.scene, georef, progress=bar)
    return res


def evaluate(trainer: Trainer) -> dict[str, Any]:
    """Held-out satellite PSNR (both protocols) and, on synthetic tiles, the DSM error."""
    cfg = trainer.cfg
    res: dict[str, Any] = {}
    scene = trainer.scene
    if len(trainer.tile.test) > 0:
        res.update(
            heldout_psnr(
                scene,
                trainer.tile.test,
                embedding=scene.novel_embedding(cfg.appearance.test_embedding),
                protocol=cfg.eval_appearance,
                fit_steps=cfg.eval_fit_steps,
                progress=trainer.progress,
            )
        )
    res.update(_dsm_metrics(trainer))
    return res


def train_stage1(
    cfg: Stage1Config,
    data: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    depth_estimator: DepthEstimator | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a tile (or resume the run in ``out``); returns the run's summary.

    Args:
        cfg: the resolved Stage 1 config.
        data: tile folder.
        out: run directory (created). A fresh run needs it empty (or ``overwrite``).
        resume: continue from the newest loadable checkpoint in ``out/ckpts`` (from step 0 when the
            run stopped before its first one). The tile and every setting but the safe ones
            (`skyfall.config.resume`) must be the run's; a finished run is not trained or evaluated again.
        overwrite: clear ``out`` (a run folder) before a fresh run.
        depth_estimator: overrides the one named in ``cfg.pseudo.estimator`` (tests).
        progress: show a tqdm progress bar.
    """
    cfg.check()  # before anything is written: one line naming the option
    rd = RunDir(out)
    saved = rd.load_config() if resume else {}
    if resume and saved:
        check_same_tile(rd.tile_dir(saved), Path(data), rd.config_path)
        check_resume("stage1", saved.get("stage1", {}), rd.as_saved(to_dict(cfg)), rd.config_path)
        finished = _finished_summary(rd, cfg)
        if finished is not None:
            return finished
    elif resume and rd.entries():
        raise SkyfallError(f"--resume: {rd.root} holds no skyfall run (no config.yml) to continue")
    elif not resume:
        rd.check_fresh(overwrite)  # said before the tile loads; checked again under the lock
    trainer = Trainer(cfg, data, out, depth_estimator=depth_estimator, progress=progress)
    with run_lock(rd.root):
        if not resume:
            rd.check_fresh(overwrite)
            rd.clear()
        rd.remove_stale_temp()
        rd.create()
        # Load the depth prior now, not at the first pseudo-depth step: a missing model or a prior
        # that does not fit the tile stops the run before any training. Before the state is seeded or
        # restored, so that loading it cannot move the run's random streams.
        if cfg.pseudo.enabled and cfg.pseudo.weight > 0:
            trainer.depth_estimator()
        if resume and latest_checkpoint(rd.ckpts) is not None:
            trainer.load()
            trainer.truncate_metrics(trainer.step)
        else:
            if resume:
                print(f"[stage1] {rd.ckpts}: no checkpoint yet; starting from step 0", flush=True)
                trainer.truncate_metrics(0)
            trainer.init_from_points()
            rd.save_run_config("stage1", trainer.data, {"stage1": to_dict(cfg)})
        return _train(trainer)


def _finished_summary(rd: RunDir, cfg: Stage1Config) -> dict[str, Any] | None:
    """The summary of a run whose Stage 1 already ran to ``cfg.steps`` (nothing to redo), else None."""
    summary = rd.read_summary()
    s1 = summary.get("stage1")
    last = latest_checkpoint(rd.ckpts)
    if not s1 or last is None or s1.get("steps") != cfg.steps or checkpoint_step(last) < cfg.steps:
        return None
    print(f"[stage1] {rd.root}: already trained to step {cfg.steps}; nothing to do", flush=True)
    return summary


def _train(trainer: Trainer) -> dict[str, Any]:
    cfg, rd = trainer.cfg, trainer.run_dir
    if cfg.tensorboard:
        trainer.open_tensorboard()
    trainer.train(
        stage1_phase(trainer),
        first=0,
        desc="stage1",
        checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every,
        evaluate=lambda: evaluate(trainer),
    )
    last_eval = evaluate(trainer)
    trainer.tb_log(trainer.step, last_eval, prefix="eval")
    if trainer.tb is not None:
        trainer.tb.close()
    s1 = {
        "steps": trainer.step,
        "num_gaussians": trainer.model.num_gaussians,
        "wall_s": trainer.wall(),
        "device": str(trainer.device),
        **last_eval,
        **trainer.counters,
    }
    rd.log_metrics({"step": trainer.step, **last_eval})
    # Flat keys too, so scripts can read summary["psnr_test"] without knowing the stage.
    flat = {k: s1[k] for k in ("psnr_test", "dsm_mae_m", "num_gaussians", "steps", "wall_s") if k in s1}
    return rd.update_summary(stage1=s1, **flat)


def export_raw_ply(run: str | Path) -> Path:
    """Write RUN/ply/STAGE_raw.ply (stage1_raw.ply, stage2_raw.ply) from the latest checkpoint: raw
    parameters plus the filter_3D column.

    Raw means not viewer-ready (the appearance model and the 3D filter are not baked in); it
    round-trips exactly and matches the reference's ``point_cloud.ply``.
    """
    from skyfall.storage.ply import write_raw_ply

    rd = RunDir(run)
    _, st = load_latest_checkpoint(rd.ckpts)
    path = rd.ply / f"{st.get('stage', 'stage1')}_raw.ply"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw_ply(path, st["model"]["params"], st["model"]["filter_3d"])
    return path


__all__ = [
    "train_stage1",
    "stage1_phase",
    "stage1_strategy",
    "evaluate",
    "export_raw_ply",
    "NonFiniteLossError",
]
