"""fp8 for the UNet's transformer layers (opt-in, ``SCOPE_STREAMDIFFUSION_FP8=1``, with ``compile``).

Weights and activations in float8 (e4m3; activations scaled on every call, one scale per tensor in
float16, per row in bfloat16) through torchao, on GPUs with fp8 matrix units (compute capability 8.9+:
Ada, Hopper), on top of the other rewrites. Only the attention blocks' linear layers are swapped: they
read one row per pixel of their level, the largest GEMMs and the ones fp8 can speed up most. The time
embedding's projections (one row) and the prompt's key/value projections (77 rows) stay in fp16, as do
convolutions and attention itself. Measured slower all the same (BENCHMARKS.md, R21: at SDXL 1024² its
GEMMs run 32% faster, and scaling the activations costs more than that), so it stays an opt-in
experiment; the quality cost would need checking with real weights, and runtime LoRA adapters can't be
used with it (their layers wrap the linear layers).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)


def fp8_requested() -> bool:
    return os.environ.get("SCOPE_STREAMDIFFUSION_FP8", "").strip().lower() in ("1", "true", "yes")


def fp8_unavailable(device: torch.device, loras=None) -> str | None:
    """Why fp8 can't run here, or None."""
    from .lora import has_runtime_adapters

    if has_runtime_adapters(loras):
        return "runtime LoRA adapters are loaded"
    if device.type != "cuda":
        return "it needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no fp8 matrix units (compute capability 8.9+ needed)"
    try:
        importlib.import_module("torchao.quantization")
    except Exception as exc:  # noqa: BLE001 - missing or built for another torch
        return f"torchao is not importable ({type(exc).__name__}: {exc}); install it with: pip install torchao"
    return None


def _fp8_friendly(module: torch.nn.Module, name: str) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    # A weight that is a view of a larger one is computed elsewhere: a fused layer's part (to_q/to_k/to_v
    # beside to_qkv) or a shared projection's member (its columns of one float16 GEMM).
    weight = module.weight
    if weight.untyped_storage().nbytes() != weight.numel() * weight.element_size():
        return False
    # Attention blocks only (``down_blocks.1.attentions.0...``, ``mid_block.attentions.0...``); fp8 matrix
    # products need both dimensions divisible by 16.
    in_attention_block = name.startswith("attentions.") or ".attentions." in name
    return in_attention_block and module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(models) -> None:
    """Quantize ``models.unet`` in place when fp8 can run here, else one warning saying why; sets
    ``models.extras["fp8_linear_layers"]``. Never fails the load: it is an experiment."""
    reason = fp8_unavailable(models.device, models.extras.get("loras"))
    if reason:
        logger.warning("SCOPE_STREAMDIFFUSION_FP8: staying in %s: %s.", models.dtype, reason)
        return
    try:
        models.extras["fp8_linear_layers"] = quantize_unet_fp8(models.unet)
    except Exception as exc:  # noqa: BLE001 - an experiment must not stop the load
        logger.warning("SCOPE_STREAMDIFFUSION_FP8: torchao could not quantize the UNet (%s: %s); it may be partly "
                       "fp8, the layers it did not reach stay in %s.", type(exc).__name__, exc, models.dtype)


def quantize_unet_fp8(unet: torch.nn.Module) -> int:
    """Swap the attention blocks' linear layers for fp8 ones in place; returns how many were to be swapped."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    count = sum(_fp8_friendly(m, n) for n, m in unet.named_modules())
    # One scale per row where torchao can (bfloat16 weights only): a row's scale is a reduction the
    # kernel making the row can do; in float16 one scale per tensor.
    granularity = PerRow() if next(unet.parameters()).dtype == torch.bfloat16 else PerTensor()
    # set_inductor_config=False: torchao's global inductor settings include slow autotuning.
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False),
              filter_fn=_fp8_friendly)
    return count
