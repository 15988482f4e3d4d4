"""GroupNorm (+ SiLU) on the GPU in two Triton kernels: many programs for the statistics, then one
pointwise pass that finishes them and normalises (small groups: one kernel, see below).

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

At one row the residual sums ending ResNet blocks and transformers, read next by a norm, are computed
inside its kernels too (:func:`fuse_residual_adds`, an inductor graph pass), with the bias of the
convolution or linear layer before them: +1.1% txt2img and img2img (R17).

Small groups (up to ``ONE_PROGRAM_VALUES``: the 8x8 level's at 512²) run in one kernel instead, a
program per group: there the second launch costs more than the idle SMs (+0.6-1.0% txt2img, R18).
"""

from __future__ import annotations

import contextlib
import functools
import operator

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from .graph_passes import CountingPass
from .small_convs import SmallPixelsConv2d, patch_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below is used
    triton = None

# Values one statistics program sums (pixels x channels of its group); the splits follow from it.
ELEMENTS_PER_PROGRAM = 2048
MAX_SPLITS = 64
# Groups of at most this many values (pixels x channels) run in one kernel instead (0: never): the
# 8x8 level's at 512² (2,560-5,120 values), where the second launch cost more than the 32 programs
# leave idle (BENCHMARKS.md, R18); the values one program loads at a time, and its warps.
ONE_PROGRAM_VALUES = 5120
ONE_PROGRAM_TILE = 4096
ONE_PROGRAM_WARPS = 8


def reference(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool,
              shift: torch.Tensor | None = None, x_bias: torch.Tensor | None = None) -> torch.Tensor:
    if x_bias is not None:
        x = x + x_bias.reshape(1, -1, 1, 1)
    if shift is not None:
        x = x + shift.reshape(-1, x.shape[1], 1, 1)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


if triton is not None:

    @triton.jit
    def _channel_bias(xb_ptr, rb_ptr, channels, mask, HAS_XB: tl.constexpr, HAS_RB: tl.constexpr):
        """The per-channel biases of x and of the residual that the sum takes in (0 without)."""
        b = (channels * 0).to(tl.float32)
        if HAS_XB:
            b += tl.load(xb_ptr + channels, mask=mask, other=0.0).to(tl.float32)
        if HAS_RB:
            b += tl.load(rb_ptr + channels, mask=mask, other=0.0).to(tl.float32)
        return b

    @triton.jit
    def _load(x_ptrs, r_ptrs, bias, mask, HAS_RESIDUAL: tl.constexpr):
        """x, or x + residual + bias rounded to x's dtype as one separate add would round it, in float32."""
        v = tl.load(x_ptrs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            v = (v.to(tl.float32) + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + bias).to(v.dtype)
        return v.to(tl.float32)

    @triton.jit
    def _channel_terms(x_row, r_row, xb_ptr, rb_ptr, shift_ptr, shift_row, channels, first, s_c, r_c, mask,
                       HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_XB: tl.constexpr,
                       HAS_RB: tl.constexpr):
        """For ``channels`` (of groups that start at ``first``): the biases the sum takes in, the shift,
        and the group's first value (of the sum, shifted), around which both kernels take their sums.
        Without a residual, x's bias is part of the shift (added in float32, like the shift)."""
        bias = _channel_bias(xb_ptr, rb_ptr, channels, mask, HAS_XB, HAS_RB)
        first_bias = _channel_bias(xb_ptr, rb_ptr, first, mask, HAS_XB, HAS_RB)
        ref = _load(x_row + first * s_c, r_row + first * r_c, first_bias, mask, HAS_RESIDUAL)
        add = (channels * 0).to(tl.float32)
        if not HAS_RESIDUAL:
            add += bias
            ref += first_bias
        if HAS_SHIFT:
            add += tl.load(shift_ptr + shift_row + channels, mask=mask, other=0.0).to(tl.float32)
            ref += tl.load(shift_ptr + shift_row + first, mask=mask, other=0.0).to(tl.float32)
        return bias, add, ref

    @triton.jit
    def _group(x_ptr, r_ptr, xb_ptr, rb_ptr, shift_ptr, ng, groups, s_n, s_c, r_n, r_c, sh_n,
               GROUP: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               HAS_XB: tl.constexpr, HAS_RB: tl.constexpr):
        """Program ``ng``'s row and group: the row's pointers, the group's channels, their mask and
        :func:`_channel_terms`."""
        n = ng // groups
        g = ng % groups
        x_row = x_ptr + n * s_n
        r_row = r_ptr + n * r_n
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < GROUP
        ch = g * GROUP + cols
        first = g * GROUP + cols * 0  # the group's first channel, in every column
        bias, add, ref = _channel_terms(x_row, r_row, xb_ptr, rb_ptr, shift_ptr, n * sh_n, ch, first, s_c, r_c,
                                        cmask, HAS_SHIFT, HAS_RESIDUAL, HAS_XB, HAS_RB)
        return n, x_row, r_row, ch, cmask, bias, add, ref

    @triton.jit
    def _group_sums(x_row, r_row, ch, cmask, bias, add, ref, start, count, pixels, s_c, s_p, r_c, r_p,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """The sums of a group's values and of their squares over pixels [start, start + count).
        Sums around the group's first value ``ref`` (the same for every chunk) do not cancel in
        E[x²] - E[x]²."""
        rows = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for off in range(0, count, BLOCK_P):
            r = start + off + rows
            m = ((r < pixels) & (off + rows < count))[:, None] & cmask[None, :]
            v = _load(x_row + r[:, None] * s_p + ch[None, :] * s_c, r_row + r[:, None] * r_p + ch[None, :] * r_c,
                      bias[None, :], m, HAS_RESIDUAL)
            v = tl.where(m, v + add[None, :] - ref[None, :], 0.0)
            acc += v
            acc2 += v * v
        return tl.sum(tl.sum(acc, 1), 0), tl.sum(tl.sum(acc2, 1), 0)

    @triton.jit
    def _partial_sums(x_ptr, shift_ptr, part_ptr, r_ptr, xb_ptr, rb_ptr, pixels, chunk, groups,
                      s_n, s_c, s_p, r_n, r_c, r_p, sh_n,
                      SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                      HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_XB: tl.constexpr,
                      HAS_RB: tl.constexpr):
        ng = tl.program_id(0)
        split = tl.program_id(1)
        n, x_row, r_row, ch, cmask, bias, add, ref = _group(
            x_ptr, r_ptr, xb_ptr, rb_ptr, shift_ptr, ng, groups, s_n, s_c, r_n, r_c, sh_n,
            GROUP, BLOCK_C, HAS_SHIFT, HAS_RESIDUAL, HAS_XB, HAS_RB)
        s1, s2 = _group_sums(x_row, r_row, ch, cmask, bias, add, ref, split * chunk, chunk, pixels, s_c, s_p, r_c, r_p,
                             BLOCK_P, BLOCK_C, HAS_RESIDUAL)
        out = part_ptr + (ng * SPLITS + split) * 2
        tl.store(out, s1)
        tl.store(out + 1, s2)

    @triton.jit
    def _scale_offset(s1, s2, inv_count, eps, w_ptr, b_ptr, channels, mask, add, ref):
        """From a group's sums (around ``ref``): per channel, y = v * scale + offset normalises v and
        applies the weight and bias (v: the value before the shift ``add``)."""
        mean = s1 * inv_count
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 * inv_count - mean * mean, 0.0) + eps)
        scale = tl.load(w_ptr + channels, mask=mask, other=0.0).to(tl.float32) * rstd
        offset = tl.load(b_ptr + channels, mask=mask, other=0.0).to(tl.float32) + (add - mean - ref) * scale
        return scale, offset

    @triton.jit
    def _normalize_tile(x_row, r_row, y_ptr, sum_ptr, out, rows, cols, m, bias, scale, offset, s_p, s_c, r_p, r_c,
                        SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """One tile normalised (+ SiLU) and written at ``out`` (offsets in y's layout), with the sum too
        (the block's output) when there is a residual."""
        v = _load(x_row + rows[:, None] * s_p + cols[None, :] * s_c, r_row + rows[:, None] * r_p + cols[None, :] * r_c,
                  bias[None, :], m, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_ptr + out, v.to(y_ptr.dtype.element_ty), mask=m)
        y = v * scale[None, :] + offset[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _normalize(x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, part_ptr, r_ptr, xb_ptr, rb_ptr, sum_ptr, pixels,
                   channels, groups, inv_count, eps, s_n, s_c, s_p, o_n, o_c, o_p, r_n, r_c, r_p, sh_n,
                   SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   SILU: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_XB: tl.constexpr,
                   HAS_RB: tl.constexpr):
        n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        g = cols // GROUP
        first = g * GROUP
        x_row = x_ptr + n * s_n
        r_row = r_ptr + n * r_n
        parts = part_ptr + ((n * groups + g)[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]) * 2
        s1 = tl.sum(tl.load(parts, mask=cmask[:, None], other=0.0), 1)
        s2 = tl.sum(tl.load(parts + 1, mask=cmask[:, None], other=0.0), 1)
        bias, add, ref = _channel_terms(x_row, r_row, xb_ptr, rb_ptr, shift_ptr, n * sh_n, cols, first, s_c, r_c,
                                        cmask, HAS_SHIFT, HAS_RESIDUAL, HAS_XB, HAS_RB)
        scale, offset = _scale_offset(s1, s2, inv_count, eps, w_ptr, b_ptr, cols, cmask, add, ref)
        # The sum (with a residual) is written here, where the tiles are coalesced.
        _normalize_tile(x_row, r_row, y_ptr, sum_ptr, n * o_n + rows[:, None] * o_p + cols[None, :] * o_c, rows, cols,
                        (rows < pixels)[:, None] & cmask[None, :], bias, scale, offset, s_p, s_c, r_p, r_c,
                        SILU, HAS_RESIDUAL)

    @triton.jit
    def _one_program(x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, r_ptr, xb_ptr, rb_ptr, sum_ptr, pixels, groups,
                     inv_count, eps, s_n, s_c, s_p, o_n, o_c, o_p, r_n, r_c, r_p, sh_n,
                     GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_XB: tl.constexpr, HAS_RB: tl.constexpr):
        """A small group whole in one program: its sums, then its normalisation (the values read again,
        from the cache), in one launch instead of two."""
        n, x_row, r_row, ch, cmask, bias, add, ref = _group(
            x_ptr, r_ptr, xb_ptr, rb_ptr, shift_ptr, tl.program_id(0), groups, s_n, s_c, r_n, r_c, sh_n,
            GROUP, BLOCK_C, HAS_SHIFT, HAS_RESIDUAL, HAS_XB, HAS_RB)
        s1, s2 = _group_sums(x_row, r_row, ch, cmask, bias, add, ref, 0, pixels, pixels, s_c, s_p, r_c, r_p,
                             BLOCK_P, BLOCK_C, HAS_RESIDUAL)
        scale, offset = _scale_offset(s1, s2, inv_count, eps, w_ptr, b_ptr, ch, cmask, add, ref)
        rows = tl.arange(0, BLOCK_P)
        for off in range(0, pixels, BLOCK_P):
            r = off + rows
            _normalize_tile(x_row, r_row, y_ptr, sum_ptr, n * o_n + r[:, None] * o_p + ch[None, :] * o_c, r, ch,
                            (r < pixels)[:, None] & cmask[None, :], bias, scale, offset, s_p, s_c, r_p, r_c,
                            SILU, HAS_RESIDUAL)


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
                      warps: int = 4, shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                      x_bias: torch.Tensor | None = None, residual_bias: torch.Tensor | None = None,
                      one_program: int = 0):
    """GroupNorm (+ SiLU) of a 4-D CUDA tensor ``x`` (+ ``x_bias``, one value per channel, + ``shift``,
    one value per row and channel, read in place: one row serves every row) in the two kernels, or in
    one (:func:`_one_program`) where a group holds at most ``one_program`` values (0 here, for explicit
    callers; the ops default to ``ONE_PROGRAM_VALUES``); the output keeps x's layout. With
    ``residual`` (x's shape and dtype) the norm is of ``x + x_bias + residual + residual_bias``
    (biases per channel, optional), which the normalising kernel writes out too: returns (output,
    that sum)."""
    if residual is None and residual_bias is not None:
        raise ValueError("residual_bias is added to x + residual: it needs a residual")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} is not x's {tuple(x.shape)} {x.dtype}")
    if _pixel_strides(x) is None:
        x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    pixels, group = h * w, c // groups
    total = None
    if residual is not None:
        if _pixel_strides(residual) is None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        total = torch.empty_like(x)  # y's layout: written with y's strides
    y = torch.empty_like(x)
    sn, sc, sp = _pixel_strides(x)
    on, oc, op = _pixel_strides(y)
    rn, rc, rp = _pixel_strides(residual) if residual is not None else (0, 0, 0)
    group_block = triton.next_power_of_2(group)
    # The kernels read the biases as one value per channel, one after the other.
    x_bias = None if x_bias is None else x_bias.contiguous()
    residual_bias = None if residual_bias is None else residual_bias.contiguous()
    sh_n = 0
    if shift is not None:
        # Read where it is (a slice of the shared time-projection GEMM's output): rows apart by its
        # stride, one row (stride 0 once expanded) for every row of x.
        shift = shift.reshape(-1, c).expand(n, c)
        if shift.stride(1) != 1:
            shift = shift.contiguous()
        sh_n = shift.stride(0)
    flags = dict(HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None, HAS_XB=x_bias is not None,
                 HAS_RB=residual is not None and residual_bias is not None)
    if residual is None:  # never read; the kernels offset the pointer all the same
        residual = x
    # Triton launches on the current device (CPU tensors: its interpreter, in the tests).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if pixels * group <= one_program:
            _one_program[(n * groups,)](
                x, shift, weight, bias, y, residual, x_bias, residual_bias, total, pixels, groups,
                1.0 / (pixels * group), eps, sn, sc, sp, on, oc, op, rn, rc, rp, sh_n, GROUP=group,
                BLOCK_P=max(16, min(triton.next_power_of_2(pixels), ONE_PROGRAM_TILE // group_block)),
                BLOCK_C=group_block, SILU=silu, num_warps=ONE_PROGRAM_WARPS, **flags)
            return y if total is None else (y, total)
        splits = splits_for(pixels, group, elements)
        parts = torch.empty(n * groups * splits * 2, device=x.device, dtype=torch.float32)
        _partial_sums[(n * groups, splits)](
            x, shift, parts, residual, x_bias, residual_bias, pixels, triton.cdiv(pixels, splits), groups,
            sn, sc, sp, rn, rc, rp, sh_n, SPLITS=splits, GROUP=group, BLOCK_P=max(16, 2048 // group_block),
            BLOCK_C=group_block, num_warps=4, **flags)
        _normalize[(n, triton.cdiv(pixels, block_p), triton.cdiv(c, block_c))](
            x, shift, weight, bias, y, parts, residual, x_bias, residual_bias, total, pixels, c, groups,
            1.0 / (pixels * group), eps, sn, sc, sp, on, oc, op, rn, rc, rp, sh_n,
            SPLITS=splits, GROUP=group, BLOCK_P=block_p, BLOCK_C=block_c, SILU=silu, num_warps=warps, **flags)
    return y if total is None else (y, total)


def _like_input(x: torch.Tensor) -> torch.Tensor:
    """The output buffer: x's layout when its height and width flatten into one index, else channels_last."""
    if _pixel_strides(x) is None:
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x)


@torch.library.custom_op("scope_streamdiffusion::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool,
                  shift: torch.Tensor | None = None, elements: int = ELEMENTS_PER_PROGRAM,
                  one_program: int = ONE_PROGRAM_VALUES, x_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) of ``x`` (+ ``x_bias`` + ``shift``) as one operation compiled code calls: the
    Triton kernels on CUDA, PyTorch's own elsewhere (laid out as the CUDA result, which the compiled
    code expects)."""
    if x.is_cuda and triton is not None:
        return group_norm_triton(x, groups, weight, bias, eps, silu, elements, shift=shift, x_bias=x_bias,
                                 one_program=one_program)
    return _like_input(x).copy_(reference(x, groups, weight, bias, eps, silu, shift, x_bias))


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps, silu, shift=None, elements=ELEMENTS_PER_PROGRAM, one_program=ONE_PROGRAM_VALUES,
      x_bias=None):
    return _like_input(x)


def _residual_sum(x, residual, x_bias=None, residual_bias=None) -> torch.Tensor:
    """x + residual + the biases, in float32 and in the kernels' order (to be rounded to x's dtype once)."""
    biases = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for b in (x_bias, residual_bias):
        if b is not None:
            biases = biases + b.float()
    return x.float() + residual.float() + biases.reshape(1, -1, 1, 1)


@torch.library.custom_op("scope_streamdiffusion::add_group_norm", mutates_args=())
def add_group_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                      eps: float, silu: bool, x_bias: torch.Tensor | None = None,
                      residual_bias: torch.Tensor | None = None,
                      elements: int = ELEMENTS_PER_PROGRAM,
                      one_program: int = ONE_PROGRAM_VALUES) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_norm_op` of ``x + x_bias + residual + residual_bias`` (the biases per channel),
    returning (its output, that sum): what :func:`fuse_residual_adds` puts in compiled graphs where a
    norm's input is a residual sum."""
    if x.is_cuda and triton is not None:
        return group_norm_triton(x, groups, weight, bias, eps, silu, elements, residual=residual, x_bias=x_bias,
                                 residual_bias=residual_bias, one_program=one_program)
    total = _like_input(x).copy_(_residual_sum(x, residual, x_bias, residual_bias))
    return _like_input(x).copy_(reference(total, groups, weight, bias, eps, silu)), total


@add_group_norm_op.register_fake
def _(x, residual, weight, bias, groups, eps, silu, x_bias=None, residual_bias=None, elements=ELEMENTS_PER_PROGRAM,
      one_program=ONE_PROGRAM_VALUES):
    return _like_input(x), _like_input(x)


class TritonGroupNorm(torch.nn.GroupNorm):
    """A ``GroupNorm`` (same parameters and state-dict keys), optionally followed by SiLU and preceded
    by a per-channel ``shift``, whose compiled form is :func:`group_norm_op`. Eager runs keep
    PyTorch's kernels: the Triton kernels would compile (seconds each) in the middle of a stream."""

    silu = False
    elements = ELEMENTS_PER_PROGRAM
    one_program = ONE_PROGRAM_VALUES

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                x_bias: torch.Tensor | None = None) -> torch.Tensor:
        # A shift of more rows than x broadcasts x (as diffusers' add would): PyTorch's ops handle that.
        if (torch.compiler.is_dynamo_compiling() and x.dim() == 4 and self.affine
                and (shift is None or shift.shape[0] in (1, x.shape[0]))):
            return group_norm_op(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, shift, self.elements,
                                 self.one_program, x_bias)
        return reference(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift, x_bias)


def _conv_without_bias(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, SmallPixelsConv2d) and conv.as_gemm(x):
        return patch_gemm(x, conv.weight, None)
    return conv._conv_forward(x, conv.weight, None)


class TritonResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (the default time-embedding path, no resampling) with its norms as
    :class:`TritonGroupNorm` + SiLU, and ``conv1``'s bias and the time embedding added inside
    ``norm2``'s kernels instead of in a pass of their own over the activations before it.

    ``bias_in_norm``: the bias goes to the operator as a bias of its own, and the time embedding as
    it is (a slice of the shared projection's output), instead of their sum: compiled, that sum is
    one tiny kernel per block (22 in SD2.1's UNet) that inductor cannot fuse into the operator. On an
    H200 22 launches fewer, the same time within 0.2% (BENCHMARKS.md, R20)."""

    bias_in_norm = True

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = _conv_without_bias(self.conv1, self.norm1(input_tensor))
        shift = self.time_emb_proj(temb)  # (rows, channels); a shift of one row applies to every row
        bias = self.conv1.bias
        if bias is not None and not self.bias_in_norm:
            shift, bias = shift + bias, None
        hidden = self.conv2(self.dropout(self.norm2(hidden, shift, bias)))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        out = shortcut + hidden
        # A plain sum (SD's factor is 1) is what the residual-add pass fuses into the next norm.
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _swap(norm: torch.nn.Module, silu: bool, elements: int, one_program: int) -> bool:
    if type(norm) is not torch.nn.GroupNorm or not norm.affine:
        return False
    norm.__class__ = TritonGroupNorm
    norm.silu = silu
    if elements != ELEMENTS_PER_PROGRAM:
        norm.elements = elements
    if one_program != ONE_PROGRAM_VALUES:
        norm.one_program = one_program
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


def triton_group_norms(unet: torch.nn.Module, elements: int = ELEMENTS_PER_PROGRAM,
                       one_program: int = ONE_PROGRAM_VALUES, bias_in_norm: bool = True) -> int:
    """Make each affine ``GroupNorm`` of ``unet`` a :class:`TritonGroupNorm` (in place; the same
    parameters), taking in the SiLU after it where the code allows: ResNet blocks with a time embedding
    whose activation runs only on the normalised hidden states (the embedding's SiLU already taken
    out, ``skip_time_act``) become :class:`TritonResnetBlock2D`, and the UNet's last norm takes in its
    activation. ``elements`` and ``one_program``: :func:`group_norm_triton`'s; ``bias_in_norm``:
    :class:`TritonResnetBlock2D`'s. Returns how many norms; 0 the second time."""
    swap = functools.partial(_swap, elements=elements, one_program=one_program)
    count = 0
    for module in unet.modules():
        if _plain_resnet(module):
            count += swap(module.norm1, True) + swap(module.norm2, True)
            module.__class__ = TritonResnetBlock2D
            if not bias_in_norm:
                module.bias_in_norm = False
    if isinstance(getattr(unet, "conv_norm_out", None), torch.nn.GroupNorm) and _silu_follows(unet, "conv_act"):
        if swap(unet.conv_norm_out, True):
            unet.conv_act = torch.nn.Identity()
            count += 1
    for module in list(unet.modules()):
        count += swap(module, False)
    return count


def _arguments(node: torch.fx.Node) -> dict:
    """An operator call's arguments by name: positional, keyword, then the schema's defaults."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _same_shape_sum(node) -> bool:
    """``node`` is ``a + b`` of two 4-D tensors of its own shape and dtype (no broadcast, no alpha)."""
    if not (isinstance(node, torch.fx.Node) and node.target is torch.ops.aten.add.Tensor
            and len(node.args) == 2 and not node.kwargs):
        return False
    vals = [getattr(v, "meta", {}).get("val") for v in (node, *node.args)]
    return (all(isinstance(v, torch.Tensor) for v in vals) and vals[0].dim() == 4
            and all(v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals[1:]))


def _fake_call(op, args: tuple):
    """``op``'s output on the arguments' fake values (the metadata inductor reads from new nodes)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]) or FakeTensorMode()
    with mode:
        return op(*[mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v
                    for v in vals])


def _is_channel_vector(node, channels: int, dtype) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.shape == (channels,) and val.dtype == dtype


def _movable_bias(graph: torch.fx.Graph, node: torch.fx.Node):
    """(bias, take_out) when ``node``, an operand of a residual sum read by nothing else, adds a
    per-channel bias last that the fused operator can add instead: a convolution's, or a linear
    layer's (``addmm``, or ``mm`` + bias once inductor unfused it) laid out as channels by a view and a
    permute. ``take_out()`` rewrites the graph without it. None otherwise."""
    val = node.meta.get("val")
    if len(node.users) != 1 or not isinstance(val, torch.Tensor):
        return None
    channels, dtype = val.shape[1], val.dtype
    if node.target is torch.ops.aten.convolution.default and _is_channel_vector(node.args[2], channels, dtype):
        def take_out():
            node.args = (*node.args[:2], None, *node.args[3:])
        return node.args[2], take_out
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
    if node.target is not torch.ops.aten.permute.default or list(node.args[1]) != [0, 3, 1, 2]:
        return None
    # Views that keep the channels as the last dimension (the linear layer's rows reshaped to pixels).
    inner = node.args[0]
    while (isinstance(inner, torch.fx.Node) and inner.target in views and len(inner.users) == 1
           and inner.meta["val"].shape[-1] == channels):
        inner = inner.args[0]
    if not isinstance(inner, torch.fx.Node) or len(inner.users) != 1 or inner.kwargs:
        return None
    if inner.target is torch.ops.aten.addmm.default and _is_channel_vector(inner.args[0], channels, dtype):
        def take_out():
            with graph.inserting_before(inner):
                mm = graph.call_function(torch.ops.aten.mm.default, tuple(inner.args[1:3]))
            mm.meta["val"] = inner.meta["val"]
            inner.replace_all_uses_with(mm)
            graph.erase_node(inner)
        return inner.args[0], take_out
    if (inner.target is torch.ops.aten.add.Tensor and len(inner.args) == 2
            and _is_channel_vector(inner.args[1], channels, dtype)
            and isinstance(getattr(inner.args[0], "meta", {}).get("val"), torch.Tensor)
            and inner.args[0].meta["val"].shape == inner.meta["val"].shape
            and inner.args[0].meta["val"].dtype == dtype):  # no promotion by the bias
        def take_out():
            inner.replace_all_uses_with(inner.args[0])
            graph.erase_node(inner)
        return inner.args[1], take_out
    return None


# Rows (frames x CFG copies) up to which the sums move into the norms: measured faster at one row
# (+1.1% at 512², the same at SDXL's 1024²), slower at LCM's four (BENCHMARKS.md, R17).
MAX_FUSED_ROWS = 1


def fuse_residual_adds(graph: torch.fx.Graph, counts: dict | None = None, max_rows: int = MAX_FUSED_ROWS) -> int:
    """In an ATen graph, ``group_norm_op(a + b, ...)`` (without shift or x_bias) becomes ``add_group_norm_op(a, b,
    ...)``, whose second output serves the sum's other uses, and the bias a convolution or a linear
    layer adds last to ``a`` or ``b`` moves into it; sums of up to ``max_rows`` rows. Returns how many
    sums; ``counts["biases"]`` adds up the biases moved.

    The sums are the residual adds ending ResNet blocks and transformers, each read next by a GroupNorm.
    Inductor leaves a convolution's bias to the kernel after it, where the sum is (one pass over the
    activations for both); with the norm an opaque operator, that pass stays unless the operator
    takes in the sum and the biases too."""
    norm = torch.ops.scope_streamdiffusion.group_norm.default
    fused_op = torch.ops.scope_streamdiffusion.add_group_norm.default
    count = 0
    for node in [n for n in graph.nodes if n.target is norm]:
        args = _arguments(node)
        total = args["x"]
        if (args.get("shift") is not None or args.get("x_bias") is not None or not _same_shape_sum(total)
                or total.meta["val"].shape[0] > max_rows
                or total.args[0] is total.args[1]):  # x + x: one node, whose bias would be taken out twice
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        # A copy that only lays an operand out (diffusers' ``.contiguous()`` after a transformer's
        # output projection) is skipped: the operator reads any layout.
        copies = [a if a.target is torch.ops.aten.clone.default and len(a.users) == 1 else None for a in total.args]
        operands = [c.args[0] if c is not None else a for a, c in zip(total.args, copies)]
        biases = [_movable_bias(graph, operand) for operand in operands]
        # The fused call goes where its inputs exist and before any use of the sum.
        inputs = (total, args["weight"], args["bias"], *(b[0] for b in biases if b))
        last = max((v for v in inputs if isinstance(v, torch.fx.Node)), key=order.__getitem__)
        if any(order[user] <= order[last] for user in total.users):
            continue
        for moved in biases:
            if moved:
                moved[1]()
        call = (*operands, args["weight"], args["bias"], args["groups"], args["eps"], args["silu"],
                *(b[0] if b else None for b in biases), args["elements"], args["one_program"])
        with graph.inserting_after(last):
            fused = graph.call_function(fused_op, call)
        fused.meta["val"] = _fake_call(fused_op, call)
        with graph.inserting_after(fused):
            out = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(out):
            summed = graph.call_function(operator.getitem, (fused, 1))
        out.meta["val"], summed.meta["val"] = fused.meta["val"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        total.replace_all_uses_with(summed)
        graph.erase_node(total)
        for copy in copies:
            if copy is not None:
                graph.erase_node(copy)
        count += 1
        if counts is not None:
            counts["biases"] = counts.get("biases", 0) + sum(1 for b in biases if b)
    return count


if CountingPass is not None:

    class ResidualAddsIntoGroupNorms(CountingPass):
        """:func:`fuse_residual_adds` as inductor's ``post_grad_custom_post_pass``; ``counts["fused"]``:
        the sums moved into norms (on an older torch, without custom passes, they stay apart)."""

        counted = "fused"

        def rewrite(self, graph: torch.fx.Graph) -> int:
            return fuse_residual_adds(graph, self.counts)


def residual_add_options(counts: dict | None = None) -> dict:
    """The inductor options that fuse the residual adds into the norms (none on an older torch)."""
    return {"post_grad_custom_post_pass": ResidualAddsIntoGroupNorms(counts)} if CountingPass is not None else {}
