"""TAESD (diffusers' ``AutoencoderTiny``) rewritten for the GPU: each ReLU run inside the convolution
before it (:func:`fuse_relus`), each 2x upsampling + convolution of the decoder as one transposed
convolution (:func:`fold_upsamples`), and the 3-channel convolutions at either end padded to shapes
cuDNN runs fast (:func:`pad_thin_convs`).

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
    """A 3x3 convolution followed by a ReLU, as one op; holds the convolution's own parameters.

    With ``input_layout`` the input is first laid out as the weight is: the decoder's first layer
    receives the stream's latents NCHW, and since the op's output keeps its input's layout, the whole
    first stage of the decoder (ten convolutions at 64x64 for 512x512) would otherwise run NCHW with
    channels_last weights: cuDNN then copies each input to NHWC and each output back (on an H200 23
    copies, ~0.07 ms per frame; BENCHMARKS.md, R13). One copy of the 4-channel input replaces them."""

    def __init__(self, conv: torch.nn.Conv2d, input_layout: bool = False):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.input_layout = input_layout

    def forward(self, x):
        if self.input_layout:  # the weight's layout as it is now (a later .to(memory_format=...) included)
            x = x.contiguous(memory_format=_layout(self.weight))
        return conv3x3_relu(x, self.weight, self.bias, None)


def _coder_layers(vae: torch.nn.Module, coder: str) -> torch.nn.Sequential | None:
    """A TAESD's ``"encoder"`` or ``"decoder"`` layers; None for any other VAE."""
    if type(vae).__name__ != "AutoencoderTiny":
        return None
    layers = getattr(getattr(vae, coder, None), "layers", None)
    return layers if isinstance(layers, torch.nn.Sequential) else None


def _fusable_block(module) -> bool:
    if type(module).__name__ != "AutoencoderTinyBlock":
        return False
    convs = list(module.conv)
    return (len(convs) == 5 and all(_is_plain_3x3(c) for c in convs[::2])
            and all(isinstance(a, torch.nn.ReLU) for a in convs[1::2]) and isinstance(module.fuse, torch.nn.ReLU))


def fuse_relus(vae: torch.nn.Module, input_layout: bool = True) -> int:
    """Fuse the ReLUs of a TAESD (``AutoencoderTiny``) into its convolutions, in place; returns how many
    places were fused (0 for any other VAE, or a bfloat16 one, which cuDNN does not fuse: left as it is).
    ``input_layout``: the decoder's first layer lays its input out as its weight (:class:`FusedConvReLU`)."""
    if type(vae).__name__ != "AutoencoderTiny" or next(vae.parameters()).dtype not in (torch.float16, torch.float32):
        return 0
    fused = 0
    for coder in ("encoder", "decoder"):
        layers = _coder_layers(vae, coder)
        if layers is None:
            continue
        for i, layer in enumerate(list(layers)):
            if _fusable_block(layer):
                layers[i] = FusedTinyBlock(layer)
                fused += 1
            elif isinstance(layer, torch.nn.ReLU) and i > 0 and _is_plain_3x3(layers[i - 1]):
                layers[i - 1], layers[i] = FusedConvReLU(layers[i - 1], input_layout), torch.nn.Identity()  # index kept
                fused += 1
    return fused


# ----- the decoder's upsampling -----------------------------------------------------------------
# Along one axis, nearest 2x upsampling then a 3-tap convolution (zero padding 1) gives output 2m
# x[m-1] * w0 + x[m] * (w1 + w2) and output 2m+1 x[m] * (w0 + w1) + x[m+1] * w2: a stride-2
# transposed convolution with 4 taps (padding 1) whose taps are w2, w1 + w2, w0 + w1, w0.
_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsampled_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """``conv_transpose2d`` weights (in, out, 4, 4) equal to nearest 2x upsampling then ``conv2d``
    with ``weight`` (out, in, 3, 3), padding 1; the taps summed in float32 at least, in ``weight``'s layout."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    taps = torch.tensor(_TAPS, dtype=wide, device=weight.device)
    folded = torch.einsum("kr,ls,oirs->iokl", taps, taps, weight.detach().to(wide)).to(weight.dtype)
    return folded.contiguous(memory_format=_layout(weight))


class _DerivedWeightConv(torch.nn.Module):
    """A convolution run with weights derived once from its own, at the rewrite. Keeps the
    convolution's parameters (the same state-dict keys) and holds the derived weights as a buffer
    that is not saved, in the same layout (another would cost a copy per call). The convolution's
    weights must not change after the rewrite (they do not in this package: TAESD's are loaded
    before it, and no LoRA reaches the VAE)."""

    def __init__(self, conv: torch.nn.Conv2d, derived: torch.Tensor):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.register_buffer("derived_weight", derived.contiguous(memory_format=_layout(conv.weight)), persistent=False)


class UpsampledConv(_DerivedWeightConv):
    """``nn.Upsample(scale_factor=2)`` (nearest) then a 3x3 convolution, as one stride-2 transposed
    convolution: 4 multiply-adds per output and input channel instead of 9, and no 4x larger
    upsampled copy."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__(conv, upsampled_conv_weight(conv.weight))

    def forward(self, x):
        return F.conv_transpose2d(x, self.derived_weight, self.bias, stride=2, padding=1)


def _is_nearest_2x(module) -> bool:
    return (isinstance(module, torch.nn.Upsample) and module.mode == "nearest" and module.size is None
            and module.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))


def fold_upsamples(vae: torch.nn.Module) -> int:
    """Each nearest 2x upsampling followed by a plain 3x3 convolution in a TAESD's decoder becomes
    one :class:`UpsampledConv` (in place; the upsampling's index keeps an ``nn.Identity``). Returns
    how many (0 for any other VAE). The same function up to rounding (the taps' sums)."""
    layers = _coder_layers(vae, "decoder")
    if layers is None:
        return 0
    folded = 0
    for i in range(len(layers) - 1):
        if _is_nearest_2x(layers[i]) and _is_plain_3x3(layers[i + 1]):
            layers[i], layers[i + 1] = torch.nn.Identity(), UpsampledConv(layers[i + 1])
            folded += 1
    return folded


# ----- the 3-channel convolutions at either end -------------------------------------------------
# The encoder's first convolution (3 -> 64 channels) and the decoder's last (64 -> 3) run at the
# frame's full size, and with 3 channels on one side cuDNN picks kernels without shared memory. On an
# H200 at 512x512 (BENCHMARKS.md, R13; alone, without bias): 64 -> 3 takes 62 us, 64 -> 32 41 us;
# 3 -> 64 36 us, 4 -> 64 28 us; and compiled, the first convolution's bias is a separate 26-us pass over its 64-channel
# output (inductor takes biases out of convolutions to fuse them with what follows; what follows
# here is the fused block, which it cannot fuse into).
PADDED_OUT_CHANNELS = 32


class BiasChannelConv(_DerivedWeightConv):
    """A 3x3 convolution (padding 1) whose bias rides on an extra input channel of ones, read by the
    kernel's centre tap only (always inside the frame, so the sum is exactly the bias): no separate
    bias pass, and 4 input channels instead of 3."""

    def __init__(self, conv: torch.nn.Conv2d):
        w = conv.weight.detach()
        padded = torch.zeros((w.shape[0], w.shape[1] + 1, 3, 3), dtype=w.dtype, device=w.device)
        padded[:, :-1] = w
        padded[:, -1, 1, 1] = conv.bias.detach()
        super().__init__(conv, padded)

    def forward(self, x):
        ones = torch.ones_like(x[:, :1])
        return F.conv2d(torch.cat([x, ones], dim=1), self.derived_weight, None, padding=1)


class PaddedOutConv(_DerivedWeightConv):
    """A 3x3 convolution (padding 1) to few channels, run to ``PADDED_OUT_CHANNELS`` (zero weights)
    and sliced, its bias added after."""

    def __init__(self, conv: torch.nn.Conv2d):
        w = conv.weight.detach()
        padded = torch.zeros((PADDED_OUT_CHANNELS, *w.shape[1:]), dtype=w.dtype, device=w.device)
        padded[:w.shape[0]] = w
        super().__init__(conv, padded)

    def forward(self, x):
        out = F.conv2d(x, self.derived_weight, None, padding=1)[:, :self.weight.shape[0]]
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def pad_thin_convs(vae: torch.nn.Module) -> int:
    """A TAESD's first encoder convolution (3 input channels, a bias) becomes a :class:`BiasChannelConv`
    and its last decoder convolution (3 output channels) a :class:`PaddedOutConv`, in place. Returns
    how many (0 for any other VAE). The same function up to rounding (summation order)."""
    padded = 0
    layers = _coder_layers(vae, "encoder")
    if layers is not None and _is_plain_3x3(layers[0]) and layers[0].in_channels < 4 and layers[0].bias is not None:
        layers[0] = BiasChannelConv(layers[0])
        padded += 1
    layers = _coder_layers(vae, "decoder")
    if layers is not None and _is_plain_3x3(layers[-1]) and layers[-1].out_channels < 8:
        layers[-1] = PaddedOutConv(layers[-1])
        padded += 1
    return padded
