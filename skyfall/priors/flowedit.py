"""FlowEdit (Kulikov et al. 2024) on a FLUX transformer: latent packing, schedule and the edit loop.

The loop works on normalised VAE latents and pre-encoded prompts, so it runs unchanged on the real
FLUX.1-dev transformer and on tiny random ones in tests. It owns the pieces that diffusers keeps
private (2x2 latent packing, image position ids, the resolution-dependent sigma shift): their
conventions changed in diffusers 0.32 (the latent-size fix, PR #9929), which is why the reference
pins diffusers 0.30.1 (upstream ``FlowEditFLUX`` derives the pixel size as ``latent size *
vae_scale_factor / 2``, right only for diffusers <= 0.31). Here the ids come from the latent shape.

Conventions (as in FlowEdit's ``FlowEdit_utils.py:FlowEditFLUX``): rectified flow ``z_t = (1 - t) x0 + t eps``; the transformer
predicts ``v ~ eps - x0``; an Euler step from t_i to t_{i+1} < t_i is ``z <- z + (t_{i+1} - t_i) v``.
Cost per image: ``2 n_avg (n_max - n_min) + n_min`` transformer rows, run as
``n_avg (n_max - n_min) + n_min`` calls because the source and target rows share one batch (twice as
many ODE-phase calls when the two prompt embeddings differ in length, e.g. with image tokens).

FLUX control models (FLUX.1-Depth-dev; diffusers' ``FluxControlPipeline``) take the packed latents of a
control image concatenated channel-wise to the packed noisy latents; ``control=`` passes them.

Batches: several images (samples of one view, several views) share each transformer call. Each image
draws its noise from its own generator and may have its own n_max; an image joins the calls from its
own first step on, so every image gets exactly the draws and steps of a batch-1 run. Batched results
equal batch-1 ones up to float rounding, not bit for bit: on a CPU the embedders' matmuls with one row
take a matrix-vector kernel whose summation order differs from the matrix-matrix one (2.4e-7 in fp32 on
the tiny model).

A transformer with diffusers cache hooks enabled (``FluxConfig.cache``) has its cache state reset for
every call of :func:`flowedit_latents` and gets one cache context per phase and set of rows, so a cached
residual is only ever reused by a later call on the same images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class PromptEmbedding:
    """A prompt encoded for FLUX (computed once and cached: the prompts of a run are fixed).

    Attributes:
        embeds: [1, L, D] T5 sequence embedding (``encoder_hidden_states``; D = 4096 for FLUX.1-dev).
        pooled: [1, P] CLIP pooled embedding (``pooled_projections``; P = 768).
    """

    embeds: Tensor
    pooled: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PromptEmbedding:
        return PromptEmbedding(self.embeds.to(device, dtype), self.pooled.to(device, dtype))


# ---------------------------------------------------------------------------------------------------
# packing, ids, schedule
# ---------------------------------------------------------------------------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """Latents [B, C, h, w] (h, w even) -> tokens [B, (h/2)(w/2), 4C]; each 2x2 patch is one token."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, (h/2)(w/2), 4C] -> latents [B, C, h, w]; h, w are latent (not pixel) sizes."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """RoPE position ids [(h/2)(w/2), 3] of the packed latent tokens: channels [0, row, col]."""
    rows, cols = torch.meshgrid(
        torch.arange(h // 2, device=device, dtype=torch.float32),
        torch.arange(w // 2, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def shifted_sigmas(T: int, image_seq_len: int, scheduler_config: dict | None = None) -> Tensor:
    """FLUX sigma schedule [T + 1]: ``linspace(1, 1/T, T)`` time-shifted, then a terminal 0.

    With dynamic shifting (FLUX.1-dev), ``mu`` is linear in the packed token count (base_shift at
    base_image_seq_len .. max_shift at max_image_seq_len; 1.15 at 1024^2) and
    ``sigma' = e^mu / (e^mu + 1/sigma - 1)``. Without it (schnell), ``sigma' = s sigma / (1 + (s - 1) sigma)``
    with the static ``shift`` s. Computed in float64, returned as float32 like the scheduler's.
    """
    cfg = {
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096, "shift": 3.0, **(scheduler_config or {}),
    }  # fmt: skip
    s = np.linspace(1.0, 1.0 / T, T)
    if cfg["use_dynamic_shifting"]:
        slope = (cfg["max_shift"] - cfg["base_shift"]) / (
            cfg["max_image_seq_len"] - cfg["base_image_seq_len"]
        )
        mu = cfg["base_shift"] + slope * (image_seq_len - cfg["base_image_seq_len"])
        s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    else:
        s = cfg["shift"] * s / (1.0 + (cfg["shift"] - 1.0) * s)
    return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])


def num_transformer_calls(n_max: int, n_min: int, n_avg: int = 1, shared: bool = True) -> int:
    """Transformer calls of one :func:`flowedit_latents` run; ``shared``: source and target share a call
    (their prompt embeddings have the same length)."""
    return (1 if shared else 2) * n_avg * max(n_max - n_min, 0) + min(n_min, n_max)


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal draw per image from that image's own CPU generator -> [B, *shape] fp32.

    Drawing on the CPU makes a seed give the same noise on every device and whatever the batch
    grouping, so a seed reproduces its sample.
    """
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)


class _Velocity:
    """Calls the transformer on fp32 state, casting inputs to its compute dtype and outputs back to fp32.

    ``control`` (packed control-image latents, one row per state row) is concatenated channel-wise to
    the state, as ``FluxControlPipeline`` feeds a control transformer.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        h: int,
        w: int,
        dtype: torch.dtype,
        device,  # noqa: ANN001
        cached: bool = False,
    ):
        self.transformer = transformer
        self.dtype = dtype
        self.device = device
        self.img_ids = image_ids(h, w, device)
        self.txt_ids: dict[int, Tensor] = {}
        self.guided = bool(getattr(transformer.config, "guidance_embeds", False))
        self.cached = cached

    def __call__(
        self,
        z: Tensor,
        sigma: float,
        embeds: Tensor,
        pooled: Tensor,
        guidance: Tensor,
        control: Tensor | None = None,
        context: str = "",
    ) -> Tensor:
        """``context``: the cache context of the call (used only when cache hooks are enabled)."""
        n, L = z.shape[0], embeds.shape[1]
        if L not in self.txt_ids:
            self.txt_ids[L] = torch.zeros(L, 3, device=self.device)
        x = z if control is None else torch.cat([z, control], dim=2)
        with self.transformer.cache_context(context) if self.cached else contextlib.nullcontext():
            out = self.transformer(
                hidden_states=x.to(self.dtype),
                timestep=torch.full((n,), sigma, device=z.device, dtype=self.dtype),
                # FLUX.1-dev is guidance-distilled: the scale enters as an embedding, no CFG pass (schnell: None)
                guidance=guidance if self.guided else None,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=self.txt_ids[L],
                img_ids=self.img_ids,
                return_dict=False,
            )[0]
        return out.float()


def _reset_cache(transformer: torch.nn.Module) -> None:
    """Drop the cache hooks' state (residuals of other images, and their device memory)."""
    reset = getattr(transformer, "_reset_stateful_cache", None)  # diffusers' CacheMixin (private API)
    if reset is not None:
        reset()


@torch.no_grad()
def flowedit_latents(
    transformer: torch.nn.Module,
    x_src: Tensor,
    src: PromptEmbedding,
    tar: PromptEmbedding,
    generators: Sequence[torch.Generator],
    *,
    T_steps: int = 28,
    n_max: int | Sequence[int] = 10,
    n_min: int = 4,
    n_avg: int = 1,
    src_guidance: float = 1.5,
    tar_guidance: float = 5.5,
    scheduler_config: dict | None = None,
    dtype: torch.dtype | None = None,
    control: Tensor | None = None,
) -> Tensor:
    """Edit normalised latents from the source prompt towards the target prompt.

    Steps with ``T - i > n_max`` are skipped; the ODE phase (velocity difference, fresh noise
    ``n_avg`` times per step) runs while ``T - i > n_min``; the last ``n_min`` steps sample with the
    target prompt from the noised edit (SDEdit-like tail). ``n_max == n_min`` is SDEdit, ``n_max == 0``
    returns the input. The state is kept in fp32 and only the transformer inputs are cast to its
    dtype (the reference casts the state back to fp16 after each step; identical in fp32).

    Args:
        transformer: a ``FluxTransformer2DModel`` (or the same call signature and ``config``).
        x_src: [B, 16, h, w] normalised VAE latents (h, w even) on the compute device.
        src: source prompt embedding (batch 1, broadcast to B; or B, one per image).
        tar: target prompt embedding (batch 1 or B). When its length equals the source's (both padded
            to the same max_sequence_length) the two velocities run as one batch, else as two calls.
        generators: B CPU generators, one per image (its seed alone determines its noise).
        T_steps: length of the full schedule.
        n_max: edit strength (0 <= n_min <= n_max <= T_steps); one value for the batch, or one per
            image (an image joins the ODE-phase calls at its own first step; the tail is common).
        n_min: length of the target-sampling tail.
        n_avg: noise draws averaged per ODE step.
        src_guidance: distilled guidance of the source velocity.
        tar_guidance: distilled guidance of the target velocity.
        scheduler_config: the pipeline's scheduler config (shift parameters); None = FLUX.1-dev's.
        dtype: transformer compute dtype; None = the transformer's parameter dtype.
        control: [B, 16, h, w] normalised VAE latents of each image's control image, for a FLUX control
            transformer (twice the packed channels): every call, source and target rows alike, gets them
            concatenated to its input. None = a plain FLUX transformer.

    Returns:
        [B, 16, h, w] edited latents (fp32).
    """
    b, _, h, w = x_src.shape
    n_maxes = [n_max] * b if isinstance(n_max, int) else [int(n) for n in n_max]
    if len(n_maxes) != b:
        raise ValueError(f"{len(n_maxes)} n_max values for {b} images")
    for n in n_maxes or [n_min]:
        if not 0 <= n_min <= n <= T_steps or n_avg < 1:
            raise ValueError(
                f"need 0 <= n_min ({n_min}) <= n_max ({n}) <= T_steps ({T_steps}) and n_avg >= 1"
            )
    if len(generators) != b:
        raise ValueError(f"{len(generators)} generators for {b} images")
    for what, p in (("source", src), ("target", tar)):
        if p.embeds.shape[0] not in (1, b) or p.pooled.shape[0] not in (1, b):
            raise ValueError(f"{what} prompt embedding: batch {p.embeds.shape[0]} for {b} images")
    if src.embeds.shape[2] != tar.embeds.shape[2]:
        raise ValueError("source and target prompt embeddings must have the same width")
    if control is not None and control.shape != x_src.shape:
        raise ValueError(f"control latents {tuple(control.shape)} for image latents {tuple(x_src.shape)}")
    device = x_src.device
    dtype = dtype or next(transformer.parameters()).dtype
    x0 = pack_latents(x_src.float())
    sigmas = shifted_sigmas(T_steps, x0.shape[1], scheduler_config).tolist()
    cached = bool(getattr(transformer, "is_cache_enabled", False))
    velocity = _Velocity(transformer, h, w, dtype, device, cached=cached)
    cond = None if control is None else pack_latents(control.to(device, torch.float32))

    s_, t_ = src.to(device, dtype), tar.to(device, dtype)
    src_embeds, src_pooled = s_.embeds.expand(b, -1, -1), s_.pooled.expand(b, -1)
    tar_embeds, tar_pooled = t_.embeds.expand(b, -1, -1), t_.pooled.expand(b, -1)
    tar_guidance_b = torch.full((b,), tar_guidance, device=device)
    shared = src_embeds.shape[1] == tar_embeds.shape[1]
    rows_inputs: dict[tuple[int, ...] | None, dict] = {}

    def inputs(rows: tuple[int, ...] | None) -> dict:
        """The ODE phase's per-row inputs for ``rows`` (None: all images), built once per row set."""
        if rows not in rows_inputs:
            idx = None if rows is None else torch.tensor(rows, device=device)

            def pick(t: Tensor) -> Tensor:
                return t if idx is None else t.index_select(0, idx)

            n = b if rows is None else len(rows)
            d = dict(src_embeds=pick(src_embeds), src_pooled=pick(src_pooled), tar_embeds=pick(tar_embeds),
                     tar_pooled=pick(tar_pooled), cond=None if cond is None else pick(cond), idx=idx,
                     src_guidance=torch.full((n,), src_guidance, device=device),
                     tar_guidance=tar_guidance_b if rows is None else torch.full((n,), tar_guidance, device=device),
                     key="" if rows is None else f":{','.join(map(str, rows))}")  # fmt: skip
            if shared:  # rows [src_0 .. src_{n-1}, tar_0 .. tar_{n-1}]: both velocities in one call
                d["pair_embeds"] = torch.cat([d["src_embeds"], d["tar_embeds"]])
                d["pair_pooled"] = torch.cat([d["src_pooled"], d["tar_pooled"]])
                d["pair_guidance"] = torch.tensor([src_guidance] * n + [tar_guidance] * n, device=device)
                d["pair_cond"] = None if cond is None else torch.cat([d["cond"], d["cond"]])
            rows_inputs[rows] = d
        return rows_inputs[rows]

    if cached:  # a new batch of images: no residual of earlier images may be reused
        _reset_cache(transformer)
    z_edit = x0.clone()
    x_tar = None
    try:
        for i in range(T_steps - max(n_maxes, default=0), T_steps):
            s_i, s_next = sigmas[i], sigmas[i + 1]
            if T_steps - i > n_min:  # ODE phase on the velocity difference
                active = tuple(k for k in range(b) if T_steps - i <= n_maxes[k])
                rows = None if len(active) == b else active  # None: every image, no gathering
                d = inputs(rows)
                n = b if rows is None else len(rows)
                gens = generators if rows is None else [generators[k] for k in rows]
                x0_r = x0 if rows is None else x0.index_select(0, d["idx"])
                z_r = z_edit if rows is None else z_edit.index_select(0, d["idx"])
                v_delta = torch.zeros_like(x0_r)
                for _ in range(n_avg):
                    z_src = (1.0 - s_i) * x0_r + s_i * _noise(gens, x0.shape[1:], device)
                    z_tar = z_r + z_src - x0_r  # the source's noise offset applied to the edit
                    if shared:
                        v = velocity(torch.cat([z_src, z_tar]), s_i, d["pair_embeds"], d["pair_pooled"],
                                     d["pair_guidance"], d["pair_cond"], context="ode" + d["key"])  # fmt: skip
                        v_src, v_tar = v[:n], v[n:]
                    else:
                        v_src = velocity(z_src, s_i, d["src_embeds"], d["src_pooled"], d["src_guidance"],
                                         d["cond"], context="ode-src" + d["key"])  # fmt: skip
                        v_tar = velocity(z_tar, s_i, d["tar_embeds"], d["tar_pooled"], d["tar_guidance"],
                                         d["cond"], context="ode-tar" + d["key"])  # fmt: skip
                    v_delta += (v_tar - v_src) / n_avg
                if rows is None:
                    z_edit = z_edit + (s_next - s_i) * v_delta
                else:
                    z_edit = z_edit.index_copy(0, d["idx"], z_r + (s_next - s_i) * v_delta)
            else:  # tail: plain Euler sampling with the target prompt from the re-noised edit
                # every image is in the tail (n_min <= its n_max), so the tail always has all rows
                if x_tar is None:
                    x_src_t = (1.0 - s_i) * x0 + s_i * _noise(generators, x0.shape[1:], device)
                    x_tar = z_edit + x_src_t - x0
                v = velocity(x_tar, s_i, tar_embeds, tar_pooled, tar_guidance_b, cond, context="tail")
                x_tar = x_tar + (s_next - s_i) * v
    finally:
        if cached:  # the residuals of this batch are dead weight now (device memory, in cpu-offload too)
            _reset_cache(transformer)
    return unpack_latents(x_tar if x_tar is not None else z_edit, h, w)
