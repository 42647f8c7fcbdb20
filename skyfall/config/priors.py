"""Options of the learned priors (FLUX refiners, depth models) as dataclasses.

The attribute docstrings are the command-line help. This module imports no torch so that the CLI
can build its help instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_DEPTH_DEV = "black-forest-labs/FLUX.1-Depth-dev"
FLUX_REDUX_DEV = "black-forest-labs/FLUX.1-Redux-dev"
MOGE_V1 = "Ruicheng/moge-vitl"
MOGE_V2 = "Ruicheng/moge-2-vitl"
DEPTH_ANYTHING_METRIC_OUTDOOR = "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf"
DIFIX = "nvidia/difix"

# The prompts of the Skyfall-GS FlowEdit fork at HEAD 9489c5b ("Update prompt"), which match the paper
# and the paper; the older, longer ones at the fork's pinned submodule commit are not used.
PAPER_SOURCE_PROMPT = (
    "Satellite image of an urban area with modern and older buildings, roads, green spaces. "
    "Some areas appear distorted, with blurring and warping artifacts."
)
PAPER_TARGET_PROMPT = (
    "Clear satellite image of an urban area with sharp buildings, smooth edges, natural lighting, "
    "and well-defined textures."
)

Dtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class FluxConfig:
    """Where the FLUX.1 components come from and how they are held in memory."""

    model_id: str = FLUX_DEV
    """Hugging Face Hub id or local directory (a diffusers FLUX pipeline folder)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = main."""
    local_files_only: bool = False
    """Never contact the Hub: use the local Hugging Face cache or the local directory only."""
    cache_dir: str | None = None
    """Hugging Face cache folder; None = the default (honours HF_HOME / HF_HUB_CACHE)."""
    device: str = "cuda"
    """Device the transformer computes on ('cuda', 'cuda:1', 'cpu')."""
    dtype: Dtype = "bfloat16"
    """Compute dtype. The reference used float16 under autocast; bfloat16 avoids fp16 overflow in
    FLUX/T5 and is recommended ('float16' reproduces the reference)."""
    memory_mode: Literal["gpu", "cpu-offload"] = "gpu"
    """'gpu': all components stay on the device. 'cpu-offload': the transformer lives in CPU memory and
    moves to the device only for the duration of a refine() call, so 3DGS training gets the GPU back."""
    quantization: Literal["none", "fp8", "fp8-dynamic", "nf4"] = "none"
    """Quantise the transformer weights: 'fp8' (torchao, ~12 GB, weight-only: the matmuls still run in
    bfloat16) or 'nf4' (bitsandbytes, ~7 GB) instead of ~22 GB in bfloat16. 'fp8-dynamic': torchao float8
    weights and activations (dynamic per-row scales), so the matmuls themselves run in float8 (~12 GB;
    needs a GPU of compute capability >= 8.9: Ada, Hopper or newer; fastest with compile 'blocks', which
    fuses the activation quantisation). Combine with memory_mode='cpu-offload' for the lowest Stage 2 peak
    VRAM."""
    max_sequence_length: int = 512
    """T5 prompt length in tokens (512 for FLUX.1-dev, as the reference)."""
    prompt_cache_dir: str | None = None
    """Folder caching the encoded prompts across runs (so T5-XXL is loaded once ever); None = the default
    (~/.cache/skyfall/prompt_embeds or $SKYFALL_CACHE/prompt_embeds); '' = in-memory only."""
    batch_size: int = 1
    """Images refined together, one transformer call per step for all of them (each image adds a source
    and a target row); Stage 2 sends this many (view, sample) pairs per refinement. Each image's seed
    alone draws its noise (and n_max), so a batch gives each image's batch-1 result up to float rounding;
    activation memory grows with it (set it as memory allows)."""
    compile: Literal["none", "blocks"] = "none"
    """'blocks': torch.compile each transformer block once after loading (regional compilation, diffusers'
    compile_repeated_blocks): the first calls of each new batch shape pay the compile time (tens of
    seconds to minutes on a GPU); outputs equal the uncompiled ones up to float rounding."""
    attention: str = "default"
    """Attention backend of the transformer, by diffusers' name (its AttentionBackendName: 'native',
    '_native_cudnn', '_native_flash', '_native_efficient', 'flash', '_flash_3', 'xformers', 'sage', ...);
    'default' keeps diffusers' own (PyTorch SDPA, which picks its kernel itself). Checked at load with one
    trial call on the device; 'sage*' backends quantise attention, so they change the output."""
    cache: Literal["none", "first-block"] = "none"
    """Block caching across denoising steps (diffusers' cache hooks). 'first-block': First Block Cache (a
    simpler relative of TeaCache): every call runs the first block, and when its residual changed by less
    than cache_threshold (relative mean absolute change) since the last full call of the same phase, the
    other blocks are skipped and their cached residual is reused. Changes the output, by an amount to
    measure on real weights (scripts/bench_flowedit.py --cache first-block --compare) before use; the
    skip decision is taken for the whole batch, so batched results differ from batch-1 ones too."""
    cache_threshold: float = 0.05
    """First Block Cache threshold (diffusers' default 0.05; higher skips more, faster and further from
    the uncached output)."""


@dataclass
class FlowEditConfig(FluxConfig):
    """FlowEdit (Kulikov et al. 2024) on FLUX.1-dev, with the Skyfall-GS paper settings as defaults."""

    T_steps: int = 28
    """Length of the full (shifted) sigma schedule."""
    n_min: int = 4
    """The last n_min steps are plain target-prompt sampling (SDEdit-like tail)."""
    n_max: int = 10
    """Edit strength: the edit starts n_max steps before the end (used as is when n_max_end = -1)."""
    n_max_end: int = 10
    """-1: n_max is fixed. Otherwise each image draws n_max uniformly from {n_min, ..., n_max_end}
    (the reference's run scripts use 10; its README uses -1)."""
    n_avg: int = 1
    """Noise draws averaged per ODE step."""
    src_guidance: float = 1.5
    """FLUX distilled-guidance value for the source-prompt velocity."""
    tar_guidance: float = 5.5
    """FLUX distilled-guidance value for the target-prompt velocity."""
    source_prompt: str = PAPER_SOURCE_PROMPT
    """Prompt describing the renders (artefacts)."""
    target_prompt: str = PAPER_TARGET_PROMPT
    """Prompt describing the desired refined image."""
    seed: int = 0
    """Base seed used when refine() gets no per-image seeds (image k of the run gets seed + k)."""


@dataclass
class SDEditConfig(FluxConfig):
    """SDEdit on FLUX.1-dev (the paper's ablation): noise the render, then sample with the target prompt."""

    T_steps: int = 28
    """Length of the full (shifted) sigma schedule."""
    n_steps: int = 10
    """Sampling steps run from the noised render (strength = n_steps / T_steps)."""
    guidance: float = 5.5
    """FLUX distilled-guidance value for the target prompt."""
    target_prompt: str = PAPER_TARGET_PROMPT
    """Prompt describing the desired refined image."""
    seed: int = 0
    """Base seed used when refine() gets no per-image seeds (image k of the run gets seed + k)."""


@dataclass
class Top2GroundConfig(FlowEditConfig):
    """Top2Ground-style refiner (Lee & Benes 2025): FlowEdit from the render on FLUX.1-Depth-dev, conditioned
    on the render's geometry (a control image) and on the satellite crop of its target (FLUX.1 Redux tokens)."""

    model_id: str = FLUX_DEPTH_DEV
    """Hugging Face Hub id or local directory of a FLUX control pipeline (diffusers FluxControlPipeline
    layout: the transformer also takes the control image's latents). With geometry 'none' a plain FLUX
    pipeline (FLUX.1-dev) works too."""
    geometry: Literal["depth", "height", "none"] = "height"
    """Geometry condition: the rendered 'depth' (as disparity, near = bright) or the rendered surface's
    'height' above the ground (high = bright), each normalised per image to [0, 1] into the control image;
    'none': a black control image (what a map without variation also gives), or no control input with a
    plain FLUX model."""
    semantics: bool = True
    """Semantic condition: append FLUX.1 Redux tokens of the satellite crop that sees the view's look-at
    target to the target prompt."""
    redux_model_id: str = FLUX_REDUX_DEV
    """Hugging Face Hub id or local directory of FLUX.1 Redux (diffusers FluxPriorReduxPipeline layout);
    loaded only when semantics is on."""
    redux_revision: str | None = None
    """Hub revision of redux_model_id; None = main."""
    redux_weight: float = 1.0
    """Scale of the Redux image tokens appended to the target prompt (text tokens unscaled); 0 = no tokens,
    as semantics off."""


@dataclass
class DifixConfig:
    """Difix3D (Wu et al., CVPR 2025), NVIDIA's single-step fixer: an SD-Turbo UNet that cleans a render's
    latent in one step from timestep 199, decoded by a VAE with skip connections from its encoder. The
    fast mode: one UNet call per image instead of FlowEdit's 10-16 FLUX calls. The reference's flags
    (--idu_difix3d_*, unused by its run scripts) are the defaults; steps 1 and guidance 0 are fixed."""

    model_id: str = DIFIX
    """Hugging Face Hub id or local directory of a Difix snapshot (the nvidia/difix layout: scheduler/,
    tokenizer/, text_encoder/, unet/, vae/ with the skip convolutions; --idu_difix3d_model)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = main."""
    local_files_only: bool = False
    """Never contact the Hub: use the local Hugging Face cache or the local directory only."""
    cache_dir: str | None = None
    """Hugging Face cache folder; None = the default (honours HF_HOME / HF_HUB_CACHE)."""
    device: str = "cuda"
    """Device the UNet and VAE compute on ('cuda', 'cuda:1', 'cpu')."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype; 'auto' = bfloat16 on a GPU, float32 on the CPU. With float16 the VAE stays in
    float32 (its config asks for it: force_upcast), as diffusers' Stable Diffusion pipelines do."""
    memory_mode: Literal["gpu", "cpu-offload"] = "gpu"
    """'gpu': the UNet and VAE stay on the device. 'cpu-offload': they live in CPU memory and move to the
    device only for the duration of a refine() call, so 3DGS training gets the GPU back."""
    timestep: int = 199
    """The single denoising step's timestep: the render's latent is read as noised to this level and
    mapped to a clean latent in one step (--idu_difix3d_timesteps [199]; Difix was trained at 199)."""
    prompt: str = "remove degradation"
    """Text prompt, encoded once at load (--idu_difix3d_prompt; the prompt Difix was trained with)."""
    use_reference: bool = False
    """Condition on a reference view (--idu_difix3d_use_reference). Not supported: it needs nvidia/difix_ref's
    multi-view UNet and a clean reference image per render, which Stage 2 does not have."""
    batch_size: int = 1
    """Images per UNet call."""
    seed: int = 0
    """Base seed used when refine() gets no per-image seeds (image k of the run gets seed + k). A seed draws
    only the VAE posterior sample (as the reference pipeline does) and the step's noise (std ~1e-10), so the
    samples of one view differ only through the posterior's spread."""


@dataclass
class DepthModelConfig:
    """A monocular depth model loaded from the Hub or a local copy."""

    model: str | None = None
    """Hub id or local path; None = the backend default (MoGe v1 'Ruicheng/moge-vitl', v2
    'Ruicheng/moge-2-vitl'; Depth Anything V2 Metric Outdoor Large)."""
    moge_version: Literal[1, 2] = 1
    """MoGe generation (1 = the reference's model; 2 = metric-scale upgrade, a deviation)."""
    local_files_only: bool = False
    """Never contact the Hub: use the local Hugging Face cache or the local path only."""
    cache_dir: str | None = None
    """Hugging Face cache folder; None = the default (honours HF_HOME / HF_HUB_CACHE)."""
    device: str | None = None
    """Device to run on; None = cuda when available, else cpu."""
    dtype: Dtype = "float32"
    """Weights/compute dtype ('float16' halves memory on GPUs)."""


# Checks of the refiners' speed options that need the machine (its GPU, its packages). They live with
# the configs so that Stage2Config.check runs them before any work starts; the refiners run them again
# when they load.

FLOAT8_MIN_CAPABILITY = (8, 9)


def check_float8_matmuls(device, flag: str = "quantization") -> None:  # noqa: ANN001 (torch.device)
    """ConfigError unless ``device`` runs float8 matmuls: a CUDA GPU of compute capability >= 8.9.

    'fp8-dynamic' quantises the activations too, so every linear layer calls ``torch._scaled_mm``, which
    has float8 kernels from sm_89 on; older GPUs and the CPU would fail at the first refinement.
    """
    import torch  # only when a run with fp8-dynamic starts

    from skyfall.errors import ConfigError

    if device.type != "cuda":
        raise ConfigError(
            f"{flag} 'fp8-dynamic' runs the matmuls in float8, which needs a CUDA GPU of compute capability "
            f">= 8.9 (Ada, Hopper or newer); the device is {device} (use 'fp8': float8 weights, bfloat16 "
            "matmuls)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLOAT8_MIN_CAPABILITY:
        raise ConfigError(
            f"{flag} 'fp8-dynamic': {torch.cuda.get_device_name(device)} ({device}) has compute capability "
            f"{major}.{minor}, float8 matmuls need >= 8.9 (Ada, Hopper or newer); use 'fp8' (weight-only) "
            "or 'nf4'"
        )


def check_attention_backend(name: str, flag: str = "attention") -> None:
    """ConfigError unless ``name`` is 'default' or an attention backend of the installed diffusers whose
    packages are installed (cheap: no model, no device; :func:`set_attention_backend` also runs it)."""
    if name == "default":
        return
    import importlib.util

    from skyfall.errors import ConfigError, MissingDependencyError

    if importlib.util.find_spec("diffusers") is None:
        raise MissingDependencyError(
            f"{flag} {name!r} needs the 'diffusers' package: pip install \"skyfall[diffusion]\""
        )
    import diffusers

    try:
        from diffusers.models import attention_dispatch as dispatch
    except ImportError:
        raise ConfigError(
            f"{flag} {name!r}: diffusers {diffusers.__version__} has no attention dispatcher (use 'default')"
        ) from None
    names = sorted(b.value for b in dispatch.AttentionBackendName)
    if name not in names:
        raise ConfigError(
            f"{flag} {name!r} is not an attention backend of diffusers {diffusers.__version__}; one of: "
            f"default, {', '.join(names)}"
        )
    check = getattr(dispatch, "_check_attention_backend_requirements", None)  # private: may move
    if check is not None:
        try:
            check(dispatch.AttentionBackendName(name))
        except (RuntimeError, ImportError) as e:
            raise ConfigError(f"{flag} {name!r} is not available here: {e}") from None
