"""acceleration="tensorrt": ONNX export of the UNet and TensorRT engines with dynamic shape profiles.

Kept small and isolated: TensorRT cannot be installed on this project's CI or test machines, so
the ONNX export (the part that decides correctness) is tested on CPU with onnxruntime against the
PyTorch UNet, and the engine build/run code below is thin glue over TensorRT's Python API.

* The ONNX graph has dynamic batch, height, width and token axes (timesteps are per row).
* Engines are built for a dynamic profile (256-1024 px, or up to the stream's size when larger, tuned
  for the stream's size; 1 to 8 UNet rows per frame per call, which covers up to 4 steps with full
  CFG; 77-231 tokens) and cached on disk under ``~/.cache/scope-streamdiffusion/tensorrt``
  keyed by a fingerprint of the UNet weights (so model, fused LoRA and dtype are all in it), the
  profile, the TensorRT version and the GPU. A cached engine is reused; it is rebuilt only when
  missing.
* Shapes outside the profile run on the PyTorch UNet (one warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .background_compile import FX_TRACING

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorrt onnx  (or: pip install 'scope-streamdiffusion[tensorrt]')"
INPUTS = ("sample", "timestep", "encoder_hidden_states")
SDXL_INPUTS = ("text_embeds", "time_ids")
OUTPUT = "latent"


def require_tensorrt(export: bool = False):
    """Import tensorrt (and onnx when the UNet must be exported: no cached engine), or raise ONE clear
    ModelLoadError with the install command."""
    import importlib

    modules, missing, cause = {}, [], None
    for name in ("tensorrt", "onnx") if export else ("tensorrt",):
        try:
            modules[name] = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA library behind it
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
            cause = cause or exc
    if missing:
        from .models import ModelLoadError

        needs = "NVIDIA TensorRT, and onnx to build its engine" if export else "NVIDIA TensorRT"
        raise ModelLoadError(
            f"acceleration='tensorrt' needs {needs}; not importable: {', '.join(missing)}. "
            f"Fix: {INSTALL_HINT}; or choose acceleration='compile' (no extra install)."
        ) from cause
    return modules["tensorrt"]


@dataclass(frozen=True)
class Profile:
    """The dynamic shape range an engine accepts (pixels; latents are 1/8)."""

    min_size: int = 256
    opt_width: int = 512
    opt_height: int = 512
    max_size: int = 1024
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    max_tokens: int = 231  # compel encodes long prompts in 77-token chunks

    @classmethod
    def for_stream(cls, width: int, height: int, frame_buffer_size: int = 1) -> "Profile":
        """Tuned for the stream being loaded: its size as the optimum, inside the range (which grows
        past 1024 px for a larger stream), and room for 4 steps with full CFG at its frames per call."""
        return cls(min_size=min(256, width, height), opt_width=width, opt_height=height,
                   max_size=max(1024, width, height), opt_batch=frame_buffer_size, max_batch=8 * frame_buffer_size)

    def shapes(self, in_channels: int, hidden: int, sdxl: bool, time_ids: int = 6, pooled: int = 1280):
        """{input name: (min, opt, max) shape}."""
        lo, hi = self.min_size // 8, self.max_size // 8
        b = (self.min_batch, self.opt_batch, self.max_batch)
        shapes = {
            "sample": tuple((bb, in_channels, h, w) for bb, h, w in
                            zip(b, (lo, self.opt_height // 8, hi), (lo, self.opt_width // 8, hi))),
            "timestep": tuple((bb,) for bb in b),
            "encoder_hidden_states": tuple((bb, t, hidden) for bb, t in zip(b, (77, 77, self.max_tokens))),
        }
        if sdxl:
            shapes["text_embeds"] = tuple((bb, pooled) for bb in b)
            shapes["time_ids"] = tuple((bb, time_ids) for bb in b)
        return shapes

    def accepts(self, sample: torch.Tensor, tokens: int) -> bool:
        b, _, h, w = sample.shape
        lo, hi = self.min_size // 8, self.max_size // 8
        return (self.min_batch <= b <= self.max_batch and lo <= h <= hi and lo <= w <= hi
                and 1 <= tokens <= self.max_tokens)


class UNetForExport(torch.nn.Module):
    """Positional-tensor face of a diffusers UNet: (sample, timestep, ehs[, text_embeds, time_ids])."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]


def example_inputs(unet: torch.nn.Module, *, batch: int = 2, height: int = 64, width: int = 64, tokens: int = 77,
                   device=None, dtype=None, seed: int = 0) -> tuple:
    """Random inputs of the right shapes for ``unet`` (pixel height/width)."""
    p = next(unet.parameters())
    device, dtype = device or p.device, dtype or p.dtype
    gen = torch.Generator("cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=gen).to(device, dtype)

    cfg = unet.config
    sample = rnd(batch, cfg.in_channels, height // 8, width // 8)
    timestep = torch.linspace(999, 99, batch).to(device, torch.float32)
    ehs = rnd(batch, tokens, cfg.cross_attention_dim)
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(batch, 1)
        return sample, timestep, ehs, rnd(batch, pooled), time_ids
    return sample, timestep, ehs


def export_unet_onnx(unet: torch.nn.Module, path: Path, *, opset: int = 17, height: int = 64, width: int = 64) -> Path:
    """Export ``unet`` to ONNX at ``path`` with dynamic batch/height/width/token axes.

    Uses the TorchScript exporter (``dynamo=False``), which needs no onnxscript; models over 2 GB
    get their weights as external data beside ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = UNetForExport(unet).eval()
    args = example_inputs(unet, height=height, width=width)
    names = list(INPUTS) + (list(SDXL_INPUTS) if wrapper.sdxl else [])
    dynamic = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "tokens"},
        OUTPUT: {0: "batch", 2: "height", 3: "width"},
    }
    if wrapper.sdxl:
        dynamic.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
    # The export runs the UNet: not beside a torch.fx trace of another pipeline's background compiler.
    with torch.no_grad(), FX_TRACING:
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=[OUTPUT], dynamic_axes=dynamic, do_constant_folding=True)
    return path


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's config, parameter shapes/dtypes and per-tensor sums (one GPU sync)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    params = list(module.named_parameters())
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().float().sum() for _, p in params]) if params else torch.zeros(0)
    h.update(sums.cpu().double().numpy().round(3).tobytes())
    return h.hexdigest()[:16]


def engine_path(fingerprint: str, profile: Profile, trt_version: str, gpu: str, root: Path | None = None) -> Path:
    from .inductor import cache_root

    key = hashlib.sha256(json.dumps([fingerprint, asdict(profile), trt_version, gpu]).encode()).hexdigest()[:16]
    return (root or cache_root() / "tensorrt") / f"unet-{fingerprint}-{key}.plan"


def build_engine(onnx_path: Path, plan_path: Path, shapes: dict, *, fp16: bool = True) -> Path:
    """Build and save a TensorRT engine for ``onnx_path`` with one dynamic optimisation profile."""
    trt = require_tensorrt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the UNet engine (see its log above).")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    return plan_path


class TensorRTUNet(torch.nn.Module):
    """Drop-in for the engine's UNet call: runs a TensorRT engine on the current CUDA stream."""

    def __init__(self, plan_path: Path, fallback: torch.nn.Module, profile: Profile):
        super().__init__()
        trt = require_tensorrt()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self._context = self._engine.create_execution_context()
        self.fallback = fallback  # the PyTorch UNet, for shapes outside the profile
        self.config = fallback.config
        self.profile = profile
        self._warned = False

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, added_cond_kwargs=None, **kw):
        if not self.profile.accepts(sample, encoder_hidden_states.shape[1]):
            if not self._warned:
                logger.warning("TensorRT engine profile %s does not cover shape %s; using the PyTorch UNet.",
                               self.profile, tuple(sample.shape))
                self._warned = True
            return self.fallback(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                                 added_cond_kwargs=added_cond_kwargs, **kw)
        b = sample.shape[0]
        feeds = {
            "sample": sample.contiguous(),
            "timestep": timestep.to(torch.float32).expand(b).contiguous(),
            "encoder_hidden_states": encoder_hidden_states.contiguous(),
        }
        if added_cond_kwargs:
            feeds["text_embeds"] = added_cond_kwargs["text_embeds"].contiguous()
            feeds["time_ids"] = added_cond_kwargs["time_ids"].to(sample.dtype).contiguous()
        out = torch.empty(sample.shape, device=sample.device, dtype=sample.dtype)
        for name, tensor in feeds.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._context.set_tensor_address(OUTPUT, out.data_ptr())
        self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return (out,)


def tensorrt_unet(models, profile: Profile | None = None) -> TensorRTUNet:
    """The models' UNet as a cached TensorRT engine (exported and built when missing)."""
    trt = require_tensorrt()
    unet = models.unet
    profile = profile or Profile()
    fingerprint = weights_fingerprint(unet)
    plan = engine_path(fingerprint, profile, trt.__version__, torch.cuda.get_device_name(models.device))
    if not plan.exists():
        require_tensorrt(export=True)  # before the export's minutes, not inside it
        # The ONNX file is only the engine's input: exported into a temporary folder, so an interrupted
        # export is never reused and gigabytes of SDXL export don't stay behind. The plan is the cache.
        plan.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=plan.parent, prefix="onnx-") as tmp:
            onnx_path = Path(tmp) / "unet.onnx"
            logger.info("Exporting the UNet to ONNX (%s)...", onnx_path)
            export_unet_onnx(unet, onnx_path)
            cfg = unet.config
            sdxl = getattr(cfg, "addition_embed_type", None) == "text_time"
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim if sdxl else 0
            shapes = profile.shapes(cfg.in_channels, cfg.cross_attention_dim, sdxl, pooled=pooled)
            logger.info("Building the TensorRT engine (minutes, once per model/LoRA/profile) -> %s", plan)
            build_engine(onnx_path, plan, shapes, fp16=models.dtype == torch.float16)
    return TensorRTUNet(plan, unet, profile)
