"""The difix refiner (Difix3D's single-step fixer) on a tiny random snapshot in nvidia/difix's layout (CPU).

The snapshot is written by ``save_tiny_difix`` and loaded through the real loader (``from_pretrained``
for the stock parts, the VAE from its config and safetensors file with the LoRA in peft's layout). The
skip-connection VAE is checked against diffusers' stock ``AutoencoderKL.encode`` / ``decode`` with the
skips injected by forward hooks, and the whole step against Difix's formula written out here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
pytest.importorskip("transformers", minversion="5")  # the tiny tokenizer is built in memory (transformers 5)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from skyfall.config.priors import DifixConfig  # noqa: E402
from skyfall.errors import ConfigError, MissingDependencyError  # noqa: E402
from skyfall.priors.difix import (  # noqa: E402
    DifixModel,
    DifixRefiner,
    add_skip_convs,
    decode_with_skips,
    encode_with_skips,
    merge_lora,
    skip_conv_channels,
)
from skyfall.priors.hub import WeightsNotFoundError  # noqa: E402
from skyfall.priors.refine import ImageRefiner, make_refiner  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    from skyfall.priors.tiny import save_tiny_difix

    return save_tiny_difix(tmp_path_factory.mktemp("difix") / "tiny-difix")


def _opts(tiny_dir, **kw) -> dict:
    return {"model_id": str(tiny_dir), "local_files_only": True, "device": "cpu", "dtype": "auto", **kw}


@pytest.fixture(scope="module")
def refiner(tiny_dir):
    return make_refiner("difix", **_opts(tiny_dir))


def _images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _skip_hooks(vae, gamma: float = 1.0):  # noqa: ANN001, ANN202
    """Difix's skips on diffusers' stock forward: capture each encoder down block's input, add the mirrored
    one (through its skip conv) to each decoder up block's input. Returns the hook handles."""
    acts: list[torch.Tensor] = []
    handles = []
    for block in vae.encoder.down_blocks:
        handles.append(block.register_forward_pre_hook(lambda mod, args: acts.append(args[0])))
    n = len(vae.decoder.up_blocks)
    for k, block in enumerate(vae.decoder.up_blocks):
        conv = getattr(vae.decoder, f"skip_conv_{k + 1}")

        def inject(mod, args, conv=conv, k=k):  # noqa: ANN001, ANN202
            return (args[0] + conv(acts[n - 1 - k] * gamma),) + tuple(args[1:])

        handles.append(block.register_forward_pre_hook(inject))
    return handles


def test_tiny_snapshot_has_the_nvidia_difix_layout(tiny_dir):
    import json

    from safetensors.torch import load_file

    for f in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert (tiny_dir / f).is_file(), f
    assert any((tiny_dir / "tokenizer").iterdir())
    cfg = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["gamma"] == 1.0 and cfg["ignore_skip"] is False
    assert cfg["lora_rank"] == 4
    keys = set(load_file(str(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors")))
    assert (
        "decoder.skip_conv_1.lora_A.vae_skip.weight" in keys
        and "decoder.skip_conv_1.base_layer.weight" in keys
    )
    assert "decoder.mid_block.attentions.0.to_q.lora_B.vae_skip.weight" in keys
    assert "encoder.conv_in.weight" in keys and not any("encoder" in k and "lora" in k for k in keys)


def test_loads_through_the_real_loader(tiny_dir, refiner):
    from transformers import CLIPTextModel, CLIPTokenizer

    from skyfall.priors.difix import encode_prompt

    assert isinstance(refiner, DifixRefiner) and isinstance(refiner, ImageRefiner)
    m = refiner.model
    assert m.dtype == torch.float32 and m.vae_dtype == torch.float32  # 'auto' on the CPU
    assert m.unet.dtype == torch.float32 and next(m.vae.parameters()).device.type == "cpu"
    assert m.timestep == 199 and list(m.scheduler.timesteps) == [199]
    assert m.use_skips and m.gamma == 1.0
    assert not any("lora" in k or "base_layer" in k for k in m.vae.state_dict())  # merged at load
    # the prompt was encoded once, by the snapshot's own text encoder
    tok = CLIPTokenizer.from_pretrained(str(tiny_dir), subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(str(tiny_dir), subfolder="text_encoder").eval()
    assert torch.allclose(m.prompt_embeds, encode_prompt(tok, te, "remove degradation"), atol=1e-6)
    assert m.prompt_embeds.shape == (1, 77, 32)


def test_refine_shape_range_dtype_device(refiner):
    imgs = _images(2)
    out = refiner.refine(imgs, seeds=[0, 1])
    assert out.shape == imgs.shape and out.dtype == imgs.dtype and out.device == imgs.device
    assert torch.isfinite(out).all() and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float((out - imgs).abs().mean()) > 1e-3  # it did something
    odd = _images(1, 36, 44, seed=1).double()  # not multiples of 8: resized down for the VAE and back
    out = refiner.refine(odd, seeds=[0])
    assert out.shape == odd.shape and out.dtype == torch.float64
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match="at least 8x8"):
        refiner.refine(_images(1, 4, 32), seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        refiner.refine(imgs, seeds=[0])


def test_deterministic_per_seed_and_batch_equals_single_calls(tiny_dir, refiner):
    imgs = _images(2, seed=2)
    a = refiner.refine(imgs, seeds=[3, 4])
    assert torch.equal(a, refiner.refine(imgs, seeds=[3, 4]))
    singles = torch.cat([refiner.refine(imgs[:1], seeds=[3]), refiner.refine(imgs[1:], seeds=[4])])
    assert torch.allclose(a, singles, atol=1e-5)
    # the seed draws the VAE posterior sample (the tiny random VAE's posterior is wide, so it shows)
    assert float((refiner.refine(imgs[:1], seeds=[5]) - a[:1]).abs().max()) > 1e-4
    # batch_size 2 groups both images in one UNet call: same samples
    r2 = make_refiner("difix", model=refiner.model, **_opts(tiny_dir, batch_size=2, seed=3))
    assert torch.allclose(r2.refine(imgs), a, atol=1e-5)  # no seeds: 3, 4 from cfg.seed


def test_equals_difix_step_on_stock_diffusers_forward(refiner):
    """Posterior sample -> UNet noise prediction at t = 199 -> x0 = (z - sqrt(1 - a) eps) / sqrt(a) ->
    stock VAE decode with the skips hooked in; against the refiner (which walks the modules itself)."""
    m = refiner.model
    imgs = _images(2, seed=6)
    out = refiner.refine(imgs, seeds=[7, 8])
    vae, sf = m.vae, m.vae.config.scaling_factor
    handles = _skip_hooks(vae)
    try:
        with torch.no_grad():
            gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
            z = vae.encode(imgs * 2 - 1).latent_dist.sample(gens) * sf
            eps = m.unet(z, 199, encoder_hidden_states=m.prompt_embeds.expand(2, -1, -1)).sample
            a = m.scheduler.alphas_cumprod[199]
            z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            ref = (vae.decode(z0 / sf).sample.clamp(-1, 1) + 1) / 2
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


def test_skip_connections_are_used(refiner):
    m = refiner.model
    vae = m.vae
    imgs = _images(1, seed=9)
    # the module walk equals diffusers' stock encoder/decoder, hooks adding the skips
    with torch.no_grad():
        moments, skips = encode_with_skips(vae, imgs * 2 - 1)
        assert torch.allclose(moments, vae.encode(imgs * 2 - 1).latent_dist.parameters, atol=1e-6)
        assert [s.shape[1] for s in skips] == [8, 8, 8, 16]
        z = moments[:, :4]
        plain = vae.decode(z).sample
        assert torch.allclose(decode_with_skips(vae, z, None), plain, atol=1e-6)
        with_skips = decode_with_skips(vae, z, skips)
        assert float((with_skips - plain).abs().max()) > 1e-3
        handles = _skip_hooks(vae)
        try:
            vae.encode(imgs * 2 - 1)
            assert torch.allclose(vae.decode(z).sample, with_skips, atol=1e-6)
        finally:
            for h in handles:
                h.remove()
    # zeroing the skip convolutions changes the refined image
    before = refiner.refine(imgs, seeds=[0])
    saved = {k: getattr(vae.decoder, f"skip_conv_{k}").weight.clone() for k in range(1, 5)}
    try:
        for k in saved:
            getattr(vae.decoder, f"skip_conv_{k}").weight.zero_()
        after = refiner.refine(imgs, seeds=[0])
    finally:
        for k, w in saved.items():
            getattr(vae.decoder, f"skip_conv_{k}").weight.copy_(w)
    assert float((after - before).abs().max()) > 1e-3
    assert torch.equal(refiner.refine(imgs, seeds=[0]), before)


def test_skip_channels_match_difix():
    # Difix's hard-coded convs for SD's VAE (src/model.py): 512->512, 256->512, 128->512, 128->256
    assert skip_conv_channels((128, 256, 512, 512)) == [(512, 512), (256, 512), (128, 512), (128, 256)]
    from diffusers import AutoencoderKL

    from skyfall.priors.tiny import DIFIX_VAE

    with torch.device("meta"):
        vae = AutoencoderKL(**DIFIX_VAE)
    add_skip_convs(vae)
    assert vae.decoder.skip_conv_4.weight.shape == (256, 128, 1, 1) and vae.decoder.skip_conv_4.bias is None


@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1", "linear"])
def test_lora_merge_equals_the_unmerged_layer(kind: str):
    """peft's forward, written out: base(x) + (alpha / r) * B(A(x)), A with the base's kernel, B 1x1."""
    torch.manual_seed(0)
    r, alpha = 2, 8.0
    if kind == "linear":
        base, a, b = nn.Linear(5, 6), nn.Linear(5, r, bias=False), nn.Linear(r, 6, bias=False)
        x = torch.randn(3, 5)
    else:
        k = 3 if kind == "conv3x3" else 1
        base = nn.Conv2d(4, 6, k, padding=k // 2)
        a, b = nn.Conv2d(4, r, k, padding=k // 2, bias=False), nn.Conv2d(r, 6, 1, bias=False)
        x = torch.randn(2, 4, 7, 9)
    state = {"m.base_layer.weight": base.weight, "m.base_layer.bias": base.bias, "n.weight": torch.ones(1),
             "m.lora_A.vae_skip.weight": a.weight, "m.lora_B.vae_skip.weight": b.weight}  # fmt: skip
    merged = merge_lora({k: v.detach() for k, v in state.items()}, alpha)
    assert set(merged) == {"m.weight", "m.bias", "n.weight"}
    plain = type(base)(*((5, 6) if kind == "linear" else (4, 6, base.kernel_size, 1, base.padding)))
    plain.load_state_dict({"weight": merged["m.weight"], "bias": merged["m.bias"]})
    with torch.no_grad():
        assert torch.allclose(plain(x), base(x) + alpha / r * b(a(x)), atol=1e-5)


def test_lora_layout_and_merge_match_peft(tiny_dir):
    """With peft installed: Difix's own adapter (LoraConfig(r=4) on its decoder targets) has the key layout of
    the tiny snapshot, and the merged VAE decodes as the adapted one."""
    pytest.importorskip("peft")
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    from skyfall.priors.tiny import DIFIX_VAE_LORA_TARGETS, difix_vae_peft_state, tiny_difix_components

    vae = tiny_difix_components(seed=1)["vae"]
    plain_layout = set(difix_vae_peft_state(vae))
    targets = [
        n
        for n, _ in vae.named_modules()
        if "decoder" in n and any(n.endswith(t) for t in DIFIX_VAE_LORA_TARGETS)
    ]
    vae.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", target_modules=targets), adapter_name="vae_skip"
    )
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    assert set(state) == plain_layout
    ours = AutoencoderKL(**{k: v for k, v in vae.config.items() if not k.startswith("_")})
    add_skip_convs(ours)
    ours.load_state_dict(merge_lora(state))
    x = _images(1, seed=3) * 2 - 1
    with torch.no_grad():
        moments, skips = encode_with_skips(vae, x)
        z = moments[:, :4]
        assert torch.allclose(
            decode_with_skips(ours.eval(), z, skips), decode_with_skips(vae.eval(), z, skips), atol=1e-5
        )


def test_missing_weights_one_actionable_error(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        make_refiner(
            "difix",
            model_id="nvidia/difix",
            local_files_only=True,
            device="cpu",
            cache_dir=str(tmp_path / "hf"),
        )
    msg = str(e.value)
    assert isinstance(e.value, MissingDependencyError)
    assert "nvidia/difix" in msg and str(tmp_path / "hf") in msg and "hf download nvidia/difix" in msg
    assert "\n" not in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_refiner("difix", model_id=str(tmp_path / "no-such-dir"), device="cpu")


def test_not_a_difix_vae_is_refused(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = bad / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "skip_conv" not in k}, str(f))
    with pytest.raises(ConfigError, match="not a Difix3D VAE.*skip_conv"):
        make_refiner("difix", **_opts(bad))


def test_registry_builds_it_from_stage2_config_and_check(tiny_dir):
    import dataclasses

    from skyfall.config.training import Stage2Config
    from skyfall.registry import REFINERS

    assert "difix" in REFINERS.names and "single-step" in REFINERS.describe()
    cfg2 = Stage2Config(refiner="difix", difix=DifixConfig(**_opts(tiny_dir)))
    cfg2.check()
    r = REFINERS.build("difix", cfg2)
    assert isinstance(r, DifixRefiner) and isinstance(r.model, DifixModel)
    out = r.refine(_images(1), seeds=[0])
    assert out.shape == (1, 3, 32, 32)
    bad = [
        (dict(use_reference=True), "use-reference"),
        (dict(timestep=1000), "timestep"),
        (dict(batch_size=0), "difix.batch-size"),
        (dict(device="tpu"), "difix.device"),
    ]
    for change, says in bad:
        with pytest.raises(ConfigError, match=says):
            dataclasses.replace(cfg2, difix=dataclasses.replace(cfg2.difix, **change)).check()
    if not torch.cuda.is_available():  # the default device is cuda: the error says what to do instead
        with pytest.raises(ConfigError, match="--stage2.difix.device cpu"):
            Stage2Config(refiner="difix").check()
    with pytest.raises(ConfigError, match="use-reference"):
        make_refiner("difix", **_opts(tiny_dir, use_reference=True))


def test_bfloat16_runs(tiny_dir):
    r = make_refiner("difix", **_opts(tiny_dir, dtype="bfloat16"))
    assert r.model.unet.dtype == torch.bfloat16 and r.model.vae_dtype == torch.bfloat16
    out = r.refine(_images(1), seeds=[0])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_doctor_lists_the_difix_weights(tmp_path):
    pytest.importorskip("huggingface_hub")
    from skyfall.cli.doctor import report

    text = "\n".join(report(cache_dir=str(tmp_path / "hub")))
    assert "weights      nvidia/difix: missing" in text
    assert "'difix' refiner" in text and "`hf download nvidia/difix`" in text
