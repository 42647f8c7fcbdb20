"""``skyfall doctor``: what this machine can run (versions, GPU, kernels, model weights) and how to fix the rest."""

from __future__ import annotations

from dataclasses import dataclass

# The files that make a cached FLUX pipeline (FLUX.1-dev, FLUX.1-Depth-dev) usable.
_FLUX_PIPELINE_FILES = (
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer_2/",
)

# What each model is for; the files that make a cached copy usable.
_MODELS: list[tuple[str, str, tuple[str, ...], str]] = [
    (
        "black-forest-labs/FLUX.1-dev",
        "Stage 2 FlowEdit/SDEdit refiner",
        _FLUX_PIPELINE_FILES,
        "Stage 2 cannot refine renders with FLUX (use --stage2.refiner identity, or 'ideal' on synthetic tiles)",
    ),  # fmt: skip
    (
        "black-forest-labs/FLUX.1-Depth-dev",
        "Stage 2 top2ground refiner (geometry-conditioned FLUX)",
        _FLUX_PIPELINE_FILES,
        "the Stage 2 'top2ground' refiner is unavailable (flowedit/sdedit on FLUX.1-dev are not affected; "
        "--stage2.top2ground.geometry none with --stage2.top2ground.model-id black-forest-labs/FLUX.1-dev "
        "runs it without geometry)",
    ),  # fmt: skip
    (
        "black-forest-labs/FLUX.1-Redux-dev",
        "Stage 2 top2ground refiner (satellite semantics, FLUX.1 Redux)",
        ("image_encoder/config.json", "image_embedder/config.json", "feature_extractor/"),
        "the Stage 2 'top2ground' refiner is unavailable with semantics on (--stage2.top2ground.no-semantics "
        "runs it without)",
    ),  # fmt: skip
    (
        "nvidia/difix",
        "Stage 2 difix refiner (Difix3D single-step fixer, the fast mode)",
        (
            "unet/config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "tokenizer/",
        ),
        "the Stage 2 'difix' refiner (single-step fast mode) is unavailable (flowedit/sdedit/top2ground on "
        "FLUX are not affected)",
    ),  # fmt: skip
    (
        "Ruicheng/moge-vitl",
        "MoGe v1 depth prior (the reference's)",
        ("model.pt",),
        "pseudo-depth with --stage1.pseudo.estimator moge is unavailable (depth-anything or ground-truth still work)",
    ),
    (
        "Ruicheng/moge-2-vitl",
        "MoGe v2 depth prior (optional upgrade)",
        ("model.pt",),
        "--stage1.pseudo.estimator moge with moge_version 2 is unavailable",
    ),
    (
        "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf",
        "Depth Anything V2 metric depth prior",
        ("config.json",),
        "--stage1.pseudo.estimator depth-anything is unavailable",
    ),
]

_PACKAGES: list[tuple[str, str, str]] = [
    # (distribution, consequence when missing, fix)
    (
        "gsplat",
        "rendering uses the pure-torch CPU backend only",
        'pip install "skyfall[cuda]" (on a CUDA machine)',
    ),
    ("diffusers", "no FLUX refiner (Stage 2 FlowEdit/SDEdit)", 'pip install "skyfall[diffusion]"'),
    ("transformers", "no FLUX text encoders, no Depth Anything", 'pip install "skyfall[diffusion,depth]"'),
    ("accelerate", "slower, more memory-hungry FLUX loading", 'pip install "skyfall[diffusion]"'),
    ("moge", "no MoGe depth prior", 'pip install "git+https://github.com/microsoft/MoGe.git"'),
    ("torchao", "no fp8 transformer weights (refiner option quantization='fp8')", "pip install torchao"),
    (
        "bitsandbytes",
        "no nf4 transformer weights (refiner option quantization='nf4')",
        "pip install bitsandbytes",
    ),
    ("ray", "no city training (`skyfall city train`)", 'pip install "skyfall[city]"'),
]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gb(n: float) -> str:
    return f"{n / 1024**3:.1f} GB"


@dataclass
class Doctor:
    """Check this machine: versions, CUDA GPU and free VRAM, gsplat / CUDA kernels, cached model weights.

    Each missing piece is reported on one line with what it means and how to fix it. Never fails:
    the exit code is 0 whatever is missing.
    """

    cache_dir: str | None = None
    """Hugging Face hub cache to inspect; None = HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub."""
    load_kernels: bool = False
    """Also try to load/build skyfall's CUDA extension now (may compile for minutes on first use)."""

    def main(self) -> None:
        for line in report(self.cache_dir, self.load_kernels):
            print(line)


def report(cache_dir: str | None = None, load_kernels: bool = False) -> list[str]:
    """The doctor's lines (also used by tests)."""
    import platform
    import sys

    import torch

    import skyfall

    lines = [
        f"skyfall      {getattr(skyfall, '__version__', _version('skyfall') or '?')}",
        f"python       {sys.version.split()[0]} ({platform.platform()})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    problems: list[str] = []

    # --- GPU -------------------------------------------------------------------------------------
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            lines.append(f"GPU {i}        {name}: {_gb(free)} free of {_gb(total)}")
            if total < 23 * 1024**3:
                problems.append(
                    f"GPU {i} has {_gb(total)}: Stage 2 with FLUX needs ~24 GB -> use the refiner options "
                    "quantization='nf4' (or 'fp8') and memory_mode='cpu-offload'"
                )
    else:
        lines.append("GPU          none (torch.cuda.is_available() is False)")
        problems.append(
            "no CUDA GPU: training renders with the pure-torch CPU backend (slow; small scenes only) and the "
            "FLUX refiner cannot run -> use a machine with an NVIDIA GPU and a CUDA build of torch"
        )

    # --- packages ---------------------------------------------------------------------------------
    for dist, consequence, fix in _PACKAGES:
        v = _version(dist)
        lines.append(f"{dist:12s} {v or 'not installed'}")
        if v is None:
            problems.append(f"{dist} not installed: {consequence} -> {fix}")

    # --- CUDA kernels -----------------------------------------------------------------------------
    try:
        from skyfall.kernels import extension_status

        st = extension_status(load=load_kernels)
        if st["loaded"]:
            state = f"loaded ({st['source']})"
        elif st["attempted"]:
            state = f"failed: {str(st['error']).splitlines()[0] if st['error'] else 'unknown error'}"
        else:
            state = "not loaded yet" + (
                " (no CUDA: the torch implementations are used)" if not has_gpu else ""
            )
        lines.append(f"cuda_ext     mode {st['mode']}, {state}")
        if has_gpu and st["attempted"] and not st["loaded"]:
            problems.append(
                "skyfall CUDA extension failed to build: the slower torch kernels are used -> see the error above"
            )
    except Exception as e:  # noqa: BLE001 - a diagnostic must not crash
        lines.append(f"cuda_ext     status unavailable ({type(e).__name__}: {e})")

    # --- model weights ----------------------------------------------------------------------------
    try:
        from skyfall.priors.hub import cached_repos, hub_cache_dir

        root = hub_cache_dir(cache_dir)
        repos = cached_repos(cache_dir)
        lines.append(
            f"HF cache     {root} ({'exists' if root.is_dir() else 'does not exist'}; {len(repos)} model repos)"
        )
        for repo_id, purpose, needed, consequence in _MODELS:
            info = repos.get(repo_id)
            if info is None:
                lines.append(f"weights      {repo_id}: missing")
                login = (
                    f"accept the licence at https://huggingface.co/{repo_id}, `hf auth login`, then "
                    if repo_id.startswith("black-forest-labs/")  # gated repo
                    else ""
                )
                problems.append(
                    f"{repo_id} ({purpose}) not in the cache: {consequence} -> {login}`hf download {repo_id}` "
                    "(or pass a local copy's path)"
                )
                continue
            files = info["files"]
            absent = [f for f in needed if not any(p == f or p.startswith(f) for p in files)]
            if absent:
                lines.append(
                    f"weights      {repo_id}: incomplete ({_gb(info['size_bytes'])}; missing {', '.join(absent)})"
                )
                problems.append(
                    f"{repo_id} is only partly downloaded: {consequence} -> `hf download {repo_id}`"
                )
            else:
                lines.append(f"weights      {repo_id}: present ({_gb(info['size_bytes'])})")
    except Exception as e:  # noqa: BLE001
        lines.append(f"HF cache     could not be scanned ({type(e).__name__}: {e})")
        problems.append(
            'huggingface_hub missing or broken: model weights cannot be found -> pip install "skyfall[diffusion]"'
        )

    try:  # optional `skyfall eval` metric: its status line, never an issue
        from skyfall.eval.dreamsim import weights_status

        lines.append(f"dreamsim     {weights_status()}")
    except Exception as e:  # noqa: BLE001 - a diagnostic must not crash
        lines.append(f"dreamsim     status unavailable ({type(e).__name__}: {e})")

    # --- verdict ----------------------------------------------------------------------------------
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} issue(s):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("all checks passed: GPU, kernels and all model weights are available")
    can = [
        "synthetic tiles (skyfall synth/demo)",
        "Stage 1 (" + ("gsplat on CUDA" if has_gpu else "CPU, slow") + ")",
    ]
    lines.append("can run:     " + ", ".join(can))
    flux_ok = (
        has_gpu and _version("diffusers") is not None and "present" in _weights_line(lines, _MODELS[0][0])
    )
    lines.append("FLUX Stage 2: " + ("ready" if flux_ok else "not possible here (" + (
        "no GPU" if not has_gpu else "missing diffusers or FLUX.1-dev weights") + ")"))  # fmt: skip
    return lines


def _weights_line(lines: list[str], repo_id: str) -> str:
    return next((line for line in lines if line.startswith("weights") and repo_id in line), "")
