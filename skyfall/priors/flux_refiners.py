"""Diffusion refiners on FLUX.1-dev: FlowEdit (the paper's) and SDEdit (its ablation).

Both implement :class:`skyfall.priors.refine.ImageRefiner`: images [B, 3, H, W] in [0, 1] plus one
seed per image -> refined images of the same shape. A seed alone determines its image's noise (and,
with ``n_max_end != -1``, its n_max), whatever the batch grouping or device, so a fixed seed
reproduces its sample and different seeds give the "multi-sample diffusion" of Stage 2.

Differences from the reference (Skyfall-GS ``train.py`` with ``jayin92/FlowEdit`` ``idu_refine.py``),
performance only: the model is loaded once and kept across calls (episodes; the reference reloads
it every episode), prompts are encoded once and cached (then the text encoders are freed), the
source and target velocities share one transformer call, several images may share a call
(``batch_size``), and the compute dtype is an option (bf16 default; the reference used fp16 under
autocast). Inputs stay float (the reference quantised renders to 8-bit PNGs and back).

Batching: the images of one refine() call are ordered by n_max and cut into chunks of at most
``batch_size``, each chunk one :func:`skyfall.priors.flowedit.flowedit_latents` run in which images of
different n_max join at their own first step; the cut minimises the chunks' summed largest n_max (the
number of transformer calls). The VAE encodes and decodes one image at a time. ``batch_size`` 1
refines the images one by one, as before.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from skyfall.config.priors import FlowEditConfig, SDEditConfig
from skyfall.errors import ConfigError
from skyfall.priors.flowedit import flowedit_latents
from skyfall.priors.flux import FluxModel
from skyfall.priors.guidance import RefineGuidance


class _FluxRefiner:
    """Shared refine() plumbing: seeds, per-image n_max, grouping into batches, VAE encode/decode."""

    cfg: FlowEditConfig | SDEditConfig

    def __init__(self, model: FluxModel):
        self.model = model
        self._next_seed = self.cfg.seed

    def n_max_for(self, seed: int) -> int:
        """The n_max of the image with this seed."""
        raise NotImplementedError

    def _edit(
        self, latents: Tensor, generators: list[torch.Generator], n_max: int | list[int], extra: Any = None
    ) -> Tensor:
        """Edit one chunk's latents (``n_max``: one value, or one per image when they differ); ``extra`` is
        `_chunk_inputs`' value for the chunk."""
        raise NotImplementedError

    def _conditions(self, guidance: RefineGuidance | None, images: Tensor) -> Any:
        """What a conditioned refiner reads from ``guidance`` for the whole batch (checked); None here."""
        return None

    def _chunk_inputs(self, conditions: Any, chunk: list[int], images: Tensor) -> Any:
        """The per-chunk part of `_conditions`' value, handed to `_edit`; None here."""
        return None

    def _on_device(self) -> contextlib.AbstractContextManager:
        """The modules a refinement needs, held on the compute device."""
        return self.model.on_device()

    @torch.no_grad()
    def refine(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        cameras=None,  # noqa: ANN001
        guidance: RefineGuidance | None = None,
    ) -> Tensor:
        """Refine images [B, 3, H, W] in [0, 1] (H, W multiples of 16) -> [B, 3, H, W] in [0, 1].

        Args:
            images: renders to refine (any device/float dtype; the result matches it).
            seeds: one seed per image; None = consecutive seeds from ``cfg.seed`` on, continuing across
                calls.
            cameras: unused (pose-free refiners).
            guidance: what a conditioned refiner's ``wants`` names (unconditioned ones ignore it).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        b = images.shape[0]
        conditions = self._conditions(guidance, images)
        if seeds is None:
            seeds = list(range(self._next_seed, self._next_seed + b))
            self._next_seed += b
        seeds = [int(s) for s in seeds]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} images")
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        n_maxes = [self.n_max_for(s) for s in seeds]
        with self._on_device():
            for chunk in chunk_by_n_max(n_maxes, max(1, self.cfg.batch_size)):
                # the VAE one image at a time: batching it saves little (its 1024^2 convolutions fill a GPU
                # alone) while its activations grow with the batch (GBs per image at 1024^2)
                lat = torch.cat([self.model.encode_images(images[k : k + 1]) for k in chunk])
                gens = [torch.Generator().manual_seed(seeds[k]) for k in chunk]
                extra = self._chunk_inputs(conditions, chunk, images)
                own = [n_maxes[k] for k in chunk]
                edited = self._edit(lat, gens, own[0] if len(set(own)) == 1 else own, extra)
                for j, k in enumerate(chunk):
                    out[k] = self.model.decode_latents(edited[j : j + 1])[0].to(images.device)
        return out.to(images.dtype)

    def close(self) -> None:
        """Free the model (GPU memory); the refiner is unusable afterwards."""
        self.model.release()


def chunk_by_n_max(n_maxes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Image indices in chunks of at most ``batch_size``, ordered by (n_max, index), cut where the summed
    largest n_max of the chunks (what their transformer calls grow with) is least.

    A chunk's images run together for the steps of its largest n_max, so sorted runs of equal n_max are
    kept together unless one mixed chunk costs less (dynamic programme over the sorted order, in which
    contiguous chunks are optimal). ``batch_size`` 1: one image per chunk, in (n_max, index) order.
    """
    order = sorted(range(len(n_maxes)), key=lambda k: (n_maxes[k], k))
    n = len(order)
    best = [math.inf] * n + [0]  # best[i]: least cost of chunking the sorted images i..n-1
    take = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        for length in range(1, min(batch_size, n - i) + 1):
            # sorted: a chunk's largest n_max is its last; ties go to the longer chunk, so with one n_max
            # the chunks are full ones and then the rest, as plain slicing would give
            cost = n_maxes[order[i + length - 1]] + best[i + length]
            if cost <= best[i]:
                best[i], take[i] = cost, length
    chunks, i = [], 0
    while i < n:
        chunks.append(order[i : i + take[i]])
        i += take[i]
    return chunks


class FlowEditRefiner(_FluxRefiner):
    """FlowEdit on FLUX.1-dev with the paper's settings (T=28, n_min=4, n_max ~ U{4..10}, 1.5/5.5).

    Args:
        cfg: the options; None = :class:`FlowEditConfig` defaults.
        model: an already loaded :class:`FluxModel` (holding both prompts); None = load from
            ``cfg.model_id`` (missing weights raise ``WeightsNotFoundError``).
    """

    def __init__(self, cfg: FlowEditConfig | None = None, *, model: FluxModel | None = None):
        self.cfg = cfg = cfg or FlowEditConfig()
        if not 0 <= cfg.n_min <= cfg.n_max <= cfg.T_steps:
            raise ConfigError(
                f"flowedit: need 0 <= n_min ({cfg.n_min}) <= n_max ({cfg.n_max}) <= T_steps ({cfg.T_steps})"
            )
        if cfg.n_max_end != -1 and not cfg.n_min <= cfg.n_max_end <= cfg.T_steps:
            raise ConfigError(f"flowedit: n_max_end ({cfg.n_max_end}) must be -1 or in [n_min, T_steps]")
        if cfg.n_avg < 1:
            raise ConfigError(f"flowedit: n_avg ({cfg.n_avg}) must be >= 1")
        prompts = [cfg.source_prompt, cfg.target_prompt]
        super().__init__(model or FluxModel.load(cfg, prompts, option="--stage2.flowedit.device"))

    def n_max_for(self, seed: int) -> int:
        """Fixed ``n_max``, or drawn from U{n_min..n_max_end} by the image's seed (paper scripts)."""
        if self.cfg.n_max_end == -1:
            return self.cfg.n_max
        # a stream separate from the noise generator's, so the draw does not shift the noise
        return random.Random(f"n_max:{seed}").randint(self.cfg.n_min, self.cfg.n_max_end)

    def _edit(
        self, latents: Tensor, generators: list[torch.Generator], n_max: int | list[int], extra: Any = None
    ) -> Tensor:
        """FlowEdit from the render; ``extra``, from a conditioned subclass's `_chunk_inputs`, is the
        chunk's (target prompt embedding, control latents or None) in place of the plain target prompt."""
        c = self.cfg
        target, control = extra if extra is not None else (self.model.prompt(c.target_prompt), None)
        return flowedit_latents(
            self.model.transformer, latents, self.model.prompt(c.source_prompt), target, generators,
            T_steps=c.T_steps, n_max=n_max, n_min=c.n_min, n_avg=c.n_avg, src_guidance=c.src_guidance,
            tar_guidance=c.tar_guidance, scheduler_config=self.model.scheduler_config, dtype=self.model.dtype,
            control=control,
        )  # fmt: skip


class SDEditRefiner(_FluxRefiner):
    """SDEdit on FLUX.1-dev: noise the render to sigma at step T - n_steps, then sample with the target prompt.

    This is FlowEdit's tail alone (n_max = n_min = n_steps), the ablation of the paper.
    """

    def __init__(self, cfg: SDEditConfig | None = None, *, model: FluxModel | None = None):
        self.cfg = cfg = cfg or SDEditConfig()
        if not 0 <= cfg.n_steps <= cfg.T_steps:
            raise ConfigError(f"sdedit: need 0 <= n_steps ({cfg.n_steps}) <= T_steps ({cfg.T_steps})")
        super().__init__(model or FluxModel.load(cfg, [cfg.target_prompt], option="--stage2.sdedit.device"))

    def n_max_for(self, seed: int) -> int:
        return self.cfg.n_steps

    def _edit(
        self, latents: Tensor, generators: list[torch.Generator], n_max: int | list[int], extra: Any = None
    ) -> Tensor:
        c = self.cfg
        assert isinstance(n_max, int)  # n_max_for is constant: every chunk has one n_max
        tar = self.model.prompt(c.target_prompt)
        # the source prompt is never evaluated when n_max == n_min; the target stands in for it
        return flowedit_latents(
            self.model.transformer, latents, tar, tar, generators, T_steps=c.T_steps, n_max=n_max,
            n_min=n_max, tar_guidance=c.guidance, scheduler_config=self.model.scheduler_config,
            dtype=self.model.dtype,
        )  # fmt: skip
