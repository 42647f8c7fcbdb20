"""FLUX.1 components for the refiners: loading, memory modes, prompt-embedding cache, VAE codec.

Only the public diffusers/transformers loaders are used (``from_pretrained`` on the subfolders of a
FLUX pipeline folder or Hub id), the same calls for real weights and for the tiny test pipelines.

Memory (FLUX.1-dev, bf16): transformer 22.2 GiB, T5-XXL 8.9 GiB, CLIP + VAE 0.4 GiB. The prompts are
fixed, so they are encoded once (and cached on disk), after which the text encoders are freed
([FIX] the reference reloads FLUX every episode and re-encodes both prompts with T5-XXL for every
image): the resident set is the transformer + VAE. ``memory_mode``
and ``quantization`` (see :class:`skyfall.config.priors.FluxConfig`) trade speed for VRAM.
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

from skyfall.config.priors import FluxConfig
from skyfall.devices import resolve_device
from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.priors.flowedit import PromptEmbedding
from skyfall.priors.hub import load_weights, looks_like_path, resolve_file, transformers_dtype_kwargs
from skyfall.storage.atomic import atomic_write

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def _quantization_config(cfg: FluxConfig, dtype: torch.dtype):  # noqa: ANN202
    """diffusers quantisation config for the transformer weights, or None."""
    if cfg.quantization == "none":
        return None
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
    raise ConfigError(f"quantization: {cfg.quantization!r} is not one of none, fp8, nf4")


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
        # Text encoders first and alone (T5-XXL ~9 GiB), then freed before the transformer arrives.
        encoder = PromptEncoder(cfg, device, dtype)
        embeds = encoder.encode(list(dict.fromkeys(prompts)))
        encoder.free()

        m, kw = cfg.model_id, _hf_kwargs(cfg)
        quant = _quantization_config(cfg, dtype)
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
        return cls(
            transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False), dict(sched), embeds,
            device=device, dtype=dtype, memory_mode=cfg.memory_mode,
        )  # fmt: skip

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
