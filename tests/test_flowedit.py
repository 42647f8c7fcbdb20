"""FlowEdit / SDEdit on a tiny random FLUX.1-dev-shaped pipeline built offline (CPU, fp32).

The batched loop (source + target rows in one call, several images per call) is checked against a
plain per-image implementation of FlowEdit's algorithm (Kulikov et al. 2024, ``FlowEditFLUX``) written here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip(
    "transformers", minversion="5"
)  # the tiny tokenizers are built in memory (transformers 5)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT  # noqa: E402

from skyfall.errors import ConfigError, MissingDependencyError  # noqa: E402
from skyfall.priors.flowedit import (  # noqa: E402
    flowedit_latents,
    image_ids,
    num_transformer_calls,
    pack_latents,
    shifted_sigmas,
    unpack_latents,
)
from skyfall.priors.hub import WeightsNotFoundError  # noqa: E402
from skyfall.priors.refine import IdentityRefiner, ImageRefiner, make_refiner  # noqa: E402

SRC, TAR = FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT


@pytest.fixture(scope="module")
def tiny_model(tiny_flux_dir, tmp_path_factory: pytest.TempPathFactory):
    from skyfall.config.priors import FluxConfig
    from skyfall.priors.flux import FluxModel

    cfg = FluxConfig(
        model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32", max_sequence_length=64,
        prompt_cache_dir=str(tmp_path_factory.mktemp("prompt_cache")),
    )  # fmt: skip
    return FluxModel.load(cfg, [SRC, TAR])


def _opts(tiny_flux_dir, **kw) -> dict:
    base = dict(model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32",
                max_sequence_length=64, source_prompt=SRC, target_prompt=TAR, prompt_cache_dir="")  # fmt: skip
    return {**base, **kw}


def _reference_flowedit(transformer, x_src, src, tar, seed, *, T, n_max, n_min, n_avg, g_src, g_tar, sched):  # noqa: ANN001
    """One image, unbatched: two separate transformer calls per ODE step, as the notes' pseudo-code."""
    gen = torch.Generator().manual_seed(seed)
    _, _, h, w = x_src.shape
    x0 = pack_latents(x_src)
    ids, txt = image_ids(h, w), torch.zeros(src.embeds.shape[1], 3)
    sig = shifted_sigmas(T, x0.shape[1], sched)

    def v(z, t, p, g):  # noqa: ANN001, ANN202
        return transformer(hidden_states=z, timestep=torch.tensor([float(t)]), guidance=torch.tensor([g]),
                           pooled_projections=p.pooled, encoder_hidden_states=p.embeds, txt_ids=txt,
                           img_ids=ids, return_dict=False)[0]  # fmt: skip

    z = x0.clone()
    xt = None
    for i in range(T):
        if T - i > n_max:
            continue
        t, tn = sig[i], sig[i + 1]
        if T - i > n_min:
            vd = torch.zeros_like(x0)
            for _ in range(n_avg):
                eps = torch.randn(x0.shape[1:], generator=gen)[None]
                zs = (1 - t) * x0 + t * eps
                zt = z + zs - x0
                vd = vd + (v(zt, t, tar, g_tar) - v(zs, t, src, g_src)) / n_avg
            z = z + (tn - t) * vd
        else:
            if xt is None:
                eps = torch.randn(x0.shape[1:], generator=gen)[None]
                xt = z + ((1 - t) * x0 + t * eps) - x0
            xt = xt + (tn - t) * v(xt, t, tar, g_tar)
    return unpack_latents(z if xt is None else xt, h, w)


def test_packing_ids_and_sigmas_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from skyfall.priors.tiny import FLUX_DEV_SCHEDULER

    x = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 12), x)
    assert torch.equal(FluxPipeline._unpack_latents(pack_latents(x), 64, 96, 8), x)  # 64x96 px, scale 8
    assert torch.equal(
        image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    )
    schnell = dict(FLUX_DEV_SCHEDULER, use_dynamic_shifting=False, shift=1.0)
    for cfg, seq in (
        (FLUX_DEV_SCHEDULER, 4096),
        (FLUX_DEV_SCHEDULER, 1024),
        (FLUX_DEV_SCHEDULER, 16),
        (schnell, 16),
    ):
        sched = FlowMatchEulerDiscreteScheduler(**cfg)
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = 0.5 + slope * (seq - 256) if cfg["use_dynamic_shifting"] else None
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
        assert torch.allclose(shifted_sigmas(28, seq, cfg), sched.sigmas.float(), atol=1e-6), (cfg, seq)
    s = shifted_sigmas(28, 4096)  # 1024^2: the edit starts at 0.637 (n_max 10), the tail at 0.345 (n_min 4)
    assert abs(float(s[18]) - 0.637) < 1e-3 and abs(float(s[24]) - 0.345) < 1e-3


@pytest.mark.parametrize(
    "n_max,n_min,n_avg",
    [(10, 4, 1), (6, 0, 2), (4, 4, 1), (28, 0, 1), (7, 5, 3)],
    ids=["paper", "ode-only-avg2", "sdedit", "from-noise", "avg3"],
)
def test_batched_loop_equals_plain_unbatched_math(tiny_model, n_max: int, n_min: int, n_avg: int):
    m = tiny_model
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    seeds = [11, 12, 13]
    src, tar = m.prompt(SRC), m.prompt(TAR)
    kw = dict(T_steps=28, n_max=n_max, n_min=n_min, n_avg=n_avg, src_guidance=1.5, tar_guidance=5.5)
    out = flowedit_latents(m.transformer, x, src, tar, [torch.Generator().manual_seed(s) for s in seeds],
                           scheduler_config=m.scheduler_config, **kw)  # fmt: skip
    with torch.no_grad():
        ref = torch.cat([
            _reference_flowedit(m.transformer, x[k : k + 1], src, tar, s, T=28, n_max=n_max, n_min=n_min,
                                n_avg=n_avg, g_src=1.5, g_tar=5.5, sched=m.scheduler_config)
            for k, s in enumerate(seeds)
        ])  # fmt: skip
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= 1e-5
    assert float((out - x).abs().mean()) > 1e-3  # it did edit


def test_n_max_zero_is_identity_and_call_count(tiny_model):
    m = tiny_model
    x = torch.randn(2, 16, 8, 8)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    src, tar = m.prompt(SRC), m.prompt(TAR)
    assert torch.equal(flowedit_latents(m.transformer, x, src, tar, gens, n_max=0, n_min=0), x)

    calls: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):  # noqa: ANN001
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):  # noqa: ANN003, ANN202
            calls.append(kw["hidden_states"].shape[0])
            return self.inner(**kw)

    flowedit_latents(Counting(m.transformer), x, src, tar, gens, n_max=10, n_min=4, n_avg=2)
    assert len(calls) == num_transformer_calls(10, 4, 2) == 2 * 6 + 4
    assert calls == [4] * 12 + [2] * 4  # src+tar rows of 2 images, then target-only tail rows

    with pytest.raises(ValueError):
        flowedit_latents(m.transformer, x, src, tar, gens, n_max=3, n_min=4)


def test_refiner_end_to_end_equals_reference_and_seeds_reproduce(tiny_flux_dir, tiny_model):
    r = make_refiner(
        "flowedit", model=tiny_model, **_opts(tiny_flux_dir, n_max=8, n_max_end=-1, batch_size=2)
    )
    assert isinstance(r, ImageRefiner)
    imgs = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    imgs[2] = imgs[0]
    out = r.refine(imgs, seeds=[5, 6, 5])
    assert out.shape == imgs.shape and out.dtype == imgs.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.allclose(
        out[0], out[2], atol=1e-5
    )  # same seed, same image -> same sample (batch position aside)
    assert float((out[0] - out[1]).abs().max()) > 1e-4  # different seeds -> different samples
    # one image at a time (different grouping) gives the same sample for a seed
    assert torch.allclose(r.refine(imgs[1:2], seeds=[6]), out[1:2], atol=1e-5)
    # equals decode(reference(encode(image)))
    m = tiny_model
    with torch.no_grad():
        lat = m.encode_images(imgs[:1])
        ref = _reference_flowedit(m.transformer, lat, m.prompt(SRC), m.prompt(TAR), 5, T=28, n_max=8, n_min=4,
                                  n_avg=1, g_src=1.5, g_tar=5.5, sched=m.scheduler_config)  # fmt: skip
        assert torch.allclose(m.decode_latents(ref), out[:1], atol=1e-5)
    # without seeds: consecutive seeds from cfg.seed, continuing across calls
    r2 = make_refiner("flowedit", model=tiny_model, **_opts(tiny_flux_dir, n_max=8, n_max_end=-1, seed=5))
    a = r2.refine(imgs[:1])
    b = r2.refine(imgs[1:2])
    assert torch.allclose(a, out[:1], atol=1e-5) and torch.allclose(b, out[1:2], atol=1e-5)


def test_n_max_drawn_per_seed(tiny_flux_dir, tiny_model):
    r = make_refiner("flowedit", model=tiny_model, **_opts(tiny_flux_dir))  # paper: n_min 4, n_max ~ U{4..10}
    draws = [r.n_max_for(s) for s in range(200)]
    assert set(draws) == set(range(4, 11))
    assert draws == [r.n_max_for(s) for s in range(200)]
    fixed = make_refiner("flowedit", model=tiny_model, **_opts(tiny_flux_dir, n_max_end=-1, n_max=7))
    assert {fixed.n_max_for(s) for s in range(20)} == {7}
    imgs = torch.rand(4, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    out = r.refine(imgs, seeds=[0, 1, 2, 3])  # mixed n_max values -> several groups
    for k in range(4):
        assert torch.allclose(r.refine(imgs[k : k + 1], seeds=[k]), out[k : k + 1], atol=1e-5)


def test_sdedit_is_the_flowedit_tail(tiny_flux_dir, tiny_model):
    s = make_refiner("sdedit", model=tiny_model, model_id=str(tiny_flux_dir), device="cpu", dtype="float32",
                     n_steps=5, target_prompt=TAR)  # fmt: skip
    f = make_refiner("flowedit", model=tiny_model, **_opts(tiny_flux_dir, n_max=5, n_min=5, n_max_end=-1))
    imgs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a, b = s.refine(imgs, seeds=[1, 2]), f.refine(imgs, seeds=[1, 2])
    assert torch.allclose(a, b, atol=1e-6)
    assert float((a - imgs).abs().mean()) > 1e-3


def test_bf16_runs_and_keeps_shape(tiny_flux_dir):
    r = make_refiner("flowedit", **_opts(tiny_flux_dir, dtype="bfloat16"))
    assert r.model.transformer.dtype == torch.bfloat16
    imgs = torch.rand(1, 3, 32, 32)
    out = r.refine(imgs, seeds=[0])
    assert out.shape == imgs.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_prompt_cache_matches_pipeline_and_skips_text_encoders(tiny_flux_dir, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from skyfall.config.priors import FluxConfig
    from skyfall.priors.flux import PromptEncoder

    cfg = FluxConfig(model_id=str(tiny_flux_dir), local_files_only=True, device="cpu", dtype="float32",
                     max_sequence_length=64, prompt_cache_dir=str(tmp_path))  # fmt: skip
    first = PromptEncoder(cfg, torch.device("cpu"), torch.float32).encode([TAR])[TAR]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), local_files_only=True)
    with torch.no_grad():
        emb, pooled, _ = pipe.encode_prompt(TAR, prompt_2=None, device="cpu", max_sequence_length=64)
    assert torch.allclose(first.embeds, emb, atol=1e-6) and torch.allclose(first.pooled, pooled, atol=1e-6)
    # second time: read from disk, the text encoders are never loaded
    monkeypatch.setattr(PromptEncoder, "_load", lambda self: pytest.fail("text encoders loaded"))
    again = PromptEncoder(cfg, torch.device("cpu"), torch.float32).encode([TAR])[TAR]
    assert torch.equal(again.embeds, first.embeds) and torch.equal(again.pooled, first.pooled)


def test_missing_weights_one_actionable_error(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        make_refiner("flowedit", model_id="black-forest-labs/FLUX.1-dev", local_files_only=True, device="cpu",
                     dtype="float32", cache_dir=str(tmp_path / "hf"))  # fmt: skip
    msg = str(e.value)
    assert isinstance(e.value, MissingDependencyError)
    assert "black-forest-labs/FLUX.1-dev" in msg and str(tmp_path / "hf") in msg
    assert "hf auth login" in msg and "\n" not in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_refiner("flowedit", model_id=str(tmp_path / "no-such-dir"), device="cpu", dtype="float32")


def test_factory_errors():
    assert isinstance(make_refiner("identity"), IdentityRefiner)
    with pytest.raises(ConfigError, match="unknown refiner"):
        make_refiner("ideal-ish")
    with pytest.raises(ConfigError, match="n_maxx"):
        make_refiner("flowedit", n_maxx=3)
    with pytest.raises(ConfigError, match="n_max_end"):
        make_refiner("flowedit", n_max_end=2)  # < n_min
    with pytest.raises(ConfigError, match="no CUDA GPU") if not torch.cuda.is_available() else _nothing():
        from skyfall.devices import resolve_device

        resolve_device("cuda")


def test_quantisation_needs_its_package(tiny_flux_dir):
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao installed")
    with pytest.raises(MissingDependencyError, match="pip install torchao"):
        make_refiner("flowedit", **_opts(tiny_flux_dir, quantization="fp8"))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> bool:
        return False


def test_bench_script_prints_json_lines():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_flowedit.py"
    out = subprocess.run(
        [sys.executable, str(script), "--random-weights", "--tiny", "--size", "32", "--modes", "gpu,nf4", "--warmup", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["what"], r["mode"]) for r in rows][:2] == [("flowedit", "gpu"), ("flowedit", "nf4")]
    for r in rows:
        assert {"what", "mode", "device", "size", "seconds", "peak_mem_mb"} <= set(r)
    assert rows[0]["seconds"] > 0 and rows[0]["finite"] and rows[0]["transformer_calls"] == 10
    assert rows[1]["seconds"] is None and "skipped" in rows[1]
    assert any(r["what"] == "depth-anything-tiny" and r["seconds"] > 0 for r in rows)
