"""Training configuration: Stage 1 and Stage 2 hyper-parameters as dataclasses.

Attribute docstrings are the CLI help (tyro). Defaults are the reference's values for the JAX
(DFC2019) scenes; named presets are YAML files in ``configs/`` (``skyfall.config.presets``). No torch
import here, so that ``skyfall --help`` stays instant.

Step-valued fields can be rescaled together with ``scale_steps`` for smoke runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from skyfall.config.priors import (
    DepthModelConfig,
    DifixConfig,
    FlowEditConfig,
    SDEditConfig,
    Top2GroundConfig,
)
from skyfall.gaussians.optim import OptimConfig
from skyfall.registry import DEPTH_ESTIMATORS, REFINERS

# Choices come from the registries, so a registered backend is selectable (and listed in --help).
EstimatorName = Literal[DEPTH_ESTIMATORS.names]  # type: ignore[valid-type]
RefinerName = Literal[REFINERS.names]  # type: ignore[valid-type]


@dataclass
class AppearanceConfig:
    """WildGaussians-style appearance model: per-image and per-Gaussian embeddings -> MLP -> affine SH."""

    enabled: bool = True
    """Per-image x per-Gaussian embeddings -> MLP -> affine on the SH coefficients (--appearance_enabled)."""
    image_dim: int = 32
    """Per-image embedding size (--appearance_embedding_dim)."""
    n_fourier_freqs: int = 4
    """Fourier frequencies of the per-Gaussian embedding; its size is 6x this (--appearance_n_fourier_freqs)."""
    gaussian_lr: float = 5e-3
    """LR of the per-Gaussian embeddings (--embedding_lr)."""
    image_lr: float = 1e-3
    """LR of the per-image embeddings (--appearance_embedding_lr)."""
    mlp_lr: float = 5e-4
    """LR of the appearance MLP (--appearance_mlp_lr)."""
    test_embedding: str = "mean"
    """Embedding for novel views (evaluation, pseudo/IDU renders, export): 'mean' of the trained
    per-image embeddings, or an integer index. The reference hard-codes index 6 (clamped to N-1);
    '6' reproduces it; 'mean' is a deliberate fix (index 6 is one arbitrary acquisition's lighting)."""


@dataclass
class DensifyConfig:
    """GOF densification and the filter-aware opacity reset (Skyfall-GS ``densify_and_prune``)."""

    start: int = 1000
    """Densify only after this step (--densify_from_iter)."""
    until: int = 21_000
    """Densify only before this step (--densify_until_iter); 0 turns densification and the opacity
    resets off (the 3D filter is then recomputed every filter_recompute_interval steps)."""
    interval: int = 100
    """Densify every this many steps (--densification_interval)."""
    grad_threshold: float = 1e-4
    """Mean NDC-space gradient threshold tau (--densify_grad_threshold; 1e-4 JAX, 2e-4 NYC)."""
    percent_dense: float = 0.01
    """Clone when max scale <= this x scene extent, else split (--percent_dense)."""
    min_opacity: float = 0.005
    """Prune Gaussians whose opacity is below this."""
    size_threshold: float = 20.0
    """Prune Gaussians whose max 2D radius exceeds this many pixels (--size_threshold); 0 disables."""
    max_world_scale_frac: float = 0.1
    """Prune Gaussians whose max scale exceeds this x scene extent."""
    opacity_reset_interval: int = 3000
    """Reset opacities every this many steps while densifying (--opacity_reset_interval; NYC 4000)."""
    opacity_reset_value: float = 0.01
    """Effective opacity ceiling after a reset (filter-aware)."""
    filter_recompute_interval: int = 100
    """After densification stops, recompute the 3D filter every this many steps."""
    max_gaussians: int = 0
    """Densify only up to this many Gaussians, largest gradients first (0 = no cap, the reference): a
    budget for sparse starts (a few thousand matched points), where the plain rule multiplies the count."""
    prune_interval: int = 0
    """Outside densification (after ``start``), remove Gaussians whose effective opacity is below
    ``prune_opacity`` every this many steps (0: never, as the reference)."""
    prune_opacity: float = 0.05
    """Effective-opacity threshold of ``prune_interval``'s pruning."""


@dataclass
class PseudoDepthConfig:
    """Pseudo-camera depth supervision: oblique renders matched to a monocular depth prior (Pearson)."""

    enabled: bool = True
    """Render oblique pseudo views and match a monocular depth prior with a Pearson loss."""
    weight: float = 0.5
    """Loss weight (--lambda_pseudo_depth)."""
    interval: int = 10
    """Use a pseudo view every this many steps (--sample_pseudo_interval)."""
    start: int = 1000
    """First step (exclusive) with pseudo supervision (--start_sample_pseudo)."""
    end: int = 21_000
    """Last step (exclusive) with pseudo supervision (--end_sample_pseudo)."""
    ramp: int = 500
    """Linear ramp of the weight over this many steps after start."""
    num_cams: int = 24
    """Cameras drawn per refill of the pseudo-camera stack (--num_pseudo_cams)."""
    n_azimuths: int = 12
    """Orbit azimuths per look-at target; one is picked at random."""
    target_std: float = 64.0
    """Std of the look-at target's x, y around the tile centre, metres (--target_std; NYC 32)."""
    elevation_start: float = 80.0
    """Elevation (degrees) at the start of the window."""
    elevation_end: float = 45.0
    """Elevation (degrees) at the end of the window."""
    radius_start: float = 300.0
    """Orbit radius (world units) at the start of the window."""
    radius_end: float = 250.0
    """Orbit radius (world units) at the end of the window."""
    size: int = 1024
    """Pseudo-view width and height in pixels."""
    fov: float = 60.0
    """Pseudo-view field of view (degrees, x and y)."""
    estimator: EstimatorName = "moge"
    """Depth prior, by registered name (skyfall.registry.DEPTH_ESTIMATORS): 'moge' (the reference's),
    'depth-anything', 'ground-truth' (synthetic tiles: exact depth), 'tiny' (tests only)."""
    model: DepthModelConfig = field(default_factory=DepthModelConfig)
    """Weights, version, device and dtype of the depth model ('moge', 'depth-anything')."""
    invalid_policy: Literal["valid_only", "skip_if_any"] = "valid_only"
    """'valid_only' computes Pearson r over valid pixels (our fix); 'skip_if_any' reproduces the
    reference, which drops the term whenever any pixel is invalid (MoGe masks sky and far pixels)."""
    min_valid_fraction: float = 0.01
    """Skip the term when fewer than this fraction of pixels are valid."""
    alpha_threshold: float = 0.5
    """Pixels whose rendered alpha is below this are invalid (nothing rendered there)."""
    render_depth: Literal["accumulated", "expected"] = "accumulated"
    """Rendered depth correlated with the prior: 'accumulated' D = sum T a z (the reference, gsplat
    RGB+D) or 'expected' D / alpha. With semi-transparent Gaussians D is alpha times a depth, and the
    correlation can be raised by changing opacities instead of geometry."""


@dataclass
class MultiViewConfig:
    """Multi-view photometric consistency of the rendered depth (no model needed).

    Each step's view is lifted to 3D at its rendered depth and compared, window by window (NCC), with
    the other satellite views at the same points (``skyfall.losses.multiview_ncc_loss``): the stereo
    cue, inside training, for few views and sparse starting points. On the dense heights that
    `skyfall prepare` writes it pulls alleys back to roof height, so the `real` preset leaves it off."""

    weight: float = 0.0
    """Loss weight (0 = off, as the reference)."""
    start: int = 300
    """First step with the term (the sparse start first settles into a coarse surface)."""
    sources: int = 4
    """Other views each view is compared with: the ones whose viewing directions are closest
    (at least ``min_angle`` degrees apart)."""
    min_angle: float = 2.0
    """Views seen from within this angle (degrees) of each other give no parallax and are not paired."""
    patch: int = 7
    """NCC window size (pixels of the training resolution)."""
    min_std: float = 0.02
    """Windows of the view whose grey-level standard deviation is below this have no texture to
    match and are left out."""
    alpha_min: float = 0.5
    """Pixels whose rendered alpha is below this have no surface to lift."""
    aggregate: Literal["min", "mean"] = "min"
    """Cost of a pixel over its sources: 'min' (the best source: occlusion-robust) or 'mean'."""


@dataclass
class Stage1Config:
    """Stage 1: fit 3D Gaussians to the satellite views (Skyfall-GS ``train.py:training``)."""

    steps: int = 30_000
    """Training steps (--iterations)."""
    resolution: int = 1
    """Image downscale factor: 1 = native, 2 = half, ... (--resolution)."""
    crop: int = 0
    """Train on random crops of this many pixels (square) of the satellite views instead of whole
    views: full-resolution detail at the cost per step of a smaller image (0: whole views, as the
    reference)."""
    sh_degree: int = 1
    """Maximum SH degree (--sh_degree)."""
    sh_increase_every: int = 1000
    """Raise the active SH degree by one every this many steps."""
    scene_extent: float = 128.0
    """Scene extent: spatial LR scale and densify/prune thresholds (reference hard-codes 128)."""
    lambda_dssim: float = 0.2
    """Weight of (1 - SSIM) in the photometric loss (--lambda_dssim)."""
    lambda_opacity: float = 10.0
    """Weight of the binary-entropy opacity regulariser (--lambda_opacity)."""
    opacity_cooldown_lambda: float = 0.01
    """Opacity-regulariser weight right after an opacity reset (Stage 1 reference: 0.01)."""
    lambda_opacity_end: float | None = None
    """Ramp the opacity regulariser linearly from lambda_opacity (at opacity_ramp_start) to this
    weight at the last step, so that surfaces end opaque without saturating early (None: constant,
    as the reference)."""
    opacity_ramp_start: int = 0
    """First step of that ramp."""
    lambda_flatten: float = 0.0
    """Weight of the mean smallest scale (metres) of the Gaussians: turns them into disks that lie on
    the surface (the flattening term of 2DGS/PGSR-style methods); 0 = off, as the reference."""
    opacity_cooldown_steps: int = 500
    """Length of the cool-down after an opacity reset."""
    eps2d: float = 0.1
    """Mip-Splatting 2D filter (px^2) with opacity compensation (--kernel_size)."""
    filter_rule: Literal["per_camera", "reference"] = "per_camera"
    """3D filter size rule. 'per_camera' = sqrt(0.2) min_c z_c/f_c over the cameras that see the
    Gaussian (Mip-Splatting's definition); 'reference' = min depth / max focal over all cameras,
    which collapses when near oblique cameras and far satellite cameras mix (Stage 2)."""
    init_max_scale: float = 10.0
    """Cap (world units) on the initial KNN scales, never below the point's Mip-Splatting 3D filter size
    (smaller would only start more transparent)."""
    init_flat: float = 0.0
    """> 0: start each Gaussian as a disk in the plane of its 8 nearest points (PCA), this fraction
    of the KNN scale thick; 0 = isotropic balls, as the reference."""
    init_grid: float = 0.0
    """> 0: also start Gaussians on a regular x-y grid of this spacing (metres) over the tile's points,
    each at the median height of its 8 nearest points: a surface without holes for sparse starts
    (a few thousand matched points on real tiles); 0 = the points only, as the reference."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    pseudo: PseudoDepthConfig = field(default_factory=PseudoDepthConfig)
    multiview: MultiViewConfig = field(default_factory=MultiViewConfig)
    checkpoint_every: int = 1000
    """Write an atomic checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final one is always kept)."""
    eval_every: int = 5000
    """Evaluate held-out PSNR every this many steps (and at the end)."""
    eval_appearance: Literal["fit-left-half", "novel"] = "fit-left-half"
    """Appearance of held-out satellite views in psnr_test. 'fit-left-half' (NeRF-W/WildGaussians
    protocol): a held-out view's acquisition lighting is unknowable, so its appearance embedding is
    fitted on the left half of the image (model frozen) and PSNR is measured on the right half.
    'novel': the novel-view embedding (appearance.test_embedding), as the reference evaluates.
    Both are always reported (psnr_test and psnr_test_novel_embedding)."""
    eval_fit_steps: int = 30
    """Adam steps (lr 0.02) of the held-out embedding fit."""
    log_every: int = 10
    """Write metrics.jsonl every this many steps."""
    min_gaussians: int = 100
    """Stop with an error when the Gaussian count falls below this (collapse guard)."""
    seed: int = 0
    """Random seed (Python, NumPy, torch)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    tensorboard: bool = False
    """Also log scalars to TensorBoard (needs the tensorboard package)."""
    compile: Literal["none", "appearance"] = "none"
    """'appearance': torch.compile the appearance model's modulation of the SH coefficients (its MLP
    and the elementwise operations around it), fewer kernel launches per step: a GPU-side benefit (a
    step's host time is its launches); on a CPU it only adds the compile time (seconds). Losses equal
    the uncompiled ones up to float rounding; may change on resume."""

    def check(self) -> None:
        """One ConfigError naming the option (CLI spelling) for a value no run could use; called
        before a run writes anything."""
        bad = _check_values(self, "stage1", _STAGE1_RULES)
        if not bad and self.multiview.patch % 2 == 0:
            bad = f"--stage1.multiview.patch must be odd (a window centred on its pixel), got {self.multiview.patch}"
        if bad:
            from skyfall.errors import ConfigError

            raise ConfigError(bad)
        from skyfall.devices import resolve_device  # torch: imported only when a run starts

        resolve_device(self.device, "--stage1.device")

    def scale_steps(self, factor: float) -> Stage1Config:
        """A copy with every step-valued field multiplied by ``factor`` (for quick runs)."""

        def s(v: int) -> int:
            return max(1, round(v * factor))

        d, p, o, m = self.densify, self.pseudo, self.optim, self.multiview
        return dataclasses.replace(
            self,
            steps=s(self.steps),
            sh_increase_every=s(self.sh_increase_every),
            opacity_cooldown_steps=s(self.opacity_cooldown_steps),
            checkpoint_every=s(self.checkpoint_every),
            eval_every=s(self.eval_every),
            optim=dataclasses.replace(o, means_lr_max_steps=s(o.means_lr_max_steps)),
            densify=dataclasses.replace(
                d,
                start=s(d.start),
                until=s(d.until),
                interval=s(d.interval),
                opacity_reset_interval=s(d.opacity_reset_interval),
                filter_recompute_interval=s(d.filter_recompute_interval),
            ),
            pseudo=dataclasses.replace(p, start=s(p.start), end=s(p.end), ramp=s(p.ramp)),
            multiview=dataclasses.replace(m, start=s(m.start)),
        )


@dataclass
class Stage2Config:
    """Stage 2: Iterative Dataset Update (Skyfall-GS ``train.py:training_idu``; JAX script values by default)."""

    curriculum: str = "jax_v1"
    """Episodes as 'jax_v1', 'nyc_v1' or a custom list 'ELEV:RADIUS[,ELEV:RADIUS...]' in degrees and
    world units (reference scale; see --scale), e.g. '85:300,65:275,45:250'."""
    fov: float | None = None
    """Field of view of the orbit renders in degrees; None = the curriculum's (jax_v1 60, nyc_v1 20)."""
    scale: str = "1.0"
    """Multiply curriculum radii, look-at grid width and pseudo-camera distances by this. The reference
    values fit ~256 m tiles; 'auto' derives the factor from the point cloud's extent
    (users of the reference ask for this on custom data)."""
    grid_size: int = 3
    """G: a GxG grid of look-at targets (--idu_grid_size; JAX 3, NYC 4)."""
    grid_width: float = 512.0
    """Width of the look-at grid; targets sit at -W/2 + k W/(G+1), k = 1..G (--idu_grid_width)."""
    n_azimuths: int = 6
    """N_v: orbit cameras per target at azimuths 2 pi i / N_v (--idu_num_cams)."""
    samples_per_view: int = 2
    """N_s: independent refinements (seeds) of each rendered view (--idu_num_samples_per_view)."""
    render_size: int = 1024
    """Square size of the orbit renders fed to the refiner (--idu_render_size)."""
    episode_steps: int = 10_000
    """Training steps per episode (--idu_episode_iterations)."""
    densify_until: int = 9_000
    """Densify during the first this many steps of each episode (--idu_densify_until_iter)."""
    densify_interval: int = 100
    """Densify every this many steps."""
    grad_threshold: float = 2e-4
    """Densification gradient threshold in Stage 2 (--densify_grad_threshold)."""
    opacity_reset_interval: int = 5000
    """Opacity reset at absolute step multiples of this, inside the densify window (--idu_opacity_reset_interval)."""
    opacity_cooldown_lambda: float = 0.0
    """Opacity-loss weight during the cool-down after a reset (the reference uses 0 in Stage 2, 0.01 in Stage 1)."""
    opacity_cooldown_steps: int = 500
    """Cool-down length (--idu_opacity_cooling_iterations)."""
    lambda_opacity: float = 0.0
    """Opacity entropy weight in Stage 2 (JAX 0, NYC 10)."""
    idu_ratio: float = 0.75
    """Probability of training on a refined view instead of a satellite view (--idu_train_ratio)."""
    lambda_depth: float = 0.0
    """Weight of the depth loss on refined views (depth predicted on the refined image; 0 in every
    reference config, in which case no depth is predicted for them)."""
    refiner: RefinerName = "flowedit"
    """Image refiner, by registered name (skyfall.registry.REFINERS): 'flowedit' on FLUX.1-dev (the
    paper's), 'sdedit' (its ablation), 'top2ground' (FlowEdit on FLUX.1-Depth-dev conditioned on the
    view's rendered height map and, through FLUX.1 Redux, on the satellite crop around its look-at
    target), 'difix' (Difix3D's single-step fixer, the fast mode), 'ideal' (synthetic tiles only: the
    ground-truth render of the pose, a measuring instrument, not a method), 'identity' (no refine)."""
    ideal_noise: float = 0.0
    """IdealRefiner only: std of per-sample colour perturbation, mimicking diffusion variance."""
    flowedit: FlowEditConfig = field(default_factory=FlowEditConfig)
    """FlowEdit on FLUX.1-dev: model, memory mode, schedule and prompts (refiner 'flowedit')."""
    sdedit: SDEditConfig = field(default_factory=SDEditConfig)
    """SDEdit on FLUX.1-dev (refiner 'sdedit', the paper's ablation)."""
    top2ground: Top2GroundConfig = field(default_factory=Top2GroundConfig)
    """FlowEdit on FLUX.1-Depth-dev conditioned on the render's geometry and the satellite crop's Redux
    tokens (refiner 'top2ground')."""
    difix: DifixConfig = field(default_factory=DifixConfig)
    """Difix3D single-step fixer on SD-Turbo: model, device, timestep and prompt (refiner 'difix')."""
    pseudo_weight: float = 0.5
    """Pseudo-camera depth weight in Stage 2 (JAX 0.5, NYC 0)."""
    pseudo_elevation_start: float = 85.0
    """Pseudo-camera elevation at the start of each episode (degrees)."""
    pseudo_elevation_end: float = 45.0
    """Pseudo-camera elevation at the end of each episode (degrees)."""
    pseudo_radius_start: float = 150.0
    """Pseudo-camera radius at the start of each episode (reference scale)."""
    pseudo_radius_end: float = 75.0
    """Pseudo-camera radius at the end of each episode (reference scale)."""
    pseudo_size: int | None = None
    """Pseudo-view size in pixels; None = Stage 1's."""
    checkpoint_every: int = 1000
    """Step checkpoints inside an episode (episode ends are always checkpointed)."""
    max_episodes: int | None = None
    """Stop after this many episodes (None = the whole curriculum)."""

    def check(self) -> None:
        """One ConfigError naming the option (CLI spelling) for a value no run could use; cheap (no
        model is loaded), so that it runs before Stage 1 or any Stage 2 work starts.

        Only the selected refiner's section (--stage2.flowedit / --stage2.sdedit / --stage2.top2ground /
        --stage2.difix) is checked: the others are not used, and their devices may well name a GPU this
        machine lacks.
        """
        from skyfall.errors import ConfigError

        section = self.refiner if self.refiner in ("flowedit", "sdedit", "top2ground", "difix") else None
        rules = tuple(
            r
            for r in _STAGE2_RULES
            if _dotted(self, r[0]) is not None and (r[0].count(".") == 0 or r[0].split(".")[0] == section)
        )
        bad = _check_values(self, "stage2", rules)
        if bad:
            raise ConfigError(bad)
        try:
            parse_curriculum(self.curriculum)
        except ConfigError as e:
            raise ConfigError(f"--stage2.curriculum {self.curriculum!r}: {e}") from None
        if self.scale != "auto":
            try:
                scale = float(self.scale)
            except ValueError:
                scale = math.nan
            if not (math.isfinite(scale) and scale > 0):
                raise ConfigError(f"--stage2.scale must be a number > 0 or 'auto', got {self.scale!r}")
        for name in ("pseudo_elevation_start", "pseudo_elevation_end"):
            v = getattr(self, name)
            if not 0 < v <= 90:
                raise ConfigError(f"--stage2.{name.replace('_', '-')} must be in (0, 90] degrees, got {v}")
        if self.fov is not None and not 0 < self.fov < 180:
            raise ConfigError(f"--stage2.fov must be in (0, 180) degrees (or None), got {self.fov}")
        if section == "difix":
            self._check_difix()
        elif section is not None:
            self._check_flux(section)

    def _check_difix(self) -> None:
        """What DifixRefiner refuses, and its device."""
        from skyfall.errors import ConfigError

        cfg = self.difix
        if cfg.use_reference:
            raise ConfigError(
                "--stage2.difix.use-reference is not supported: it needs nvidia/difix_ref's multi-view UNet and "
                "a clean reference image per render (the reference's default is off too)"
            )
        if not 0 <= cfg.timestep < 1000:
            raise ConfigError(
                f"--stage2.difix.timestep must be in [0, 999] (the SD-Turbo schedule's training steps), "
                f"got {cfg.timestep}"
            )
        if self.render_size < 8:
            raise ConfigError(
                f"--stage2.render-size must be at least 8 for the difix refiner, got {self.render_size}"
            )
        from skyfall.devices import resolve_device  # torch: imported only when a run starts

        try:
            resolve_device(cfg.device, "--stage2.difix.device")
        except ConfigError as e:
            if "no CUDA GPU" not in str(e):
                raise
            raise ConfigError(
                f"{e}; without a GPU: --stage2.difix.device cpu (slow at 1024 px), or --preset demo (the ideal "
                "refiner)"
            ) from None

    def _check_flux(self, section: str) -> None:
        """The FLUX refiner's schedule (what FlowEditRefiner / SDEditRefiner / Top2GroundRefiner refuse)
        and its device."""
        from skyfall.errors import ConfigError

        cfg = getattr(self, section)
        flag = f"--stage2.{section}"
        if self.render_size % 16:
            raise ConfigError(
                f"--stage2.render-size must be a multiple of 16 for the {section} refiner (FLUX latents), "
                f"got {self.render_size}"
            )
        if section in ("flowedit", "top2ground"):
            if not 0 <= cfg.n_min <= cfg.n_max <= cfg.T_steps:
                raise ConfigError(
                    f"{flag}.n-min, {flag}.n-max: need 0 <= n-min ({cfg.n_min}) <= n-max ({cfg.n_max}) "
                    f"<= T-steps ({cfg.T_steps})"
                )
            if cfg.n_max_end != -1 and not cfg.n_min <= cfg.n_max_end <= cfg.T_steps:
                raise ConfigError(
                    f"{flag}.n-max-end must be -1 or in [n-min, T-steps] = [{cfg.n_min}, {cfg.T_steps}], "
                    f"got {cfg.n_max_end}"
                )
            if section == "top2ground" and cfg.geometry not in ("depth", "height", "none"):
                raise ConfigError(f"{flag}.geometry must be depth, height or none, got {cfg.geometry!r}")
        elif not 0 <= cfg.n_steps <= cfg.T_steps:
            raise ConfigError(
                f"{flag}.n-steps must be in [0, T-steps] = [0, {cfg.T_steps}], got {cfg.n_steps}"
            )
        from skyfall.devices import resolve_device  # torch: imported only when a run starts

        try:
            device = resolve_device(cfg.device, f"{flag}.device")
        except ConfigError as e:
            if "no CUDA GPU" not in str(e):
                raise
            raise ConfigError(
                f"{e}; without a GPU: {flag}.device cpu (FLUX on a CPU), or --preset demo (the ideal refiner)"
            ) from None
        # the speed options that cannot work on this machine stop the run before Stage 1 or any Stage 2 work
        if cfg.quantization == "fp8-dynamic":
            from skyfall.config.priors import check_float8_matmuls

            check_float8_matmuls(device, f"{flag}.quantization")
        if cfg.attention != "default":  # diffusers is imported only for a backend other than the default
            from skyfall.config.priors import check_attention_backend

            check_attention_backend(cfg.attention, f"{flag}.attention")

    def scale_steps(self, factor: float) -> Stage2Config:
        """A copy with every step-valued field multiplied by ``factor``."""

        def s(v: int) -> int:
            return max(1, round(v * factor))

        return dataclasses.replace(
            self,
            episode_steps=s(self.episode_steps),
            densify_until=s(self.densify_until),
            densify_interval=s(self.densify_interval),
            opacity_reset_interval=s(self.opacity_reset_interval),
            opacity_cooldown_steps=s(self.opacity_cooldown_steps),
            checkpoint_every=s(self.checkpoint_every),
        )


CURRICULA: dict[str, tuple[float, list[tuple[float, float]]]] = {
    # name -> (FoV degrees, [(elevation deg, radius), ...]), from the reference's IDU run scripts
    "jax_v1": (60.0, [(85.0, 300.0), (75.0, 275.0), (65.0, 275.0), (55.0, 250.0), (45.0, 250.0)]),
    # The reference lists 6 elevations (…, 25) with 5 radii and zips them, so 25° never runs:
    # the preset lists the 5 episodes that actually run.
    "nyc_v1": (20.0, [(85.0, 600.0), (75.0, 600.0), (65.0, 600.0), (55.0, 600.0), (45.0, 600.0)]),
}


def parse_curriculum(spec: str) -> tuple[float | None, list[tuple[float, float]]]:
    """('jax_v1' | 'nyc_v1' | 'E:R,E:R,...') -> (preset FoV or None, [(elevation, radius), ...])."""
    from skyfall.errors import ConfigError

    if spec in CURRICULA:
        fov, eps = CURRICULA[spec]
        return fov, list(eps)
    episodes = []
    for part in spec.split(","):
        bits = part.strip().split(":")
        if len(bits) != 2:
            raise ConfigError(f"curriculum entry {part!r}: expected ELEVATION:RADIUS (or a preset name)")
        try:
            elev, radius = float(bits[0]), float(bits[1])
        except ValueError:
            raise ConfigError(f"curriculum entry {part!r}: elevation and radius must be numbers") from None
        if not (0.0 < elev <= 90.0) or radius <= 0:
            raise ConfigError(f"curriculum entry {part!r}: elevation must be in (0, 90] and radius > 0")
        episodes.append((elev, radius))
    if not episodes:
        raise ConfigError("empty curriculum")
    return None, episodes


# (dotted field, rule, what the rule says) for Stage1Config.check: only what no run could use.
_STAGE1_RULES: tuple[tuple[str, str, str], ...] = (
    ("steps", "pos", "a positive number of steps"),
    ("resolution", "pos", "a positive downscale factor"),
    ("crop", "nonneg", ">= 0 (0: whole views)"),
    ("checkpoint_every", "pos", "a positive number of steps"),
    ("keep_checkpoints", "pos", "at least 1 (the run's state lives in its checkpoints)"),
    ("eval_every", "pos", "a positive number of steps"),
    ("log_every", "pos", "a positive number of steps"),
    ("sh_increase_every", "pos", "a positive number of steps"),
    ("init_max_scale", "pos", "a positive length (metres)"),
    ("lambda_dssim", "unit", "in [0, 1]"),
    ("lambda_opacity", "nonneg", ">= 0"),
    ("lambda_flatten", "nonneg", ">= 0"),
    ("init_flat", "unit", "in [0, 1]"),
    ("init_grid", "nonneg", ">= 0 metres (0: off)"),
    ("optim.means_lr_init", "nonneg", "a learning rate >= 0"),
    ("optim.means_lr_final", "nonneg", "a learning rate >= 0"),
    ("optim.sh0_lr", "nonneg", "a learning rate >= 0"),
    ("optim.shN_lr", "nonneg", "a learning rate >= 0"),
    ("optim.opacities_lr", "nonneg", "a learning rate >= 0"),
    ("optim.scales_lr", "nonneg", "a learning rate >= 0"),
    ("optim.quats_lr", "nonneg", "a learning rate >= 0"),
    ("optim.adam_eps", "pos", "> 0"),
    ("densify.interval", "pos", "a positive number of steps"),
    ("densify.opacity_reset_interval", "pos", "a positive number of steps"),
    ("densify.filter_recompute_interval", "pos", "a positive number of steps"),
    ("densify.prune_interval", "nonneg", ">= 0 (0: never)"),
    ("pseudo.interval", "pos", "a positive number of steps"),
    ("multiview.weight", "nonneg", ">= 0 (0: off)"),
    ("multiview.start", "nonneg", "a step >= 0"),
    ("multiview.sources", "pos", "at least one other view"),
    ("multiview.patch", "pos", "a positive window size (pixels)"),
    ("multiview.min_std", "nonneg", ">= 0"),
    ("multiview.alpha_min", "unit", "in [0, 1]"),
)


# (dotted field, rule, what the rule says) for Stage2Config.check. Fields that may be None (None: a
# default) are checked only when set; flowedit.* / sdedit.* / top2ground.* / difix.* only for the selected
# refiner.
_STAGE2_RULES: tuple[tuple[str, str, str], ...] = (
    ("grid_size", "pos", "a positive number of look-at targets per side"),
    ("grid_width", "pos", "a positive width (reference scale)"),
    ("n_azimuths", "pos", "a positive number of cameras per target"),
    ("samples_per_view", "pos", "a positive number of samples"),
    ("render_size", "pos", "a positive size in pixels"),
    ("episode_steps", "pos", "a positive number of steps"),
    ("densify_until", "nonneg", ">= 0 (0: no densification)"),
    ("densify_interval", "pos", "a positive number of steps"),
    ("grad_threshold", "nonneg", ">= 0"),
    ("opacity_reset_interval", "pos", "a positive number of steps"),
    ("opacity_cooldown_lambda", "nonneg", ">= 0"),
    ("opacity_cooldown_steps", "nonneg", ">= 0"),
    ("lambda_opacity", "nonneg", ">= 0"),
    ("idu_ratio", "unit", "a probability in [0, 1]"),
    ("lambda_depth", "nonneg", ">= 0"),
    ("ideal_noise", "nonneg", ">= 0"),
    ("pseudo_weight", "nonneg", ">= 0"),
    ("pseudo_radius_start", "pos", "a positive radius (reference scale)"),
    ("pseudo_radius_end", "pos", "a positive radius (reference scale)"),
    ("pseudo_size", "pos", "a positive size in pixels (or None: Stage 1's)"),
    ("checkpoint_every", "pos", "a positive number of steps"),
    ("max_episodes", "pos", "at least 1 (or None: the whole curriculum)"),
    ("flowedit.T_steps", "pos", "a positive number of steps"),
    ("flowedit.n_avg", "pos", "at least 1"),
    ("flowedit.src_guidance", "nonneg", ">= 0"),
    ("flowedit.tar_guidance", "nonneg", ">= 0"),
    ("flowedit.batch_size", "pos", "at least 1"),
    ("flowedit.cache_threshold", "nonneg", ">= 0"),
    ("flowedit.max_sequence_length", "pos", "a positive number of tokens"),
    ("flowedit.seed", "nonneg", ">= 0"),
    ("sdedit.T_steps", "pos", "a positive number of steps"),
    ("sdedit.guidance", "nonneg", ">= 0"),
    ("sdedit.batch_size", "pos", "at least 1"),
    ("sdedit.cache_threshold", "nonneg", ">= 0"),
    ("sdedit.max_sequence_length", "pos", "a positive number of tokens"),
    ("sdedit.seed", "nonneg", ">= 0"),
    ("top2ground.T_steps", "pos", "a positive number of steps"),
    ("top2ground.n_avg", "pos", "at least 1"),
    ("top2ground.src_guidance", "nonneg", ">= 0"),
    ("top2ground.tar_guidance", "nonneg", ">= 0"),
    ("top2ground.batch_size", "pos", "at least 1"),
    ("top2ground.cache_threshold", "nonneg", ">= 0"),
    ("top2ground.max_sequence_length", "pos", "a positive number of tokens"),
    ("top2ground.seed", "nonneg", ">= 0"),
    ("top2ground.redux_weight", "nonneg", ">= 0 (0: no Redux tokens)"),
    ("difix.batch_size", "pos", "at least 1"),
    ("difix.seed", "nonneg", ">= 0"),
)


def _dotted(cfg: object, dotted: str) -> object:
    """The value of a dotted field (``optim.means_lr_init``) of a nested config."""
    v = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v


def _check_values(cfg: object, prefix: str, rules: tuple[tuple[str, str, str], ...]) -> str | None:
    """The first rule broken, as one line naming the option as the CLI spells it, or None."""
    for dotted, rule, says in rules:
        v = _dotted(cfg, dotted)
        x = float(v)  # type: ignore[arg-type]
        ok = (
            math.isfinite(x)
            and {
                "pos": x > 0,
                "nonneg": x >= 0,
                "unit": 0 <= x <= 1,
            }[rule]
        )
        if not ok:
            flag = "--" + prefix + "." + dotted.replace("_", "-")
            return f"{flag} must be {says}, got {v}"
    return None
