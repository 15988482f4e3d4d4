"""The UNet's GroupNorms (+ SiLU) as two Triton kernels when compiled (engine/group_norm.py): the
same function, only inside traced code, the same parameters."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from scope_streamdiffusion.engine import group_norm
from scope_streamdiffusion.engine.group_norm import (
    ELEMENTS_PER_PROGRAM,
    MAX_FUSED_ROWS,
    MAX_SPLITS,
    ONE_PROGRAM_VALUES,
    TritonGroupNorm,
    TritonResnetBlock2D,
    _arguments,
    add_group_norm_op,
    fuse_residual_adds,
    group_norm_op,
    reference,
    residual_add_options,
    splits_for,
    triton_group_norms,
)
from scope_streamdiffusion.engine.projections import share_conditioning_projections
from scope_streamdiffusion.engine.small_convs import gemm_small_convs
from scope_streamdiffusion.testing.tiny_models import _tiny_unet

# Run by Triton's CPU interpreter in a subprocess (triton.jit reads TRITON_INTERPRET when the kernels
# are decorated, at import): each case's largest error against float64, its splits, and whether the
# output has the strides it should.
_INTERPRETED = r"""
import json
import torch
from scope_streamdiffusion.engine import group_norm
from scope_streamdiffusion.engine.group_norm import _residual_sum, group_norm_triton, reference, splits_for

CASES = [  # name, rows, channels, height, width, groups, dtype, layout, silu, shift, elements, residual layout
    ("cl f32 silu shift", 2, 64, 9, 7, 8, "float32", "cl", True, True, ELEMENTS, None),
    ("cl f32 silu shift, 2 splits", 2, 64, 9, 7, 8, "float32", "cl", True, True, 64, None),
    ("nchw f32, group of 3, 16 splits", 1, 96, 16, 16, 32, "float32", "nchw", False, False, 32, None),
    ("cl f16 silu shift, 8 splits", 2, 64, 10, 13, 4, "float16", "cl", True, True, 256, None),
    ("nchw f16 shift, 3 rows", 3, 32, 11, 6, 8, "float16", "nchw", False, True, ELEMENTS, None),
    ("large mean", 2, 32, 12, 12, 8, "float32", "cl", False, False, 64, None),
    ("strided width", 2, 32, 6, 5, 8, "float32", "sliced", True, True, 64, None),
    ("channel slice", 2, 32, 6, 5, 8, "float32", "channels", True, True, 64, None),  # not dense, pixels flatten
    ("one-row shift", 3, 32, 5, 6, 8, "float32", "cl", True, True, 64, None),  # one shift for every row
    # a ResNet's norm2: conv1's bias, and the shift read in place from a wider projection's output
    ("cl f16 silu strided x-bias, sliced shift, 4 splits", 2, 64, 10, 13, 4, "float16", "cl", True, True, 512, None),
    ("one-row sliced shift f32, x-bias, large mean", 3, 32, 12, 12, 8, "float32", "cl", False, True, 64, None),
    # x + residual (written out too): residuals in x's layout, in another, not one pixel index, with a shift
    ("residual cl f16 silu, 8 splits", 2, 64, 10, 13, 4, "float16", "cl", True, False, 256, "cl"),
    ("residual nchw into cl f32", 2, 32, 9, 7, 8, "float32", "cl", False, False, 64, "nchw"),
    ("residual sliced f16, shift", 2, 32, 6, 5, 8, "float16", "nchw", True, True, 64, "sliced"),
    ("residual cl f16, x-bias, r-bias", 2, 64, 9, 7, 8, "float16", "cl", True, False, 64, "cl"),
    # a sum of large mean over a small spread: sums not taken around its first value would cancel
    ("residual cl f32, r-bias, large mean", 2, 32, 12, 12, 8, "float32", "cl", False, False, 64, "cl"),
    # a group whole in one program (the pixels in tiles of 16: several per pass)
    ("one program cl f16 silu shift", 2, 64, 10, 13, 4, "float16", "cl", True, True, ELEMENTS, None),
    ("one program strided width f32", 2, 32, 6, 5, 8, "float32", "sliced", True, True, ELEMENTS, None),
    ("one program residual nchw into cl f16, x-bias, r-bias", 2, 64, 9, 7, 8, "float16", "cl", True, False, ELEMENTS,
     "nchw"),
    ("one program residual cl f32, r-bias, large mean", 2, 32, 12, 12, 8, "float32", "cl", False, False, ELEMENTS, "cl"),
    # SD's 8x8 level has 40 channels a group (masked columns); NCHW in, and a channel slice (another layout out)
    ("one program nchw f32, group of 40, one-row shift", 3, 80, 4, 5, 2, "float32", "nchw", True, True, ELEMENTS, None),
    ("one program channel slice f16", 2, 32, 6, 5, 8, "float16", "channels", True, True, ELEMENTS, None),
    ("one program nchw f16 silu, x-bias, sliced shift", 2, 64, 9, 7, 8, "float16", "nchw", True, True, ELEMENTS, None),
    # a group one value over the limit: two kernels
    ("over the limit by one", 2, 32, 6, 5, 8, "float32", "cl", True, True, 64, None),
]
group_norm.ONE_PROGRAM_TILE = 64
launches = {}


class Counted:  # a kernel whose launches (kernel[grid](...)) are counted
    def __init__(self, kernel, name):
        self.kernel, self.name = kernel, name

    def __getitem__(self, grid):
        launches[self.name] = launches.get(self.name, 0) + 1
        return self.kernel[grid]


for kernel in ("_one_program", "_partial_sums", "_normalize"):
    setattr(group_norm, kernel, Counted(getattr(group_norm, kernel), kernel))
results = []
for name, n, c, h, w, groups, dtype, layout, silu, with_shift, elements, residual_layout in CASES:
    g = torch.Generator().manual_seed(len(results))
    dtype = getattr(torch, dtype)

    def make(layout, scale=1.0, offset=0.0):
        x = torch.randn(n, c + (16 if layout == "channels" else 0), h, w + (3 if layout == "sliced" else 0), generator=g)
        x = (x * scale + offset).to(dtype)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            x = x[..., :w]  # heights and widths do not flatten into one pixel index
        elif layout == "channels":
            x = x.contiguous(memory_format=torch.channels_last)[:, :c]
        return x

    # "large mean": E[x^2] - E[x]^2 in float32 would cancel to nothing
    large = "large mean" in name
    x = make(layout, 0.01, 300) if large else make(layout)
    residual = (make(residual_layout, 0.01, -100) if large else make(residual_layout)) if residual_layout else None
    x_bias = (torch.randn(c, 2, generator=g) * (0.01 if large else 1) + (-200 if large else 0)).to(dtype) \
        if "x-bias" in name else None
    if x_bias is not None:
        x_bias = x_bias[:, 0] if "strided x-bias" in name else x_bias[:, 0].contiguous()
    residual_bias = ((torch.randn(c, generator=g) * (0.001 if large else 1) + (50 if large else 0)).to(dtype)
                     if "r-bias" in name else None)
    weight, bias = (torch.randn(c, generator=g).to(dtype) for _ in range(2))
    shift = None
    if with_shift:
        # small beside a large mean: a shift of unit spread would hide a cancelled variance
        shift = (torch.randn(1 if "one-row" in name else n, c + 7, generator=g) * (0.01 if large else 1)).to(dtype)
        shift = shift[:, 3:3 + c] if "sliced shift" in name else shift[:, :c].contiguous()
    values = h * w * c // groups  # in a group
    one_program = values if name.startswith("one program") else values - 1 if "over the limit" in name else 0
    launches.clear()
    y = group_norm_triton(x, groups, weight, bias, 1e-5, silu, elements, shift=shift, residual=residual,
                          x_bias=x_bias, residual_bias=residual_bias, one_program=one_program)
    summed, normed = True, x
    if residual is not None:
        y, total = y
        normed = _residual_sum(x, residual, x_bias, residual_bias).to(dtype)  # rounded once, as by one pointwise kernel
        summed = torch.equal(total, normed) and total.stride() == y.stride()
    want = reference(normed.double(), groups, weight.double(), bias.double(), 1e-5, silu,
                     None if shift is None else shift.double(),
                     None if x_bias is None or residual is not None else x_bias.double())
    dense = layout not in ("sliced", "channels")
    strides = y.stride() == x.stride() if dense else y.is_contiguous(memory_format=torch.channels_last)
    results.append(dict(name=name, dtype=str(dtype), error=(y.double() - want).abs().max().item(),
                        magnitude=want.abs().max().item(),
                        splits=0 if launches.get("_one_program") else splits_for(h * w, c // groups, elements),
                        launches=dict(launches),
                        strides=strides and y.dtype == dtype and y.shape == x.shape, summed=summed))
print(json.dumps(results))
""".replace("ELEMENTS", str(ELEMENTS_PER_PROGRAM))


def test_the_triton_kernels_compute_group_norm():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 24
    assert {r["splits"] for r in results} >= {0, 1, 2, 8, 16}  # 0: one program
    for r in results:
        assert r["strides"] and r["summed"], r
        one = r["name"].startswith("one program")
        assert r["launches"] == ({"_one_program": 1} if one else {"_partial_sums": 1, "_normalize": 1}), r
        if "large mean" in r["name"]:
            # Outputs of order 1 from inputs of 300 +- 0.01: float32's rounding of x * scale + offset
            # (the same form as PyTorch's) leaves ~1e-3; cancelled statistics would be off by ~1.
            assert r["error"] < 2e-2, r
        elif r["dtype"] == "torch.float32":
            assert r["error"] < 1e-4, r
        else:
            assert r["error"] < 4e-3 * r["magnitude"], r


def test_splits_are_powers_of_two_of_at_least_16_pixels():
    assert splits_for(63, 8) == 1 and splits_for(15, 1024, elements=2) == 1  # small groups: one program
    assert splits_for(64 * 64, 10) == 16  # 40960 values: 20 programs' worth, down to a power of two
    for pixels in (1, 16, 17, 63, 64, 1000, 4096, 16384, 1 << 20):
        for group in (1, 3, 10, 20, 40):
            for elements in (16, 256, ELEMENTS_PER_PROGRAM):
                splits = splits_for(pixels, group, elements)
                assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS
                assert splits == 1 or pixels // splits >= 16
                assert splits <= max(1, pixels * group // elements)
    assert splits_for(1 << 20, 40) == MAX_SPLITS


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided width"])
def test_the_op_off_cuda_is_pytorchs_group_norm_in_the_cuda_layout(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 5, 9, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided width":
        x = x[..., :6]  # not one pixel index: the CUDA kernels make it channels_last
    weight, bias, shift = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(2, 32, generator=g)
    for silu in (False, True):
        got = group_norm_op(x, weight, bias, 8, 1e-6, silu, shift)
        assert torch.allclose(got, reference(x, 8, weight, bias, 1e-6, silu, shift), atol=1e-6)
        assert not torch.allclose(got, reference(x, 8, weight, bias, 1e-6, silu), atol=1e-2)  # the shift counts
        if layout == "strided width":
            assert got.is_contiguous(memory_format=torch.channels_last)
        else:
            assert got.stride() == x.stride()
    assert torch.equal(group_norm_op(x, weight, bias, 8, 1e-6, False), reference(x, 8, weight, bias, 1e-6, False))
    if hasattr(torch.library, "opcheck"):
        torch.library.opcheck(group_norm_op, (x, weight, bias, 8, 1e-6, True))
        torch.library.opcheck(group_norm_op, (x, weight, bias, 8, 1e-6, False), dict(shift=shift, elements=64))
        torch.library.opcheck(add_group_norm_op, (x, x * 2, weight, bias, 8, 1e-6, True), dict(residual_bias=bias))
    # With a residual: the norm of x + residual + the biases, and that sum, both laid out as the CUDA kernels lay them out.
    y, total = add_group_norm_op(x, x.flip(0), weight, bias, 8, 1e-6, False, x_bias=weight)
    assert torch.allclose(total, x + x.flip(0) + weight.reshape(1, -1, 1, 1), atol=1e-6)
    assert torch.allclose(y, reference(total, 8, weight, bias, 1e-6, False), atol=1e-6)
    assert total.stride() == y.stride() == group_norm_op(x, weight, bias, 8, 1e-6, False).stride()


def _unet_inputs(family: str, rows: int = 2):
    g = torch.Generator().manual_seed(0)
    kwargs = dict(encoder_hidden_states=torch.randn(rows, 77, 64 if family == "sdxl" else 32, generator=g))
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 32, generator=g),
                                       "time_ids": torch.randn(rows, 6, generator=g)}
    return torch.randn(rows, 4, 8, 8, generator=g), torch.tensor([999, 301][:rows]), kwargs


def _affine_norms(module) -> int:
    return sum(isinstance(m, torch.nn.GroupNorm) and m.affine for m in module.modules())


def _called_norms(unet, args, kwargs) -> int:
    """How many TritonGroupNorms a call of ``unet`` runs on 4-D inputs (those the op serves)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: calls.append(a[0].dim() == 4))
             for m in unet.modules() if type(m) is TritonGroupNorm]
    try:
        unet(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(calls)


def _rewritten(family: str, share: bool, rows: int = 2):
    """A tiny UNet rewritten as the pipeline does, its output before triton_group_norms, its inputs."""
    torch.manual_seed(0)
    unet = _tiny_unet(family).eval().to(memory_format=torch.channels_last)
    resnets = [m for m in unet.modules() if type(m) is ResnetBlock2D]
    if share:
        assert share_conditioning_projections(unet)
    sample, t, kwargs = _unet_inputs(family, rows)
    norms, keys = _affine_norms(unet), set(unet.state_dict())
    with torch.no_grad():
        before = unet(sample, t, **kwargs).sample
        assert triton_group_norms(unet) == norms > 0
        assert triton_group_norms(unet) == 0  # once only
    assert set(unet.state_dict()) == keys
    assert all(type(m) is TritonGroupNorm for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    # The last norm takes in the SiLU after it either way.
    assert unet.conv_norm_out.silu and type(unet.conv_act) is torch.nn.Identity
    # Blocks whose time embedding is activated outside them take in their SiLUs; others keep theirs.
    assert all(type(m) is (TritonResnetBlock2D if share else ResnetBlock2D) for m in resnets)
    assert all(m.norm1.silu == m.norm2.silu == share for m in resnets)
    return unet, before, (sample, t), kwargs


def _compile(fn, compiler: str = "aot_eager"):
    """torch.compile through ``compiler``, keeping the call_function targets of the graph dynamo traced.
    aot_eager runs the op's fake implementation as inductor does; inductor itself is used on one block
    only (compiling the tiny UNet's C++ kernels takes ~45 s on the test machines)."""
    from torch._dynamo import lookup_backend

    graphs = []

    def backend(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return lookup_backend(compiler)(gm, inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), graphs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_tiny_unet_compiles_its_group_norms_as_the_op_with_the_same_output(family):
    torch.manual_seed(0)
    unet = _tiny_unet(family).eval().to(memory_format=torch.channels_last)
    assert share_conditioning_projections(unet)
    assert gemm_small_convs(unet)  # as the pipeline does: conv1 of the 4x4 and 2x2 levels then a GEMM without bias
    sample, t, kwargs = _unet_inputs(family)
    with torch.no_grad():
        before = unet(sample, t, **kwargs).sample
        assert triton_group_norms(unet) == _affine_norms(unet)
        assert torch.allclose(unet(sample, t, **kwargs).sample, before, atol=1e-5)
        called = _called_norms(unet, (sample, t), kwargs)
        compiled, graphs = _compile(unet)
        got = compiled(sample, t, **kwargs).sample
    assert torch.allclose(got, before, atol=1e-5)
    assert len(graphs) == 1
    ops = sum("scope_streamdiffusion.group_norm" in name for name in graphs[0])
    assert ops == called == _affine_norms(unet)
    assert not [name for name in graphs[0] if "group_norm" in name and "scope_streamdiffusion" not in name]


def _compile_traced(fn):
    """torch.compile running dynamo's graph as traced (the op's CPU implementation), keeping its targets."""
    graphs = []

    def backend(gm, _inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), graphs


@pytest.mark.parametrize("family,share", [("sd15", True), ("sd15", False), ("sdxl", True)])
def test_the_rewrite_keeps_the_eager_output(family, share):
    unet, before, args, kwargs = _rewritten(family, share)
    with torch.no_grad():
        assert torch.allclose(unet(*args, **kwargs).sample, before, atol=1e-5)
        assert _called_norms(unet, args, kwargs) == _affine_norms(unet)


@pytest.mark.parametrize("config,fused", [
    (dict(), True),
    (dict(out_channels=24, output_scale_factor=2.0), True),  # a shortcut convolution, a scale
    (dict(time_embedding_norm="scale_shift"), False),  # the time embedding applied after norm2
    (dict(up=True), False),
    (dict(down=True), False),
    (dict(skip_time_act=False), False),  # its time embedding's SiLU runs in the block
])
def test_only_plain_resnet_blocks_take_in_the_shift_and_silu(config, fused):
    torch.manual_seed(0)
    plain = not config  # compiled by inductor too (the others' graphs run as traced)
    config = dict(in_channels=16, temb_channels=32, groups=8, skip_time_act=True) | config
    block = ResnetBlock2D(**config).eval()
    g = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        before = block(x, temb)
        assert triton_group_norms(block) == 2
        assert type(block) is (TritonResnetBlock2D if fused else ResnetBlock2D)
        assert type(block.norm1) is type(block.norm2) is TritonGroupNorm
        assert block.norm1.silu == block.norm2.silu == fused
        assert torch.allclose(block(x, temb), before, atol=1e-5)
        compiled, graphs = _compile(block, "inductor") if plain else _compile_traced(block)
        assert torch.allclose(compiled(x, temb), before, atol=1e-5)
    assert sum("scope_streamdiffusion.group_norm" in name for name in graphs[0]) == 2


def test_a_time_embedding_of_one_row_or_of_more_rows_than_the_input():
    """One embedding row serves every input row (the op broadcasts the shift); more embedding rows
    than input rows broadcast the input, as diffusers' add does (PyTorch's ops, not the op)."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=32, groups=8, skip_time_act=True).eval()
    g = torch.Generator().manual_seed(2)
    x, temb = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        before = [block(x, temb[:1]), block(x[:1], temb)]
        assert triton_group_norms(block) == 2 and type(block) is TritonResnetBlock2D
        compiled, graphs = _compile_traced(block)
        assert torch.allclose(compiled(x, temb[:1]), before[0], atol=1e-5)
        assert sum("scope_streamdiffusion.group_norm" in name for name in graphs[-1]) == 2
        got = compiled(x[:1], temb)
        assert got.shape == before[1].shape == (2, 16, 4, 4) and torch.allclose(got, before[1], atol=1e-5)
        assert sum("scope_streamdiffusion.group_norm" in name for name in graphs[-1]) == 1  # norm1 only


@pytest.mark.parametrize("bias_in_norm", [True, False])
def test_conv1s_bias_goes_to_the_operator_beside_the_time_embedding(bias_in_norm):
    """The bias of conv1 and the time embedding reach norm2's operator apart (the embedding as the
    projection's output itself), or, switched off, as their sum: the same output either way."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=32, groups=8, skip_time_act=True).eval()
    torch.nn.init.normal_(block.conv1.bias)
    g = torch.Generator().manual_seed(3)
    x, temb = torch.randn(2, 16, 5, 5, generator=g), torch.randn(2, 32, generator=g)
    calls = []

    def backend(gm, _inputs):
        calls.extend(n for n in gm.graph.nodes if n.target is torch.ops.scope_streamdiffusion.group_norm.default)
        return gm.forward

    with torch.no_grad():
        before = block(x, temb)
        assert triton_group_norms(block, bias_in_norm=bias_in_norm) == 2
        assert block.bias_in_norm is bias_in_norm
        assert torch.allclose(block(x, temb), before, atol=1e-5)
        torch._dynamo.reset()
        got = torch.compile(block, backend=backend, fullgraph=True, dynamic=False)(x, temb)
    assert torch.allclose(got, before, atol=1e-5)
    norm2 = _arguments(calls[1])
    assert (norm2["x_bias"] is not None) is bias_in_norm
    producer = norm2["shift"].target
    assert (producer is torch._C._nn.linear) is bias_in_norm, producer  # else the add of the two
    assert _arguments(calls[0])["x_bias"] is None  # norm1 reads the block's input


def test_a_block_without_time_embedding_keeps_its_code():
    """No ``time_emb_proj``: diffusers' block (which may add a raw embedding) is kept; its norms still swap."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=None, groups=8).eval()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        before = block(x, None)
        assert triton_group_norms(block) == 2
        assert type(block) is ResnetBlock2D and not block.norm1.silu
        assert torch.allclose(block(x, None), before, atol=1e-6)


def test_eager_calls_keep_pytorchs_group_norm(monkeypatch):
    """Outside traced code the module never calls the op (on CUDA the Triton kernels would compile
    in the middle of a stream); traced, it does."""
    calls = []
    real = group_norm.group_norm_op

    def recording(*args):
        calls.append(torch.compiler.is_dynamo_compiling())
        return real(*args)

    monkeypatch.setattr(group_norm, "group_norm_op", recording)
    norm = torch.nn.GroupNorm(4, 16).eval()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    assert triton_group_norms(norm) == 1 and type(norm) is TritonGroupNorm
    x, shift = torch.randn(2, 16, 3, 5), torch.randn(2, 16)
    with torch.no_grad():
        eager = norm(x, shift)
        assert calls == []
        assert torch.allclose(eager, reference(x, 4, norm.weight, norm.bias, norm.eps, False, shift), atol=1e-6)
        compiled, _ = _compile_traced(norm)
        assert torch.allclose(compiled(x, shift), eager, atol=1e-6)
    assert calls and all(calls)  # traced: the op, through the module-level name


# The residual sums read by a norm, moved into the operator (fuse_residual_adds, inductor's post-grad pass).

def _sums_and_norms(x, r, w, b, cw, cb, lw, lb, shift):
    conv = F.conv2d(x, cw, cb, padding=1)  # read by the sum alone: its bias moves
    s1 = conv + r
    y1 = group_norm_op(s1, w, b, 4, 1e-5, True, None, 64, 0)  # its sizes go with it into the fused operator
    # A linear layer laid out as channels and copied (a transformer's output in diffusers) ...
    lin = F.linear(r.permute(0, 2, 3, 1), lw, lb).permute(0, 3, 1, 2).contiguous()
    s2 = lin + s1
    y2 = group_norm_op(s2, w, b, 4, 1e-5, False)
    # ... and as inductor's graphs have it, an addmm over the pixels' rows.
    def rows_of(t):
        pixels = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
        return torch.addmm(lb, pixels, lw.t()).view(t.shape[0], *t.shape[2:], -1).permute(0, 3, 1, 2)

    y3 = group_norm_op(rows_of(r) + s2, w, b, 4, 1e-5, False)
    shared = F.conv2d(x, cw, cb, padding=1)  # also read elsewhere: its bias stays
    y4 = group_norm_op(shared + r, w, b, 4, 1e-5, False)
    y5 = group_norm_op(x + r[:, :, :1, :1], w, b, 4, 1e-5, False)  # a broadcast: left alone
    y6 = group_norm_op(x + r, w, b, 4, 1e-5, False, shift)  # with a shift: left alone
    twice = rows_of(r.flip(1))
    y7 = group_norm_op(twice + twice, w, b, 4, 1e-5, False)  # x + x: left alone (one node, one bias to take out)
    # A bias that promotes the product's dtype: the sum is fused, the bias stays.
    promoted = ((r.permute(0, 2, 3, 1).bfloat16() @ lw.t().bfloat16()) + lb).permute(0, 3, 1, 2)
    y8 = group_norm_op(promoted + r, w, b, 4, 1e-5, False)
    y9 = group_norm_op(x + r, w, b, 4, 1e-5, False, x_bias=cb)  # with a bias of x (a ResNet's norm2): left alone
    return y1, y2, y3, y4, y5, y6, y7, y8, y9, shared * 2, s2


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _sums_graph(rows: int):
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(rows, 8, 5, 6, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randn(rows, 8, 5, 6, generator=g), *(torch.randn(8, generator=g) for _ in range(2)),
            torch.randn(8, 8, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(8, 8, generator=g),
            torch.randn(8, generator=g), torch.randn(rows, 8, generator=g)]
    return make_fx(_sums_and_norms, tracing_mode="fake")(*args), args


@pytest.mark.parametrize("rows", [1, 2])
def test_residual_sums_move_into_the_operator_with_the_biases_added_last(rows):
    gm, args = _sums_graph(rows)
    want = _sums_and_norms(*args)
    before = _targets(gm)
    counts = {}
    if rows > MAX_FUSED_ROWS:  # measured slower at LCM's 4 rows: left alone unless asked
        assert fuse_residual_adds(gm.graph, counts) == 0 and _targets(gm) == before
    assert fuse_residual_adds(gm.graph, counts, max_rows=rows) == 5
    gm.graph.lint()
    gm.recompile()
    after = _targets(gm)
    assert counts == {"biases": 3}  # the first convolution's, the linear layer's, one addmm's
    assert after.count("scope_streamdiffusion.add_group_norm.default") == 5
    assert after.count("scope_streamdiffusion.group_norm.default") == 4
    assert before.count("aten.addmm.default") == 2 and after.count("aten.addmm.default") == 1  # one became an mm
    assert after.count("aten.clone.default") == before.count("aten.clone.default") - 1  # the layout copy
    got = gm(*args)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, atol=1e-5)
    fused = [_arguments(n) for n in gm.graph.nodes if n.target is torch.ops.scope_streamdiffusion.add_group_norm.default]
    assert sorted((a["elements"], a["one_program"]) for a in fused) == [(64, 0)] + [
        (ELEMENTS_PER_PROGRAM, ONE_PROGRAM_VALUES)] * 4
    assert fuse_residual_adds(gm.graph) == 0  # nothing left to fuse


def _compile_fusing(fn):
    """torch.compile through AOTAutograd, running :func:`fuse_residual_adds` on its ATen graph (the
    operators' CPU implementations run it)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    found = {"counts": {}}

    def compiler(gm, _inputs):
        found["fused"] = fuse_residual_adds(gm.graph, found["counts"])
        gm.graph.lint()
        gm.recompile()
        found["targets"] = _targets(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    return torch.compile(fn, backend=aot_autograd(fw_compiler=compiler), fullgraph=True, dynamic=False), found


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_tiny_unets_residual_sums_move_into_its_norms_with_the_same_output(family):
    """Each ResNet block's and transformer's output read next by a norm (10 in the tiny UNets: the
    others read a concatenation, a strided convolution or conv_in), with the biases added last."""
    unet, before, args, kwargs = _rewritten(family, share=True, rows=1)
    with torch.no_grad():
        compiled, found = _compile_fusing(unet)
        got = compiled(*args, **kwargs).sample
    assert torch.allclose(got, before, atol=1e-5)
    assert found["fused"] == 10 and found["counts"]["biases"] >= 10
    assert found["targets"].count("scope_streamdiffusion.add_group_norm.default") == 10


def test_inductor_runs_the_pass_on_consecutive_blocks():
    """Inductor (on the CPU) with the pipeline's options: the first block's sum moves into the second
    block's first norm, with conv2's bias."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(ResnetBlock2D(in_channels=16, temb_channels=32, groups=8, skip_time_act=True)
                                 for _ in range(2)).eval()
    g = torch.Generator().manual_seed(1)
    x, temb = torch.randn(1, 16, 6, 6, generator=g), torch.randn(1, 32, generator=g)

    def run(x, temb):
        for block in blocks:
            x = block(x, temb)
        return x

    counts = {}
    with torch.no_grad():
        before = run(x, temb)
        assert triton_group_norms(blocks) == 4
        torch._dynamo.reset()
        # No cache: a cached graph would skip the pass (and its counts).
        with inductor_config.patch(residual_add_options(counts) | {"force_disable_caches": True}):
            got = torch.compile(run, fullgraph=True, dynamic=False)(x, temb)
    assert torch.allclose(got, before, atol=1e-5)
    assert counts == {"graphs": 1, "fused": 1, "biases": 1}
