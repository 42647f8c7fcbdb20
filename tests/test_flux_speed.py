"""Refiner speed options on tiny random FLUX stand-ins (CPU, fp32): batching, regional compile, attention
backends, First Block Cache and the fp8-dynamic gate.

Every option is off by default and then changes nothing: the default loop is compared bit for bit with a
frozen copy of the loop as it was before the options existed. Batched refinements are compared with the
same images refined one by one (equal to float rounding: on a CPU a 1-row matmul takes a matrix-vector
kernel whose summation order differs from the matrix-matrix one, so bitwise equality is not reachable).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers", minversion="5")  # the tiny tokenizers are built in memory

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT  # noqa: E402
from PIL import Image  # noqa: E402

from skyfall.config.priors import FlowEditConfig, Top2GroundConfig  # noqa: E402
from skyfall.errors import ConfigError, MissingDependencyError  # noqa: E402
from skyfall.priors.flowedit import (  # noqa: E402
    flowedit_latents,
    image_ids,
    num_transformer_calls,
    pack_latents,
    shifted_sigmas,
    unpack_latents,
)
from skyfall.priors.refine import RefineGuidance  # noqa: E402

SRC, TAR = FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT
# Batched vs one-by-one in fp32 (measured: at most ~1e-6 on latents and decoded images)
BATCH_TOL = 1e-5


def _cfg(tiny_flux_dir: Path, **kw) -> FlowEditConfig:
    base = dict(model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32",
                max_sequence_length=64, source_prompt=SRC, target_prompt=TAR, prompt_cache_dir="")  # fmt: skip
    return FlowEditConfig(**{**base, **kw})


def _refiner(tiny_flux_dir: Path, **kw):  # noqa: ANN202
    from skyfall.priors.flux_refiners import FlowEditRefiner

    return FlowEditRefiner(_cfg(tiny_flux_dir, **kw))


@pytest.fixture(scope="module")
def plain(tiny_flux_dir: Path):  # noqa: ANN201
    """A refiner with every option at its default (the model is shared by tests that leave it as it is)."""
    return _refiner(tiny_flux_dir, n_max=10, n_max_end=-1)


def _images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# --------------------------------------------------------------------------------------------------
# the default path is the loop as it was
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _loop_before(transformer, x_src, src, tar, generators, *, T_steps, n_max, n_min, n_avg, src_guidance,  # noqa: ANN001, ANN202
                 tar_guidance, scheduler_config, control=None):  # fmt: skip
    """``flowedit_latents`` as it was before batching with per-image n_max and cache contexts (frozen)."""
    b, _, h, w = x_src.shape
    device, dtype = x_src.device, next(transformer.parameters()).dtype
    x0 = pack_latents(x_src.float())
    sigmas = shifted_sigmas(T_steps, x0.shape[1], scheduler_config).tolist()
    ids, txt_ids = image_ids(h, w, device), {}

    def velocity(z, sigma, embeds, pooled, guidance, ctrl=None):  # noqa: ANN001, ANN202
        n, L = z.shape[0], embeds.shape[1]
        txt_ids.setdefault(L, torch.zeros(L, 3, device=device))
        x = z if ctrl is None else torch.cat([z, ctrl], dim=2)
        return transformer(hidden_states=x.to(dtype), timestep=torch.full((n,), sigma, device=device, dtype=dtype),
                           guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                           txt_ids=txt_ids[L], img_ids=ids, return_dict=False)[0].float()  # fmt: skip

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in generators])

    cond = None if control is None else pack_latents(control.to(device, torch.float32))
    s_, t_ = src.to(device, dtype), tar.to(device, dtype)
    src_embeds, src_pooled = s_.embeds.expand(b, -1, -1), s_.pooled.expand(b, -1)
    tar_embeds, tar_pooled = t_.embeds.expand(b, -1, -1), t_.pooled.expand(b, -1)
    src_guidance_b = torch.full((b,), src_guidance, device=device)
    tar_guidance_b = torch.full((b,), tar_guidance, device=device)
    shared = src_embeds.shape[1] == tar_embeds.shape[1]
    if shared:
        pair_embeds, pair_pooled = torch.cat([src_embeds, tar_embeds]), torch.cat([src_pooled, tar_pooled])
        pair_guidance = torch.tensor([src_guidance] * b + [tar_guidance] * b, device=device)
        pair_cond = None if cond is None else torch.cat([cond, cond])
    z_edit, x_tar = x0.clone(), None
    for i in range(T_steps - n_max, T_steps):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        if T_steps - i > n_min:
            v_delta = torch.zeros_like(x0)
            for _ in range(n_avg):
                z_src = (1.0 - s_i) * x0 + s_i * noise()
                z_tar = z_edit + z_src - x0
                if shared:
                    v = velocity(
                        torch.cat([z_src, z_tar]), s_i, pair_embeds, pair_pooled, pair_guidance, pair_cond
                    )
                    v_src, v_tar = v[:b], v[b:]
                else:
                    v_src = velocity(z_src, s_i, src_embeds, src_pooled, src_guidance_b, cond)
                    v_tar = velocity(z_tar, s_i, tar_embeds, tar_pooled, tar_guidance_b, cond)
                v_delta += (v_tar - v_src) / n_avg
            z_edit = z_edit + (s_next - s_i) * v_delta
        else:
            if x_tar is None:
                x_src_t = (1.0 - s_i) * x0 + s_i * noise()
                x_tar = z_edit + x_src_t - x0
            x_tar = x_tar + (s_next - s_i) * velocity(
                x_tar, s_i, tar_embeds, tar_pooled, tar_guidance_b, cond
            )
    return unpack_latents(x_tar if x_tar is not None else z_edit, h, w)


@pytest.mark.parametrize(
    "n_max,n_min,n_avg,split",
    [(10, 4, 1, False), (7, 5, 2, False), (6, 0, 1, True), (4, 4, 1, True)],
    ids=["paper", "avg2", "ode-only-two-calls", "sdedit-two-calls"],
)
def test_default_loop_is_bit_identical_to_the_loop_before(plain, n_max, n_min, n_avg, split):
    m = plain.model
    x = torch.randn(3, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    src, tar = m.prompt(SRC), m.prompt(TAR)
    if split:  # target embedding of another length: the source and target rows run as two calls
        from skyfall.priors.flowedit import PromptEmbedding

        tar = PromptEmbedding(torch.cat([tar.embeds, tar.embeds[:, :5]], dim=1), tar.pooled)
    kw = dict(T_steps=28, n_max=n_max, n_min=n_min, n_avg=n_avg, src_guidance=1.5, tar_guidance=5.5,
              scheduler_config=m.scheduler_config)  # fmt: skip
    seeds = [3, 4, 5]
    new = flowedit_latents(
        m.transformer, x, src, tar, [torch.Generator().manual_seed(s) for s in seeds], **kw
    )
    old = _loop_before(m.transformer, x, src, tar, [torch.Generator().manual_seed(s) for s in seeds], **kw)
    assert torch.equal(new, old)


def test_default_options_leave_the_transformer_untouched_and_the_refiner_as_before(plain):
    m = plain.model
    tr = m.transformer
    assert not tr.is_cache_enabled
    for block in [*tr.transformer_blocks, *tr.single_transformer_blocks]:
        assert not hasattr(block, "_diffusers_hook")  # no cache hooks
        assert (
            block._compiled_call_impl is None and block.forward.__func__ is type(block).forward
        )  # not compiled
        assert block.attn.processor._attention_backend is None  # diffusers' own attention
    # refine() with the defaults (batch_size 1) is decode(old loop(encode(image))) bit for bit
    imgs = _images(2)
    out = plain.refine(imgs, seeds=[7, 8])
    for k, s in enumerate((7, 8)):
        lat = m.encode_images(imgs[k : k + 1])
        ref = _loop_before(tr, lat, m.prompt(SRC), m.prompt(TAR), [torch.Generator().manual_seed(s)], T_steps=28,
                           n_max=10, n_min=4, n_avg=1, src_guidance=1.5, tar_guidance=5.5,
                           scheduler_config=m.scheduler_config)  # fmt: skip
        assert torch.equal(out[k : k + 1], m.decode_latents(ref))


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------
def test_batch_with_per_image_n_max_equals_one_by_one_in_fewer_calls(plain):
    m = plain.model
    x = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    n_maxes, seeds = [4, 10, 7, 10], [11, 12, 13, 14]
    src, tar = m.prompt(SRC), m.prompt(TAR)
    rows: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):  # noqa: ANN003, ANN202
            rows.append(kw["hidden_states"].shape[0])
            return self.inner(**kw)

    kw = dict(n_min=4, scheduler_config=m.scheduler_config)
    out = flowedit_latents(Counting(m.transformer), x, src, tar,
                           [torch.Generator().manual_seed(s) for s in seeds], n_max=n_maxes, **kw)  # fmt: skip
    # images join at their own first step: steps 18-20 hold the two n_max-10 images, 21-23 add the
    # n_max-7 one, and the 4-step tail has all four (10 calls; one by one: 4 + 10 + 7 + 10 = 31)
    assert rows == [4, 4, 4, 6, 6, 6, 4, 4, 4, 4]
    assert len(rows) < sum(num_transformer_calls(n, 4) for n in n_maxes) == 31
    one = torch.cat([
        flowedit_latents(m.transformer, x[k : k + 1], src, tar, [torch.Generator().manual_seed(s)], n_max=n, **kw)
        for k, (n, s) in enumerate(zip(n_maxes, seeds, strict=True))
    ])  # fmt: skip
    diff = float((out - one).abs().max())
    assert diff <= BATCH_TOL, diff
    assert (
        torch.equal(out[0], x[0]) is False and float((out[0] - x[0]).abs().mean()) > 1e-3
    )  # n_max 4 edited too


def test_refiner_batches_mixed_n_max_and_matches_batch_one(tiny_flux_dir, plain):
    from skyfall.priors.flux_refiners import FlowEditRefiner, chunk_by_n_max

    assert chunk_by_n_max([4, 4, 4, 7, 7], 2) == [[0, 1], [2], [3, 4]]  # as grouping by n_max did
    assert chunk_by_n_max([7, 4, 9, 4], 4) == [[1, 3, 0, 2]]  # one mixed chunk: 9 steps, not 4 + 7 + 9
    assert chunk_by_n_max([9, 4, 6], 1) == [[1], [2], [0]]
    cfg = _cfg(tiny_flux_dir)  # the paper's n_max ~ U{4..10} per seed
    one = FlowEditRefiner(cfg, model=plain.model)
    many = FlowEditRefiner(_cfg(tiny_flux_dir, batch_size=4), model=plain.model)
    imgs, seeds = _images(6, seed=3), [0, 1, 2, 3, 4, 5]
    assert len({one.n_max_for(s) for s in seeds}) > 2
    a, b = one.refine(imgs, seeds=seeds), many.refine(imgs, seeds=seeds)
    diff = float((a - b).abs().max())
    assert diff <= BATCH_TOL, diff
    assert float((a - imgs).abs().mean()) > 1e-3


def test_top2ground_batch_equals_batch_one(tmp_path_factory: pytest.TempPathFactory):
    """The two-call path (Redux tokens lengthen the target prompt), per-image control latents and Redux
    tokens, mixed n_max: a batch of 3 equals the images refined one by one."""
    from skyfall.priors.flux import FluxModel
    from skyfall.priors.tiny import save_tiny_flux_control, save_tiny_redux
    from skyfall.priors.top2ground import ReduxEncoder, Top2GroundRefiner

    root = tmp_path_factory.mktemp("t2g")
    cfg = Top2GroundConfig(model_id=str(save_tiny_flux_control(root / "c")), redux_model_id=str(save_tiny_redux(root / "r")),
                           local_files_only=True, device="cpu", dtype="float32", max_sequence_length=64,
                           source_prompt=SRC, target_prompt=TAR, prompt_cache_dir="")  # fmt: skip
    model = FluxModel.load(cfg, [SRC, TAR])
    redux = ReduxEncoder.load(cfg, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    guide = RefineGuidance(
        height=30 * torch.rand(3, 32, 32, generator=g), satellite=torch.rand(3, 3, 40, 40, generator=g)
    )
    imgs, seeds = _images(3, seed=5), [1, 2, 6]
    single = Top2GroundRefiner(cfg, model=model, redux=redux)
    batched = Top2GroundRefiner(
        Top2GroundConfig(**{**cfg.__dict__, "batch_size": 3}), model=model, redux=redux
    )
    assert len({single.n_max_for(s) for s in seeds}) == 3
    a = torch.cat([
        single.refine(imgs[k : k + 1], seeds=[s], guidance=RefineGuidance(height=guide.height[k : k + 1],
                                                                          satellite=guide.satellite[k : k + 1]))
        for k, s in enumerate(seeds)
    ])  # fmt: skip
    b = batched.refine(imgs, seeds=seeds, guidance=guide)
    diff = float((a - b).abs().max())
    assert diff <= BATCH_TOL, diff


# --------------------------------------------------------------------------------------------------
# Stage 2 sends groups of (view, sample) pairs and resumes inside a group
# --------------------------------------------------------------------------------------------------
class _Recording:
    """Wraps a refiner, recording each call's seeds (and guidance)."""

    def __init__(self, inner, wants=frozenset()):  # noqa: ANN001
        self.inner, self.wants, self.calls = inner, wants, []

    def refine(self, images, *, seeds=None, cameras=None, guidance=None):  # noqa: ANN001, ANN201
        assert len(cameras) == len(images) == len(seeds)
        self.calls.append((list(seeds), guidance))
        return self.inner.refine(images, seeds=seeds, cameras=cameras) if self.inner else images.clone()


def _stage2_stub(root: Path, refiner, batch_size: int):  # noqa: ANN001, ANN202
    """The parts of IterativeDatasetUpdate that _refine_phase uses: 4 views x 2 samples of 32^2 renders."""
    import dataclasses

    from skyfall.config.training import Stage2Config
    from skyfall.data.cameras import Cameras, intrinsics_from_fov
    from skyfall.train.stage2 import Episode, IterativeDatasetUpdate

    views, reps = 4, 2
    ep = Episode(0, 85.0, 300.0, 60.0)
    (root / "idu" / ep.name / "render").mkdir(parents=True, exist_ok=True)
    for v in range(views):
        px = (np.random.default_rng(v).random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(px).save(root / "idu" / ep.name / "render" / f"{v:05d}.png")
    cfg2 = Stage2Config(refiner="flowedit")
    cfg2 = dataclasses.replace(cfg2, flowedit=dataclasses.replace(cfg2.flowedit, batch_size=batch_size))
    view_calls: list[int] = []

    def guidance(camera, view, wants):  # noqa: ANN001, ANN202
        view_calls.append(view)
        return RefineGuidance(
            height=torch.full((1, 32, 32), float(view)), satellite=torch.full((1, 3, 8, 8), view / 10)
        )

    stub = SimpleNamespace(
        cfg=SimpleNamespace(seed=0), cfg2=cfg2, progress=False, trainer=SimpleNamespace(device=torch.device("cpu")),
        episode_dir=lambda e: root / "idu" / e.name, refiner=lambda: refiner, guidance=guidance,
    )  # fmt: skip
    stub._refine_batch_size = lambda: IterativeDatasetUpdate._refine_batch_size(stub)
    n = views * reps
    cams = Cameras(
        torch.eye(4, dtype=torch.float64).repeat(n, 1, 1),
        intrinsics_from_fov(60.0, 32, 32).expand(n, 3, 3),
        32,
        32,
    )

    def run() -> None:
        IterativeDatasetUpdate._refine_phase(stub, ep, cams, [i // reps for i in range(n)])

    return run, root / "idu" / ep.name / "refine", view_calls


def test_stage2_refines_in_groups_and_resumes_inside_a_group(tmp_path: Path, tiny_flux_dir, plain):
    from skyfall.priors.flux_refiners import FlowEditRefiner
    from skyfall.train.stage2 import sample_seed

    refiner = FlowEditRefiner(_cfg(tiny_flux_dir, batch_size=3), model=plain.model)
    rec = _Recording(refiner)
    run, rdir, _ = _stage2_stub(tmp_path / "grouped", rec, batch_size=3)
    run()
    seeds = [sample_seed(0, 0, i) for i in range(8)]
    assert [c[0] for c in rec.calls] == [seeds[0:3], seeds[3:6], seeds[6:8]]
    grouped = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(rdir.glob("*.png"))}
    assert len(grouped) == 8
    # the same pairs one by one (batch_size 1, the default): the same images up to one 8-bit level
    rec1 = _Recording(FlowEditRefiner(_cfg(tiny_flux_dir), model=plain.model))
    run1, rdir1, _ = _stage2_stub(tmp_path / "single", rec1, batch_size=1)
    run1()
    assert [c[0] for c in rec1.calls] == [[s] for s in seeds]
    for name, img in grouped.items():
        assert np.abs(img - np.asarray(Image.open(rdir1 / name), dtype=np.int16)).max() <= 1
    # killed while writing the second group (00003 written, 00004 and 00005 not) and before the third
    mtimes = {p.name: p.stat().st_mtime_ns for p in rdir.glob("*.png")}
    for i in (4, 5, 6, 7):
        (rdir / f"{i:05d}.png").unlink()
    rec.calls.clear()
    run()
    assert [c[0] for c in rec.calls] == [[seeds[4], seeds[5], seeds[6]], [seeds[7]]]  # only the missing ones
    for name, img in grouped.items():
        now = np.asarray(Image.open(rdir / name), dtype=np.int16)
        assert np.abs(img - now).max() <= 1
        if int(name[:5]) < 4:
            assert (rdir / name).stat().st_mtime_ns == mtimes[name]  # finished images are not redone


def test_stage2_stacks_each_images_guidance_and_renders_it_once_per_view(tmp_path: Path):
    rec = _Recording(None, wants=frozenset({"height", "satellite"}))
    run, rdir, view_calls = _stage2_stub(tmp_path, rec, batch_size=3)
    run()
    assert view_calls == [0, 1, 2, 3]  # a view split across two groups is not recomputed
    views = [0, 0, 1, 1, 2, 2, 3, 3]
    for k, (seeds, g) in enumerate(rec.calls):
        want = views[3 * k : 3 * k + len(seeds)]
        assert g.height.shape == (len(seeds), 32, 32) and g.satellite.shape == (len(seeds), 3, 8, 8)
        assert [float(h[0, 0]) for h in g.height] == [float(v) for v in want]
        assert g.depth is None
    assert len(list(rdir.glob("*.png"))) == 8


# --------------------------------------------------------------------------------------------------
# regional compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["none", "first-block"])
def test_compile_blocks_runs_and_matches(tiny_flux_dir, plain, monkeypatch, cache):
    """Graph capture of every block (fullgraph) with the 'aot_eager' backend: inductor's C++ code
    generation takes about a minute per shape on this CPU (set SKYFALL_TEST_INDUCTOR=1 to use it)."""
    import os

    import skyfall.priors.flux as flux

    if os.environ.get("SKYFALL_TEST_INDUCTOR") != "1":
        monkeypatch.setattr(flux, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    r = _refiner(tiny_flux_dir, n_max=10, n_max_end=-1, compile="blocks", cache=cache, cache_threshold=0.0)
    tr = r.model.transformer
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    if cache == "none":  # diffusers' compile_repeated_blocks
        assert all(b._compiled_call_impl is not None for b in blocks)
    else:  # each block's forward, then the cache hooks around it
        assert tr.is_cache_enabled and all(b._compiled_call_impl is None for b in blocks)
    imgs = _images(2, seed=6)
    out = r.refine(imgs, seeds=[1, 2])
    diff = float((out - plain.refine(imgs, seeds=[1, 2])).abs().max())
    assert diff <= 1e-5, diff


# --------------------------------------------------------------------------------------------------
# attention backends
# --------------------------------------------------------------------------------------------------
def test_attention_backend_choice_and_errors(tiny_flux_dir, plain):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    imgs = _images(1, seed=7)
    base = plain.refine(imgs, seeds=[3])
    native = _refiner(tiny_flux_dir, n_max=10, n_max_end=-1, attention="native")
    assert all(
        b.attn.processor._attention_backend == "native" for b in native.model.transformer.transformer_blocks
    )
    assert torch.equal(native.refine(imgs, seeds=[3]), base)  # diffusers' default is PyTorch SDPA
    math_ = _refiner(tiny_flux_dir, n_max=10, n_max_end=-1, attention="_native_math")
    assert float((math_.refine(imgs, seeds=[3]) - base).abs().max()) <= 1e-5
    from skyfall.priors.refine import make_refiner

    kw = dict(model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32", max_sequence_length=64,
              source_prompt=SRC, target_prompt=TAR, prompt_cache_dir="")  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"--stage2\.flowedit\.attention 'flash-ish' is not an attention backend.*native"
    ):
        make_refiner("flowedit", attention="flash-ish", **kw)
    with pytest.raises(
        ConfigError, match=r"--stage2\.flowedit\.attention 'flash' is not available here.*flash-attn"
    ):
        make_refiner("flowedit", attention="flash", **kw)  # flash-attn is not installed
    with pytest.raises(
        ConfigError, match=r"--stage2\.flowedit\.attention '_native_cudnn' does not run on cpu"
    ):
        make_refiner("flowedit", attention="_native_cudnn", **kw)
    # a backend stays with its model: diffusers' process-wide default is left as it was
    assert _AttentionBackendRegistry._active_backend == default
    assert torch.equal(plain.refine(imgs, seeds=[3]), base)
    # Stage2Config.check says the same before anything runs
    from skyfall.config.training import Stage2Config

    cfg2 = Stage2Config(refiner="flowedit", flowedit=_cfg(tiny_flux_dir, attention="nope"), render_size=32)
    with pytest.raises(ConfigError, match=r"--stage2\.flowedit\.attention 'nope'"):
        cfg2.check()


# --------------------------------------------------------------------------------------------------
# First Block Cache
# --------------------------------------------------------------------------------------------------
def _decisions(refiner) -> list[bool]:  # noqa: ANN001
    """Record First Block Cache's per-call decision (True: the remaining blocks ran)."""
    tr = refiner.model.transformer
    hook = tr.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"]
    decide, log = hook._should_compute_remaining_blocks, []

    def logged(residual):  # noqa: ANN001, ANN202
        log.append(decide(residual))
        return log[-1]

    hook._should_compute_remaining_blocks = logged
    return log


def test_first_block_cache_effect_on_the_tiny_model(tiny_flux_dir, plain):
    """Threshold 0 never skips and gives the uncached output bit for bit (the hooks alone change nothing).
    On the tiny random model the first block's relative residual change between calls is above 0.25 at
    every call, so thresholds up to 0.25 skip nothing. Measured here (64^2, n_max 10, 4 images one by one:
    40 calls, of which the first call of each phase, 8, always runs; PSNR of the decoded images against
    the uncached ones): 0.3 skips 1 (59.9 dB), 0.5 skips 8 (45.8 dB, max abs diff 0.062), 1.0 skips 14
    (41.6 dB, 0.106; 12 of them tail calls, 2 in the ODE phase, whose fresh noise per step changes the
    first block's residual more), 2.0 skips all 32 skippable (38.0 dB). What a threshold does to
    FLUX.1-dev is a property of the real weights: measure it there (scripts/bench_flowedit.py --cache
    first-block --compare)."""
    imgs, seeds = _images(4, size=64, seed=8), [1, 2, 3, 4]
    base = plain.refine(imgs, seeds=seeds)
    measured = {}
    for t in (0.0, 0.5, 1.0):
        r = _refiner(tiny_flux_dir, n_max=10, n_max_end=-1, cache="first-block", cache_threshold=t)
        assert r.model.transformer.is_cache_enabled
        log = _decisions(r)
        out = r.refine(imgs, seeds=seeds)
        measured[t] = (log.count(False), len(log), _psnr(out, base), float((out - base).abs().max()))
    assert measured[0.0] == (0, 40, math.inf, 0.0)
    skipped = [measured[t][0] for t in (0.5, 1.0)]
    assert 0 < skipped[0] <= skipped[1] <= 4 * 8  # the first call of each phase of each image always runs
    assert 30 < measured[1.0][2] <= measured[0.5][2] < 80  # skipping more moves further from uncached
    print("first-block cache on the tiny model (skipped, calls, PSNR dB, max abs diff):", measured)


def test_cache_state_does_not_leak_between_batches(tiny_flux_dir):
    """Each flowedit_latents call starts from fresh cache state: refining an image after another gives
    the result of refining it alone."""
    r = _refiner(tiny_flux_dir, n_max=10, n_max_end=-1, cache="first-block", cache_threshold=1.0)
    imgs = _images(2, seed=9)
    alone = r.refine(imgs[1:], seeds=[5])
    r.refine(imgs[:1], seeds=[4])
    assert torch.equal(r.refine(imgs[1:], seeds=[5]), alone)
    states = (
        r.model.transformer.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"].state_manager
    )
    assert states._state_cache == {}  # reset after the batch: no residuals held


def test_option_values_are_checked(tiny_flux_dir):
    from skyfall.config.training import Stage2Config

    cfg2 = Stage2Config(
        refiner="flowedit", flowedit=_cfg(tiny_flux_dir, cache_threshold=-1.0), render_size=32
    )
    with pytest.raises(ConfigError, match=r"--stage2\.flowedit\.cache-threshold must be >= 0"):
        cfg2.check()
    with pytest.raises(ConfigError, match="cache"):
        _refiner(tiny_flux_dir, cache="teacache")


# --------------------------------------------------------------------------------------------------
# fp8 with float8 matmuls: the gate (no GPU here)
# --------------------------------------------------------------------------------------------------
def test_fp8_dynamic_is_gated_on_compute_capability(tiny_flux_dir, monkeypatch):
    import importlib.util

    from skyfall.config.training import Stage2Config
    from skyfall.priors import flux
    from skyfall.priors.refine import make_refiner

    with pytest.raises(
        ConfigError, match=r"--stage2\.flowedit\.quantization 'fp8-dynamic'.*compute capability >= 8\.9"
    ):
        make_refiner("flowedit", model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32",
                     quantization="fp8-dynamic", prompt_cache_dir="")  # fmt: skip
    cfg2 = Stage2Config(
        refiner="flowedit", flowedit=_cfg(tiny_flux_dir, quantization="fp8-dynamic"), render_size=32
    )
    with pytest.raises(ConfigError, match=r"--stage2\.flowedit\.quantization 'fp8-dynamic'"):
        cfg2.check()
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ConfigError, match=r"A100.*compute capability 8\.0.*'fp8' \(weight-only\)"):
        flux.check_float8_matmuls(cuda, "--stage2.flowedit.quantization")
    for cc in ((8, 9), (9, 0), (10, 0)):  # Ada, Hopper, Blackwell
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cc=cc: cc)
        flux.check_float8_matmuls(cuda)
    cfg = _cfg(tiny_flux_dir, quantization="fp8-dynamic", device="cuda")
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(MissingDependencyError, match="pip install torchao"):
            flux._quantization_config(cfg, torch.bfloat16, cuda)
    else:
        q = flux._quantization_config(cfg, torch.bfloat16, cuda)
        assert type(q.quant_type).__name__ == "Float8DynamicActivationFloat8WeightConfig"


def test_bench_script_measures_the_options_against_a_baseline():
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_flowedit.py"
    out = subprocess.run(
        [sys.executable, str(script), "--random-weights", "--tiny", "--size", "32", "--modes", "gpu,fp8-dynamic",
         "--warmup", "0", "--no-depth", "--batch-size", "2", "--compile", "blocks", "--compile-backend",
         "aot_eager", "--cache", "first-block", "--cache-threshold", "1.0", "--compare"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["gpu", "fp8-dynamic"]
    r = rows[0]
    assert r["batch_size"] == 2 and r["compile"] == "blocks" and r["cache"] == "first-block" and r["finite"]
    assert r["seconds"] > 0 and r["seconds_per_image"] == pytest.approx(r["seconds"] / 2, rel=1e-3)
    assert r["cache_calls"] == 10 and 0 <= r["cache_skipped"] <= 8  # calls with the first block only
    assert r["psnr_vs_baseline_db"] > 20 and r["max_abs_diff_vs_baseline"] >= 0
    assert rows[1]["seconds"] is None and "8.9" in rows[1]["skipped"]
