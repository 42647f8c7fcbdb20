"""Tiny, randomly initialised stand-ins for the real prior models, built offline from configs.

They keep the structural facts the code depends on (FLUX: 16 latent channels, VAE scale factor 8,
64-wide packed tokens, guidance embedding, CLIP pooled + T5 sequence conditioning, the FLUX.1-dev
scheduler config; FLUX.1-Depth-dev: a transformer taking 128 channels, the packed control latents
after the noisy ones; FLUX.1 Redux: SigLIP patch tokens projected to the T5 width; Difix3D: the
4-level skip-connection VAE with its LoRA stored as nvidia/difix stores it, an SD-2-shaped UNet, the
SD-Turbo schedule; Depth Anything: a DINOv2 backbone with a metric head) and shrink only the widths,
so tests and ``scripts/bench_flowedit.py --tiny`` run the same code paths as real weights in
milliseconds on a CPU. Nothing is downloaded: the tokenizers are built from in-memory vocabularies
(transformers >= 5).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# FLUX.1-dev's scheduler config (``scheduler/scheduler_config.json`` of black-forest-labs/FLUX.1-dev).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# FLUX.1-dev transformer config (public model config); used by the benchmark with random weights.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Where FLUX.1-Depth-dev's transformer config differs from FLUX.1-dev's: the packed control latents
# (64 channels) are concatenated to the packed noisy latents (64); the output stays a 64-wide velocity.
FLUX_DEPTH_DEV_CHANNELS = dict(in_channels=128, out_channels=64)

# FLUX.1-dev VAE config (public model config).
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
    sample_size=1024,
)


def _clip_tokenizer():  # noqa: ANN202
    """CLIP byte-level BPE without merges: each byte symbol is a token, alone or word-final."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for sym in sorted(ByteLevel.alphabet()):
        for piece in (sym, sym + "</w>"):
            vocab[piece] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():  # noqa: ANN202
    """T5 Unigram over single characters (word-initial forms scored higher) plus 4 sentinels."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -2.5) for c in chars]
    pieces += [(c, -5.0) for c in chars]
    n_sentinels = 4
    pieces += [(f"<extra_id_{k}>", 0.0) for k in reversed(range(n_sentinels))]
    return T5TokenizerFast(vocab=pieces, extra_ids=n_sentinels, model_max_length=512)


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True, control: bool = False) -> dict:
    """Keyword arguments for ``diffusers.FluxPipeline`` with tiny random modules (eval mode, no grad).

    Widths: transformer 1 double + 1 single block, 2 heads of 16; VAE channels (8, 8, 16, 16);
    CLIP 2 layers x 32; T5 2 layers x 32. The real VAE shift/scale and scheduler config are kept.
    ``control``: the transformer of a FLUX control model (FLUX.1-Depth-dev: 128 input channels, 64
    output), with the same text encoders and VAE as the plain one of that seed.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    with torch.random.fork_rng():  # building from configs draws from the global RNG; leave it untouched
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok), hidden_size=32, intermediate_size=48, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
                # the real eos id: with the legacy value 2, transformers pools by argmax instead
                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                use_cache=False, pad_token_id=0, eos_token_id=1,
            )
        )  # fmt: skip
        vae_cfg = dict(FLUX_DEV_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
        vae = AutoencoderKL(**vae_cfg)
        channels = FLUX_DEPTH_DEV_CHANNELS if control else {}
        transformer = FluxTransformer2DModel(
            **dict(
                FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8), **channels,
            )
        )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    # modules built from configs start in train(): T5's dropout would make prompt embeddings random
    for m in (clip, t5, vae, transformer):
        m.eval().requires_grad_(False)
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
        tokenizer_2=t5_tok, transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip


def save_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX pipeline folder (the layout of ``black-forest-labs/FLUX.1-dev``) to ``path``."""
    from diffusers import FluxPipeline

    path = Path(path)
    FluxPipeline(**tiny_flux_components(seed, guidance_embeds)).save_pretrained(path)
    return path


def save_tiny_flux_control(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny FLUX control pipeline folder (the layout of ``black-forest-labs/FLUX.1-Depth-dev``)."""
    from diffusers import FluxControlPipeline

    parts = tiny_flux_components(seed, control=True)
    del parts["image_encoder"], parts["feature_extractor"]  # not components of FluxControlPipeline
    path = Path(path)
    FluxControlPipeline(**parts).save_pretrained(path)
    return path


def tiny_redux_components(seed: int = 0, txt_dim: int = 32) -> dict:
    """Keyword arguments for ``diffusers.FluxPriorReduxPipeline`` with tiny random modules.

    SigLIP vision tower 2 layers x 16 on 32x32 images in 8x8 patches (16 tokens; the real one: 729 tokens
    of 1152 from 384x384 in 14x14 patches), its image processor (real normalisation and resampling) and
    a ``ReduxImageEncoder`` from the SigLIP width to ``txt_dim`` (the tiny T5 width, as the real one maps
    to T5-XXL's 4096).
    """
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        siglip = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8,
            )
        )  # fmt: skip
        embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=txt_dim)
    for m in (siglip, embedder):
        m.eval().requires_grad_(False)
    processor = SiglipImageProcessor(
        size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return dict(image_encoder=siglip, feature_extractor=processor, image_embedder=embedder)


def save_tiny_redux(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 Redux folder (the layout of ``black-forest-labs/FLUX.1-Redux-dev``) to ``path``."""
    from diffusers import FluxPriorReduxPipeline

    path = Path(path)
    FluxPriorReduxPipeline(**tiny_redux_components(seed)).save_pretrained(path)
    # without torchvision transformers builds (and records) the PIL-backend class; name the class the real
    # repo names, so loading resolves the processor the same way for both
    index = json.loads((path / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "SiglipImageProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


# Difix3D (nvidia/difix): its VAE config (SD's VAE plus Difix's keys gamma, ignore_skip, lora_rank), as the
# Hub repo ships it; the DDPMScheduler fields of stabilityai/sd-turbo's scheduler config, which Difix's
# model.py loads into a DDPMScheduler (the Hub repo's own scheduler/scheduler_config.json was not readable
# here).
DIFIX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
    force_upcast=True,
)
DIFIX_VAE_EXTRAS = dict(gamma=1.0, ignore_skip=False, lora_rank=4)
DIFIX_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="trailing",
)
# Difix's VAE LoRA (adapter "vae_skip"): decoder modules whose names end with one of these (src/model.py).
DIFIX_VAE_LORA_TARGETS = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
    "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4",
    "to_k", "to_q", "to_v", "to_out.0",
)  # fmt: skip


def tiny_difix_components(seed: int = 0) -> dict:
    """Tiny random Difix parts (eval mode, no grad): ``unet``, ``vae`` (skip convolutions attached, plain
    weights), ``text_encoder``, ``tokenizer``, ``scheduler``.

    Widths: VAE channels (8, 8, 16, 16) with the real block structure (4 levels, so 4 skips) and scaling
    factor; an SD-2-shaped UNet (linear attention projections, cross-attention) with channels (8, 16)
    and cross-attention width 32; CLIP 2 layers x 32. The scheduler config is the real one.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from skyfall.priors.difix import add_skip_convs

    tok = _clip_tokenizer()
    with torch.random.fork_rng():  # building from configs draws from the global RNG; leave it untouched
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
        )  # fmt: skip
        vae = AutoencoderKL(
            **dict(DIFIX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
        )
        add_skip_convs(vae)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
        )  # fmt: skip
    for m in (clip, vae, unet):
        m.eval().requires_grad_(False)
    return dict(
        unet=unet, vae=vae, text_encoder=clip, tokenizer=tok, scheduler=DDPMScheduler(**DIFIX_SCHEDULER)
    )


def difix_vae_peft_state(vae, rank: int = 4, adapter: str = "vae_skip", seed: int = 0) -> dict:  # noqa: ANN001
    """The state dict of a Difix VAE as nvidia/difix stores it: every LoRA target of the decoder in peft's
    layout (``<m>.base_layer.weight`` / ``.bias``, ``<m>.lora_A.<adapter>.weight``,
    ``<m>.lora_B.<adapter>.weight``; A with the base's kernel, B 1x1), with random non-zero A and B so
    that merging them matters."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    for name, mod in vae.named_modules():
        if "decoder" not in name or not any(name.endswith(t) for t in DIFIX_VAE_LORA_TARGETS):
            continue
        if isinstance(mod, nn.Conv2d):
            a_shape = (rank, mod.in_channels // mod.groups, *mod.kernel_size)
            b_shape = (mod.out_channels, rank, 1, 1)
        elif isinstance(mod, nn.Linear):
            a_shape, b_shape = (rank, mod.in_features), (mod.out_features, rank)
        else:
            continue
        for p in ("weight", "bias"):
            if f"{name}.{p}" in state:
                state[f"{name}.base_layer.{p}"] = state.pop(f"{name}.{p}")
        state[f"{name}.lora_A.{adapter}.weight"] = 0.1 * torch.randn(a_shape, generator=gen)
        state[f"{name}.lora_B.{adapter}.weight"] = 0.1 * torch.randn(b_shape, generator=gen)
    return state


def save_tiny_difix(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Difix snapshot in the layout of ``nvidia/difix`` to ``path``: ``model_index.json``,
    ``scheduler/``, ``tokenizer/``, ``text_encoder/``, ``unet/`` (``save_pretrained``) and ``vae/config.json``
    (with Difix's gamma / ignore_skip / lora_rank) + ``vae/diffusion_pytorch_model.safetensors`` (skip
    convolutions, LoRA in peft's layout). The real repo's ``vae/autoencoder_kl.py`` (remote code) is not
    written: skyfall never runs it."""
    import diffusers
    from safetensors.torch import save_file

    parts = tiny_difix_components(seed)
    path = Path(path)
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(path / name)
    vae = parts["vae"]
    (path / "vae").mkdir(parents=True, exist_ok=True)
    vae.save_config(path / "vae")
    config = json.loads((path / "vae" / "config.json").read_text())
    config.update(DIFIX_VAE_EXTRAS)
    (path / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = difix_vae_peft_state(vae, rank=DIFIX_VAE_EXTRAS["lora_rank"], seed=seed)
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    index = {
        "_class_name": "DifixPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["autoencoder_kl", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def tiny_depth_anything(seed: int = 0, depth_estimation_type: str = "metric", max_depth: int = 80):  # noqa: ANN201
    """A ~140k-parameter Depth Anything (V2 architecture) with a 4-layer, 32-wide DINOv2 backbone."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False, apply_layernorm=True,
    )  # fmt: skip
    extra = {"max_depth": max_depth} if depth_estimation_type == "metric" else {}
    cfg = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, patch_size=14, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5],
        depth_estimation_type=depth_estimation_type, **extra,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(cfg)
    return model.eval().requires_grad_(False)
