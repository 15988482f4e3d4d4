"""TAESD (diffusers' ``AutoencoderTiny``) with each ReLU run inside the convolution before it.

TAESD's blocks are conv -> ReLU -> conv -> ReLU -> conv, + input, ReLU, at 64 channels up to the
frame's full size. Compiled or not, each convolution is a cuDNN call and each ReLU (or add + ReLU) a
separate kernel that reads and writes the whole activation again. cuDNN runs a convolution, its bias,
a residual add and the ReLU as one kernel: on an H200 TAESD's encoder + decoder at 512² go from 1.46 to
1.25 ms per frame, compiled and replayed from a CUDA graph, and the pipeline gains 1.5-2.7% fps
(BENCHMARKS.md, R11). The weights are the same modules' (state-dict keys unchanged); the result
differs from the separate ops by rounding only (the convolution's sum is not rounded to fp16 before
the add and the ReLU).

Inference only: the op has no autograd formula (the models load without gradients), and the fused
blocks read their convolutions' weights directly (hooks on those convolutions do not run).
Applied in the graph modes (``acceleration.accelerate``); ``SCOPE_STREAMDIFFUSION_FUSE_TAESD=0``
keeps the separate ops, and so does a bfloat16 TAESD (cuDNN fuses float16 and float32). Off CUDA,
or where cuDNN is turned off, the op computes the same thing with the separate ops.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The output's layout, the same for the real op and its fake (inductor plans with the fake's
    strides): the input's, as in R11's A/B runs. (Following the weight too, as cuDNN would, measured
    once on another machine: 0.07 ms less of layout copies per 512² frame, 0.12 ms more in inductor's
    kernels around the op; BENCHMARKS.md, R11 run 51.)"""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _separate_ops(x, weight, bias, residual):
    out = F.conv2d(x, weight, bias, padding=1)
    if residual is not None:
        out = out + residual
    return F.relu(out).contiguous(memory_format=_layout(x))


@torch.library.custom_op("scope_streamdiffusion::conv3x3_relu", mutates_args=())
def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, padding=1) + residual)`` (no residual: ``relu(conv2d(...))``)."""
    return _separate_ops(x, weight, bias, residual)


@conv3x3_relu.register_kernel("cuda")
def _conv3x3_relu_cudnn(x, weight, bias, residual):
    if not torch.backends.cudnn.is_acceptable(x):  # cuDNN turned off, or a dtype it does not fuse
        return _separate_ops(x, weight, bias, residual)
    if residual is None:
        out = torch.cudnn_convolution_relu(x, weight, bias, [1, 1], [1, 1], [1, 1], 1)
    else:
        out = torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, [1, 1], [1, 1], [1, 1], 1)
    return out.contiguous(memory_format=_layout(x))


@conv3x3_relu.register_fake
def _conv3x3_relu_fake(x, weight, bias, residual):
    return F.conv2d(x, weight, bias, padding=1).contiguous(memory_format=_layout(x))


def _is_plain_3x3(conv) -> bool:
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class FusedTinyBlock(torch.nn.Module):
    """An ``AutoencoderTinyBlock`` whose three ReLUs run inside its convolutions (same submodules)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.conv, self.skip = block.conv, block.skip  # the same modules: the same state-dict keys

    def forward(self, x):
        conv1, _, conv2, _, conv3 = self.conv
        h = conv3x3_relu(x, conv1.weight, conv1.bias, None)
        h = conv3x3_relu(h, conv2.weight, conv2.bias, None)
        return conv3x3_relu(h, conv3.weight, conv3.bias, self.skip(x))


class FusedConvReLU(torch.nn.Module):
    """A 3x3 convolution followed by a ReLU, as one op; holds the convolution's own parameters."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        return conv3x3_relu(x, self.weight, self.bias, None)


def _fusable_block(module) -> bool:
    if type(module).__name__ != "AutoencoderTinyBlock":
        return False
    convs = list(module.conv)
    return (len(convs) == 5 and all(_is_plain_3x3(c) for c in convs[::2])
            and all(isinstance(a, torch.nn.ReLU) for a in convs[1::2]) and isinstance(module.fuse, torch.nn.ReLU))


def fuse_relus(vae: torch.nn.Module) -> int:
    """Fuse the ReLUs of a TAESD (``AutoencoderTiny``) into its convolutions, in place; returns how many
    places were fused (0 for any other VAE, or a bfloat16 one, which cuDNN does not fuse: left as it is)."""
    if type(vae).__name__ != "AutoencoderTiny" or next(vae.parameters()).dtype not in (torch.float16, torch.float32):
        return 0
    fused = 0
    for coder in (vae.encoder, vae.decoder):
        layers = getattr(coder, "layers", None)
        if not isinstance(layers, torch.nn.Sequential):
            continue
        for i, layer in enumerate(list(layers)):
            if _fusable_block(layer):
                layers[i] = FusedTinyBlock(layer)
                fused += 1
            elif isinstance(layer, torch.nn.ReLU) and i > 0 and _is_plain_3x3(layers[i - 1]):
                layers[i - 1], layers[i] = FusedConvReLU(layers[i - 1]), torch.nn.Identity()  # index kept
                fused += 1
    return fused
