"""StreamDiffusionConfig: every parameter of the pipeline with its range and UI metadata.

``is_load_param=True`` fields are passed to ``__init__`` and lock while streaming; all others are
runtime parameters that may change on any call. Ranges (``ge``/``le``) are also what out-of-range
runtime values are clamped to.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ._scope import BasePipelineConfig, HuggingfaceRepoArtifact, ModeDefaults, ui_field_config
from ._version import __version__

DEFAULT_MODEL_ID = "stabilityai/sd-turbo"
DEFAULT_PROMPT = "a watercolor painting, soft light, highly detailed"

# Explicit files (never ``files=[]``): Scope's dialog fetches exactly these and its
# "already downloaded?" check can see them.
SD_TURBO_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]
TAESD_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]

VIDEO = ["video"]


def _input(order: int, label: str, **kw):
    return ui_field_config(order=order, label=label, category="input", **kw)


def _config(order: int, label: str, **kw):
    return ui_field_config(order=order, label=label, category="configuration", **kw)


class StreamDiffusionConfig(BasePipelineConfig):
    pipeline_id: ClassVar[str] = "streamdiffusion"
    pipeline_name: ClassVar[str] = "StreamDiffusion"
    pipeline_description: ClassVar[str] = (
        "Real-time Stable Diffusion on live video or from text: stream-batch denoising with residual "
        "CFG, for SD1.5, SD2.1/SD-Turbo and SDXL/SDXL-Turbo models."
    )
    pipeline_version: ClassVar[str] = __version__
    docs_url: ClassVar[str | None] = "https://github.com/daydreamlive/scope-streamdiffusion#readme"
    estimated_vram_gb: ClassVar[float | None] = 4.0
    artifacts: ClassVar[list] = [
        HuggingfaceRepoArtifact(repo_id="stabilityai/sd-turbo", files=SD_TURBO_FILES),
        HuggingfaceRepoArtifact(repo_id="madebyollin/taesd", files=TAESD_FILES),
    ]
    supports_lora: ClassVar[bool] = True
    supports_prompts: ClassVar[bool] = True
    min_dimension: ClassVar[int] = 64
    inputs: ClassVar[list] = ["video"]
    outputs: ClassVar[list] = ["video"]
    # Video (img2img on the input stream) is StreamDiffusion's main use; text mode runs txt2img.
    modes: ClassVar[dict] = {
        "video": ModeDefaults(default=True, height=512, width=512, input_size=1),
        "text": ModeDefaults(height=512, width=512),
    }

    # ----- live controls (Input & Controls panel) -------------------------------------------------
    negative_prompt: str = Field(
        default="", description="What the image should not show (used by the 'full' and 'initialize' CFG types).",
        json_schema_extra=_input(1, "Negative prompt"))
    strength: float = Field(
        default=0.5, ge=0.0, le=1.2,
        description="How far the output departs from the input frame: 0 returns the input, 1 ignores most "
                    "of it, up to 1.2 fades the input out completely. Sets the first denoising timestep "
                    "(t = strength x 999).",
        json_schema_extra=_input(2, "Strength", modes=VIDEO, modulatable=True, modulatable_min=0.0,
                                 modulatable_max=1.2))
    guidance_scale: float = Field(
        default=1.0, ge=0.0, le=20.0,
        description="Classifier-free guidance scale. At 1 or below guidance is off and costs nothing.",
        json_schema_extra=_input(3, "Guidance", modulatable=True, modulatable_min=0.0, modulatable_max=10.0))
    delta: float = Field(
        default=1.0, ge=0.0, le=5.0,
        description="Residual CFG strength of the virtual negative (self/initialize CFG types).",
        json_schema_extra=_input(4, "Delta", modulatable=True, modulatable_min=0.0, modulatable_max=2.0))
    num_inference_steps: int = Field(
        default=1, ge=1, le=10,
        description="Denoising steps per frame (stream-batch slots). More steps: more detail, more latency.",
        json_schema_extra=_input(5, "Steps"))
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Seed of the fixed per-step noise.",
        json_schema_extra=_input(6, "Seed"))
    cfg_type: Literal["none", "full", "self", "initialize"] = Field(
        default="self",
        description="Guidance type: none; full (negative-prompt UNet rows); self (residual CFG, free); "
                    "initialize (one negative row per new frame, then residual).",
        json_schema_extra=_input(7, "CFG type"))
    t_index_list: list[int] | None = Field(
        default=None,
        description="Advanced: explicit timestep indices into the 50-step LCM grid (t = 999 - 20 i), "
                    "overriding strength and steps, e.g. [32, 45].",
        json_schema_extra=_input(8, "Timestep indices"))

    # ----- runtime configuration (Settings panel) -------------------------------------------------
    use_denoising_batch: bool = Field(
        default=True,
        description="Stream batch: one UNet batch per frame over all steps (faster; n-1 frames latency). "
                    "Off: the steps run one after another.",
        json_schema_extra=_config(20, "Denoising batch"))
    do_add_noise: bool = Field(
        default=True, description="Re-noise between steps with the fixed per-step noise.",
        json_schema_extra=_config(21, "Add noise"))
    similar_image_filter: bool = Field(
        default=False, description="Skip the model when the input frame barely changed (saves GPU power).",
        json_schema_extra=_config(22, "Similar-image filter", modes=VIDEO))
    similar_image_filter_threshold: float = Field(
        default=0.98, ge=0.9, le=1.0, description="Cosine similarity above which frames may be skipped.",
        json_schema_extra=_config(23, "Filter threshold", modes=VIDEO))
    similar_image_filter_max_skip_frame: int = Field(
        default=10, ge=0, le=120, description="At most this many frames in a row are skipped.",
        json_schema_extra=_config(24, "Filter max skips", modes=VIDEO))

    # ----- load-time configuration (reload the model) ---------------------------------------------
    model_id: str = Field(
        default=DEFAULT_MODEL_ID,
        description="Hugging Face id or local diffusers folder (SD1.5, SD2.1, SD-Turbo, SDXL, SDXL-Turbo, "
                    "SDXL-Lightning, LCM models).",
        json_schema_extra=_config(1, "Model", is_load_param=True))
    use_lcm_lora: bool = Field(
        default=False, description="Fuse LCM-LoRA (for non-distilled SD1.5/SDXL models; skipped for turbo/LCM).",
        json_schema_extra=_config(2, "LCM-LoRA", is_load_param=True))
    lcm_lora_id: str | None = Field(
        default=None, description="LCM-LoRA id or folder (default per model family).",
        json_schema_extra=_config(3, "LCM-LoRA model", is_load_param=True))
    use_tiny_vae: bool = Field(
        default=True, description="Use TAESD, the tiny autoencoder (much faster, slightly softer).",
        json_schema_extra=_config(4, "Tiny VAE (TAESD)", is_load_param=True))
    tiny_vae_id: str | None = Field(
        default=None, description="TAESD id or folder (default madebyollin/taesd or taesdxl).",
        json_schema_extra=_config(5, "Tiny VAE model", is_load_param=True))
    acceleration: Literal["auto", "none", "xformers", "cudagraph", "compile", "background-compile", "tensorrt"] = Field(
        default="auto",
        description="auto: background-compile on CUDA (cudagraph without Triton), eager elsewhere; none: eager "
                    "PyTorch; xformers: xformers attention; cudagraph: the whole frame step replayed as one CUDA "
                    "graph (ready in seconds); compile: torch.compile + CUDA graph (fastest, minutes to compile "
                    "the first time, cached on disk); background-compile: each shape as cudagraph at once, as "
                    "compile once it has compiled in the background (a minute or two, 30-40 s cached); tensorrt: "
                    "TensorRT UNet engine (needs `pip install tensorrt onnx`). See BENCHMARKS.md.",
        json_schema_extra=_config(6, "Acceleration", is_load_param=True))
    frame_buffer_size: int = Field(
        default=1, ge=1, le=8, description="Frames processed per call (batched together).",
        json_schema_extra=_config(7, "Frames per call", is_load_param=True))
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        default=None, description="Model precision (default float16 on CUDA, float32 on CPU).",
        json_schema_extra=_config(8, "Precision", is_load_param=True))
    device: str | None = Field(
        default=None, description="Torch device, e.g. cuda:1 (default CUDA when available, else CPU).",
        json_schema_extra=_config(10, "Device", is_load_param=True))
    # Scope renders its LoRA manager for the component="lora" field; the UI sends its choice as the
    # load parameters loras=[{path, scale, merge_mode}] and lora_merge_mode, not as this field.
    lora_merge_strategy: Literal["permanent_merge", "runtime_peft"] = Field(
        default="permanent_merge",
        description="How LoRAs are applied: permanent_merge fuses them into the weights (no per-frame cost, scale "
                    "fixed until reload); runtime_peft keeps them as adapters whose scale changes live.",
        json_schema_extra=_config(9, "LoRA", component="lora", is_load_param=True))
    # Resolution (Scope's resolution control); snapped down to a multiple of 8.
    height: int = Field(
        default=512, ge=64, le=2048, description="Output height in pixels (rounded down to a multiple of 8).",
        json_schema_extra=_config(0, "Height", component="resolution", is_load_param=True))
    width: int = Field(
        default=512, ge=64, le=2048, description="Output width in pixels (rounded down to a multiple of 8).",
        json_schema_extra=_config(0, "Width", component="resolution", is_load_param=True))

