"""FLUX.1 components for the refiners: loading, memory modes, prompt-embedding cache, VAE codec.

Only the public diffusers/transformers loaders are used (``from_pretrained`` on the subfolders of a
FLUX pipeline folder or Hub id), the same calls for real weights and for the tiny test pipelines.

Memory (FLUX.1-dev, bf16): transformer 22.2 GiB, T5-XXL 8.9 GiB, CLIP + VAE 0.4 GiB. The prompts are
fixed, so they are encoded once (and cached on disk), after which the text encoders are freed
([FIX] the reference reloads FLUX every episode and re-encodes both prompts with T5-XXL for every
image): the resident set is the transformer + VAE. ``memory_mode``
and ``quantization`` (see :class:`skyfall.config.priors.FluxConfig`) trade speed for VRAM.

Speed options, all off by default (then nothing below touches the transformer and the outputs are
those of the plain model): ``quantization='fp8-dynamic'`` (float8 matmuls, compute capability >= 8.9),
``attention`` (a diffusers attention backend), ``compile='blocks'`` (regional torch.compile) and
``cache='first-block'`` (First Block Cache across denoising steps; changes the output). They are applied
once, after loading (:func:`apply_speed_options`), in the order attention, compile, cache.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from skyfall.config.priors import (  # noqa: F401 (the checks are part of this module's API too)
    FLOAT8_MIN_CAPABILITY,
    FluxConfig,
    check_attention_backend,
    check_float8_matmuls,
)
from skyfall.devices import resolve_device
from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.priors.flowedit import PromptEmbedding
from skyfall.priors.hub import load_weights, looks_like_path, resolve_file, transformers_dtype_kwargs
from skyfall.storage.atomic import atomic_write

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

"""CUDA compute capability from which ``torch._scaled_mm`` runs float8 matmuls (Ada, Hopper, Blackwell)."""

COMPILE_BACKEND = "inductor"
"""torch.compile backend of ``compile='blocks'``. Tests on a small CPU set 'aot_eager' (the same graph
capture without inductor's code generation, which takes about a minute per shape there)."""


@contextlib.contextmanager
def held_on(move, home: torch.device, device: torch.device) -> Iterator[None]:  # noqa: ANN001
    """``move(device)`` for the ``with`` block, then ``move(home)`` (a no-op when they are the same):
    'cpu-offload' keeps models in host memory between uses."""
    if home == device:
        yield
        return
    move(device)
    try:
        yield
    finally:
        move(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' -> torch dtype (ConfigError otherwise)."""
    if name not in _DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _require(module: str, pip_name: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{why} needs the '{module}' package: pip install {pip_name}")


def _hf_kwargs(cfg: FluxConfig) -> dict:
    return dict(local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir, revision=cfg.revision)


def option_flag(option: str, name: str) -> str:
    """The flag of field ``name`` in the section whose device flag is ``option``
    ('--stage2.flowedit.device' -> '--stage2.flowedit.<name>', '--device' -> '--<name>', 'device' -> '<name>')."""
    return option[: -len("device")] + name if option.endswith("device") else name


def float8_dynamic_config():  # noqa: ANN201
    """torchao's float8 dynamic activation + float8 weight config with per-row scales: one scale per token
    and per output channel keeps more of the bfloat16 result than one scale per tensor (torchao's default),
    which may be a little faster; scripts/bench_flowedit.py --compare measures the difference."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    try:
        from torchao.quantization import PerRow
    except ImportError:  # older torchao keeps the granularities in their own module
        from torchao.quantization.granularity import PerRow
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _quantization_config(  # noqa: ANN202
    cfg: FluxConfig, dtype: torch.dtype, device: torch.device | None = None, flag: str = "quantization"
):
    """diffusers quantisation config for the transformer weights, or None."""
    if cfg.quantization == "none":
        return None
    if cfg.quantization == "fp8-dynamic":
        check_float8_matmuls(device if device is not None else torch.device(cfg.device), flag)
        _require("torchao", "torchao", "quantization='fp8-dynamic'")
        from diffusers import TorchAoConfig

        return TorchAoConfig(float8_dynamic_config())
    if cfg.quantization == "fp8":
        _require("torchao", "torchao", "quantization='fp8'")
        from diffusers import TorchAoConfig

        try:  # torchao >= 0.10 takes config objects; older diffusers/torchao take the short name
            from torchao.quantization import Float8WeightOnlyConfig

            return TorchAoConfig(Float8WeightOnlyConfig())
        except (ImportError, TypeError, ValueError):
            return TorchAoConfig("float8wo_e4m3")
    if cfg.quantization == "nf4":
        _require("bitsandbytes", "bitsandbytes", "quantization='nf4'")
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ConfigError(f"{flag}: {cfg.quantization!r} is not one of none, fp8, fp8-dynamic, nf4")


def set_attention_backend(
    transformer: torch.nn.Module,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    flag: str = "attention",
) -> None:
    """Route the transformer's attention through diffusers backend ``name`` ('default': leave it).

    A backend whose package is installed can still refuse the device or dtype (flash kernels on a CPU,
    fp32 in FlashAttention) only when called, so one small attention call of the transformer's head
    shape runs here: a backend that cannot run stops the load with a ConfigError naming ``flag``.
    """
    if name == "default":
        return
    check_attention_backend(name, flag)
    if not hasattr(transformer, "set_attention_backend"):
        raise ConfigError(f"{flag} {name!r}: this transformer has no set_attention_backend (use 'default')")
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        dispatch_attention_fn,
    )

    heads = int(getattr(transformer.config, "num_attention_heads", 1))
    head_dim = int(getattr(transformer.config, "attention_head_dim", 64))
    active = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
        # diffusers also makes the backend the process-wide default, which every other diffusers model
        # ('default' ones included) would then use; this model's processors hold it, so restore the default
        _AttentionBackendRegistry.set_active_backend(active)
        # [batch, tokens, heads, head_dim], the layout FLUX's attention processor hands the dispatcher
        q = torch.randn(1, 64, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        out = dispatch_attention_fn(q, q, q, backend=AttentionBackendName(name))
        if not torch.isfinite(out.float()).all():
            raise RuntimeError("the trial call returned non-finite values")
    except Exception as e:  # noqa: BLE001 - any failure of the trial call means the backend is unusable here
        _AttentionBackendRegistry.set_active_backend(active)
        with contextlib.suppress(Exception):
            transformer.reset_attention_backend()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"{flag} {name!r} does not run on {device} in {str(dtype).replace('torch.', '')}: "
            f"{type(e).__name__}: {first}"
        ) from None


def compile_blocks(transformer: torch.nn.Module, *, before_hooks: bool = False) -> int:
    """Regional compilation: torch.compile each transformer block (FLUX: 19 double + 38 single), not the
    whole model, so the compile time is paid per block class and input shape rather than for one graph of
    the whole network; returns the number of blocks.

    diffusers' ``compile_repeated_blocks`` when the model has it and ``before_hooks`` is False. With
    ``before_hooks`` (a block cache follows), each block's ``forward`` is compiled instead: the cache hooks
    wrap the forward they find when registered, so their Python (a ``.item()`` skip decision, per-phase
    state) stays outside the compiled graphs, which then hold tensors only (``fullgraph``); compiling the
    module would trace into the hooks, break the graph there and recompile for every cache phase.
    """
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if not before_hooks and names and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(fullgraph=True, backend=COMPILE_BACKEND)
        return sum(type(m).__name__ in names for m in transformer.modules())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:  # no declared repeated blocks: FLUX's two block lists
        blocks = [
            *getattr(transformer, "transformer_blocks", ()),
            *getattr(transformer, "single_transformer_blocks", ()),
        ]
    if not blocks:
        raise ConfigError(f"compile 'blocks': {type(transformer).__name__} has no transformer blocks")
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, backend=COMPILE_BACKEND)
    return len(blocks)


def enable_block_cache(
    transformer: torch.nn.Module, kind: str, threshold: float, flag: str = "cache"
) -> None:
    """Attach diffusers' cache hooks ('first-block': First Block Cache at ``threshold``; 'none': nothing).

    The hooks keep state per cache context: :func:`skyfall.priors.flowedit.flowedit_latents` resets it for
    every batch of images and names a context per phase (FlowEdit's source+target calls, the
    target-only tail), so a residual is only reused by a call of the same rows and shape.
    """
    if kind == "none":
        return
    if kind != "first-block":
        raise ConfigError(f"{flag}: {kind!r} is not one of none, first-block")
    if not (threshold >= 0 and threshold != float("inf")):
        raise ConfigError(f"{flag}-threshold must be a number >= 0, got {threshold}")
    import diffusers

    try:
        from diffusers.hooks import FirstBlockCacheConfig
    except ImportError:
        raise ConfigError(
            f"{flag} 'first-block' needs a diffusers with First Block Cache (diffusers.hooks."
            f"FirstBlockCacheConfig); installed: {diffusers.__version__}"
        ) from None
    if not hasattr(transformer, "enable_cache"):
        raise ConfigError(
            f"{flag} 'first-block': {type(transformer).__name__} takes no diffusers cache hooks"
        )
    transformer.enable_cache(FirstBlockCacheConfig(threshold=float(threshold)))


def apply_speed_options(
    transformer: torch.nn.Module,
    cfg: FluxConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    option: str = "device",
) -> None:
    """Apply ``cfg.attention``, ``cfg.compile`` and ``cfg.cache`` to a loaded transformer, once.

    Attention first (the compiled graphs call the chosen backend), compile before the cache hooks (see
    :func:`compile_blocks`). With every option at its default nothing is touched. ``option`` is the
    section's device flag, from which the error messages name the option.
    """
    set_attention_backend(
        transformer, cfg.attention, device=device, dtype=dtype, flag=option_flag(option, "attention")
    )
    if cfg.compile not in ("none", "blocks"):
        raise ConfigError(f"{option_flag(option, 'compile')}: {cfg.compile!r} is not one of none, blocks")
    if cfg.cache not in ("none", "first-block"):
        raise ConfigError(f"{option_flag(option, 'cache')}: {cfg.cache!r} is not one of none, first-block")
    if cfg.compile == "blocks":
        compile_blocks(transformer, before_hooks=cfg.cache != "none")
    enable_block_cache(transformer, cfg.cache, cfg.cache_threshold, option_flag(option, "cache"))


def default_prompt_cache_dir() -> Path:
    """~/.cache/skyfall/prompt_embeds, or $SKYFALL_CACHE/prompt_embeds."""
    root = os.environ.get("SKYFALL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "skyfall")
    return Path(root) / "prompt_embeds"


class PromptEncoder:
    """FLUX's two text encoders (CLIP-L pooled + T5 sequence), loaded only when a prompt is not cached.

    The encoding follows the pipeline's: both tokenizers pad to their max length and truncate; CLIP's
    ``pooler_output`` is the pooled embedding, T5's last hidden state the sequence embedding.
    """

    def __init__(self, cfg: FluxConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        cache = cfg.prompt_cache_dir
        self.cache_dir = None if cache == "" else Path(cache) if cache else default_prompt_cache_dir()
        self._models = None

    def _identity(self) -> str:
        """What the embeddings depend on: the resolved T5 config file (its Hub snapshot commit, or a local
        folder's path and mtime), the CLIP config likewise, and the sequence length."""
        parts = [str(self.cfg.max_sequence_length)]
        for sub in ("text_encoder_2", "text_encoder"):
            f = resolve_file(
                self.cfg.model_id, f"{sub}/config.json", "FLUX.1 text encoder",
                local_files_only=self.cfg.local_files_only, cache_dir=self.cfg.cache_dir, revision=self.cfg.revision,
            )  # fmt: skip
            parts += [
                str(f.resolve()),
                str(f.stat().st_mtime_ns) if looks_like_path(self.cfg.model_id) else "",
            ]
        return "\n".join(parts)

    def _load(self) -> tuple:
        if self._models is None:
            from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

            m, kw = self.cfg.model_id, _hf_kwargs(self.cfg)
            dkw = transformers_dtype_kwargs(self.dtype)

            def load() -> tuple:
                return (
                    CLIPTokenizer.from_pretrained(m, subfolder="tokenizer", **kw),
                    CLIPTextModel.from_pretrained(m, subfolder="text_encoder", **dkw, **kw),
                    T5TokenizerFast.from_pretrained(m, subfolder="tokenizer_2", **kw),
                    T5EncoderModel.from_pretrained(m, subfolder="text_encoder_2", **dkw, **kw),
                )

            tok, clip, tok2, t5 = load_weights(
                load, m, "FLUX.1 text encoders", local_files_only=self.cfg.local_files_only,
                cache_dir=self.cfg.cache_dir,
            )  # fmt: skip
            self._models = (tok, clip.eval().to(self.device), tok2, t5.eval().to(self.device))
        return self._models

    @torch.no_grad()
    def encode_now(self, prompt: str) -> PromptEmbedding:
        """Run the text encoders (loading them on first use); fp32 result on the CPU."""
        tok, clip, tok2, t5 = self._load()
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids2 = tok2(prompt, padding="max_length", max_length=self.cfg.max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
        embeds = t5(ids2.to(self.device), output_hidden_states=False)[0]
        return PromptEmbedding(embeds.float().cpu(), pooled.float().cpu())

    def encode(self, prompts: Sequence[str]) -> dict[str, PromptEmbedding]:
        """Embeddings of ``prompts``, read from the disk cache where present, else encoded and stored."""
        out: dict[str, PromptEmbedding] = {}
        key_base = self._identity() if self.cache_dir is not None else ""
        for p in prompts:
            path = None
            if self.cache_dir is not None:
                digest = hashlib.sha256(f"{key_base}\n{p}".encode()).hexdigest()[:32]
                path = self.cache_dir / f"{digest}.safetensors"
                if path.is_file():
                    from safetensors.torch import load_file

                    st = load_file(str(path))
                    out[p] = PromptEmbedding(st["embeds"], st["pooled"])
                    continue
            out[p] = self.encode_now(p)
            if path is not None:
                from safetensors.torch import save

                blob = save({"embeds": out[p].embeds, "pooled": out[p].pooled},
                            metadata={"prompt": p, "identity": json.dumps(key_base)})  # fmt: skip
                with atomic_write(path) as f:
                    f.write(blob)
        return out

    def free(self) -> None:
        """Drop the text encoders (T5-XXL alone is ~9 GiB)."""
        self._models = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class FluxModel:
    """The FLUX transformer + VAE + scheduler config + cached prompt embeddings, on a device.

    Args:
        transformer: a ``FluxTransformer2DModel`` (eval mode).
        vae: the FLUX ``AutoencoderKL`` (16 latent channels, scale factor 8).
        scheduler_config: the pipeline's scheduler config (shift parameters).
        prompts: prompt -> embedding (fp32, CPU).
        device: compute device.
        dtype: compute dtype of the transformer and VAE.
        memory_mode: 'gpu' or 'cpu-offload' (transformer + VAE on the device only inside ``on_device()``).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler_config: dict,
        prompts: dict[str, PromptEmbedding],
        *,
        device: torch.device,
        dtype: torch.dtype,
        memory_mode: str = "gpu",
    ):
        if memory_mode not in ("gpu", "cpu-offload"):
            raise ConfigError(f"memory_mode: {memory_mode!r} is not one of gpu, cpu-offload")
        self.transformer, self.vae = transformer, vae
        self.scheduler_config = dict(scheduler_config)
        self.prompts = dict(prompts)
        self.device, self.dtype, self.memory_mode = device, dtype, memory_mode
        self._home = torch.device("cpu") if memory_mode == "cpu-offload" else device
        self._move(self._home)

    @classmethod
    def load(cls, cfg: FluxConfig, prompts: Sequence[str], *, option: str = "device") -> FluxModel:
        """Load from ``cfg.model_id`` (Hub id or local folder), encoding ``prompts`` once first.

        Missing or gated weights raise :class:`skyfall.priors.hub.WeightsNotFoundError`; an unusable
        ``cfg.device`` a ConfigError naming ``option`` (the command-line flag it came from).
        """
        _require("diffusers", '"skyfall[diffusion]"', "the FLUX refiner")
        _require("transformers", '"skyfall[diffusion]"', "the FLUX refiner")
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        device = resolve_device(cfg.device, option)
        dtype = torch_dtype(cfg.dtype)
        # Options that cannot work here stop the load before any weights are read.
        quant = _quantization_config(cfg, dtype, device, option_flag(option, "quantization"))
        check_attention_backend(cfg.attention, option_flag(option, "attention"))
        # Text encoders first and alone (T5-XXL ~9 GiB), then freed before the transformer arrives.
        encoder = PromptEncoder(cfg, device, dtype)
        embeds = encoder.encode(list(dict.fromkeys(prompts)))
        encoder.free()

        m, kw = cfg.model_id, _hf_kwargs(cfg)
        qkw = {"quantization_config": quant} if quant is not None else {}

        def load() -> tuple:
            return (
                FluxTransformer2DModel.from_pretrained(
                    m, subfolder="transformer", torch_dtype=dtype, **qkw, **kw
                ),
                AutoencoderKL.from_pretrained(m, subfolder="vae", torch_dtype=dtype, **kw),
                FlowMatchEulerDiscreteScheduler.load_config(m, subfolder="scheduler", **kw),
            )

        transformer, vae, sched = load_weights(
            load, m, "FLUX.1", local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir
        )
        model = cls(
            transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False), dict(sched), embeds,
            device=device, dtype=dtype, memory_mode=cfg.memory_mode,
        )  # fmt: skip
        apply_speed_options(model.transformer, cfg, device=device, dtype=dtype, option=option)
        return model

    # --- memory -------------------------------------------------------------------------------
    def _move(self, device: torch.device) -> None:
        for m in (self.transformer, self.vae):
            if getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False):
                continue  # bitsandbytes weights stay where they were quantised
            m.to(device)

    def on_device(self) -> contextlib.AbstractContextManager:
        """Hold the transformer and VAE on the compute device (a no-op in 'gpu' mode)."""
        return held_on(self._move, self._home, self.device)

    def release(self) -> None:
        """Free the modules (the model is unusable afterwards)."""
        self.transformer = self.vae = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- prompts and VAE -------------------------------------------------------------------------
    def prompt(self, text: str) -> PromptEmbedding:
        """The cached embedding of a prompt given at load time (KeyError naming it otherwise)."""
        if text not in self.prompts:
            raise KeyError(f"prompt not encoded at load time: {text[:60]!r}...")
        return self.prompts[text]

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (H, W multiples of 16) -> normalised latents [B, 16, H/8, W/8] fp32.

        ``(mode of the posterior - shift_factor) * scaling_factor``, as the reference (mode, not a sample).
        """
        h, w = images.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"image size {h}x{w}: FLUX needs height and width that are multiples of 16")
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        lat = self.vae.encode(x).latent_dist.mode().float()
        return (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, 16, h, w] -> images [B, 3, 8h, 8w] in [0, 1] (fp32)."""
        lat = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        x = self.vae.decode(lat.to(self.device, self.dtype), return_dict=False)[0].float()
        return (x * 0.5 + 0.5).clamp(0.0, 1.0)
