"""The top2ground refiner on tiny random FLUX.1-Depth-dev- and FLUX.1-Redux-shaped folders built offline (CPU, fp32).

Its two conditions are checked against diffusers' own pipelines on the same weights (FluxControlPipeline
for the control-latent transformer input and the sampling steps, FluxPriorReduxPipeline for the image
tokens); then the refiner: seeds, each condition switched off or changed, guidance errors, the registry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers", minversion="5")  # the tiny tokenizers are built in memory

import torch  # noqa: E402
from conftest import FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT  # noqa: E402

from skyfall.config.priors import Top2GroundConfig  # noqa: E402
from skyfall.errors import ConfigError, MissingDependencyError  # noqa: E402
from skyfall.priors.flowedit import flowedit_latents, pack_latents  # noqa: E402
from skyfall.priors.hub import WeightsNotFoundError  # noqa: E402
from skyfall.priors.refine import ImageRefiner, RefineGuidance, make_refiner  # noqa: E402

SRC, TAR = FLUX_SOURCE_PROMPT, FLUX_TARGET_PROMPT


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from skyfall.priors.tiny import save_tiny_flux, save_tiny_flux_control, save_tiny_redux

    root = tmp_path_factory.mktemp("top2ground")
    return {
        "control": save_tiny_flux_control(root / "tiny-flux-depth"),
        "redux": save_tiny_redux(root / "tiny-flux-redux"),
        "plain": save_tiny_flux(root / "tiny-flux"),
    }


def _cfg(dirs: dict, **kw) -> Top2GroundConfig:
    base = dict(model_id=str(dirs["control"]), redux_model_id=str(dirs["redux"]), local_files_only=True,
                device="cpu", dtype="float32", max_sequence_length=64, source_prompt=SRC, target_prompt=TAR,
                prompt_cache_dir="", n_max=6, n_max_end=-1)  # fmt: skip
    return Top2GroundConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model(dirs):  # noqa: ANN201
    from skyfall.priors.flux import FluxModel

    return FluxModel.load(_cfg(dirs), [SRC, TAR])


@pytest.fixture(scope="module")
def redux(dirs):  # noqa: ANN201
    from skyfall.priors.top2ground import ReduxEncoder

    return ReduxEncoder.load(_cfg(dirs), device=torch.device("cpu"), dtype=torch.float32)


def _refiner(dirs, model, redux, **kw):  # noqa: ANN001, ANN003, ANN202
    from skyfall.priors.top2ground import Top2GroundRefiner

    return Top2GroundRefiner(_cfg(dirs, **kw), model=model, redux=redux)


def _guidance(seed: int, b: int = 2, size: int = 32) -> RefineGuidance:
    g = torch.Generator().manual_seed(seed)
    depth = 50 + 200 * torch.rand(b, size, size, generator=g)
    depth[:, :4] = 0  # nothing rendered there
    sat = torch.randint(0, 256, (b, 3, 40, 40), generator=g).float() / 255
    return RefineGuidance(depth=depth, height=30 * torch.rand(b, size, size, generator=g), satellite=sat)


def _images(seed: int = 0, b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_control_image_normalisation():
    from skyfall.priors.top2ground import control_image

    depth = torch.tensor([[[0.0, 100.0], [200.0, 400.0]]])
    img = control_image(depth, "depth")
    assert img.shape == (1, 3, 2, 2) and torch.equal(img[:, 0], img[:, 2])
    disp = torch.tensor([1 / 100, 1 / 200, 1 / 400])
    expect = (disp - disp.min()) / (disp.max() - disp.min())  # near = bright, over rendered pixels
    assert torch.allclose(img[0, 0].flatten(), torch.cat([torch.zeros(1), expect]), atol=1e-6)
    height = torch.tensor([[[0.0, 5.0], [10.0, 20.0]]])
    assert torch.allclose(control_image(height, "height")[0, 1], height[0] / 20)
    assert torch.equal(control_image(torch.full((2, 4, 4), 7.0), "height"), torch.zeros(2, 3, 4, 4))
    assert torch.equal(control_image(torch.zeros(1, 4, 4), "depth"), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("steps", [1, 3])
def test_control_sampling_equals_flux_control_pipeline(dirs, model, steps: int):
    """n_max = n_min = T (sampling from pure noise with the target prompt) is FluxControlPipeline's loop."""
    from diffusers import FluxControlPipeline

    from skyfall.priors.top2ground import control_image

    pipe = FluxControlPipeline.from_pretrained(str(dirs["control"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = 64
    ctl_img = control_image(_guidance(1, b=1, size=size).height, "height")
    ctl = model.encode_images(ctl_img)
    with torch.no_grad():  # our control latents: the pipeline's preprocessing and VAE, posterior mode
        x = pipe.image_processor.preprocess(ctl_img, height=size, width=size)
        mode = pipe.vae.encode(x).latent_dist.mode()
    assert torch.allclose(
        ctl, (mode - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor, atol=1e-6
    )

    tar, seed = model.prompt(TAR), 7
    x0 = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    ours = flowedit_latents(model.transformer, x0, tar, tar, [torch.Generator().manual_seed(seed)], T_steps=steps,
                            n_max=steps, n_min=steps, tar_guidance=4.0, scheduler_config=model.scheduler_config,
                            control=ctl)  # fmt: skip
    noise = torch.randn(pack_latents(x0).shape[1:], generator=torch.Generator().manual_seed(seed))[None]
    with torch.no_grad():
        ref = pipe(prompt_embeds=tar.embeds, pooled_prompt_embeds=tar.pooled, control_image=pack_latents(ctl),
                   latents=noise, height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                   output_type="latent").images  # fmt: skip
    assert ref.shape == pack_latents(ours).shape
    assert float((pack_latents(ours) - ref).abs().max()) <= 1e-5
    # the control latents matter: without them the transformer would not even accept the input
    other = flowedit_latents(model.transformer, x0, tar, tar, [torch.Generator().manual_seed(seed)], T_steps=steps,
                             n_max=steps, n_min=steps, tar_guidance=4.0, scheduler_config=model.scheduler_config,
                             control=torch.zeros_like(ctl))  # fmt: skip
    assert float((other - ours).abs().max()) > 1e-4


def test_redux_tokens_equal_flux_prior_redux_pipeline(dirs, redux):
    from diffusers import FluxPriorReduxPipeline
    from PIL import Image

    from skyfall.priors.tiny import tiny_flux_components

    text = {k: v for k, v in tiny_flux_components().items() if k.startswith(("text_encoder", "tokenizer"))}
    pipe = FluxPriorReduxPipeline.from_pretrained(str(dirs["redux"]), local_files_only=True, **text)
    sat = _guidance(2).satellite
    ours = redux.tokens(sat)
    assert ours.shape == (2, 16, 32)  # 4x4 SigLIP patches, T5 width
    L = 5
    for i in range(2):
        pil = Image.fromarray((sat[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        with torch.no_grad():
            embeds, pooled = pipe(image=pil, prompt_embeds=torch.zeros(1, L, 32),
                                  pooled_prompt_embeds=torch.zeros(1, 32), return_dict=False)  # fmt: skip
        assert embeds.shape == (1, L + 16, 32)
        assert torch.allclose(ours[i], embeds[0, L:], atol=1e-6)


def test_target_embedding_appends_weighted_tokens(dirs, model, redux):
    r = _refiner(dirs, model, redux, redux_weight=0.5)
    sat = _guidance(3).satellite
    tar = r._target(sat, [1])
    text = model.prompt(TAR)
    assert tar.embeds.shape == (1, text.embeds.shape[1] + 16, 32)
    assert torch.equal(tar.embeds[:, : text.embeds.shape[1]], text.embeds)  # text tokens unscaled
    assert torch.allclose(tar.embeds[:, text.embeds.shape[1] :], 0.5 * redux.tokens(sat[1:2]), atol=1e-6)
    assert torch.equal(tar.pooled, text.pooled)


def test_refiner_runs_and_seeds_reproduce(dirs, model, redux):
    r = _refiner(dirs, model, redux, batch_size=2)
    assert isinstance(r, ImageRefiner)
    assert r.wants == frozenset({"height", "satellite"})
    imgs, g = _images(), _guidance(4)
    out = r.refine(imgs, seeds=[5, 6], guidance=g)
    assert out.shape == imgs.shape and out.dtype == imgs.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.equal(r.refine(imgs, seeds=[5, 6], guidance=g), out)
    assert float((out - r.refine(imgs, seeds=[7, 6], guidance=g))[0].abs().max()) > 1e-4
    # one image at a time (another batch grouping) gives the same sample for a seed
    one = RefineGuidance(height=g.height[1:], satellite=g.satellite[1:])
    assert torch.allclose(r.refine(imgs[1:], seeds=[6], guidance=one), out[1:], atol=1e-5)
    assert float((out - imgs).abs().mean()) > 1e-3  # it did edit


def test_each_condition_switched_off_is_ignored_and_on_matters(dirs, model, redux):
    imgs, g, g2 = _images(), _guidance(5), _guidance(6)
    seeds = [1, 2]

    def run(r, **changes):  # noqa: ANN001, ANN003, ANN202
        return r.refine(imgs, seeds=seeds, guidance=RefineGuidance(**{**vars(g), **changes}))

    no_sem = _refiner(dirs, model, None, semantics=False)
    assert no_sem.wants == frozenset({"height"}) and no_sem.redux is None  # Redux is not even loaded
    base = run(no_sem)
    assert torch.equal(run(no_sem, satellite=g2.satellite), base)
    assert torch.equal(run(no_sem, satellite=None), base)
    zero_weight = _refiner(dirs, model, None, redux_weight=0.0)
    assert zero_weight.wants == frozenset({"height"}) and torch.equal(run(zero_weight), base)

    no_geo = _refiner(dirs, model, redux, geometry="none")
    assert no_geo.wants == frozenset({"satellite"})
    flat = run(no_geo)
    assert torch.equal(run(no_geo, height=g2.height), flat)
    assert torch.equal(run(no_geo, height=None, depth=None), flat)
    # 'none' is the control image of a map without information
    assert torch.equal(run(_refiner(dirs, model, redux), height=torch.full_like(g.height, 3.0)), flat)

    both = _refiner(dirs, model, redux)
    ref = run(both)
    assert float((run(both, satellite=g2.satellite) - ref).abs().mean()) > 1e-4
    assert float((run(both, height=g2.height) - ref).abs().mean()) > 1e-4
    assert float((run(both, depth=g2.depth) - ref).abs().max()) == 0.0  # depth is not what it reads
    by_depth = _refiner(dirs, model, redux, geometry="depth")
    assert by_depth.wants == frozenset({"depth", "satellite"})
    assert float((run(by_depth) - ref).abs().mean()) > 1e-4


def test_plain_flux_without_conditions_is_flowedit(dirs):
    from skyfall.priors.flux import FluxModel
    from skyfall.priors.flux_refiners import FlowEditRefiner
    from skyfall.priors.top2ground import Top2GroundRefiner

    plain = FluxModel.load(_cfg(dirs, model_id=str(dirs["plain"])), [SRC, TAR])
    t2g = Top2GroundRefiner(
        _cfg(dirs, model_id=str(dirs["plain"]), geometry="none", semantics=False), model=plain
    )
    assert t2g.wants == frozenset() and not t2g.control
    fe = FlowEditRefiner(t2g.cfg, model=plain)
    imgs = _images(7)
    assert torch.equal(t2g.refine(imgs, seeds=[3, 4]), fe.refine(imgs, seeds=[3, 4]))
    with pytest.raises(ConfigError, match="needs a FLUX control model"):
        Top2GroundRefiner(_cfg(dirs, model_id=str(dirs["plain"]), semantics=False), model=plain)


def test_missing_or_wrong_guidance_is_a_value_error(dirs, model, redux):
    r = _refiner(dirs, model, redux)
    imgs, g = _images(), _guidance(8)
    with pytest.raises(ValueError, match=r"needs guidance\.height .* and guidance\.satellite .*no guidance"):
        r.refine(imgs, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"needs guidance\.satellite"):
        r.refine(imgs, seeds=[0, 1], guidance=RefineGuidance(height=g.height))
    with pytest.raises(ValueError, match=r"needs guidance\.depth"):
        _refiner(dirs, model, redux, geometry="depth").refine(imgs, seeds=[0, 1], guidance=RefineGuidance(
            height=g.height, satellite=g.satellite))  # fmt: skip
    with pytest.raises(ValueError, match=r"guidance\.height: expected \[2, 32, 32\]"):
        r.refine(imgs, seeds=[0, 1], guidance=RefineGuidance(height=g.height[:, :16], satellite=g.satellite))
    with pytest.raises(ValueError, match=r"guidance\.satellite: expected"):
        r.refine(imgs, seeds=[0, 1], guidance=RefineGuidance(height=g.height, satellite=g.satellite[:1]))


def test_registry_and_make_refiner(dirs, model):
    from skyfall.config.training import Stage2Config
    from skyfall.priors.top2ground import Top2GroundRefiner
    from skyfall.registry import REFINERS

    assert "top2ground" in REFINERS.names
    cfg2 = Stage2Config(refiner="top2ground", top2ground=_cfg(dirs))
    cfg2.check()
    r = REFINERS.build("top2ground", cfg2)
    assert isinstance(r, Top2GroundRefiner) and r.wants == frozenset({"height", "satellite"})
    imgs, g = _images(size=32), _guidance(9)
    out = r.refine(imgs, seeds=[1, 2], guidance=g)
    r2 = make_refiner("top2ground", model=model, **vars(_cfg(dirs)))
    assert torch.allclose(r2.refine(imgs, seeds=[1, 2], guidance=g), out, atol=1e-6)
    for bad, flag in (
        (dict(redux_weight=-1.0), "--stage2.top2ground.redux-weight"),
        (dict(geometry="sideways"), "--stage2.top2ground.geometry"),
        (dict(n_min=5, n_max=3), "--stage2.top2ground.n-min"),
        (dict(T_steps=0), "--stage2.top2ground.T-steps"),
    ):
        with pytest.raises(ConfigError, match=flag):
            Stage2Config(refiner="top2ground", top2ground=_cfg(dirs, **bad)).check()
    Stage2Config(refiner="identity", top2ground=_cfg(dirs, redux_weight=-1.0)).check()  # not selected
    with pytest.raises(ConfigError, match="redux_weight"):
        make_refiner("top2ground", model=model, **vars(_cfg(dirs, redux_weight=-1.0)))


def test_missing_weights_one_actionable_error(dirs, tmp_path):
    kw = dict(local_files_only=True, device="cpu", dtype="float32", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as e:  # Redux is loaded first: it fails before the big load
        make_refiner("top2ground", **kw)
    msg = str(e.value)
    assert isinstance(e.value, MissingDependencyError)
    assert "black-forest-labs/FLUX.1-Redux-dev" in msg and str(tmp_path / "hf") in msg
    assert "hf auth login" in msg and "\n" not in msg
    with pytest.raises(WeightsNotFoundError) as e:
        make_refiner("top2ground", semantics=False, **kw)
    assert "black-forest-labs/FLUX.1-Depth-dev" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_refiner("top2ground", model_id=str(tmp_path / "no-such-dir"), redux_model_id=str(dirs["redux"]),
                     device="cpu", dtype="float32")  # fmt: skip


def test_doctor_lists_the_top2ground_weights(tmp_path):
    pytest.importorskip("huggingface_hub")
    from skyfall.cli.doctor import report

    text = "\n".join(report(str(tmp_path / "hub")))
    for repo in ("black-forest-labs/FLUX.1-Depth-dev", "black-forest-labs/FLUX.1-Redux-dev"):
        assert f"weights      {repo}: missing" in text
        assert f"`hf download {repo}`" in text
    assert "top2ground" in text


def test_cli_stage2_runs_a_full_top2ground_episode(dirs, tiny_run: Path, tmp_path: Path):
    """The acceptance command: `skyfall train stage2 --stage2.refiner top2ground --stage2.top2ground.model-id DIR`
    on the tiny folders drives one whole Stage 2 episode on CPU, conditioned on height and satellite."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    t2g = "--stage2.top2ground."
    cmd = [
        sys.executable, "-m", "skyfall", "train", "stage2", "--run", str(run), "--preset", "tiny",
        "--stage2.refiner", "top2ground", "--stage2.max-episodes", "1",
        t2g + "model-id", str(dirs["control"]), t2g + "redux-model-id", str(dirs["redux"]),
        t2g + "local-files-only", t2g + "device", "cpu", t2g + "dtype", "float32",
        t2g + "max-sequence-length", "64", t2g + "prompt-cache-dir", str(tmp_path / "prompts"),
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [e["episode"] for e in summary["stage2"]["episodes"]] == [0]
    ep = run / "idu" / "ep00_e85_r300"
    refined = sorted((ep / "refine").glob("*.png"))
    assert len(refined) == 16
    a = np.asarray(Image.open(refined[0]), dtype=np.float32)
    render = np.asarray(Image.open(ep / "render" / "00000.png"), dtype=np.float32)
    assert a.shape == render.shape and np.abs(a - render).mean() > 1.0  # the random model edited it
    assert (run / "ply" / "stage2_raw.ply").is_file()


def test_ablation_script_runs_each_variant_and_tabulates_its_eval(dirs, tiny_run: Path, tmp_path: Path):
    import csv
    import os
    import subprocess
    import sys

    flux, t2g = "--stage2.flowedit.", "--stage2.top2ground."
    common = ["local-files-only", "device", "cpu", "dtype", "float32", "max-sequence-length", "64"]
    extra = [
        "--stage2.max-episodes",
        "1",
        flux + "model-id",
        str(dirs["plain"]),
        t2g + "model-id",
        str(dirs["control"]),
    ]
    extra += [t2g + "redux-model-id", str(dirs["redux"])]
    for prefix in (flux, t2g):
        extra += [prefix + common[0], prefix + common[1], common[2], prefix + common[3], common[4]]
        extra += [prefix + common[5], common[6], prefix + "prompt-cache-dir", str(tmp_path / "prompts")]
    out = tmp_path / "ablation"
    cmd = [
        sys.executable, "scripts/ablate_refiner.py", "--run", str(tiny_run), "--out", str(out), "--preset", "tiny",
        "--variants", "flowedit,top2ground", "--eval-args", "--no-clip --no-lpips", "--", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    by = {(r["variant"], r["group"]): r for r in rows}
    for variant in ("flowedit", "top2ground"):
        assert float(by[(variant, "orbit_e45_r250")]["psnr"]) > 5.0
        assert float(by[(variant, "dsm_nadir")]["dsm_mae_m"]) > 0.0
        assert (out / variant / "idu" / "ep00_e85_r300" / "refine").is_dir()
    # the two refiners produced different episodes, hence different scores
    assert by[("flowedit", "orbit_e45_r250")]["psnr"] != by[("top2ground", "orbit_e45_r250")]["psnr"]
    assert not (tiny_run / "idu").exists()  # variants run on copies
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert again.returncode == 0 and again.stdout.count("done before") == 2  # nothing recomputed
