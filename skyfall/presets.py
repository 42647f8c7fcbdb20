"""Named Stage 1 presets, as code (style-guide §4.3). No torch import here.

* ``paper-jax`` / ``paper-nyc``: the reference's Stage 1 values for the JAX (DFC2019) and NYC (GES)
  scenes, from its run scripts (reference-pipeline.md §2.6 table).
* ``demo``: a CPU-sized run on the synthetic default tile that finishes in minutes on 2 cores.
* ``tiny``: tens of steps on the ``tiny`` synthetic tile, for tests.
"""

from __future__ import annotations

import dataclasses

from skyfall.config import DensifyConfig, PseudoDepthConfig, Stage1Config, Stage2Config


def _paper_jax() -> Stage1Config:
    return Stage1Config()


def _paper_nyc() -> Stage1Config:
    cfg = Stage1Config()
    return dataclasses.replace(
        cfg,
        densify=dataclasses.replace(cfg.densify, grad_threshold=2e-4, opacity_reset_interval=4000),
        pseudo=dataclasses.replace(cfg.pseudo, target_std=32.0),
    )


def _demo() -> Stage1Config:
    # CPU budget: minutes on 2 cores. Half-resolution satellite views, a short schedule with the
    # reference's shape, small pseudo views with the synthetic tile's exact depth as the prior.
    # Three deliberate departures from the reference, each measured on the default synthetic tile
    # (1500 steps; DSM MAE from median depth, held-out PSNR with the fitted embedding):
    # * lambda_op = 0.1 (the reference's flag default) instead of 10: in 1500 steps lambda_op = 10
    #   drives every opacity to ~1 (median 0.9997) and the scene stays made of opaque 1 m balls
    #   (DSM 3.67 m, 25.7 dB); 0.1 gives 1.6-1.9 m and 25.8-26.1 dB, 1.0 gives 1.8 m at 750 steps;
    # * no densification (``until=0``): every densification schedule we tried raised the DSM error
    #   (clones of 1 m Gaussians at roof edges spread over the ground: 1.49 m at step 250 -> 3.1 m
    #   at step 750 with tau 2e-4) and tripled the Gaussian count (24k -> 87k), i.e. the run time;
    # * the pseudo-depth Pearson loss on the expected depth D / alpha: on the reference's
    #   accumulated D = alpha * depth the loss can be lowered by changing opacities, and with
    #   semi-transparent Gaussians it pulled the DSM from 1.5 m to 2.3 m mid-run.
    steps = 1500
    return Stage1Config(
        steps=steps,
        resolution=2,
        lambda_opacity=0.1,
        sh_increase_every=300,
        opacity_cooldown_steps=100,
        checkpoint_every=250,
        eval_every=750,
        log_every=10,
        optim=dataclasses.replace(Stage1Config().optim, means_lr_max_steps=steps),
        densify=DensifyConfig(
            start=200,
            until=0,
            interval=100,
            grad_threshold=2e-4,
            opacity_reset_interval=10_000,
            filter_recompute_interval=50,
        ),
        pseudo=PseudoDepthConfig(
            start=200, end=1000, ramp=100, size=128, estimator="ground-truth", render_depth="expected"
        ),
        device="cpu",
    )


def _tiny() -> Stage1Config:
    # Densification, pseudo depth and the filter recompute all fire. No opacity reset by default:
    # opacity logits need ~90 Adam steps (lr 0.05) to recover from one, longer than this run (tests
    # that need a reset override --densify.opacity-reset-interval).
    steps = 60
    return Stage1Config(
        steps=steps,
        # lambda_op = 10 needs a long run: Adam follows the entropy gradient's sign on every weakly
        # constrained Gaussian at lr 0.05/step, so in tens of steps it drives opacities to 0 and the
        # fit degrades (measured: held-out PSNR 13.1 dB with 10 vs 21.2 dB without, 100 steps).
        # 0.1 is the reference's flag default (--lambda_opacity).
        lambda_opacity=0.1,
        sh_increase_every=10,
        opacity_cooldown_steps=30,
        checkpoint_every=10,
        eval_every=30,
        log_every=5,
        min_gaussians=10,
        optim=dataclasses.replace(Stage1Config().optim, means_lr_max_steps=steps),
        densify=DensifyConfig(
            # Early in a 60-step run every Gaussian's NDC gradient exceeds the reference's 1e-4 (the
            # reference starts densifying after 1000 steps), so tiny uses a larger threshold.
            start=10,
            until=40,
            interval=5,
            grad_threshold=3e-3,
            opacity_reset_interval=1000,
            filter_recompute_interval=5,
        ),
        pseudo=PseudoDepthConfig(
            start=5, end=50, ramp=5, interval=5, size=32, num_cams=4, estimator="ground-truth"
        ),
        device="cpu",
    )


PRESETS = {
    "paper-jax": ("Reference Stage 1 for DFC2019/JAX tiles (30k steps, GPU).", _paper_jax),
    "paper-nyc": ("Reference Stage 1 for NYC/GES tiles (tau 2e-4, reset 4000, target std 32).", _paper_nyc),
    "demo": ("CPU-sized run on the synthetic default tile (minutes on 2 cores).", _demo),
    "tiny": ("Tens of steps on the tiny synthetic tile (tests).", _tiny),
}

PresetName = str


def get_preset(name: str) -> Stage1Config:
    """A fresh Stage1Config for a named preset; raises ConfigError for an unknown name."""
    from skyfall.errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][1]()


# ---------------------------------------------------------------------------------------------- Stage 2


def _s2_paper_nyc() -> Stage2Config:
    return Stage2Config(curriculum="nyc_v1", grid_size=4, lambda_opacity=10.0, pseudo_weight=0.0)


def _s2_demo() -> Stage2Config:
    # CPU-sized: 128^2 orbit renders, one sample per view, 5 short episodes with the reference's
    # proportions (densify for the first 90 %, one opacity reset mid-episode).
    return Stage2Config(
        render_size=128,
        samples_per_view=1,
        episode_steps=400,
        densify_until=360,
        densify_interval=40,
        opacity_reset_interval=200,
        opacity_cooldown_steps=20,
        checkpoint_every=200,
        refiner="ideal",
        pseudo_size=96,
    )


def _s2_tiny() -> Stage2Config:
    return Stage2Config(
        grid_size=2,
        n_azimuths=2,
        samples_per_view=2,
        render_size=32,
        episode_steps=20,
        densify_until=15,
        densify_interval=5,
        opacity_reset_interval=10,
        opacity_cooldown_steps=3,
        checkpoint_every=5,
        refiner="identity",
        pseudo_size=32,
        max_episodes=2,
    )


STAGE2_PRESETS = {
    "paper-jax": (
        "Reference IDU for DFC2019/JAX (jax_v1, 5 x 10k steps, FlowEdit on FLUX.1-dev).",
        Stage2Config,
    ),
    "paper-nyc": (
        "Reference IDU for NYC/GES (nyc_v1, 4x4 grid, lambda_op 10, no pseudo depth).",
        _s2_paper_nyc,
    ),
    "demo": ("CPU-sized IDU on the synthetic tile with the ideal refiner (measuring instrument).", _s2_demo),
    "tiny": ("Two 20-step episodes at 32^2 (tests).", _s2_tiny),
}


def get_stage2_preset(name: str) -> Stage2Config:
    """A fresh Stage2Config for a named preset; raises ConfigError for an unknown name."""
    from skyfall.errors import ConfigError

    if name not in STAGE2_PRESETS:
        raise ConfigError(f"unknown Stage 2 preset {name!r}; choose one of {', '.join(STAGE2_PRESETS)}")
    return STAGE2_PRESETS[name][1]()
