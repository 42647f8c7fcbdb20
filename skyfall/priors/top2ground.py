"""Top2Ground-style refiner: FlowEdit from the render on FLUX.1-Depth-dev, conditioned on geometry and semantics.

Top2Ground (Lee & Benes 2025, arXiv 2511.08258) generates ground-level views from aerial data with a
diffusion model conditioned jointly on geometry (an aerial height map) and semantics (an embedding of
the aerial image). This backend trains nothing: it builds both conditions from pretrained FLUX.1 tools,
loaded with diffusers' and transformers' public ``from_pretrained`` (the same calls for real weights and
for the tiny test folders of :mod:`skyfall.priors.tiny`):

* geometry: FLUX.1-Depth-dev (diffusers ``FluxControlPipeline`` layout) takes the VAE latents of a
  control image, packed and concatenated channel-wise to the packed noisy latents, in every transformer
  call. The control image is made from the view's rendered depth or height (:func:`control_image`);
* semantics: FLUX.1 Redux (``FluxPriorReduxPipeline`` layout): a SigLIP vision tower and the
  ``ReduxImageEncoder`` turn the satellite crop that sees the view's look-at target into tokens of the
  T5 width, appended to the target prompt's T5 embedding (:class:`ReduxEncoder`);
* the edit: FlowEdit from the render (:func:`skyfall.priors.flowedit.flowedit_latents`; source prompt:
  a description of the render, target prompt + Redux tokens) with FlowEdit's options, per-image seeds,
  batching, prompt-embedding cache and memory modes.

Choices:

* Control image. FLUX.1-Depth-dev was trained on Depth Anything maps, which diffusers' recipe feeds
  min-max normalised per image (near = bright) and replicated to 3 channels. 'depth' becomes disparity
  1/depth on the rendered pixels, normalised over them to [0, 1], and 0 (infinitely far, as Depth
  Anything's sky) where nothing was rendered. 'height' is normalised over the image, high = bright (seen
  from above, higher is nearer); unrendered pixels count as ground level 0, as the guidance gives them. A
  map without variation gives a black image. The control image is encoded as the render is, to the
  posterior mode (diffusers draws a posterior sample with the pipeline's generator), so the condition
  does not depend on the seed.
* geometry 'none' feeds that black image (a map that carries no information), so switching geometry
  off changes the control input only. A plain FLUX transformer (FLUX.1-dev, no control channels) gets no
  control input at all, and with semantics off the refiner is then exactly FlowEdit.
* Both FlowEdit velocities get the control latents (the source prompt describes the render, whose
  geometry this is); only the target gets the Redux tokens, so the edit direction carries the
  satellite's semantics. The two embeddings then differ in length, so the velocities run as two calls.
* ``redux_weight`` scales the image tokens only (diffusers' ``prompt_embeds_scale`` scales text and
  image tokens together); 0 appends none, as semantics off does (zero tokens would still draw attention).
* The satellite crop is quantised to 8 bits and given to the Redux folder's own image processor
  (resize to 384, normalise) as a PIL image, as ``FluxPriorReduxPipeline`` treats one.

Memory (bf16): the FLUX.1-Depth-dev transformer is FLUX.1-dev's with a 128-wide input projection
(~22.2 GiB; 'fp8' / 'nf4' quantisation and 'cpu-offload' apply as for FlowEdit); the text encoders are
loaded only to encode the two prompts; Redux adds the SigLIP so400m tower (~0.8 GiB) and the image
embedder (~0.12 GiB), held with the transformer (moved with it in 'cpu-offload'). The 729 Redux
tokens of a crop lengthen the target rows' text sequence from 512 to 1241 tokens.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch import Tensor

from skyfall.config.priors import FLUX_DEPTH_DEV, Top2GroundConfig
from skyfall.devices import resolve_device
from skyfall.errors import ConfigError
from skyfall.priors.flowedit import PromptEmbedding
from skyfall.priors.flux import FluxModel, _require, held_on, torch_dtype
from skyfall.priors.flux_refiners import FlowEditRefiner
from skyfall.priors.guidance import RefineGuidance
from skyfall.priors.hub import load_weights, transformers_dtype_kwargs

_OPTION = "--stage2.top2ground"
_SHAPES = {"depth": "[B, H, W]", "height": "[B, H, W]", "satellite": "[B, 3, h, w]"}


def control_image(values: Tensor, kind: str) -> Tensor:
    """A rendered depth or height map [B, H, W] -> the control image [B, 3, H, W] in [0, 1].

    'depth' (metres, 0 = nothing rendered): disparity normalised per image over the rendered pixels,
    near = 1, unrendered = 0. 'height' (metres above the ground): normalised per image, high = 1. A map
    without variation (or without rendered pixels) gives 0 everywhere.
    """
    if values.ndim != 3:
        raise ValueError(f"expected a map [B, H, W], got {tuple(values.shape)}")
    v = values.float()
    if kind == "depth":
        valid = torch.isfinite(v) & (v > 0)
        x = torch.where(valid, 1.0 / torch.where(valid, v, torch.ones_like(v)), torch.zeros_like(v))
    elif kind == "height":
        valid = torch.isfinite(v)
        x = torch.where(valid, v, torch.zeros_like(v))
    else:
        raise ValueError(f"control image kind {kind!r} is not depth or height")
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid, x, big).amin(dim=(1, 2), keepdim=True)
    hi = torch.where(valid, x, -big).amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    ok = valid & (span > 0)
    out = torch.where(ok, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))
    return out.clamp(0.0, 1.0)[:, None].expand(-1, 3, -1, -1).contiguous()


class ReduxEncoder:
    """FLUX.1 Redux: images -> image tokens of the T5 width (SigLIP last hidden state -> ``ReduxImageEncoder``).

    Args:
        image_encoder: a ``SiglipVisionModel`` (eval mode).
        processor: its ``SiglipImageProcessor``.
        embedder: the ``ReduxImageEncoder``.
        device: compute device.
        dtype: compute dtype of both modules.
        memory_mode: 'gpu' or 'cpu-offload' (modules on the device only inside ``on_device()``).
    """

    def __init__(
        self,
        image_encoder: torch.nn.Module,
        processor,  # noqa: ANN001
        embedder: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        memory_mode: str = "gpu",
    ):
        self.image_encoder, self.processor, self.embedder = image_encoder, processor, embedder
        self.device, self.dtype = device, dtype
        self._home = torch.device("cpu") if memory_mode == "cpu-offload" else device
        self._move(self._home)

    @classmethod
    def load(cls, cfg: Top2GroundConfig, *, device: torch.device, dtype: torch.dtype) -> ReduxEncoder:
        """Load from ``cfg.redux_model_id`` (Hub id or local folder); missing/gated -> WeightsNotFoundError."""
        _require("diffusers", '"skyfall[diffusion]"', "the top2ground refiner")
        _require("transformers", '"skyfall[diffusion]"', "the top2ground refiner")
        from diffusers import ReduxImageEncoder
        from transformers import SiglipImageProcessor, SiglipVisionModel

        m = cfg.redux_model_id
        kw = dict(local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir, revision=cfg.redux_revision)

        def load() -> tuple:
            return (
                SiglipVisionModel.from_pretrained(
                    m, subfolder="image_encoder", **transformers_dtype_kwargs(dtype), **kw
                ),
                SiglipImageProcessor.from_pretrained(m, subfolder="feature_extractor", **kw),
                ReduxImageEncoder.from_pretrained(m, subfolder="image_embedder", torch_dtype=dtype, **kw),
            )

        encoder, processor, embedder = load_weights(
            load, m, "FLUX.1 Redux", local_files_only=cfg.local_files_only, cache_dir=cfg.cache_dir
        )
        return cls(
            encoder.eval().requires_grad_(False), processor, embedder.eval().requires_grad_(False),
            device=device, dtype=dtype, memory_mode=cfg.memory_mode,
        )  # fmt: skip

    @property
    def width(self) -> int:
        """Width of the tokens (the T5 width of the FLUX model they are meant for)."""
        return int(self.embedder.config.txt_in_features)

    def _move(self, device: torch.device) -> None:
        self.image_encoder.to(device)
        self.embedder.to(device)

    def on_device(self) -> contextlib.AbstractContextManager:
        """Hold the modules on the compute device (a no-op in 'gpu' mode)."""
        return held_on(self._move, self._home, self.device)

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """Images [B, 3, h, w] in [0, 1] -> Redux tokens [B, N, width] (fp32, on the compute device)."""
        from PIL import Image

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, h, w], got {tuple(images.shape)}")
        u8 = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        pil = [Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in u8]
        inputs = self.processor.preprocess(
            images=pil, do_resize=True, return_tensors="pt", do_convert_rgb=True
        )
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        hidden = self.image_encoder(**inputs).last_hidden_state
        return self.embedder(hidden).image_embeds.float()

    def release(self) -> None:
        """Free the modules (the encoder is unusable afterwards)."""
        self.image_encoder = self.embedder = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Top2GroundRefiner(FlowEditRefiner):
    """FlowEdit from the render on a FLUX control model, conditioned on geometry and satellite semantics.

    ``wants`` follows the config: {'depth'} or {'height'} with that geometry, plus 'satellite' while
    semantics is on (and redux_weight > 0); refine() raises ValueError when a wanted guidance is missing.

    Args:
        cfg: the options; None = :class:`Top2GroundConfig` defaults.
        model: an already loaded :class:`FluxModel` holding both prompts; None = load ``cfg.model_id``.
        redux: an already loaded :class:`ReduxEncoder`; None = load ``cfg.redux_model_id`` when needed.
    """

    wants: frozenset[str] = frozenset()
    cfg: Top2GroundConfig

    def __init__(
        self,
        cfg: Top2GroundConfig | None = None,
        *,
        model: FluxModel | None = None,
        redux: ReduxEncoder | None = None,
    ):
        cfg = cfg or Top2GroundConfig()
        _check(cfg)
        self.semantic = cfg.semantics and cfg.redux_weight > 0
        self.wants = frozenset(({cfg.geometry} if cfg.geometry != "none" else set()) | (
            {"satellite"} if self.semantic else set()))  # fmt: skip
        self.redux = None
        if self.semantic:  # before FLUX: missing Redux weights fail in seconds, not after the big load
            if redux is None:
                device, dtype = (model.device, model.dtype) if model is not None else _device_dtype(cfg)
                redux = ReduxEncoder.load(cfg, device=device, dtype=dtype)
            self.redux = redux
        if model is None:
            model = FluxModel.load(cfg, [cfg.source_prompt, cfg.target_prompt], option=f"{_OPTION}.device")
        self.control = _has_control_channels(cfg, model)
        if self.redux is not None:
            width = model.prompt(cfg.target_prompt).embeds.shape[-1]
            if self.redux.width != width:
                raise ConfigError(
                    f"top2ground: the Redux tokens of {cfg.redux_model_id} are {self.redux.width} wide but "
                    f"the T5 embeddings of {cfg.model_id} are {width} wide (pair FLUX.1 Redux with a FLUX.1 model)"
                )
        super().__init__(cfg, model=model)

    def _conditions(
        self, guidance: RefineGuidance | None, images: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """(geometry maps, satellite crops) of the batch: what ``self.wants`` names, checked. Passed as
        ``refine(..., guidance=...)``: depth or height [B, H, W] at the render's size, satellite
        [B, 3, h, w] in [0, 1] (any size); other entries are ignored."""
        return self._guidance(guidance, images.shape[0], images.shape[2], images.shape[3])

    def _chunk_inputs(self, conditions: tuple, chunk: list[int], images: Tensor) -> tuple:
        """(target embedding with the chunk's Redux tokens, the chunk's control latents): what
        FlowEdit's `_edit` uses in place of the plain target prompt."""
        maps, satellite = conditions
        return self._target(satellite, chunk), self._control(maps, chunk, images.shape[2], images.shape[3])

    def _on_device(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.model.on_device())
        if self.redux is not None:
            stack.enter_context(self.redux.on_device())
        return stack

    def _guidance(
        self, guidance: RefineGuidance | None, b: int, h: int, w: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """The geometry maps and satellite crops this refiner wants, checked (ValueError otherwise)."""
        missing = [n for n in sorted(self.wants) if getattr(guidance, n, None) is None]
        if missing:
            raise ValueError(
                f"the top2ground refiner (geometry {self.cfg.geometry!r}, semantics "
                f"{'on' if self.semantic else 'off'}) needs "
                + " and ".join(f"guidance.{n} {_SHAPES[n]}" for n in missing)
                + f" for its {b} image(s), got {'no guidance' if guidance is None else 'none'}: pass "
                "refine(..., guidance=RefineGuidance(...)) with everything refiner.wants names"
            )
        maps = satellite = None
        if self.cfg.geometry != "none":
            maps = getattr(guidance, self.cfg.geometry)
            if tuple(maps.shape) != (b, h, w):
                raise ValueError(
                    f"guidance.{self.cfg.geometry}: expected [{b}, {h}, {w}] (one map per image, at the "
                    f"render's size), got {tuple(maps.shape)}"
                )
        if self.semantic:
            satellite = guidance.satellite  # type: ignore[union-attr]
            if satellite.ndim != 4 or satellite.shape[0] != b or satellite.shape[1] != 3:
                raise ValueError(f"guidance.satellite: expected [{b}, 3, h, w], got {tuple(satellite.shape)}")
        return maps, satellite

    def _control(self, maps: Tensor | None, chunk: list[int], h: int, w: int) -> Tensor | None:
        """Control latents of the chunk's images (None for a plain FLUX transformer)."""
        if not self.control:
            return None
        if maps is None:  # geometry 'none': the image of a map without information
            img = torch.zeros(len(chunk), 3, h, w)
        else:
            img = control_image(maps[chunk], self.cfg.geometry)
        # one image at a time, as the renders (the VAE's activations would grow with the batch)
        return torch.cat([self.model.encode_images(img[j : j + 1]) for j in range(len(chunk))])

    def _target(self, satellite: Tensor | None, chunk: list[int]) -> PromptEmbedding:
        """The target prompt's embedding, with each image's weighted Redux tokens appended when semantic."""
        tar = self.model.prompt(self.cfg.target_prompt)
        if satellite is None:
            return tar
        tokens = self.redux.tokens(satellite[chunk]) * self.cfg.redux_weight  # type: ignore[union-attr]
        text = tar.embeds.to(tokens.device).expand(len(chunk), -1, -1)
        return PromptEmbedding(torch.cat([text, tokens], dim=1), tar.pooled)

    def close(self) -> None:
        """Free the models (GPU memory); the refiner is unusable afterwards."""
        super().close()
        if self.redux is not None:
            self.redux.release()


def _check(cfg: Top2GroundConfig) -> None:
    """What Top2GroundRefiner refuses (Stage2Config.check says the same up front)."""
    if not 0 <= cfg.n_min <= cfg.n_max <= cfg.T_steps:
        raise ConfigError(
            f"top2ground: need 0 <= n_min ({cfg.n_min}) <= n_max ({cfg.n_max}) <= T_steps ({cfg.T_steps})"
        )
    if cfg.n_max_end != -1 and not cfg.n_min <= cfg.n_max_end <= cfg.T_steps:
        raise ConfigError(f"top2ground: n_max_end ({cfg.n_max_end}) must be -1 or in [n_min, T_steps]")
    if cfg.n_avg < 1:
        raise ConfigError(f"top2ground: n_avg ({cfg.n_avg}) must be >= 1")
    if cfg.geometry not in ("depth", "height", "none"):
        raise ConfigError(f"top2ground: geometry {cfg.geometry!r} is not one of depth, height, none")
    if not cfg.redux_weight >= 0:
        raise ConfigError(f"top2ground: redux_weight ({cfg.redux_weight}) must be >= 0")


def _device_dtype(cfg: Top2GroundConfig) -> tuple[torch.device, torch.dtype]:
    return resolve_device(cfg.device, f"{_OPTION}.device"), torch_dtype(cfg.dtype)


def _has_control_channels(cfg: Top2GroundConfig, model: FluxModel) -> bool:
    """Whether the transformer takes control latents (twice the packed latent width), checked against geometry."""
    got = int(model.transformer.config.in_channels)
    packed = 4 * int(model.vae.config.latent_channels)
    if got == 2 * packed:
        return True
    if got == packed:
        if cfg.geometry != "none":
            raise ConfigError(
                f"top2ground: geometry {cfg.geometry!r} needs a FLUX control model ({2 * packed} input channels, "
                f"as {FLUX_DEPTH_DEV}); {cfg.model_id} takes {got} (use it with geometry 'none')"
            )
        return False
    raise ConfigError(
        f"top2ground: the transformer of {cfg.model_id} takes {got} input channels; expected {packed} "
        f"(FLUX) or {2 * packed} (a FLUX control model such as {FLUX_DEPTH_DEV})"
    )
