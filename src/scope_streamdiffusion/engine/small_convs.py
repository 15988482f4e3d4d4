"""The UNet's 3x3 convolutions over a handful of pixels, compiled as one GEMM over gathered patches.

At one frame of 512² the UNet's lowest level is 8x8: its 14 convolutions (1280 or 2560 channels in,
1280 out) are GEMMs 64 rows tall and 11,520-23,040 deep. On an H200 cuDNN runs them as split-K
kernels at a third of the rate of the UNet's other 3x3 convolutions (~20 µs each; reading the 30-MB
weight takes ~6), each after a memset node in the step graph. cuBLAS's split-K GEMM over the same
weight, with the 3x3 patches gathered first (a copy in inductor's generated kernels), made the
compiled step 1.7-1.8% faster at one frame; up to 256 pixels (the 16x16 level too, or the 8x8 level
at four rows) it was 0.5-1.2% slower than up to 64 (BENCHMARKS.md, R15). So the rewrite:

* applies only inside code dynamo traces (``is_dynamo_compiling``: in torch 2.13 ``is_compiling``
  is also true on other threads while a compilation runs, i.e. for background-compile's eager steps), and only where
  rows x height x width <= :data:`MAX_PIXELS` (a static shape under torch.compile). Eager and
  CUDA-graph runs keep cuDNN: there the gather would be separate eager kernels (not measured in the
  pipeline); 256² frames (their 8x8 and 4x4 levels) were not measured either;
* keeps the layer a ``Conv2d`` with the same parameters (same state-dict keys) and reads its weight
  as a matrix without copying (a channels_last weight is already laid out (out, 3, 3, in));
* computes the same function up to rounding (another summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows x height x width up to which the GEMM wins (64: the 8x8 level at one 512² frame; 256 lost).
MAX_PIXELS = 64


class SmallPixelsConv2d(torch.nn.Conv2d):
    """A 3x3, stride-1, padding-1 ``Conv2d`` whose compiled form over few pixels is one GEMM."""

    max_pixels = MAX_PIXELS

    def as_gemm(self, x: torch.Tensor) -> bool:
        """Whether this call runs as the GEMM."""
        return (torch.compiler.is_dynamo_compiling() and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= self.max_pixels
                and self.weight.is_contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_gemm(x):
            return patch_gemm(x, self.weight, self.bias)
        return super().forward(x)


def patch_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` for a 3x3 weight, as one GEMM over gathered patches;
    the result laid out channels_last, as cuDNN returns it for channels_last inputs."""
    n, _, h, w = x.shape
    matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (out, 3*3*in), a view if channels_last
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C)
    patches = F.pad(rows, (0, 0, 1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1)  # (N, H, W, C, 3, 3)
    patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * h * w, -1)  # (pixels, 3*3*C) in the weight's order
    out = patches @ matrix.t() if bias is None else torch.addmm(bias, patches, matrix.t())
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _qualifies(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def gemm_small_convs(unet: torch.nn.Module, max_pixels: int = MAX_PIXELS) -> int:
    """Make each plain 3x3 convolution of ``unet`` a :class:`SmallPixelsConv2d` (in place; the same
    module objects and parameters) that runs as a GEMM up to ``max_pixels``. Returns how many; 0 the
    second time."""
    count = 0
    for module in unet.modules():
        if _qualifies(module):
            module.__class__ = SmallPixelsConv2d
            if max_pixels != MAX_PIXELS:
                module.max_pixels = max_pixels
            count += 1
    return count
