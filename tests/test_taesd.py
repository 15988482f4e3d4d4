"""TAESD with its ReLUs inside its convolutions (engine/taesd.py): the same function, the same weights,
the same layouts, and applied by the graph modes. The cuDNN kernel itself runs only on a GPU
(BENCHMARKS.md, R11, compares it with the separate ops there); on the CPU the op runs the separate ops.
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
from scope_streamdiffusion.engine.taesd import FusedConvReLU, FusedTinyBlock, conv3x3_relu, fuse_relus

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


def test_other_vaes_and_bfloat16_are_left_as_they_are():
    for vae in (AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4),
                AutoencoderTiny().to(torch.bfloat16)):  # cuDNN fuses float16 and float32 only
        before = [type(m) for m in vae.modules()]
        assert fuse_relus(vae) == 0 and [type(m) for m in vae.modules()] == before


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
    decoder = torch.compile(fused.decoder, fullgraph=True)  # the op traces: no graph break around it
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), inductor_config.patch({"freezing": frozen}):
        torch.testing.assert_close(decoder(latents), stock.decoder(latents), rtol=1e-5, atol=1e-5)


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

    models = load()
    assert models.extras["fused_taesd_relus"] == 9
    assert sum(isinstance(m, FusedTinyBlock) for m in models.vae.modules()) == 8
    fused = stream(models)
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_FUSE_TAESD", "0")
    models = load()
    assert "fused_taesd_relus" not in models.extras
    assert not any(isinstance(m, FusedTinyBlock) for m in models.vae.modules())
    torch.testing.assert_close(fused, stream(models), rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_FUSE_TAESD")
    monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: "none")
    assert "fused_taesd_relus" not in load("none").extras  # eager stays the reference
