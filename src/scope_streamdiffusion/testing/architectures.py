"""Random-weight builders of the TRUE SD1.5 / SD2.1 / SDXL architectures, for benchmarks.

Same shapes (hence FLOPs, memory and kernel timings) as the released checkpoints, with
random weights, because no machine here can download the real ones. Build on the GPU
(``device="cuda"``) to skip slow CPU initialisation, or on ``device="meta"`` to count
parameters without allocating anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

__all__ = [
    "KINDS",
    "PARAM_COUNTS",
    "build_pipeline_folder",
    "build_scheduler",
    "build_scheduler_config",
    "build_taesd",
    "build_text_encoders",
    "build_unet",
    "build_vae",
    "count_params",
    "resolve_kind",
]

# Architecture kinds; the turbo names share their base model's architecture and differ
# only in default resolution and scheduler config.
KINDS = ("sd15", "sd21", "sdxl")
_ALIASES = {
    "sd-turbo": "sd21",
    "sdxl-turbo": "sdxl",
    "sd1.5": "sd15",
    "sd2.1": "sd21",
}

# Parameter counts of the released checkpoints' components (what the builders must match).
PARAM_COUNTS: dict[str, int] = {
    "unet:sd15": 859_520_964,
    "unet:sd21": 865_910_724,
    "unet:sdxl": 2_567_463_684,
    "vae:sd15": 83_653_863,
    "vae:sd21": 83_653_863,
    "vae:sdxl": 83_653_863,
    "taesd": 2_445_063,  # madebyollin/taesd and taesdxl: AutoencoderTiny() defaults
    "text_encoder:sd15": 123_060_480,  # CLIP ViT-L/14 text tower
    "text_encoder:sd21": 340_387_840,  # OpenCLIP ViT-H/14 text tower, 23 of 24 layers
    "text_encoder:sdxl": 123_060_480,  # CLIP ViT-L/14 text tower
    "text_encoder_2:sdxl": 694_659_840,  # OpenCLIP ViT-bigG/14 text tower + projection
}


def resolve_kind(kind: str) -> str:
    """Map a kind or alias (``sd-turbo``, ``sdxl-turbo``) to ``sd15``/``sd21``/``sdxl``."""
    base = _ALIASES.get(kind, kind)
    if base not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS + tuple(_ALIASES)}")
    return base


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters (shared ones once); works on meta-device modules."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- configs

_SD_UNET_BLOCKS = dict(
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
)

_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        **_SD_UNET_BLOCKS,
    ),
    "sd21": dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=1024,
        # diffusers' legacy name: these are numbers of heads (head size 64)
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        **_SD_UNET_BLOCKS,
    ),
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # 6 micro-conditioning values * 256 + 1280 pooled bigG embedding
        projection_class_embeddings_input_dim=2816,
    ),
}

# Default latent sample sizes of the turbo variants (512 px instead of 768 / 1024).
_ALIAS_SAMPLE_SIZE = {"sd-turbo": 64, "sdxl-turbo": 64}

_VAE_SAMPLE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
_VAE_SCALING = {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025}

# transformers' CLIPTextConfig kwargs of the released text encoders. The legacy special-token
# ids (bos 0, eos 2, pad 1) are what the SD checkpoints ship; eos 2 makes CLIP pool at argmax(ids).
_CLIP_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
_CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    **_CLIP_COMMON,
)
_OPENCLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,  # SD2 drops the last of ViT-H's 24 layers (uses the penultimate)
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
    **_CLIP_COMMON,
)
_OPENCLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    **_CLIP_COMMON,
)

_SD_BETAS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    steps_offset=1,
)
# The released checkpoints' scheduler configs.
_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        _class_name="PNDMScheduler",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        **_SD_BETAS,
    ),
    "sd21": dict(
        _class_name="DDIMScheduler",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
        **_SD_BETAS,
    ),
    "sdxl": dict(
        _class_name="EulerDiscreteScheduler",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        **_SD_BETAS,
    ),
    "sd-turbo": dict(
        _class_name="EulerDiscreteScheduler",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="trailing",
        **_SD_BETAS,
    ),
    "sdxl-turbo": dict(
        _class_name="EulerDiscreteScheduler",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="trailing",
        **_SD_BETAS,
    ),
}


def unet_config(kind: str) -> dict[str, Any]:
    config = copy.deepcopy(_UNET_CONFIGS[resolve_kind(kind)])
    if kind in _ALIAS_SAMPLE_SIZE:
        config["sample_size"] = _ALIAS_SAMPLE_SIZE[kind]
    return config


def vae_config(kind: str) -> dict[str, Any]:
    base = resolve_kind(kind)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512 if kind in _ALIAS_SAMPLE_SIZE else _VAE_SAMPLE_SIZE[base],
        scaling_factor=_VAE_SCALING[base],
        # The released SDXL VAE overflows in fp16, hence upcast; diffusers' default is True too.
        force_upcast=True,
    )


def taesd_config(kind: str) -> dict[str, Any]:
    resolve_kind(kind)
    # taesd and taesdxl share one config: TAESD latents are already in the UNet's scaled
    # latent space, so scaling_factor 1.0 / shift 0 for both.
    return dict(
        encoder_block_out_channels=(64, 64, 64, 64),
        decoder_block_out_channels=(64, 64, 64, 64),
        num_encoder_blocks=(1, 3, 3, 3),
        num_decoder_blocks=(3, 3, 3, 1),
        latent_channels=4,
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
    )


def text_encoder_configs(kind: str) -> list[tuple[type, dict[str, Any]]]:
    base = resolve_kind(kind)
    if base == "sd15":
        return [(CLIPTextModel, dict(_CLIP_L))]
    if base == "sd21":
        return [(CLIPTextModel, dict(_OPENCLIP_H))]
    return [(CLIPTextModel, dict(_CLIP_L)), (CLIPTextModelWithProjection, dict(_OPENCLIP_BIGG))]


def build_scheduler_config(kind: str) -> dict[str, Any]:
    """The released checkpoint's scheduler config (``_class_name`` + kwargs).

    ``sd15``: PNDM, ``sd21``: DDIM v-prediction, ``sdxl``: Euler leading,
    ``sd-turbo``/``sdxl-turbo``: Euler trailing.
    """
    if kind not in _SCHEDULER_CONFIGS:
        resolve_kind(kind)  # raises for unknown kinds
        kind = _ALIASES[kind]
    return copy.deepcopy(_SCHEDULER_CONFIGS[kind])


def build_scheduler(kind: str):
    """Instantiate the scheduler of ``build_scheduler_config(kind)``."""
    import diffusers

    config = build_scheduler_config(kind)
    cls = getattr(diffusers, config.pop("_class_name"))
    return cls.from_config(config)


# --------------------------------------------------------------------------- builders


def _build(factory, device, dtype, seed):
    """Construct directly on ``device`` and in ``dtype``: random init on the GPU is far
    faster than on CPU, no fp32 copy is ever made, and on "meta" nothing is allocated."""
    device = torch.device(device)
    if device.type != "meta" and seed is not None:
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)  # only if a library ignored the default dtype
    return module.eval().requires_grad_(False)


def build_unet(
    kind: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> UNet2DConditionModel:
    """Random-weight UNet of the released ``kind`` architecture."""
    config = unet_config(kind)
    return _build(lambda: UNet2DConditionModel(**config), device, dtype, seed)


def build_vae(
    kind: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 1,
) -> AutoencoderKL:
    """Random-weight SD VAE (SDXL: same architecture, scaling_factor 0.13025)."""
    config = vae_config(kind)
    return _build(lambda: AutoencoderKL(**config), device, dtype, seed)


def build_taesd(
    kind: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 4,
) -> AutoencoderTiny:
    """Random-weight TAESD (sd15/sd21) or TAESDXL (sdxl): same architecture."""
    config = taesd_config(kind)
    return _build(lambda: AutoencoderTiny(**config), device, dtype, seed)


def build_text_encoders(
    kind: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 2,
) -> tuple[torch.nn.Module, ...]:
    """Random-weight text encoder(s): ``(text_encoder,)`` or, for SDXL,
    ``(text_encoder, text_encoder_2)`` with the second a CLIPTextModelWithProjection."""
    encoders = []
    for i, (cls, kwargs) in enumerate(text_encoder_configs(kind)):
        config = CLIPTextConfig(**kwargs)
        encoders.append(
            _build(lambda: cls(config), device, dtype, None if seed is None else seed + i)
        )
    return tuple(encoders)


def build_pipeline_folder(
    kind: str,
    dest: Path,
    dtype: torch.dtype = torch.float16,
    tiny_vae: bool = True,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Path:
    """Save a full random-weight diffusers folder of the true architecture into ``dest``.

    Loadable with ``DiffusionPipeline.from_pretrained(dest)`` like a hub model id (with the
    real CLIP tokenizers). With ``tiny_vae`` a matching TAESD folder is also saved in
    ``dest / "taesd"`` (outside model_index.json, so the pipeline ignores it). Slow on CPU
    (minutes for SDXL); meant for the GPU machine. ``device`` defaults to CUDA if present.
    """
    from transformers import CLIPTokenizer

    from .tiny_models import (
        EOS_TOKEN,
        _canonical_clip_text_weights,
        _strip_taesd_config,
        _write_tokenizer,
        clip_tokenizer_files,
    )

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = resolve_kind(kind)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def tokenizer(pad_token: str, sub: str) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(
            clip_tokenizer_files(dest / sub, pad_token=pad_token)
        )

    build = dict(device=device, dtype=dtype)
    unet = build_unet(kind, seed=seed, **build)
    vae = build_vae(kind, seed=seed + 1, **build)
    encoders = build_text_encoders(kind, seed=seed + 2, **build)
    sched = build_scheduler(kind)
    # SD1.x pads with <|endoftext|>; the OpenCLIP tokenizers (SD2.x, SDXL's second) with "!".
    pad = "!" if base == "sd21" else EOS_TOKEN
    if base == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizer(EOS_TOKEN, "tokenizer"),
            tokenizer_2=tokenizer("!", "tokenizer_2"),
            unet=unet,
            scheduler=sched,
            force_zeros_for_empty_prompt=kind != "sdxl-turbo",
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizer(pad, "tokenizer"),
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(dest, safe_serialization=True)
    _canonical_clip_text_weights(dest / "text_encoder")  # loadable by transformers 4 and 5
    # Rewrite the tokenizer folders with plain vocab/merges files that transformers 4 and 5 read.
    _write_tokenizer(dest / "tokenizer", pad)
    if base == "sdxl":
        _write_tokenizer(dest / "tokenizer_2", "!")
    if tiny_vae:
        taesd = build_taesd(kind, seed=seed + 4, **build)
        taesd.save_pretrained(dest / "taesd", safe_serialization=True)
        _strip_taesd_config(dest / "taesd" / "config.json")
    (dest / "random_weights.json").write_text(
        json.dumps({"kind": kind, "seed": seed, "dtype": str(dtype)}, indent=2) + "\n"
    )
    return dest
