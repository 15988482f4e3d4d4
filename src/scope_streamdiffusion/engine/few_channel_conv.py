"""A 3x3 convolution (padding 1) to a few output channels as one Triton kernel: TAESD's last layer
(64 -> 3 channels at the frame's full size).

cuDNN has no good kernel for three output channels: on an H200 at 512x512 the convolution takes 62 us
as it is and 41 us run to 32 zero-padded channels and sliced (R13's :class:`.taesd.PaddedOutConv`),
where reading its 64-channel input once takes ~8 us. Here a program computes a run of pixels of one
row: for each of the 9 taps it loads those pixels' channels (channels_last: one contiguous row each)
and multiplies them by the tap's weights, padded to 16 output columns for the tensor cores, summing
in float32; then it adds the bias and writes the few real channels. The rows above and below are
read again by the neighbouring programs, from the cache.

``conv3x3_to_few`` is the operator compiled code calls (graph modes, on CUDA with Triton); elsewhere
it is PyTorch's convolution. Inference only (no autograd formula).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: PyTorch's convolution
    triton = None

# Output columns the weights are padded to (the tensor cores' smallest dot), pixels a program.
PADDED_COLUMNS = 16
BLOCK_PIXELS = 128


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) weights as the kernel reads them: (9 taps, in, PADDED_COLUMNS), zeros past ``out``."""
    out, cin = weight.shape[:2]
    if out > PADDED_COLUMNS or weight.shape[2:] != (3, 3):
        raise ValueError(f"weights {tuple(weight.shape)}: 3x3 to at most {PADDED_COLUMNS} channels expected")
    packed = torch.zeros((9, cin, PADDED_COLUMNS), dtype=weight.dtype, device=weight.device)
    packed[:, :, :out] = weight.detach().permute(2, 3, 1, 0).reshape(9, cin, out)
    return packed


def served(x: torch.Tensor) -> bool:
    """Inputs the kernel takes: 4-D float16/bfloat16 (float32 would run its dots in TF32)."""
    return x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _output(x: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _unpacked(packed: torch.Tensor, channels: int) -> torch.Tensor:
    cin = packed.shape[1]
    return packed[:, :, :channels].reshape(3, 3, cin, channels).permute(3, 2, 0, 1)


if triton is not None:

    @triton.jit
    def _conv3x3_to_few(x_ptr, w_ptr, b_ptr, y_ptr, height, width, cin, s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                        OUT: tl.constexpr, COLUMNS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        row = tl.program_id(1)
        n = tl.program_id(2)
        ch = tl.arange(0, BLOCK_C)
        outs = tl.arange(0, COLUMNS)
        cmask = ch < cin
        acc = tl.zeros([BLOCK_P, COLUMNS], tl.float32)
        for dy in tl.static_range(3):
            r = row + dy - 1 + cols * 0  # per column: the masks are vectors
            for dx in tl.static_range(3):
                c = cols + dx - 1
                inside = (c >= 0) & (c < width) & (r >= 0) & (r < height)  # zeros outside: padding 1
                xt = tl.load(x_ptr + n * s_n + r[:, None] * s_h + c[:, None] * s_w + ch[None, :] * s_c,
                             mask=inside[:, None] & cmask[None, :], other=0.0)
                wt = tl.load(w_ptr + ((dy * 3 + dx) * cin + ch[:, None]) * COLUMNS + outs[None, :],
                             mask=cmask[:, None], other=0.0)
                acc += tl.dot(xt, wt)
        if HAS_BIAS:
            acc += tl.load(b_ptr + outs, mask=outs < OUT, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + n * o_n + row * o_h + cols[:, None] * o_w + outs[None, :] * o_c
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(cols < width)[:, None] & (outs < OUT)[None, :])


def conv3x3_to_few_triton(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                          channels: int) -> torch.Tensor:
    """The kernel on ``x`` (N, C, H, W), any strides; ``packed``: :func:`pack_weight`'s. The output
    keeps x's layout (channels_last or contiguous)."""
    n, cin, h, w = x.shape
    y = _output(x, channels)
    # Triton launches on the current device (CPU tensors: its interpreter, in the tests).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _conv3x3_to_few[(triton.cdiv(w, BLOCK_PIXELS), h, n)](
            x, packed, bias, y, h, w, cin, *x.stride(), *y.stride(), OUT=channels, COLUMNS=PADDED_COLUMNS,
            BLOCK_C=max(16, triton.next_power_of_2(cin)), BLOCK_P=BLOCK_PIXELS, HAS_BIAS=bias is not None,
            num_warps=4)
    return y


@torch.library.custom_op("scope_streamdiffusion::conv3x3_to_few", mutates_args=())
def conv3x3_to_few(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], channels: int) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` for the ``channels`` (<= 16) output channels of
    ``packed`` (:func:`pack_weight` of ``weight``), laid out as x."""
    if x.is_cuda and triton is not None and served(x):
        return conv3x3_to_few_triton(x, packed, bias, channels)
    out = F.conv2d(x, _unpacked(packed, channels).to(x.dtype), bias, padding=1)
    return _output(x, channels).copy_(out)


@conv3x3_to_few.register_fake
def _(x, packed, bias, channels):
    return _output(x, channels)
