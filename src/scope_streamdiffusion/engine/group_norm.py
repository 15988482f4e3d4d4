"""GroupNorm (+ SiLU) on the GPU in two Triton kernels: many programs for the statistics, then one
pointwise pass that finishes them and normalises.

At one 512² frame the UNet's 61 GroupNorms are latency-bound: each group holds 40-330 K values, and
inductor splits each GroupNorm into 3-4 kernels (partial sums, their sum, statistics, normalisation),
0.56-0.64 ms of a ~4.7 ms step (BENCHMARKS.md, R15). One program per group (32 programs) is slower
still: it leaves most SMs idle. Here the first kernel sums chunks of pixels of one group
(``groups x splits`` programs, ~2,048 values each) and the second adds the few partial sums per
channel itself, so a GroupNorm costs two launches: the 61 alone 0.49 ms instead of 0.60-0.68 (0.75
instead of 1.06-1.14 at LCM's 4 rows). In a ResNet block ``conv1``'s bias and the time embedding are
added inside ``norm2``'s kernels: as an operator inductor cannot fuse into, the norm would otherwise
get a pass of its own over the activations for them. Compiled, +1.8% img2img, +2.4% txt2img on an
H200, and +7.1% for the LCM stream batch with the SiLU inside but not yet the bias and time embedding
(BENCHMARKS.md, R16).

Sums are taken around the group's first value (the same for every chunk), which keeps
``E[x²] - E[x]²`` from cancelling when a group's mean is large against its spread.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from .small_convs import SmallPixelsConv2d, patch_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below is used
    triton = None

# Values one statistics program sums (pixels x channels of its group); the splits follow from it.
ELEMENTS_PER_PROGRAM = 2048
MAX_SPLITS = 64


def reference(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    if shift is not None:
        x = x + shift.reshape(-1, x.shape[1], 1, 1)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


if triton is not None:

    @triton.jit
    def _partial_sums(x_ptr, shift_ptr, part_ptr, pixels, channels, chunk, groups, s_n, s_c, s_p,
                      SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                      HAS_SHIFT: tl.constexpr):
        ng = tl.program_id(0)
        split = tl.program_id(1)
        n = ng // groups
        g = ng % groups
        base = x_ptr + n * s_n + g * GROUP * s_c
        cols = tl.arange(0, BLOCK_C)
        rows = tl.arange(0, BLOCK_P)
        cmask = cols < GROUP
        if HAS_SHIFT:
            add = tl.load(shift_ptr + n * channels + g * GROUP + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            add = tl.zeros([BLOCK_C], tl.float32)
        ref = tl.load(base).to(tl.float32) + tl.sum(tl.where(cols == 0, add, 0.0), 0)
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        first = split * chunk
        for off in range(0, chunk, BLOCK_P):
            r = first + off + rows
            m = ((r < pixels) & (off + rows < chunk))[:, None] & cmask[None, :]
            v = tl.load(base + r[:, None] * s_p + cols[None, :] * s_c, mask=m, other=0.0).to(tl.float32)
            v = tl.where(m, v + add[None, :] - ref, 0.0)
            acc += v
            acc2 += v * v
        out = part_ptr + (ng * SPLITS + split) * 2
        tl.store(out, tl.sum(tl.sum(acc, 1), 0))
        tl.store(out + 1, tl.sum(tl.sum(acc2, 1), 0))

    @triton.jit
    def _normalize(x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, part_ptr, pixels, channels, groups, inv_count, eps,
                   s_n, s_c, s_p, o_n, o_c, o_p,
                   SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   SILU: tl.constexpr, HAS_SHIFT: tl.constexpr):
        n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        g = cols // GROUP
        parts = part_ptr + ((n * groups + g)[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]) * 2
        s1 = tl.sum(tl.load(parts, mask=cmask[:, None], other=0.0), 1)
        s2 = tl.sum(tl.load(parts + 1, mask=cmask[:, None], other=0.0), 1)
        ref = tl.load(x_ptr + n * s_n + g * GROUP * s_c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            add = tl.load(shift_ptr + n * channels + cols, mask=cmask, other=0.0).to(tl.float32)
            ref += tl.load(shift_ptr + n * channels + g * GROUP, mask=cmask, other=0.0).to(tl.float32)
        else:
            add = tl.zeros([BLOCK_C], tl.float32)
        mean = s1 * inv_count
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 * inv_count - mean * mean, 0.0) + eps)
        scale = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * rstd
        offset = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + (add - mean - ref) * scale
        m = (rows < pixels)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + n * s_n + rows[:, None] * s_p + cols[None, :] * s_c, mask=m, other=0.0).to(tl.float32)
        y = v * scale[None, :] + offset[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + n * o_n + rows[:, None] * o_p + cols[None, :] * o_c, y.to(y_ptr.dtype.element_ty), mask=m)


def _pixel_strides(t: torch.Tensor):
    """(batch, channel, pixel) strides of a 4-D tensor whose height and width flatten into one index."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and sh != sw * t.shape[3]:
        return None
    return sn, sc, sw


def splits_for(pixels: int, group: int, elements: int = ELEMENTS_PER_PROGRAM) -> int:
    """A power of two near pixels x group / elements, at most MAX_SPLITS and at least 16 pixels a split."""
    want = max(1, min(MAX_SPLITS, (pixels * group) // elements, pixels // 16))
    return 1 << (want.bit_length() - 1)


def group_norm_triton(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      silu: bool, elements: int = ELEMENTS_PER_PROGRAM, block_p: int = 64, block_c: int = 64,
                      warps: int = 4, shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a 4-D CUDA tensor ``x`` (+ ``shift``, one value per row and channel) in
    the two kernels; the output keeps x's layout."""
    if _pixel_strides(x) is None:
        x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    pixels, group = h * w, c // groups
    y = torch.empty_like(x)
    splits = splits_for(pixels, group, elements)
    parts = torch.empty(n * groups * splits * 2, device=x.device, dtype=torch.float32)
    sn, sc, sp = _pixel_strides(x)
    on, oc, op = _pixel_strides(y)
    group_block = triton.next_power_of_2(group)
    if shift is not None:
        shift = shift.reshape(-1, c).expand(n, c).contiguous()
    # Triton launches on the current device (CPU tensors: its interpreter, in the tests).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _partial_sums[(n * groups, splits)](
            x, shift, parts, pixels, c, triton.cdiv(pixels, splits), groups, sn, sc, sp,
            SPLITS=splits, GROUP=group, BLOCK_P=max(16, 2048 // group_block), BLOCK_C=group_block,
            HAS_SHIFT=shift is not None, num_warps=4)
        _normalize[(n, triton.cdiv(pixels, block_p), triton.cdiv(c, block_c))](
            x, shift, weight, bias, y, parts, pixels, c, groups, 1.0 / (pixels * group), eps, sn, sc, sp, on, oc, op,
            SPLITS=splits, GROUP=group, BLOCK_P=block_p, BLOCK_C=block_c, SILU=silu, HAS_SHIFT=shift is not None,
            num_warps=warps)
    return y


def _like_input(x: torch.Tensor) -> torch.Tensor:
    """The output buffer: x's layout when its height and width flatten into one index, else channels_last."""
    if _pixel_strides(x) is None:
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x)


@torch.library.custom_op("scope_streamdiffusion::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool,
                  shift: torch.Tensor | None = None, elements: int = ELEMENTS_PER_PROGRAM) -> torch.Tensor:
    """GroupNorm (+ SiLU) of ``x`` (+ ``shift``) as one operation compiled code calls: the Triton
    kernels on CUDA, PyTorch's own elsewhere (laid out as the CUDA result, which the compiled code expects)."""
    if x.is_cuda and triton is not None:
        return group_norm_triton(x, groups, weight, bias, eps, silu, elements, shift=shift)
    return _like_input(x).copy_(reference(x, groups, weight, bias, eps, silu, shift))


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps, silu, shift=None, elements=ELEMENTS_PER_PROGRAM):
    return _like_input(x)


class TritonGroupNorm(torch.nn.GroupNorm):
    """A ``GroupNorm`` (same parameters and state-dict keys), optionally followed by SiLU and preceded
    by a per-channel ``shift``, whose compiled form is :func:`group_norm_op`. Eager runs keep
    PyTorch's kernels: the Triton kernels would compile (seconds each) in the middle of a stream."""

    silu = False
    elements = ELEMENTS_PER_PROGRAM

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        # A shift of more rows than x broadcasts x (as diffusers' add would): PyTorch's ops handle that.
        if (torch.compiler.is_dynamo_compiling() and x.dim() == 4 and self.affine
                and (shift is None or shift.shape[0] in (1, x.shape[0]))):
            return group_norm_op(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, shift, self.elements)
        return reference(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift)


def _conv_without_bias(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, SmallPixelsConv2d) and conv.as_gemm(x):
        return patch_gemm(x, conv.weight, None)
    return conv._conv_forward(x, conv.weight, None)


class TritonResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (the default time-embedding path, no resampling) with its norms as
    :class:`TritonGroupNorm` + SiLU, and ``conv1``'s bias and the time embedding added inside
    ``norm2``'s kernels instead of in a pass of their own over the activations before it."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = _conv_without_bias(self.conv1, self.norm1(input_tensor))
        shift = self.time_emb_proj(temb)  # (rows, channels); a shift of one row applies to every row
        if self.conv1.bias is not None:
            shift = shift + self.conv1.bias
        hidden = self.conv2(self.dropout(self.norm2(hidden, shift)))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (shortcut + hidden) / self.output_scale_factor


def _swap(norm: torch.nn.Module, silu: bool, elements: int) -> bool:
    if type(norm) is not torch.nn.GroupNorm or not norm.affine:
        return False
    norm.__class__ = TritonGroupNorm
    norm.silu = silu
    if elements != ELEMENTS_PER_PROGRAM:
        norm.elements = elements
    return True


def _silu_follows(owner: torch.nn.Module, act: str) -> bool:
    return type(getattr(owner, act, None)) is torch.nn.SiLU


def _plain_resnet(block: torch.nn.Module) -> bool:
    return (type(block) is ResnetBlock2D and block.time_embedding_norm == "default" and block.upsample is None
            and block.downsample is None and type(block.nonlinearity) is torch.nn.SiLU
            and block.time_emb_proj is not None and block.skip_time_act
            and type(block.conv1) in (torch.nn.Conv2d, SmallPixelsConv2d)
            and not (block.conv1._forward_hooks or block.conv1._forward_pre_hooks)  # its forward is bypassed
            and all(type(n) is torch.nn.GroupNorm and n.affine for n in (block.norm1, block.norm2)))


def triton_group_norms(unet: torch.nn.Module, elements: int = ELEMENTS_PER_PROGRAM) -> int:
    """Make each affine ``GroupNorm`` of ``unet`` a :class:`TritonGroupNorm` (in place; the same
    parameters), taking in the SiLU after it where the code allows: ResNet blocks with a time embedding
    whose activation runs only on the normalised hidden states (the embedding's SiLU already taken
    out, ``skip_time_act``) become :class:`TritonResnetBlock2D`, and the UNet's last norm takes in its
    activation. Returns how many norms; 0 the second time."""
    count = 0
    for module in unet.modules():
        if _plain_resnet(module):
            count += _swap(module.norm1, True, elements) + _swap(module.norm2, True, elements)
            module.__class__ = TritonResnetBlock2D
    if isinstance(getattr(unet, "conv_norm_out", None), torch.nn.GroupNorm) and _silu_follows(unet, "conv_act"):
        if _swap(unet.conv_norm_out, True, elements):
            unet.conv_act = torch.nn.Identity()
            count += 1
    for module in list(unet.modules()):
        count += _swap(module, False, elements)
    return count
