"""Time one FlowEdit (or top2ground) refinement and one depth prediction with *random* full-size weights.

The FLUX.1-dev transformer (11.9 B parameters) is built on the meta device and materialised with
``to_empty`` plus a cheap random init, so timings and peak memory are those of the real shapes
(the numbers of a trained model are the same up to data-dependent kernels). Prompt embeddings are
random tensors of the real shapes (T5 [1, 512, 4096], CLIP pooled [1, 768]): the text encoders run
once per run, not per image, so they are not part of a refinement.

Prints one JSON line per measurement with the keys what, mode, device, size, seconds, peak_mem_mb
(CUDA: max allocated by torch; CPU: the process's peak RSS so far), plus details (resident_mb:
CUDA memory allocated between refinements, i.e. what a loaded refiner keeps on the GPU).

    # GPU (full size, paper settings: T=28, n_min=4, n_max=10 -> 16 transformer rows in 10 calls)
    python scripts/bench_flowedit.py --random-weights
    # the top2ground refiner: FLUX.1-Depth-dev (128 input channels) + FLUX.1 Redux (SigLIP so400m,
    # 729 image tokens appended to the target prompt), height-map control
    python scripts/bench_flowedit.py --random-weights --refiner top2ground --no-depth
    # CPU smoke versions
    python scripts/bench_flowedit.py --random-weights --tiny --size 64
    python scripts/bench_flowedit.py --random-weights --tiny --size 64 --refiner top2ground --modes gpu
    python scripts/bench_flowedit.py --random-weights --size 64 --layers 1 --seq-len 64 --modes gpu

Speed options (FluxConfig's; each row also reports seconds_per_image). ``--compare`` first refines the
same images with every option off and unquantised weights, then reports the options' max/mean absolute
difference and PSNR against that baseline (and, with --cache, how many calls skipped the blocks):

    # float8 matmuls + regional compile + the fastest attention, 4 images per call (warm up twice:
    # the first calls compile each batch shape)
    python scripts/bench_flowedit.py --random-weights --modes fp8-dynamic --batch-size 4 --compile blocks \
        --attention _native_cudnn --warmup 2 --compare --no-depth
    # First Block Cache: speed and difference from the uncached output. With random weights the
    # difference says nothing about image quality: measure it on the real model and a real render
    python scripts/bench_flowedit.py --model-id black-forest-labs/FLUX.1-dev --image RUN/idu/ep00_.../render/00000.png \
        --modes gpu --cache first-block --cache-threshold 0.05 --compare --no-depth
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Cheap init after ``to_empty``: matrices N(0, 0.02), 1-D weights (norm scales) 1, biases 0."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=g)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_transformer(args: argparse.Namespace, home: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from skyfall.priors.tiny import FLUX_DEV_TRANSFORMER, tiny_flux_components

    control = args.refiner == "top2ground"
    if args.tiny:
        return tiny_flux_components(control=control)["transformer"].to(home, dtype)
    cfg = dict(FLUX_DEV_TRANSFORMER)
    if control:
        from skyfall.priors.tiny import FLUX_DEPTH_DEV_CHANNELS

        cfg.update(FLUX_DEPTH_DEV_CHANNELS)
    if args.layers is not None:
        cfg.update(num_layers=args.layers, num_single_layers=2 * args.layers)
    with init_empty_weights():  # no memory, no init cost: parameters on the meta device
        model = FluxTransformer2DModel(**cfg)
    model = model.to_empty(device=home).to(dtype)
    _random_init_(model)
    return model.eval().requires_grad_(False)


def build_vae(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    from skyfall.priors.tiny import FLUX_DEV_VAE, tiny_flux_components

    if args.tiny:
        return tiny_flux_components()["vae"].to(dtype)
    torch.manual_seed(0)
    return AutoencoderKL(**FLUX_DEV_VAE).to(dtype).eval().requires_grad_(False)


def build_redux(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, memory_mode: str):  # noqa: ANN201
    """A ``ReduxEncoder`` with FLUX.1-Redux-dev's shapes (SigLIP so400m at 384 px -> 729 tokens of 4096)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from skyfall.priors.tiny import tiny_redux_components
    from skyfall.priors.top2ground import ReduxEncoder

    if args.tiny:
        parts = tiny_redux_components()
        siglip, processor, embedder = (
            parts["image_encoder"],
            parts["feature_extractor"],
            parts["image_embedder"],
        )
    else:
        torch.manual_seed(0)
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14))  # fmt: skip
        embedder = ReduxImageEncoder(redux_dim=1152, txt_in_features=4096)
        processor = SiglipImageProcessor(size={"height": 384, "width": 384}, resample=3,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    for m in (siglip, embedder):
        m.to(dtype).eval().requires_grad_(False)
    return ReduxEncoder(siglip, processor, embedder, device=device, dtype=dtype, memory_mode=memory_mode)


def quantise_fp8(transformer: torch.nn.Module, dynamic: bool = False) -> str | None:
    """In-place torchao float8 quantisation (weight-only, or ``dynamic``: float8 weights and activations,
    float8 matmuls); returns a skip reason or None."""
    from skyfall.errors import ConfigError
    from skyfall.priors.flux import check_float8_matmuls, float8_dynamic_config

    if dynamic:
        try:
            check_float8_matmuls(next(transformer.parameters()).device, "--modes")
        except ConfigError as e:
            return str(e)
    try:
        from torchao.quantization import quantize_
    except ImportError:
        return "torchao not installed (pip install torchao)"
    try:
        if dynamic:
            quantize_(transformer, float8_dynamic_config())
        else:
            from torchao.quantization import Float8WeightOnlyConfig

            quantize_(transformer, Float8WeightOnlyConfig())
    except Exception as e:  # noqa: BLE001 - report, do not abort the other modes
        return f"torchao float8 failed here: {type(e).__name__}: {e}"
    return None


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR (dB) of images in [0, 1]; None when identical (JSON has no infinity)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def _count_cache_decisions(transformer: torch.nn.Module) -> list[bool] | None:
    """First Block Cache's decisions per transformer call (True: the remaining blocks ran), or None when
    the transformer has no First Block Cache. Wraps the head hook's decision method, which runs outside
    the compiled graphs."""
    hooks = getattr(transformer.transformer_blocks[0], "_diffusers_hook", None)
    hook = None if hooks is None else hooks.hooks.get("fbc_leader_block_hook")
    if hook is None:
        return None
    decide, log = hook._should_compute_remaining_blocks, []

    def logged(residual: torch.Tensor) -> bool:
        log.append(decide(residual))
        return log[-1]

    hook._should_compute_remaining_blocks = logged
    return log


def _speed_config(args: argparse.Namespace):  # noqa: ANN202
    """The FluxConfig speed options of the command line."""
    from skyfall.config.priors import FluxConfig

    return FluxConfig(compile=args.compile, attention=args.attention, cache=args.cache,
                      cache_threshold=args.cache_threshold)  # fmt: skip


def _load_real(args: argparse.Namespace, device: torch.device, memory_mode: str):  # noqa: ANN202
    """The real FLUX model of --model-id, every speed option off (they are applied after the baseline)."""
    from skyfall.config.priors import FlowEditConfig, Top2GroundConfig
    from skyfall.priors.flux import FluxModel

    kind = Top2GroundConfig if args.refiner == "top2ground" else FlowEditConfig
    cfg = kind(model_id=args.model_id, device=str(device), dtype=args.dtype, memory_mode=memory_mode,
               local_files_only=True)  # fmt: skip
    return FluxModel.load(cfg, [cfg.source_prompt, cfg.target_prompt], option="--device")


def _images(args: argparse.Namespace, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """--batch-size images: --image (a render) repeated, or random noise images."""
    if args.image:
        from skyfall.eval.heldout import read_image

        img = read_image(args.image)
        if img.shape[-1] != args.size or img.shape[-2] != args.size:
            img = torch.nn.functional.interpolate(img[None], size=(args.size, args.size), mode="bilinear",
                                                  antialias=True)[0]  # fmt: skip
        return img[None].expand(args.batch_size, -1, -1, -1).contiguous().to(device)
    return torch.rand(args.batch_size, 3, args.size, args.size, generator=g).to(device)


def bench_flowedit(args: argparse.Namespace, mode: str, device: torch.device) -> dict:
    from skyfall.config.priors import FlowEditConfig
    from skyfall.priors.flowedit import PromptEmbedding, num_transformer_calls
    from skyfall.priors.flux import FluxModel, apply_speed_options, torch_dtype
    from skyfall.priors.flux_refiners import FlowEditRefiner
    from skyfall.priors.tiny import FLUX_DEV_SCHEDULER

    dtype = torch_dtype(args.dtype if device.type == "cuda" or args.dtype != "float16" else "float32")
    row = dict(
        what=args.refiner,
        mode=mode,
        device=str(device),
        size=args.size,
        dtype=str(dtype).replace("torch.", ""),
        batch_size=args.batch_size,
        compile=args.compile,
        attention=args.attention,
        cache=args.cache,
        cache_threshold=args.cache_threshold if args.cache != "none" else None,
    )
    parts = set(mode.split("+"))  # e.g. fp8-dynamic+cpu-offload: a quantisation in a memory mode
    if "nf4" in parts:
        row.update(seconds=None, peak_mem_mb=None, skipped="bitsandbytes quantises at from_pretrained time; "
                   "random in-memory weights cannot be nf4-quantised this way (measure with real weights)")  # fmt: skip
        return row
    if "fp8-dynamic" in parts:  # the gate first: nothing to build where float8 matmuls cannot run
        from skyfall.errors import ConfigError
        from skyfall.priors.flux import check_float8_matmuls

        try:
            check_float8_matmuls(device, "--modes")
        except ConfigError as e:
            row.update(seconds=None, peak_mem_mb=None, skipped=str(e))
            return row
    memory_mode = "cpu-offload" if "cpu-offload" in parts else "gpu"
    _reset(device)
    home = torch.device("cpu") if memory_mode == "cpu-offload" else device
    t0 = time.perf_counter()
    cfg = FlowEditConfig(device=str(device), dtype=args.dtype, memory_mode=memory_mode, n_max=args.n_max,
                         n_max_end=-1, n_min=args.n_min, batch_size=args.batch_size)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    if args.model_id:
        model = _load_real(args, device, memory_mode)
        transformer = model.transformer
    else:
        transformer = build_transformer(args, home, dtype)
        vae = build_vae(args, dtype)
        c = transformer.config
        prompts = {
            p: PromptEmbedding(
                torch.randn(1, args.seq_len, c.joint_attention_dim, generator=g),
                torch.randn(1, c.pooled_projection_dim, generator=g),
            )  # fmt: skip
            for p in (cfg.source_prompt, cfg.target_prompt)
        }
        model = FluxModel(
            transformer, vae, FLUX_DEV_SCHEDULER, prompts, device=device, dtype=dtype, memory_mode=memory_mode
        )
    build_s = time.perf_counter() - t0
    images = _images(args, device, g)
    seeds = list(range(1, args.batch_size + 1))
    kwargs: dict = {}
    if args.refiner == "top2ground":
        from skyfall.config.priors import Top2GroundConfig
        from skyfall.priors.refine import RefineGuidance
        from skyfall.priors.top2ground import Top2GroundRefiner

        t2g = Top2GroundConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
        refiner = Top2GroundRefiner(t2g, model=model, redux=build_redux(args, device, dtype, memory_mode))
        height = torch.rand(args.batch_size, args.size, args.size, generator=g).to(device) * 30
        sat = torch.rand(args.batch_size, 3, 384, 384, generator=g)
        kwargs["guidance"] = RefineGuidance(height=height, satellite=sat)
    else:
        refiner = FlowEditRefiner(cfg, model=model)
    baseline = refiner.refine(images, seeds=seeds, **kwargs).cpu() if args.compare else None
    # quantisation and the speed options after the baseline: it is the unquantised, option-free output
    if parts & {"fp8", "fp8-dynamic"}:
        with model.on_device():
            reason = quantise_fp8(transformer, dynamic="fp8-dynamic" in parts)
        if reason:
            row.update(seconds=None, peak_mem_mb=None, skipped=reason)
            return row
    apply_speed_options(transformer, _speed_config(args), device=device, dtype=dtype, option="--device")
    decisions = _count_cache_decisions(transformer)
    for _ in range(args.warmup):
        refiner.refine(images, seeds=seeds, **kwargs)
    _sync(device)
    # What stays on the device between refinements (weights, cached prompt embeddings): the part of
    # the refiner that shares the GPU with 3DGS training when the refiner is kept loaded.
    resident = round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if decisions is not None:
        decisions.clear()
    t0 = time.perf_counter()
    out = refiner.refine(images, seeds=seeds, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    row.update(
        seconds=round(seconds, 4),
        seconds_per_image=round(seconds / args.batch_size, 4),
        peak_mem_mb=round(_peak_mb(device), 1),
        resident_mb=resident,
        params_m=round(sum(p.numel() for p in transformer.parameters()) / 1e6, 2),
        # top2ground's source and target prompts differ in length (the Redux tokens), so each velocity
        # pair is two calls instead of one batched call
        transformer_calls=num_transformer_calls(args.n_max, args.n_min) * (2 if args.refiner == "top2ground" else 1),
        T=cfg.T_steps, n_max=args.n_max, n_min=args.n_min, seq_len=args.seq_len,
        build_seconds=round(build_s, 2), finite=bool(torch.isfinite(out).all()),
    )  # fmt: skip
    if decisions is not None:  # calls of the timed refinement, and how many ran the first block only
        row.update(cache_calls=len(decisions), cache_skipped=decisions.count(False))
    if baseline is not None:
        diff = (out.cpu().float() - baseline.float()).abs()
        row.update(max_abs_diff_vs_baseline=round(float(diff.max()), 6),
                   mean_abs_diff_vs_baseline=round(float(diff.mean()), 6),
                   psnr_vs_baseline_db=_psnr(out.cpu(), baseline))  # fmt: skip
    del refiner, model, transformer
    return row


def build_depth_net(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The depth network (on the CPU, float32) and its label: Depth Anything V2 Large with random
    weights, or the tiny stand-in with ``args.tiny``. Separate from `bench_depth` so that
    ``scripts/bench_tile.py`` can train with the same network as its pseudo-depth prior."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from skyfall.priors.tiny import tiny_depth_anything

    if args.tiny:
        return tiny_depth_anything(), "depth-anything-tiny"
    # Depth Anything V2 Large (ViT-L/14 backbone, 335 M parameters: the same backbone size as MoGe v1 ViT-L)
    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                            num_attention_heads=16, intermediate_size=4096, out_indices=[5, 12, 18, 24],
                            reshape_hidden_states=False, apply_layernorm=True)  # fmt: skip
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=1024, patch_size=14,
                              neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256,
                              depth_estimation_type="metric", max_depth=80)  # fmt: skip
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(cfg), "depth-anything-large"


def bench_depth(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from skyfall.priors.depth_backends import DepthAnythingDepth

    rows = []
    net, label = build_depth_net(args)
    dtype = args.dtype if device.type == "cuda" else "float32"
    _reset(device)
    est = DepthAnythingDepth.from_module(net, device=str(device), dtype=dtype)
    image = torch.rand(1, 3, args.size, args.size).to(device)
    for _ in range(args.warmup):
        est(image, 60.0)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    est(image, 60.0)
    _sync(device)
    rows.append(dict(what=label, mode="gpu", device=str(device), size=args.size, dtype=dtype,
                     seconds=round(time.perf_counter() - t0, 4), peak_mem_mb=round(_peak_mb(device), 1),
                     params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 2)))  # fmt: skip
    try:
        import moge  # noqa: F401

        moge_note = "moge installed; use scripts with real weights for MoGe itself"
    except ImportError:
        moge_note = "moge not installed; depth-anything-large has the same ViT-L/14 backbone size as MoGe v1"
    rows.append(dict(what="moge", mode="gpu", device=str(device), size=args.size, seconds=None, peak_mem_mb=None,
                     skipped=moge_note))  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``build_parser().parse_args([...])`` also gives other scripts (bench_tile.py)
    a complete argument namespace for `bench_flowedit` and `bench_depth`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--random-weights", action="store_true", help="random weights (the only mode; no download)"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    ap.add_argument(
        "--layers", type=int, default=None, help="double-stream blocks (single = 2x); default 19/38"
    )
    ap.add_argument("--seq-len", type=int, default=512, help="T5 prompt tokens (512 for FLUX.1-dev)")
    ap.add_argument(
        "--modes",
        default="gpu,cpu-offload,fp8,nf4",
        help="comma list of gpu, cpu-offload, fp8, fp8-dynamic (float8 matmuls, compute capability >= 8.9), "
        "nf4; a quantisation joins cpu-offload with '+' (fp8-dynamic+cpu-offload: the low-memory mode)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--n-max", type=int, default=10, help="paper: n_max ~ U{4..10}; 10 is the slowest draw")
    ap.add_argument("--n-min", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-depth", action="store_true")
    ap.add_argument("--refiner", default="flowedit", choices=["flowedit", "top2ground"])
    ap.add_argument("--batch-size", type=int, default=1, help="images per refine() call (one seed each)")
    ap.add_argument("--compile", default="none", choices=["none", "blocks"], help="regional torch.compile")
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (CPU smoke: aot_eager)"
    )
    ap.add_argument("--attention", default="default", help="diffusers attention backend name, or default")
    ap.add_argument(
        "--cache", default="none", choices=["none", "first-block"], help="block cache across steps"
    )
    ap.add_argument("--cache-threshold", type=float, default=0.05, help="First Block Cache threshold")
    ap.add_argument(
        "--compare", action="store_true",
        help="refine the same images with every option off first; report the difference and PSNR",
    )  # fmt: skip
    ap.add_argument(
        "--model-id", default=None,
        help="real FLUX weights (Hub id in the local cache, or a folder) instead of --random-weights",
    )  # fmt: skip
    ap.add_argument("--image", default=None, help="input image (a render; resized to --size); default noise")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if not args.random_weights and not args.model_id:
        ap.error("give --random-weights, or --model-id for real weights")
    if args.random_weights and args.model_id:
        ap.error("--random-weights and --model-id exclude each other")
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import skyfall.priors.flux as flux

    flux.COMPILE_BACKEND = args.compile_backend
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # the ".to(dtype) with keep-in-fp32 modules: []" notice is noise here
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for mode in args.modes.split(","):
        print(json.dumps(bench_flowedit(args, mode.strip(), device)), flush=True)
        gc.collect()
    if not args.no_depth:
        for row in bench_depth(args, device):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
