"""Difix3D's single-step fixer (Wu et al., CVPR 2025) as a Stage 2 refiner: the fast mode.

What the model is (nv-tlabs/Difix3D ``src/model.py`` and ``src/pipeline_difix.py``, and the files of
the ``nvidia/difix`` Hub repo):

* an SD-Turbo UNet fine-tuned to clean a render in one DDPM step: the render's VAE latent is read as if
  it were noised to timestep 199, the UNet predicts its noise with the fixed prompt "remove degradation"
  (no classifier-free guidance), and the step goes straight to the predicted clean latent (the last
  step of a one-step schedule lands on x0). The step is always ``DDPMScheduler``'s, the scheduler Difix
  was trained with (``make_1step_sched`` in ``src/model.py``), built from the snapshot's scheduler
  config (its betas and prediction type);
* a Stable Diffusion VAE whose decoder also receives the encoder's activations (pix2pix-turbo's skip
  connections): the input of each encoder down block goes through a 1x1 convolution
  (``decoder.skip_conv_k``, scaled by ``gamma``) and is added to the input of the mirrored decoder up
  block, so the input's fine detail survives the 8x latent bottleneck. Its decoder also carries a
  rank-4 LoRA (adapter ``vae_skip``).

Files of ``nvidia/difix`` (a diffusers folder with a remote-code pipeline, ``DifixPipeline``):
``model_index.json``, ``scheduler/scheduler_config.json``, ``tokenizer/`` (CLIP), ``text_encoder/``
(``CLIPTextModel``), ``unet/`` (a stock ``UNet2DConditionModel``) and ``vae/``: ``config.json`` (an SD
VAE config plus ``gamma``, ``ignore_skip`` and ``lora_rank``), ``autoencoder_kl.py`` (the remote
code) and ``diffusion_pytorch_model.safetensors`` (the VAE with ``decoder.skip_conv_{1..4}``, its LoRA
layers in peft's layout: ``<module>.base_layer.*``, ``<module>.lora_A.vae_skip.weight``,
``<module>.lora_B.vae_skip.weight``). The stock components load with diffusers' and transformers'
``from_pretrained`` (Hub cache, ``local_files_only``, revision); the VAE is built here on diffusers'
``AutoencoderKL`` modules from ``vae/config.json`` and its safetensors file, so no remote code runs
(no ``trust_remote_code``) and peft is not needed: the LoRA is merged into the base weights at load,
``W + (alpha / r) B A``, with peft's default ``alpha`` 8, which Difix's ``LoraConfig`` leaves unset.

Seeds. Difix is deterministic but for two draws, both made as its pipeline makes them: the VAE
posterior sample of the render's latent, and the DDPM step's noise, whose std at the last step of a
one-step schedule is 1e-10. One seed per image drives both (a CPU generator, so a seed gives the same
draws whatever the batch grouping or device); the samples of one view differ only through the
posterior's spread.

Differences from the reference pipeline, none of them in the model's math: the render is a float tensor
(the pipeline takes 8-bit images), resized (bilinear, antialiased) down to a multiple of 8 when it is
not one and back afterwards (``Difix.sample`` does both with Lanczos on PIL images); the prompt is
encoded once and the text encoder freed; the scheduler step runs in float32; half-precision compute is
an option (the reference pipeline runs in float32), with the VAE kept in float32 under float16.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skyfall.config.priors import DifixConfig
from skyfall.devices import resolve_device
from skyfall.errors import ConfigError
from skyfall.priors.flux import _require, held_on, torch_dtype
from skyfall.priors.guidance import RefineGuidance
from skyfall.priors.hub import load_weights, resolve_file, transformers_dtype_kwargs

_OPTION = "--stage2.difix"
# peft's LoraConfig default; Difix builds its VAE adapter with LoraConfig(r=lora_rank, ...) and no alpha.
PEFT_DEFAULT_LORA_ALPHA = 8.0
# vae/config.json keys that are Difix's, not AutoencoderKL's
_DIFIX_VAE_KEYS = ("gamma", "ignore_skip", "lora_rank", "lora_alpha")
# peft's full state dict names the adapter (lora_A.vae_skip.weight); its adapter-only export does not
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# --- the skip-connection VAE --------------------------------------------------------------------------


def skip_conv_channels(block_out_channels: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) channels of ``decoder.skip_conv_{1..n}``, in decoder order.

    Skip k carries the input of encoder down block n-k (``conv_in``'s output for the first block, the
    previous block's output after that) to the input of decoder up block k-1 (the mid block's output for
    the first, the previous up block's output after that). SD's VAE (128, 256, 512, 512) gives Difix's
    (512, 512), (256, 512), (128, 512), (128, 256).
    """
    c = list(block_out_channels)
    down_inputs = [c[0], *c[:-1]]
    rev = c[::-1]
    up_inputs = [rev[0], *rev[:-1]]
    return list(zip(down_inputs[::-1], up_inputs, strict=True))


def add_skip_convs(vae: nn.Module) -> None:
    """Attach Difix's bias-free 1x1 skip convolutions to ``vae.decoder`` (a diffusers ``AutoencoderKL``),
    under the names its checkpoint uses; diffusers' own forward ignores them (see ``decode_with_skips``)."""
    for k, (cin, cout) in enumerate(skip_conv_channels(vae.config.block_out_channels), start=1):
        vae.decoder.add_module(f"skip_conv_{k}", nn.Conv2d(cin, cout, kernel_size=1, bias=False))


def encode_with_skips(vae: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """diffusers' ``AutoencoderKL`` encoder pass, also returning the input of every down block.

    Args:
        vae: an ``AutoencoderKL``.
        x: images [B, 3, H, W] in [-1, 1].

    Returns:
        The posterior's parameters (mean and log-variance stacked on dim 1, as ``quant_conv`` gives them)
        and the skip activations, encoder order.
    """
    enc = vae.encoder
    h = enc.conv_in(x)
    skips = []
    for block in enc.down_blocks:
        skips.append(h)
        h = block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    return h, skips


def decode_with_skips(
    vae: nn.Module, z: Tensor, skips: Sequence[Tensor] | None, *, gamma: float = 1.0
) -> Tensor:
    """diffusers' ``AutoencoderKL`` decoder pass with Difix's skips added before each up block.

    Args:
        vae: an ``AutoencoderKL`` with :func:`add_skip_convs` applied.
        z: unscaled latents [B, C, h, w] (the scaling factor already divided out).
        skips: :func:`encode_with_skips`' activations of the same images; None = no skips (the plain
            decoder, Difix's ``ignore_skip``).
        gamma: the skips' scale (Difix's ``gamma``, 1 in nvidia/difix).

    Returns:
        Images [B, 3, 8h, 8w], about [-1, 1].
    """
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    dec = vae.decoder
    h = dec.mid_block(dec.conv_in(z))
    for k, block in enumerate(dec.up_blocks):
        if skips is not None:
            # the deepest encoder activation meets the first up block
            h = h + getattr(dec, f"skip_conv_{k + 1}")(skips[len(skips) - 1 - k] * gamma)
        h = block(h)
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))


def merge_lora(state: dict[str, Tensor], alpha: float = PEFT_DEFAULT_LORA_ALPHA) -> dict[str, Tensor]:
    """A state dict with LoRA layers in peft's layout -> plain weights, each LoRA folded into its base.

    ``<m>.base_layer.<p>`` becomes ``<m>.<p>``, and ``<m>.weight`` gains ``(alpha / r) * B @ A``: for a
    Linear the matrix product, for a Conv2d (A: the base's kernel size with r outputs, B: 1x1) the
    composed kernel, which is exact because B is 1x1 with stride 1. Keys of other layouts pass through.
    """
    out: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = value
            adapters.add(m["adapter"] or "")
        else:
            out[key.replace(".base_layer.", ".")] = value
    if len(adapters) > 1:
        raise ConfigError(
            f"VAE checkpoint holds several LoRA adapters ({', '.join(sorted(adapters))}); expected one"
        )
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or f"{module}.weight" not in out:
            raise ConfigError(
                f"VAE checkpoint: incomplete LoRA layer {module!r} (needs lora_A, lora_B and a base weight)"
            )
        a, b, w = ab["A"].float(), ab["B"].float(), out[f"{module}.weight"]
        scale = alpha / a.shape[0]
        if w.ndim == 2:
            delta = b @ a
        elif w.ndim == 4 and b.shape[2:] == (1, 1):
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        else:
            raise ConfigError(
                f"VAE checkpoint: cannot merge the LoRA of {module!r} (weight {tuple(w.shape)})"
            )
        out[f"{module}.weight"] = (w.float() + scale * delta).to(w.dtype)
    return out


def load_vae(cfg: DifixConfig) -> tuple[nn.Module, dict]:
    """The Difix VAE of ``cfg.model_id`` (``vae/config.json`` + ``vae/diffusion_pytorch_model.safetensors``),
    in float32 on the CPU, LoRA merged; and its Difix settings (``gamma``, ``ignore_skip``, ...).

    Raises:
        WeightsNotFoundError: a file is missing. ConfigError: the checkpoint is not a Difix VAE.
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    kw = dict(local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir, revision=cfg.revision)
    config_file = resolve_file(cfg.model_id, "vae/config.json", "Difix3D VAE", **kw)
    weights_file = resolve_file(cfg.model_id, "vae/diffusion_pytorch_model.safetensors", "Difix3D VAE", **kw)
    config = json.loads(config_file.read_text())
    extras = {k: config[k] for k in _DIFIX_VAE_KEYS if k in config}
    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    with torch.device("meta"):  # every tensor comes from the file: skip the random initialisation
        vae = AutoencoderKL(**{k: v for k, v in config.items() if k in accepted})
        add_skip_convs(vae)
    state = merge_lora(load_file(str(weights_file)), float(extras.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)))
    missing, unexpected = (
        sorted(s) for s in (set(vae.state_dict()) - set(state), set(state) - set(vae.state_dict()))
    )
    if missing or unexpected:
        raise ConfigError(
            f"{weights_file}: not a Difix3D VAE checkpoint for {config_file} (missing "
            f"{missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}); --stage2.difix.model-id must "
            "name an nvidia/difix snapshot"
        )
    vae.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*vae.parameters(), *vae.buffers())):
        raise ConfigError(f"{weights_file}: the VAE has tensors its checkpoint does not hold")
    return vae.eval().requires_grad_(False), extras


# --- the model ----------------------------------------------------------------------------------------


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU, float32 on the CPU (half-precision convolutions are slow there);
    other names as :func:`skyfall.priors.flux.torch_dtype`."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


class DifixModel:
    """Difix's UNet, skip-connection VAE, one-step scheduler and encoded prompt, on a device.

    Args:
        unet: the ``UNet2DConditionModel`` (eval mode), in ``dtype``.
        vae: the ``AutoencoderKL`` with skip convolutions (:func:`load_vae`), in ``vae_dtype``.
        scheduler: a ``DDPMScheduler`` (its config: Difix's).
        prompt_embeds: the prompt's text-encoder states [1, L, D].
        timestep: the single step's timestep.
        device: compute device.
        dtype: the UNet's compute dtype.
        vae_dtype: the VAE's (float32 where half precision would overflow).
        gamma: scale of the skip activations; use_skips: False = Difix's ``ignore_skip``.
        memory_mode: 'gpu' or 'cpu-offload' (UNet + VAE on the device only inside ``on_device()``).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        scheduler,  # noqa: ANN001 - a diffusers DDPMScheduler
        prompt_embeds: Tensor,
        *,
        timestep: int,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        gamma: float = 1.0,
        use_skips: bool = True,
        memory_mode: str = "gpu",
    ):
        if memory_mode not in ("gpu", "cpu-offload"):
            raise ConfigError(f"memory_mode: {memory_mode!r} is not one of gpu, cpu-offload")
        n_train = scheduler.config.num_train_timesteps
        if not 0 <= timestep < n_train:
            raise ConfigError(f"{_OPTION}.timestep must be in [0, {n_train - 1}], got {timestep}")
        self.unet, self.vae, self.scheduler = unet, vae.to(dtype=vae_dtype), scheduler
        # one step from `timestep`: the schedule's last step, which lands on the predicted clean latent
        self.scheduler.set_timesteps(timesteps=[int(timestep)])
        self.timestep = int(timestep)
        self.prompt_embeds = prompt_embeds.to(device, dtype)
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.gamma, self.use_skips, self.memory_mode = float(gamma), bool(use_skips), memory_mode
        self._home = torch.device("cpu") if memory_mode == "cpu-offload" else device
        self._move(self._home)

    @classmethod
    def load(cls, cfg: DifixConfig, *, option: str = _OPTION) -> DifixModel:
        """Load from ``cfg.model_id`` (Hub id or local folder) and encode ``cfg.prompt`` once.

        Missing weights raise :class:`skyfall.priors.hub.WeightsNotFoundError`, missing packages
        MissingDependencyError, an unusable ``cfg.device`` or an unsupported option a ConfigError.
        """
        _require("diffusers", '"skyfall[diffusion]"', "the difix refiner")
        _require("transformers", '"skyfall[diffusion]"', "the difix refiner")
        _require("safetensors", '"skyfall[diffusion]"', "the difix refiner")
        if cfg.use_reference:
            raise ConfigError(
                f"{option}.use-reference is not supported: it needs nvidia/difix_ref's multi-view UNet and a "
                "clean reference image per render"
            )
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device = resolve_device(cfg.device, f"{option}.device")
        dtype = compute_dtype(cfg.dtype, device)
        m = cfg.model_id
        kw = dict(local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir, revision=cfg.revision)

        def load() -> tuple:
            return (
                CLIPTokenizer.from_pretrained(m, subfolder="tokenizer", **kw),
                CLIPTextModel.from_pretrained(
                    m, subfolder="text_encoder", **transformers_dtype_kwargs(dtype), **kw
                ),
                UNet2DConditionModel.from_pretrained(m, subfolder="unet", torch_dtype=dtype, **kw),
                DDPMScheduler.from_pretrained(m, subfolder="scheduler", **kw),
            )

        vae, extras = load_vae(cfg)  # first: an absent snapshot fails on its first small file
        tokenizer, text_encoder, unet, scheduler = load_weights(
            load, m, "Difix3D", local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir
        )
        embeds = encode_prompt(tokenizer, text_encoder.eval().to(device), cfg.prompt)
        del text_encoder  # used once: the prompt is fixed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = dtype == torch.float16 and vae.config.get("force_upcast", True)
        return cls(
            unet.eval().requires_grad_(False), vae, scheduler, embeds, timestep=cfg.timestep, device=device,
            dtype=dtype, vae_dtype=torch.float32 if half else dtype, gamma=float(extras.get("gamma", 1.0)),
            use_skips=not extras.get("ignore_skip", False), memory_mode=cfg.memory_mode,
        )  # fmt: skip

    # --- memory -------------------------------------------------------------------------------
    def _move(self, device: torch.device) -> None:
        self.unet.to(device)
        self.vae.to(device)

    def on_device(self) -> contextlib.AbstractContextManager:
        """Hold the UNet and VAE on the compute device (a no-op in 'gpu' mode)."""
        return held_on(self._move, self._home, self.device)

    def release(self) -> None:
        """Free the modules (the model is unusable afterwards)."""
        self.unet = self.vae = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- the fix --------------------------------------------------------------------------------
    @torch.no_grad()
    def fix(self, images: Tensor, generators: list[torch.Generator]) -> Tensor:
        """One Difix step. Images [B, 3, H, W] in [0, 1] (H, W multiples of 8), one generator per image
        -> fixed images [B, 3, H, W] in [0, 1], float32 on the compute device."""
        if len(generators) != images.shape[0]:
            raise ValueError(f"{len(generators)} generators for {images.shape[0]} images")
        vae, sf = self.vae, self.vae.config.scaling_factor
        x = images.to(self.device, self.vae_dtype) * 2.0 - 1.0
        moments, skips = encode_with_skips(vae, x)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # a posterior sample, as DifixPipeline.prepare_latents draws it (with the caller's generator)
        z = DiagonalGaussianDistribution(moments).sample(generators) * sf
        t = torch.tensor([self.timestep], device=self.device)
        cond = self.prompt_embeds.expand(z.shape[0], -1, -1)
        eps = self.unet(z.to(self.dtype), t, encoder_hidden_states=cond, return_dict=False)[0]
        z0 = self.scheduler.step(
            eps.float(), self.timestep, z.float(), generator=generators, return_dict=False
        )[0]
        y = decode_with_skips(
            vae, (z0 / sf).to(self.vae_dtype), skips if self.use_skips else None, gamma=self.gamma
        )
        return (y.float().clamp(-1.0, 1.0) + 1.0) * 0.5


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: nn.Module, prompt: str) -> Tensor:  # noqa: ANN001
    """The prompt's last hidden states [1, L, D] (padded to the tokenizer's max length, as Stable
    Diffusion pipelines encode it)."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return text_encoder(ids.to(device))[0]


# --- the refiner --------------------------------------------------------------------------------------


class DifixRefiner:
    """Difix3D's single-step fixer behind :class:`skyfall.priors.refine.ImageRefiner`.

    Args:
        cfg: the options; None = :class:`DifixConfig` defaults (nvidia/difix, t = 199, "remove
            degradation").
        model: an already loaded :class:`DifixModel`; None = load from ``cfg.model_id`` (missing weights
            raise ``WeightsNotFoundError``).
    """

    def __init__(self, cfg: DifixConfig | None = None, *, model: DifixModel | None = None):
        self.cfg = cfg = cfg or DifixConfig()
        if cfg.batch_size < 1:
            raise ConfigError(f"{_OPTION}.batch-size must be at least 1, got {cfg.batch_size}")
        self.model = model or DifixModel.load(cfg)
        self._next_seed = cfg.seed

    @torch.no_grad()
    def refine(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        cameras=None,  # noqa: ANN001
        guidance: RefineGuidance | None = None,
    ) -> Tensor:
        """Refine images [B, 3, H, W] in [0, 1] -> [B, 3, H, W] in [0, 1] (dtype and device of the input).

        Args:
            images: renders to refine; sizes that are not multiples of 8 are resized down to one for the
                VAE and the result back.
            seeds: one seed per image (see the module docstring for what it draws); None = consecutive
                seeds from ``cfg.seed`` on, continuing across calls.
            cameras: unused (pose-free refiner).
            guidance: unused (unconditioned refiner).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        b, _, h, w = images.shape
        h8, w8 = h - h % 8, w - w % 8
        if h8 == 0 or w8 == 0:
            raise ValueError(f"image size {h}x{w}: the difix refiner needs at least 8x8 pixels")
        if seeds is None:
            seeds = list(range(self._next_seed, self._next_seed + b))
            self._next_seed += b
        seeds = [int(s) for s in seeds]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} images")
        resized = (h8, w8) != (h, w)
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        bs = max(1, self.cfg.batch_size)
        with self.model.on_device():
            for start in range(0, b, bs):
                x = images[start : start + bs].float()
                if resized:  # rounded down, as the VAE image processor of the reference pipeline does
                    x = F.interpolate(x, size=(h8, w8), mode="bilinear", align_corners=False, antialias=True)
                gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + bs]]
                y = self.model.fix(x, gens)
                if resized:
                    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                out[start : start + bs] = y.clamp(0.0, 1.0).to(images.device)
        return out.to(images.dtype)

    def close(self) -> None:
        """Free the model (GPU memory); the refiner is unusable afterwards."""
        self.model.release()
