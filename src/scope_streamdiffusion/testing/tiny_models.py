"""Tiny random-weight diffusers models, built locally so tests never download weights.

The folders are written with ``save_pretrained`` and loaded back through the normal
``from_pretrained`` paths, so the project's real loading code is what gets tested.
Only tests and the CLI import this module (never the package ``__init__``), so the
heavy imports at module top are fine.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "CLIP_VOCAB_SIZE",
    "LORA_WEIGHT_NAME",
    "TINY_MODEL_NAMES",
    "build_tiny_lcm_lora",
    "build_tiny_model",
    "build_tiny_taesd",
    "clip_tokenizer_files",
    "ensure_tiny_model",
    "ensure_tiny_taesd",
    "find_clip_bpe_file",
]

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges so that the vocab totals 49408.
_NUM_MERGES = 49152 - 256 - 2

# Bump when the builders change so stale cached folders get rebuilt.
BUILDER_VERSION = "1"
_VERSION_FILE = ".tiny_models_version"

# name -> family for ensure_tiny_model
TINY_MODEL_NAMES = {
    "tiny-random": "sd15",
    "tiny-random-sd15": "sd15",
    "tiny-random-sdxl": "sdxl",
}

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers 0.36 refuses to guess the file name of a local LoRA folder when HF_HUB_OFFLINE=1,
# so loaders should pass weight_name=LORA_WEIGHT_NAME (0.42 guesses it).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------- tokenizer


def find_clip_bpe_file() -> Path:
    """Locate CLIP's BPE merges file inside open_clip or openai-clip without importing them
    (importing open_clip pulls in timm/torchvision, which may be absent)."""
    for pkg in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        candidate = Path(list(spec.submodule_search_locations)[0]) / _BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The CLIP BPE vocabulary ({_BPE_FILENAME}) was not found. It ships inside the "
        "open_clip_torch package: install it with `pip install open_clip_torch --no-deps` "
        "(or install openai-clip)."
    )


def _bytes_to_unicode() -> dict[int, str]:
    # Same byte -> printable-char table as CLIP/GPT-2; its order defines the first 256 ids.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[str, str]:
    """Return (vocab.json text, merges.txt text) converted from CLIP's BPE file (cached)."""
    lines = gzip.open(find_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a header
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    vocab_list += ["".join(m.split()) for m in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab_list) != CLIP_VOCAB_SIZE or len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(vocab_list)}/{len(vocab)}")
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return json.dumps(vocab, ensure_ascii=False), merges_text


def clip_tokenizer_files(dest: Path, *, pad_token: str = EOS_TOKEN) -> Path:
    """Write the real CLIP BPE tokenizer (vocab.json, merges.txt, configs) into ``dest``.

    Load it with ``CLIPTokenizer.from_pretrained(dest)`` (transformers 5 ignores
    ``vocab_file=`` paths in the constructor). SD1.x uses ``pad_token="<|endoftext|>"``,
    the OpenCLIP tokenizers of SD2.x / SDXL's second encoder use ``"!"``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = _clip_vocab_and_merges()
    (dest / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (dest / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return dest


@functools.lru_cache(maxsize=4)
def _load_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    # Cached: pipelines only read tokenizers, and loading costs ~0.1 s.
    with tempfile.TemporaryDirectory(prefix="clip-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(clip_tokenizer_files(Path(tmp), pad_token=pad_token))


# --------------------------------------------------------------------------- components


def _text_config(*, projection_dim: int = 32, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    # Special-token ids as in the real SD checkpoints' configs (legacy eos id 2 means the
    # pooled output is taken at argmax(input_ids), i.e. the first <|endoftext|>).
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _tiny_vae(family: str) -> AutoencoderKL:
    # Four blocks => 3 downsamples => 8x, like the real SD VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
        force_upcast=True,  # diffusers default, as in the released SD1.5 and SDXL VAEs
    )


def _tiny_unet(family: str, *, sample_size: int = 8) -> UNet2DConditionModel:
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
    )
    if family == "sdxl":
        # Mirrors SDXL: no attention in the first block, text_time conditioning,
        # cross-attention on both encoders' concatenated hidden states (32 + 32).
        pooled_dim = 32
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
            **common,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32,
        **common,
    )


def _scheduler(prediction_type: str, timestep_spacing: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def _check_family(family: str) -> str:
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    return family


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    # Replace whatever the installed transformers wrote with the plain vocab/merges files,
    # which both transformers 4.x (slow CLIPTokenizer) and 5.x read.
    if folder.exists():
        shutil.rmtree(folder)
    clip_tokenizer_files(folder, pad_token=pad_token)


def _canonical_clip_text_weights(folder: Path) -> None:
    """Rewrite a saved CLIPTextModel's weights with the hub's ``text_model.`` key prefix.

    transformers 5 dropped the ``text_model`` wrapper of CLIPTextModel and saves bare keys,
    which transformers 4.x silently ignores (random init). The prefixed layout is what real
    checkpoints use and both versions load.
    """
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures", ["CLIPTextModel"])[0] != "CLIPTextModel":
        return  # CLIPTextModelWithProjection keeps the prefix in both versions

    def canonical(key: str) -> str:
        return key if key.startswith("text_model.") else "text_model." + key

    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        if all(k.startswith("text_model.") for k in tensors):
            continue
        save_file({canonical(k): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    for index_file in folder.glob("*.safetensors.index.json"):
        index = json.loads(index_file.read_text())
        index["weight_map"] = {canonical(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_model(
    dest: Path,
    family: str = "sd15",
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    sample_size: int = 8,
) -> Path:
    """Save a tiny random-weight SD1.5- or SDXL-layout diffusers folder into ``dest``.

    Loadable by ``DiffusionPipeline.from_pretrained(dest)`` and per component
    (``UNet2DConditionModel.from_pretrained(dest, subfolder="unet")`` ...). ``sample_size``
    is the UNet's latent size; the default 8 gives 64x64 images by default.
    """
    family = _check_family(family)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    # Re-seed before each component so one component's config never shifts another's weights.
    torch.manual_seed(seed)
    unet = _tiny_unet(family, sample_size=sample_size)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(family)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    scheduler = _scheduler(prediction_type, timestep_spacing)
    tokenizer = _load_clip_tokenizer(EOS_TOKEN)

    if family == "sdxl":
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(projection_dim=32, hidden_act="gelu")
        )
        tokenizer_2 = _load_clip_tokenizer("!")
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(dest, safe_serialization=True)
    _canonical_clip_text_weights(dest / "text_encoder")
    _write_tokenizer(dest / "tokenizer", EOS_TOKEN)
    if family == "sdxl":
        _write_tokenizer(dest / "tokenizer_2", "!")
    return dest


def build_tiny_taesd(dest: Path, seed: int = 0, *, taesd_default_config: bool = False) -> Path:
    """Save a random-weight AutoencoderTiny into ``dest``.

    Small config by default (still 8x down, 4 latent channels); ``taesd_default_config=True``
    gives ``AutoencoderTiny()`` defaults, i.e. the real TAESD/TAESDXL architecture.
    """
    dest = Path(dest)
    torch.manual_seed(seed)
    if taesd_default_config:
        vae = AutoencoderTiny()
    else:
        # Four encoder blocks: the first keeps the size, each later one halves it => 8x.
        vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=4,
        )
    vae.save_pretrained(dest, safe_serialization=True)
    _strip_taesd_config(dest / "config.json")
    return dest


def _strip_taesd_config(config_path: Path) -> None:
    # AutoencoderTiny registers `block_out_channels` itself (pipelines read it), so saving it
    # only makes every later load warn "not expected"; real TAESD configs don't carry it.
    config = json.loads(config_path.read_text())
    if config.pop("block_out_channels", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_family(model_dir: Path) -> str:
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return "sdxl" if "XL" in index.get("_class_name", "") else "sd15"


def build_tiny_lcm_lora(model_dir: Path, dest: Path, seed: int = 0, rank: int = 4) -> Path:
    """Save a random non-zero LoRA for the tiny UNet in ``model_dir`` (stand-in for LCM-LoRA).

    Written as ``dest/pytorch_lora_weights.safetensors`` in diffusers format; load with
    ``pipe.load_lora_weights(dest, weight_name=LORA_WEIGHT_NAME)`` then ``pipe.fuse_lora()``
    (diffusers 0.42 also finds it without ``weight_name``; 0.36 needs it when offline).
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_dir, dest = Path(model_dir), Path(dest)
    family = _model_family(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    # init_lora_weights=False keeps peft's random (non-zero) B, so the LoRA changes outputs.
    # lora_alpha == rank: loaders that don't read alpha metadata assume scale 1 as well.
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=LORA_TARGET_MODULES,
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    unet.add_adapter(config)
    lora_state = get_peft_model_state_dict(unet)
    pipe_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    dest.mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(
        dest,
        unet_lora_layers=lora_state,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return dest


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("SCOPE_STREAMDIFFUSION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "scope-streamdiffusion"


def _is_complete(folder: Path, marker_file: str = "model_index.json") -> bool:
    marker = folder / _VERSION_FILE
    return (folder / marker_file).is_file() and marker.is_file() and marker.read_text().strip() == BUILDER_VERSION


def _build_once(final: Path, build, marker_file: str) -> Path:
    """Build into a temp dir beside ``final`` and rename it into place.

    Concurrent processes see either no folder or a complete one; a stale one (older builder) is
    swapped out first.
    """
    if _is_complete(final, marker_file):
        return final
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
    try:
        build(tmp)
        (tmp / _VERSION_FILE).write_text(BUILDER_VERSION + "\n")
        if final.exists() and not _is_complete(final, marker_file):
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            try:
                os.replace(final, trash / name)
            except OSError:
                pass  # another process already swapped it
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, marker_file):  # lost the race to a complete build: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_model(name: str = "tiny-random", cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model folder ``name``, building it once if needed."""
    if name not in TINY_MODEL_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODEL_NAMES)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_once(root / name, lambda tmp: build_tiny_model(tmp, TINY_MODEL_NAMES[name]), "model_index.json")


TINY_TAESD_NAME = "tiny-random-taesd"


def ensure_tiny_taesd(cache_dir: Path | None = None) -> Path:
    """Return the cached tiny random-weight TAESD folder, building it once if needed.

    The tiny-random models use it as their default tiny VAE, so ``use_tiny_vae=True`` (the default)
    never reaches the hub.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_once(root / TINY_TAESD_NAME, build_tiny_taesd, "config.json")
