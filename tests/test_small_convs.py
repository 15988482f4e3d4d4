"""The UNet's 3x3 convolutions over few pixels as GEMMs when compiled (engine/small_convs.py): the
same function, only inside traced code, only up to MAX_PIXELS, the same parameters."""

import threading

import pytest
import torch
import torch.nn.functional as F

from scope_streamdiffusion.engine.small_convs import MAX_PIXELS, SmallPixelsConv2d, gemm_small_convs, patch_gemm
from scope_streamdiffusion.testing.tiny_models import _tiny_unet


def _ops(graph_module) -> dict:
    """How many convolutions and matrix products a dynamo graph calls."""
    names = [str(n.target) for n in graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    return dict(conv=sum("conv2d" in name for name in names),
                gemm=sum(any(op in name for op in ("matmul", "addmm", "built-in function mm")) for name in names))


def _compile(fn):
    graphs = []

    def backend(gm, _inputs):
        graphs.append(_ops(gm))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False), graphs


@pytest.mark.parametrize("rows,height,width,bias,channels_last",
                         [(1, 8, 8, True, True), (2, 4, 8, False, True), (3, 5, 3, True, False)])
def test_the_patch_gemm_is_the_convolution(rows, height, width, bias, channels_last):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 24, height, width, generator=g)
    weight = torch.randn(16, 24, 3, 3, generator=g)
    b = torch.randn(16, generator=g) if bias else None
    if channels_last:
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    got = patch_gemm(x, weight, b)
    assert got.shape == (rows, 16, height, width)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, F.conv2d(x, weight, b, padding=1), atol=1e-5)


def test_compiled_over_few_pixels_a_gemm_else_the_convolution():
    conv = torch.nn.Conv2d(32, 16, 3, padding=1).eval().to(memory_format=torch.channels_last)
    gemm_small_convs(conv)
    assert type(conv) is SmallPixelsConv2d
    side = int(MAX_PIXELS ** 0.5)
    small = torch.randn(1, 32, side, side).to(memory_format=torch.channels_last)
    large = torch.randn(2, 32, side, side).to(memory_format=torch.channels_last)  # 2 x 64 pixels
    with torch.no_grad():
        eager = conv(small)
        assert torch.equal(eager, F.conv2d(small, conv.weight, conv.bias, padding=1))  # eager: the convolution itself
        compiled, graphs = _compile(conv)
        got_small, got_large = compiled(small), compiled(large)
    assert graphs == [dict(conv=0, gemm=1), dict(conv=1, gemm=0)]
    assert torch.allclose(got_small, eager, atol=1e-5)
    assert torch.allclose(got_large, F.conv2d(large, conv.weight, conv.bias, padding=1), atol=1e-6)
    # Another limit: 2 x 64 pixels as a GEMM too.
    limited = torch.nn.Conv2d(32, 16, 3, padding=1).eval().to(memory_format=torch.channels_last)
    gemm_small_convs(limited, max_pixels=2 * MAX_PIXELS)
    with torch.no_grad():
        compiled, graphs = _compile(limited)
        got = compiled(large)
    assert graphs == [dict(conv=0, gemm=1)] and conv.max_pixels == MAX_PIXELS
    assert torch.allclose(got, F.conv2d(large, limited.weight, limited.bias, padding=1), atol=1e-5)
    # A weight that is not channels_last would be copied on every call: the convolution stays.
    conv.weight.data = conv.weight.data.contiguous()
    with torch.no_grad():
        compiled, graphs = _compile(conv)
        compiled(small)
    assert graphs == [dict(conv=1, gemm=0)]


def test_eager_calls_while_another_thread_compiles_keep_the_convolution(monkeypatch):
    """background-compile traces the UNet on its thread while the stream's thread runs it eagerly
    (and captures its eager graph): only the traced code may take the GEMM."""
    conv = torch.nn.Conv2d(32, 16, 3, padding=1).eval().to(memory_format=torch.channels_last)
    gemm_small_convs(conv)
    small = torch.randn(1, 32, 8, 8).to(memory_format=torch.channels_last)
    convolved = []  # the threads that ran the convolution itself
    real = torch.nn.Conv2d._conv_forward

    def recording(self, x, weight, bias):
        convolved.append(threading.get_ident())
        return real(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", recording)
    inside, release = threading.Event(), threading.Event()

    def backend(gm, _inputs):  # holds the compilation open until the eager call below is done
        inside.set()
        release.wait(30)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(conv, backend=backend, dynamic=False)
    worker = threading.Thread(target=lambda: compiled(small))
    with torch.no_grad():
        worker.start()
        try:
            assert inside.wait(30)
            eager = conv(small)
        finally:
            release.set()
            worker.join(30)
    assert convolved == [threading.get_ident()]  # this thread convolved; the traced code took the GEMM
    assert torch.equal(eager, real(conv, small, conv.weight, conv.bias))


def test_a_tiny_unet_compiles_its_lowest_levels_as_gemms_with_the_same_output():
    torch.manual_seed(0)
    unet = _tiny_unet("sd15").eval().to(memory_format=torch.channels_last)
    keys = set(unet.state_dict())
    plain = [m for m in unet.modules() if type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 301])
    prompt = torch.randn(2, 77, 32, generator=g)
    pixels = []  # rows x height x width each plain 3x3 convolution sees
    hooks = [m.register_forward_pre_hook(lambda _m, args: pixels.append(args[0].shape[0] * args[0][0, 0].numel()))
             for m in plain]
    with torch.no_grad():
        before = unet(sample, t, encoder_hidden_states=prompt).sample
        for hook in hooks:
            hook.remove()
        assert gemm_small_convs(unet) == len(plain) > 0
        assert gemm_small_convs(unet) == 0  # once only
        assert set(unet.state_dict()) == keys
        assert torch.equal(unet(sample, t, encoder_hidden_states=prompt).sample, before)  # eager: unchanged
        compiled, graphs = _compile(unet)
        got = compiled(sample, t, encoder_hidden_states=prompt).sample
    # 2 rows at 8x8 (128 pixels: cuDNN), 4x4 and 2x2 (32 and 8 pixels: GEMMs).
    small = sum(p <= MAX_PIXELS for p in pixels)
    assert 0 < small < len(pixels)
    assert len(graphs) == 1 and graphs[0]["gemm"] == small and graphs[0]["conv"] >= len(pixels) - small
    assert torch.allclose(got, before, atol=1e-5)
