"""TAESD rewritten for the GPU (engine/taesd.py): its ReLUs inside its convolutions, its decoder's
upsamplings folded into transposed convolutions, its 3-channel convolutions padded. The same function,
the same weights, the same layouts, and applied by the graph modes. The cuDNN kernels themselves run
only on a GPU (BENCHMARKS.md, R11 and R13, compare them there); on the CPU the fused op runs the
separate ops.
"""

import copy
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import make_frames
from scope_streamdiffusion.engine import CfgType, StreamDiffusion, StreamSettings, load_models
from scope_streamdiffusion.engine import acceleration as acc
from scope_streamdiffusion.engine.taesd import (BiasChannelConv, FusedConvReLU, FusedTinyBlock, PaddedOutConv,
                                                 UpsampledConv, conv3x3_relu, fold_upsamples, fuse_relus,
                                                 pad_thin_convs, upsampled_conv_weight)

CPU = torch.device("cpu")


def _round_trip(vae, image):
    return vae.decoder(vae.encoder(image))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_taesd_computes_the_same_frames_with_the_same_weights(channels_last):
    torch.manual_seed(0)
    stock = AutoencoderTiny().eval()  # the real TAESD/TAESDXL layout: 64 channels, 3 blocks per level
    fused = copy.deepcopy(stock)
    assert fuse_relus(fused) == 10 + 10 + 1  # every block of encoder and decoder, and the decoder's first conv
    assert sum(isinstance(m, FusedTinyBlock) for m in fused.modules()) == 20
    assert sum(isinstance(m, FusedConvReLU) for m in fused.modules()) == 1
    assert fused.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), stock.state_dict().values()))
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    if channels_last:
        stock, fused = stock.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = _round_trip(stock, image), _round_trip(fused, image)
    assert got.shape == want.shape == image.shape and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride()
    assert fuse_relus(fused) == 0  # nothing left to fuse a second time


@pytest.mark.parametrize("size", [(5, 7), (8, 8)])
def test_nearest_upsampling_then_conv_is_one_transposed_conv(size):
    torch.manual_seed(0)
    w, b = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    got = torch.nn.functional.conv_transpose2d(x, upsampled_conv_weight(w), b, stride=2, padding=1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert upsampled_conv_weight(w.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)  # the weights keep the model's layout (no copy per call)


def test_folded_upsamplings_and_padded_convs_compute_the_same_function():
    torch.manual_seed(0)
    stock = AutoencoderTiny().eval().double()  # the real TAESD/TAESDXL layout; float64: exact comparisons
    rewritten = copy.deepcopy(stock)
    assert fold_upsamples(rewritten) == 3  # the decoder's three 2x upsamplings
    assert pad_thin_convs(rewritten) == 2  # the encoder's first convolution, the decoder's last
    assert sum(isinstance(m, UpsampledConv) for m in rewritten.modules()) == 3
    assert isinstance(rewritten.encoder.layers[0], BiasChannelConv) and isinstance(rewritten.decoder.layers[-1], PaddedOutConv)
    assert not any(isinstance(m, torch.nn.Upsample) for m in rewritten.modules())
    assert rewritten.state_dict().keys() == stock.state_dict().keys()  # derived weights are not saved
    assert all(torch.equal(a, b) for a, b in zip(rewritten.state_dict().values(), stock.state_dict().values()))
    image = torch.rand(1, 3, 24, 40, dtype=torch.float64) * 2 - 1  # the frame's borders matter (the bias channel)
    with torch.no_grad():
        want_z, got_z = stock.encoder(image), rewritten.encoder(image)
        torch.testing.assert_close(got_z, want_z, rtol=1e-12, atol=1e-12)
        want, got = stock.decoder(want_z), rewritten.decoder(want_z)
    assert want.abs().mean() > 0.1 and got.shape == want.shape == image.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fold_upsamples(rewritten) == 0 and pad_thin_convs(rewritten) == 0  # nothing left a second time


def test_decoder_input_laid_out_as_its_weights():
    """Latents arrive NCHW; with channels_last weights the decoder's first stage runs channels_last
    (the fused op's output keeps its input's layout: without the conversion, cuDNN copies around each
    convolution of that stage)."""
    torch.manual_seed(0)
    stock = AutoencoderTiny().eval().to(memory_format=torch.channels_last)
    layouts = {}
    for input_layout in (False, True):
        vae = copy.deepcopy(stock)
        fuse_relus(vae, input_layout=input_layout)
        seen = []
        vae.decoder.layers[2].register_forward_hook(lambda m, i, out: seen.append(out))  # the first block
        latents = torch.randn(1, 4, 6, 8)  # NCHW, as the stream's x0 is
        with torch.no_grad():
            out = vae.decoder(latents)
            torch.testing.assert_close(out, stock.decoder(latents), rtol=1e-5, atol=1e-5)
        layouts[input_layout] = seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert layouts == {False: False, True: True}


def test_rewritten_weights_keep_the_models_layout_and_outputs_keep_their_strides():
    """Derived weights in another layout than the model's would cost a copy per call on the GPU."""
    torch.manual_seed(0)
    stock = AutoencoderTiny().eval().to(memory_format=torch.channels_last)
    rewritten = copy.deepcopy(stock)
    fuse_relus(rewritten), fold_upsamples(rewritten), pad_thin_convs(rewritten)
    buffers = dict(rewritten.named_buffers())
    assert len(buffers) == 3 + 2
    assert all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous() for b in buffers.values())
    image = (torch.rand(1, 3, 32, 48) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        latents = stock.encoder(image)
        for want, got in ((latents, rewritten.encoder(image)), (stock.decoder(latents), rewritten.decoder(latents))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got.stride() == want.stride()


def test_other_vaes_are_left_as_they_are_and_bfloat16_is_not_fused():
    for vae in (AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4),
                AutoencoderTiny().to(torch.bfloat16)):  # cuDNN fuses float16 and float32 only
        before = [type(m) for m in vae.modules()]
        assert fuse_relus(vae) == 0 and [type(m) for m in vae.modules()] == before
    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8, latent_channels=4)
    before = [type(m) for m in vae.modules()]
    assert fold_upsamples(vae) == 0 and pad_thin_convs(vae) == 0 and [type(m) for m in vae.modules()] == before
    # Plain convolutions, any dtype: a bfloat16 TAESD is folded and padded (one bfloat16 rounding apart).
    torch.manual_seed(0)
    stock = AutoencoderTiny().eval().to(torch.bfloat16)
    rewritten = copy.deepcopy(stock)
    assert fold_upsamples(rewritten) == 3 and pad_thin_convs(rewritten) == 2
    latents = torch.randn(1, 4, 6, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(rewritten.decoder(latents).float(), stock.decoder(latents).float(), rtol=0, atol=0.02)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layouts", [(torch.contiguous_format,) * 2, (torch.channels_last,) * 2,
                                     (torch.contiguous_format, torch.channels_last)], ids=["nchw", "nhwc", "mixed"])
def test_the_ops_fake_has_the_real_outputs_layout(residual, layouts):
    """Inductor plans buffers from the fake op's strides: they must be the real op's (the input's layout).
    Here the real op is the CPU's; the cuDNN kernel ends in the same layout step, and its compiled runs
    on the GPU (BENCHMARKS.md, R11, --check) would show a mismatch as wrong frames."""
    x = torch.randn(2, 8, 6, 10).contiguous(memory_format=layouts[0])
    w, b = torch.randn(8, 8, 3, 3).contiguous(memory_format=layouts[1]), torch.randn(8)
    z = torch.randn(2, 8, 6, 10).contiguous(memory_format=layouts[0]) if residual else None
    real = conv3x3_relu(x, w, b, z)
    want = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1) + (z if residual else 0))
    torch.testing.assert_close(real, want)
    assert real.is_contiguous(memory_format=layouts[0])
    with FakeTensorMode() as mode:
        fake = conv3x3_relu(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b),
                            None if z is None else mode.from_tensor(z))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen weights"])
def test_fused_taesd_compiles_to_the_same_frames(tiny_taesd, frozen):
    import torch._inductor.config as inductor_config

    stock = AutoencoderTiny.from_pretrained(str(tiny_taesd)).eval().requires_grad_(False)
    fused = copy.deepcopy(stock)
    assert fuse_relus(fused) == 4 + 4 + 1
    assert fold_upsamples(fused) == 3 and pad_thin_convs(fused) == 2  # as the graph modes rewrite it
    # The ops trace: no graph break around them.
    encoder, decoder = torch.compile(fused.encoder, fullgraph=True), torch.compile(fused.decoder, fullgraph=True)
    latents, image = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad(), inductor_config.patch({"freezing": frozen}):
        torch.testing.assert_close(decoder(latents), stock.decoder(latents), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder(image), stock.encoder(image), rtol=1e-5, atol=1e-5)


def test_graph_modes_fuse_taesd_unless_turned_off(tiny_sd15, tiny_taesd, monkeypatch):
    """A graph mode's stream (its static step, run eagerly on the CPU) gives the frames of the separate ops."""
    monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: "cudagraph")  # a graph mode on CPU

    def load(mode="cudagraph"):
        return load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, tiny_vae_id=str(tiny_taesd),
                           acceleration=mode)

    def stream(models):
        models.extras["step_runner"] = acc.StepGraphs(use_graphs=False)
        engine = StreamDiffusion(models, width=64, height=64, settings=StreamSettings(
            num_inference_steps=2, cfg_type=CfgType.SELF, guidance_scale=1.2, prompts=(("a red fox", 1.0),)))
        return torch.stack([engine(f) for f in make_frames(3)])

    rewrites = {"fused_taesd_relus": ("SCOPE_STREAMDIFFUSION_FUSE_TAESD", 9),
                "taesd_input_layout": ("SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT", True),
                "folded_taesd_upsamples": ("SCOPE_STREAMDIFFUSION_FOLD_UPSAMPLES", 3),
                "padded_taesd_convs": ("SCOPE_STREAMDIFFUSION_PAD_THIN_CONVS", 2)}
    models = load()
    assert {key: models.extras[key] for key in rewrites} == {key: value for key, (_, value) in rewrites.items()}
    assert sum(isinstance(m, FusedTinyBlock) for m in models.vae.modules()) == 8
    rewritten = stream(models)
    for key, (switch, _) in rewrites.items():  # each switch turns its own rewrite off (the layout goes with the fusion)
        monkeypatch.setenv(switch, "0")
        models = load()
        off = {key, "taesd_input_layout"} if key == "fused_taesd_relus" else {key}
        assert all(not models.extras.get(k) for k in off) and all(models.extras[k] for k in rewrites if k not in off)
        assert any(isinstance(m, FusedConvReLU) and m.input_layout for m in models.vae.modules()) == (
            "taesd_input_layout" not in off)
        monkeypatch.delenv(switch)
    for switch, _ in rewrites.values():
        monkeypatch.setenv(switch, "0")
    models = load()
    assert not any(isinstance(m, (FusedTinyBlock, UpsampledConv, BiasChannelConv, PaddedOutConv)) for m in models.vae.modules())
    torch.testing.assert_close(rewritten, stream(models), rtol=1e-5, atol=1e-5)
    for switch, _ in rewrites.values():
        monkeypatch.delenv(switch)
    monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: "none")
    assert not set(rewrites) & set(load("none").extras)  # eager stays the reference
