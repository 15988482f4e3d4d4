"""Where models are loaded: the diffusers model, LCM-LoRA, TAESD, and the attention backend.

A model is named by a Hugging Face id or a local diffusers folder. Before the hub, a folder of the
same repo name in Scope's models directory (``DAYDREAM_SCOPE_MODELS_DIR`` or
``~/.daydream-scope/models``) is used, so files fetched by Scope's download dialog are found.
Every load failure becomes one :class:`ModelLoadError` naming the cause and the fix.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "stabilityai/sd-turbo"
DEFAULT_LCM_LORA = {"sd15": "latent-consistency/lcm-lora-sdv1-5", "sdxl": "latent-consistency/lcm-lora-sdxl"}
DEFAULT_TINY_VAE = {"sd15": "madebyollin/taesd", "sd21": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
# Names that mark a model as already few-step distilled: LCM-LoRA is not fused into those.
DISTILLED_MARKERS = ("turbo", "lightning", "lcm", "hyper", "dmd")
# Components a real-time img2img stream never uses.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


# Peak VRAM of a loaded model in fp16 with TAESD at 512x512, rounded up (BENCHMARKS.md has measurements).
ESTIMATED_VRAM_GB = {"sd": 4, "sdxl": 10}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the cause and the fix."""


def scope_models_dir() -> Path:
    """Scope's models folder: Scope's own answer when Scope is installed, else the same rule."""
    try:
        from scope.core.config import get_models_dir
    except ImportError:
        env = os.environ.get("DAYDREAM_SCOPE_MODELS_DIR")
        return Path(env or "~/.daydream-scope/models").expanduser().resolve()
    return get_models_dir()


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_absolute()


def resolve_source(name: str, marker: str = "model_index.json") -> str:
    """A local folder for ``name`` if there is one (as given, or in Scope's models dir), else ``name``.

    ``tiny-random`` (and ``tiny-random-sd15`` / ``tiny-random-sdxl``) name a tiny random-weight model
    that the package builds itself: for offline smoke tests, its output is noise by nature.
    """
    if name.startswith("tiny-random"):
        from ..testing.tiny_models import TINY_MODEL_NAMES, ensure_tiny_model

        if name in TINY_MODEL_NAMES:
            return str(ensure_tiny_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / marker).exists():
            raise ModelLoadError(
                f"'{name}' is not a diffusers folder (no {marker} in it). Fix: point to the folder that "
                f"holds {marker}, or convert a single-file checkpoint with diffusers' from_single_file "
                "and save_pretrained."
            )
        return str(path)
    if _looks_like_path(name):
        raise ModelLoadError(
            f"Model folder '{name}' does not exist. Fix: check the path, or pass a Hugging Face id "
            f"such as {DEFAULT_MODEL_ID}."
        )
    local = scope_models_dir() / name.split("/")[-1]
    if (local / marker).exists():
        return str(local)
    return name


def _load_error(what: str, name: str, exc: Exception) -> ModelLoadError:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ModelLoadError(
            f"Out of GPU memory loading {what} '{name}'. It needs about {ESTIMATED_VRAM_GB['sd']} GB "
            f"(SD1.5/SD2.1/SD-Turbo) or {ESTIMATED_VRAM_GB['sdxl']} GB (SDXL) of free GPU memory in fp16. "
            "Fix: close other GPU programs or pipelines, use the tiny VAE, or pick a smaller model."
        )
    text = f"{type(exc).__name__}: {exc}".strip()
    lowered = text.lower()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    # The hub's own exception is often the cause behind diffusers' OSError: read the whole chain.
    chain, cause = lowered, exc.__cause__ or exc.__context__
    for _ in range(5):
        if cause is None:
            break
        chain += f" | {type(cause).__name__}: {cause}".lower()
        cause = cause.__cause__ or cause.__context__
    # HF_HUB_OFFLINE alone proves nothing: a model that loaded and then failed is not a missing one.
    hub_words = ("offline", "connection", "resolve", "cannot find the requested files", "couldn't connect",
                 "max retries", "localentrynotfound", "not cached locally", "not fully cached",
                 "outgoing traffic has been disabled") + (("does not appear to have a file",) if offline else ())
    if any(k in chain for k in hub_words):
        return ModelLoadError(
            f"Could not get {what} '{name}': it is not in the local cache and the Hugging Face hub is "
            f"unreachable{' (HF_HUB_OFFLINE is set)' if offline else ''}. Fix: run "
            f"`scope-streamdiffusion download {name}` on a machine with internet (or download it from "
            "Scope's dialog), or pass a local diffusers folder."
        )
    if any(k in lowered for k in ("repositorynotfound", "404", "not a valid model identifier", "is not a local folder")):
        return ModelLoadError(
            f"{what.capitalize()} '{name}' was not found on the Hugging Face hub. Fix: check the id "
            "(e.g. stabilityai/sd-turbo) or pass a local diffusers folder."
        )
    if any(k in lowered for k in ("safetensors", "headertoolarge", "invalid header", "deserializ", "unexpected end")):
        return ModelLoadError(
            f"The weights of {what} '{name}' are unreadable ({text[:200]}). Fix: delete the damaged "
            "files and download them again."
        )
    if "lora" in what.lower():
        return ModelLoadError(f"Could not load {what} '{name}' ({text[:300]}). Fix: check that it is a LoRA "
                              "for Stable Diffusion (a .safetensors file of LoRA weights, or a diffusers LoRA folder).")
    return ModelLoadError(f"Could not load {what} '{name}' ({text[:300]}). Fix: check that it is a diffusers "
                          "Stable Diffusion model (SD1.5, SD2.1, SDXL or their turbo/LCM variants).")


@dataclass
class ModelFamily:
    """What the loaded configs say the model is."""

    base: str  # "sd15" | "sd21" | "sdxl"
    distilled: bool  # turbo / lightning / LCM: already few-step

    @property
    def is_sdxl(self) -> bool:
        return self.base == "sdxl"


def detect_family(unet_config, model_id: str, scheduler_class: str) -> ModelFamily:
    if unet_config.get("addition_embed_type") == "text_time":
        base = "sdxl"
    elif unet_config.get("cross_attention_dim") == 1024:
        base = "sd21"
    else:
        base = "sd15"
    name = model_id.lower()
    distilled = any(m in name for m in DISTILLED_MARKERS) or scheduler_class == "LCMScheduler"
    return ModelFamily(base=base, distilled=distilled)


@dataclass
class StreamModels:
    """The named components the engine runs, already on their device."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    alphas_cumprod: torch.Tensor
    prediction_type: str
    family: ModelFamily
    device: torch.device
    dtype: torch.dtype
    model_id: str
    force_zeros_for_empty_prompt: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def is_tiny_vae(self) -> bool:
        return type(self.vae).__name__ == "AutoencoderTiny"

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def _pipeline_kwargs(source: str) -> dict:
    """Drop components the stream never uses, if the model declares them."""
    index = Path(source) / "model_index.json"
    names = json.loads(index.read_text()).keys() if index.exists() else UNUSED_COMPONENTS
    return {name: None for name in UNUSED_COMPONENTS if name in names}


def _from_pretrained(cls, source: str, dtype: torch.dtype, **kwargs):
    """Prefer the fp16 weight variant in half precision; fall back to the plain files."""
    import warnings

    # diffusers >= 0.40 renamed torch_dtype to dtype; 0.36 (Scope's pin) only knows torch_dtype.
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    if dtype in (torch.float16, torch.bfloat16):
        try:
            return cls.from_pretrained(source, torch_dtype=dtype, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass
    return cls.from_pretrained(source, torch_dtype=dtype, **kwargs)


def _fuse_lcm_lora(pipe, family: ModelFamily, lcm_lora_id: str | None, model_id: str) -> None:
    if family.distilled:
        logger.info("'%s' is already a few-step model: LCM-LoRA is not fused.", model_id)
        return
    lora = lcm_lora_id or DEFAULT_LCM_LORA.get(family.base)
    if lora is None:
        logger.warning("No LCM-LoRA is known for %s models: pass lcm_lora_id; continuing without it.", family.base)
        return
    from .lora import does_not_fit, resolve_lora

    source, weight_kwargs = resolve_lora(lora)
    try:
        pipe.load_lora_weights(source, adapter_name="lcm", **weight_kwargs)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
        err = _load_error("LCM-LoRA", lora, exc)
        if does_not_fit(exc):
            err = ModelLoadError(
                f"LCM-LoRA '{lora}' does not fit model '{model_id}' ({family.base}). Fix: use "
                f"{DEFAULT_LCM_LORA.get(family.base, 'a LoRA made for this model')} or turn use_lcm_lora off."
            )
        raise err from exc


def _load_tiny_vae(family: ModelFamily, tiny_vae_id: str | None, dtype: torch.dtype):
    from diffusers import AutoencoderTiny

    name = tiny_vae_id or DEFAULT_TINY_VAE[family.base]
    source = resolve_source(name, marker="config.json")
    try:
        return AutoencoderTiny.from_pretrained(source, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise _load_error("tiny VAE", name, exc) from exc


def _set_attention(unet: torch.nn.Module, vae: torch.nn.Module, acceleration: str, device: torch.device) -> str:
    if acceleration != "xformers":
        return "none"
    try:
        importlib.import_module("xformers")  # present and loadable (its CUDA libraries too)

        if device.type != "cuda":
            raise RuntimeError("xformers needs a CUDA device")
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as exc:  # noqa: BLE001 - fall back, once, loudly
        logger.warning("acceleration='xformers' is unavailable (%s); using PyTorch SDPA attention.", exc)
        return "none"


def load_models(
    model_id: str = DEFAULT_MODEL_ID,
    *,
    device: torch.device,
    dtype: torch.dtype,
    use_lcm_lora: bool = False,
    lcm_lora_id: str | None = None,
    use_tiny_vae: bool = True,
    tiny_vae_id: str | None = None,
    acceleration: str = "none",
    loras: list | None = None,
    lora_merge_mode: str | None = None,
    stream_shape: tuple[int, int, int] | None = None,
) -> StreamModels:
    """``loras``/``lora_merge_mode``: user LoRAs in Scope's format (see ``lora.py``), fused or kept as adapters.
    ``stream_shape``: (width, height, frame_buffer_size) the models will run at (tunes TensorRT engines)."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from .lora import apply_loras, hold_scales_in_tensors, parse_loras

    lora_specs = parse_loras(loras, lora_merge_mode)  # a malformed entry fails before the model loads

    if model_id.startswith("tiny-random") and use_tiny_vae and tiny_vae_id is None:
        # The tiny smoke-test models get a tiny local TAESD too: the default one is on the hub.
        from ..testing.tiny_models import ensure_tiny_taesd

        tiny_vae_id = str(ensure_tiny_taesd())
    source = resolve_source(model_id)
    try:
        pipe = _from_pretrained(DiffusionPipeline, source, dtype, **_pipeline_kwargs(source))
    except Exception as exc:  # noqa: BLE001
        gc.collect()
        raise _load_error("model", model_id, exc) from exc
    try:
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise ModelLoadError(
                f"'{model_id}' is a {type(pipe).__name__}, not a Stable Diffusion UNet model. Fix: use an "
                "SD1.5, SD2.1 or SDXL model (or their turbo/LCM variants)."
            )
        scheduler_config = dict(pipe.scheduler.config)
        family = detect_family(pipe.unet.config, model_id, scheduler_config.get("_class_name", type(pipe.scheduler).__name__))
        if use_lcm_lora:
            _fuse_lcm_lora(pipe, family, lcm_lora_id, model_id)
        loaded_loras = apply_loras(pipe, lora_specs, model_id, family)
        vae = _load_tiny_vae(family, tiny_vae_id, dtype) if use_tiny_vae else pipe.vae
        # The SDXL VAE overflows in fp16 (NaN images): decode it in fp32 as its config asks.
        if not use_tiny_vae and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = vae.to(torch.float32)
        unet = pipe.unet
        encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
        tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
        for module in (unet, vae, *encoders):
            module.to(device)
            module.eval()
            module.requires_grad_(False)
        # Runtime LoRA scales as tensors on the device: a new scale then needs no new compile or capture.
        live_scales = any(lora.is_runtime and "unet" in lora.components for lora in loaded_loras) \
            and hold_scales_in_tensors(unet)
        if device.type == "cuda":
            # cuDNN runs convolutions in NHWC; NCHW weights cost a layout conversion per layer.
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        attention = _set_attention(unet, vae, acceleration, device)
        alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod
        force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        from .acceleration import accelerate

        return accelerate(StreamModels(
            unet=unet,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            alphas_cumprod=alphas_cumprod,
            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            family=family,
            device=device,
            dtype=dtype,
            model_id=model_id,
            force_zeros_for_empty_prompt=force_zeros,
            extras={"attention": attention, "source": source, "loras": loaded_loras,
                    "lora_scales_in_tensors": live_scales},
        ), acceleration, stream_shape)
    except ModelLoadError:
        pipe = None  # the half-loaded weights go before the error is raised
        gc.collect()
        raise
    except Exception as exc:  # noqa: BLE001
        pipe = None  # the half-loaded weights go before the error is raised
        gc.collect()
        raise _load_error("model", model_id, exc) from exc
