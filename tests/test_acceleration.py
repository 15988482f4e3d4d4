"""Acceleration modes on CPU: fallbacks, the static-buffer step, ONNX export, and the bench command.

The CUDA-graph capture, torch.compile and TensorRT themselves only run on a GPU (BENCHMARKS.md has
the figures and correctness tolerances measured there); here we test everything around them.
"""

import gc
import json
import logging
import re
import shutil
import sys
import threading
import time
import weakref

import pytest
import torch

from conftest import make_frames
from scope_streamdiffusion.engine import CfgType, ModelLoadError, StreamDiffusion, StreamSettings, load_models
from scope_streamdiffusion.engine import acceleration as acc
from scope_streamdiffusion.engine import inductor

CPU = torch.device("cpu")


def _fallback_warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "acceleration" in r.getMessage()]


@pytest.mark.parametrize("mode", ["compile", "cudagraph", "xformers", "tensorrt", "background-compile"])
def test_modes_fall_back_to_none_on_cpu_with_one_warning(tiny_sd15, caplog, mode):
    caplog.set_level(logging.WARNING)
    models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration=mode)
    assert models.extras["acceleration"] == "none"
    assert "step_runner" not in models.extras
    assert len(_fallback_warnings(caplog)) == 1, [r.getMessage() for r in caplog.records]


def test_auto_is_silent_and_none_on_cpu(tiny_sd15, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration="auto")
    assert models.extras["acceleration"] == "none"
    assert not _fallback_warnings(caplog)
    # On CUDA: compiling in the background where Triton is there, CUDA graphs of eager modules else.
    monkeypatch.setattr(acc, "has_triton", lambda: True)
    assert acc.resolve_acceleration("auto", torch.device("cuda")) == "background-compile"
    monkeypatch.setattr(acc, "has_triton", lambda: False)
    assert acc.resolve_acceleration("auto", torch.device("cuda")) == "cudagraph"
    assert not caplog.records


def test_schema_lists_every_mode():
    from typing import get_args

    from scope_streamdiffusion.schema import StreamDiffusionConfig

    field = StreamDiffusionConfig.model_fields["acceleration"]
    assert set(get_args(field.annotation)) == set(acc.ACCELERATIONS)
    assert field.default == "auto"


def test_tensorrt_missing_is_one_clear_error_on_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(ModelLoadError) as info:
        acc.resolve_acceleration("tensorrt", torch.device("cuda"))
    text = str(info.value)
    assert "pip install tensorrt onnx" in text and "scope-streamdiffusion[tensorrt]" in text


def test_tensorrt_without_onnx_builds_no_engine_but_runs_a_cached_one(monkeypatch):
    """An engine is built from an ONNX export: without onnx, building stops before the export with the
    same one error, naming onnx; a cached engine needs no onnx."""
    import types

    from scope_streamdiffusion.engine.tensorrt_export import require_tensorrt

    trt = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert acc.resolve_acceleration("tensorrt", torch.device("cuda")) == "tensorrt"
    assert require_tensorrt() is trt
    with pytest.raises(ModelLoadError) as info:
        require_tensorrt(export=True)
    text = str(info.value)
    assert "onnx (" in text and "tensorrt (" not in text and "pip install tensorrt onnx" in text
    assert isinstance(info.value.__cause__, ImportError)


def test_compile_without_triton_falls_back_once(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(acc, "has_triton", lambda: False)
    assert acc.resolve_acceleration("compile", torch.device("cuda")) == "none"
    assert len(_fallback_warnings(caplog)) == 1


def test_inductor_cache_goes_under_our_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert inductor.configure_inductor_cache() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's choice is kept
    assert inductor.configure_inductor_cache() == tmp_path / "mine"


# ----- the static-buffer step (what the CUDA graph replays) ----------------------------------------
def _run(models, runner, frames, **settings):
    models.extras.pop("step_runner", None)
    if runner is not None:
        models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(models, width=64, height=64, settings=StreamSettings(**settings))
        outs = [engine(f) for f in frames]
        # Runtime parameters of the same batch shape: prompt, guidance, delta, strength, seed.
        engine.update(prompts=(("a red fox", 1.0),), guidance_scale=settings.get("guidance_scale", 1.0) + 0.4,
                      delta=0.6, strength=0.7, seed=7)
        outs += [engine(f) for f in frames[:3]]
        # One at a time, as per-frame modulation does: each refreshes only its own static buffers.
        g = settings.get("guidance_scale", 1.0)
        for change in (dict(guidance_scale=g + 0.2), dict(delta=0.9), dict(strength=0.55),
                       dict(prompts=(("a blue boat", 1.0),)), dict(negative_prompt="dark"), dict(seed=11),
                       dict(strength=0.7)):
            engine.update(**change)
            outs.append(engine(frames[0]))
        return outs
    finally:
        models.extras.pop("step_runner", None)


@pytest.mark.parametrize("settings", [
    dict(num_inference_steps=3, cfg_type=CfgType.SELF, guidance_scale=1.3),
    dict(num_inference_steps=2, cfg_type=CfgType.FULL, guidance_scale=1.5, do_add_noise=False),
    dict(num_inference_steps=3, cfg_type=CfgType.INITIALIZE, guidance_scale=1.5, use_denoising_batch=False),
], ids=["self-batch", "full-batch", "initialize-sequential"])
def test_static_step_matches_eager_and_runtime_changes_reuse_it(sd15_models, settings):
    frames = make_frames(5)
    expected = _run(sd15_models, None, frames, **settings)
    runner = acc.StepGraphs(use_graphs=False)
    got = _run(sd15_models, runner, frames, **settings)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-5
    assert len(runner._steps) == 1  # one batch shape -> one graph, whatever the runtime parameters


def test_static_step_takes_raw_frames_and_converts_them_inside(sd15_models):
    """Raw uint8 frames get their own static buffer and graph; the step converts them as the host
    would have (the same frames out)."""
    from scope_streamdiffusion.engine.frames import to_unit

    raw = [(f.permute(0, 2, 3, 1) * 255).round().to(torch.uint8) for f in make_frames(4, size=96)]
    raw = [r[:, :, 8:88] for r in raw]  # 96x80, not contiguous: cropped to square and downscaled in the step
    expected = _run(sd15_models, None, [to_unit(r, 64, 64) for r in raw], num_inference_steps=2, guidance_scale=1.2,
                    cfg_type=CfgType.SELF)
    runner = acc.StepGraphs(use_graphs=False)
    got = _run(sd15_models, runner, raw, num_inference_steps=2, guidance_scale=1.2, cfg_type=CfgType.SELF)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-5
    assert [key[0] for key in runner._steps] == [((1, 96, 80, 3), torch.uint8)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fused_attention_projections_compute_the_same_frames(tmp_path, family, request):
    """Graph modes fuse each attention's q/k/v projections into one GEMM: the same function."""
    folder = request.getfixturevalue(f"tiny_{family}")
    models = load_models(str(folder), device=CPU, dtype=torch.float32, use_tiny_vae=False)
    frames = make_frames(3)

    def stream():
        engine = StreamDiffusion(models, width=64, height=64, settings=StreamSettings(
            num_inference_steps=2, cfg_type=CfgType.FULL, guidance_scale=1.5, prompts=(("a red fox", 1.0),)))
        return [engine(f) for f in frames]

    def storage_bytes():
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in models.unet.parameters()}.values())

    attn = next(m for m in models.unet.modules() if hasattr(m, "to_q") and not m.is_cross_attention)
    x = torch.randn(2, 5, attn.to_q.in_features)
    q, v = attn.to_q(x), attn.to_v(x)
    before, memory = stream(), storage_bytes()
    assert acc.fuse_projections(models.unet)
    assert {type(p).__name__ for p in models.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    after = stream()
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) <= 1e-5
    # The separate projections became views of the fused weights: no second copy, same values.
    assert storage_bytes() == memory
    assert torch.equal(attn.to_q(x), q) and torch.equal(attn.to_v(x), v)


def test_graph_modes_fuse_projections_unless_runtime_loras_or_turned_off(tiny_sd15, tiny_lcm_lora, monkeypatch):
    """Runtime LoRA adapters sit on the separate q/k/v (and time-embedding) layers: fusing or
    sharing would silently drop them."""
    from scope_streamdiffusion.engine.projections import SharedInputMember
    from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME

    monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: "cudagraph")  # a graph mode on CPU

    def fused(**kw):
        models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False,
                             acceleration="cudagraph", **kw)
        names = {type(p).__name__ for p in models.unet.attn_processors.values()}
        assert bool(models.extras.get("fused_projections")) == (names == {"FusedAttnProcessor2_0"})
        shared = models.extras.get("shared_projections") or {}
        members = sum(isinstance(m, SharedInputMember) for m in models.unet.modules())
        assert members == sum(shared.values())
        return bool(models.extras.get("fused_projections")), sorted(shared)

    lora = [{"path": str(tiny_lcm_lora / LORA_WEIGHT_NAME), "scale": 1.0}]
    assert fused() == (True, ["prompt", "time"])
    assert fused(loras=lora, lora_merge_mode="permanent_merge") == (True, ["prompt", "time"])  # merged first
    assert fused(loras=lora, lora_merge_mode="runtime_peft") == (False, [])
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS", "0")
    assert fused() == (True, [])
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_FUSE_QKV", "0")
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS")
    assert fused() == (False, ["time"])  # the prompt's key/value sharing builds on the fused layers


def test_compiled_modes_run_small_convolutions_as_gemms_unless_runtime_loras_or_turned_off(tiny_sd15, tiny_lcm_lora,
                                                                                           monkeypatch, caplog):
    """Only where the UNet is compiled (eager and cudagraph runs would gather patches in separate
    kernels), not on layers runtime LoRA adapters sit on, and off with its switch."""
    from scope_streamdiffusion.engine.small_convs import SmallPixelsConv2d
    from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME

    def count(mode, **kw):
        monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: mode)  # any mode on CPU
        models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False,
                             acceleration=mode, **kw)
        rewritten = sum(type(m) is SmallPixelsConv2d for m in models.unet.modules())
        assert rewritten == models.extras.get("gemm_small_convs", 0)
        return rewritten

    lora = [{"path": str(tiny_lcm_lora / LORA_WEIGHT_NAME), "scale": 1.0}]
    assert count("compile") == count("background-compile") > 0
    assert count("cudagraph") == 0
    assert count("compile", loras=lora, lora_merge_mode="runtime_peft") == 0
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS", "256")  # another limit
    models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration="compile")
    assert {m.max_pixels for m in models.unet.modules() if type(m) is SmallPixelsConv2d} == {256}
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS", "lots")  # not a number: the default, one warning
    with caplog.at_level(logging.WARNING, logger=acc.__name__):
        models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration="compile")
    assert {m.max_pixels for m in models.unet.modules() if type(m) is SmallPixelsConv2d} == {64}
    assert sum("GEMM_SMALL_CONVS" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS", "0")
    assert count("compile") == 0


def test_compiled_modes_split_attentions_where_the_gpu_allows_unless_turned_off(tiny_sd15, monkeypatch):
    """The attention pass is given to both compiled modes where its options say the device allows it
    (a Hopper GPU; here stood in for on the CPU), with its counts in the extras; not to ``cudagraph``
    or with its switch off."""
    from scope_streamdiffusion.engine import attention_split

    def load(mode):
        monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: mode)  # any mode on CPU
        models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration=mode)
        runner = models.extras["step_runner"]
        options = runner.compiler.options if runner.compiler is not None else runner.compile_options
        return models, (options or {}).get("post_grad_custom_pre_pass")

    assert attention_split.attention_split_options(CPU) == {}  # not on a CPU by itself
    models, split = load("compile")
    assert split is None and "split_attentions" not in models.extras
    monkeypatch.setattr(attention_split, "attention_split_options",
                        lambda device, counts: {"post_grad_custom_pre_pass": attention_split.AttentionKeysSplit(132, counts)})
    for mode in ("compile", "background-compile"):
        models, split = load(mode)
        assert type(split) is attention_split.AttentionKeysSplit and split.counts is models.extras["split_attentions"]
    models, split = load("cudagraph")
    assert split is None and "split_attentions" not in models.extras
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION", "0")
    models, split = load("compile")
    assert split is None and "split_attentions" not in models.extras


def test_compiled_modes_run_group_norms_as_the_triton_op_unless_runtime_loras_or_turned_off(tiny_sd15, tiny_lcm_lora,
                                                                                            monkeypatch, caplog):
    """As the small convolutions: only where the UNet is compiled, not with runtime LoRA adapters
    (their scales change after compilation), off with its switch, its size from its number."""
    from scope_streamdiffusion.engine.group_norm import ResidualAddsIntoGroupNorms, TritonGroupNorm, TritonResnetBlock2D
    from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME

    def load(mode, **kw):
        monkeypatch.setattr(acc, "resolve_acceleration", lambda requested, device: mode)  # any mode on CPU
        models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False,
                             acceleration=mode, **kw)
        norms = [m for m in models.unet.modules() if type(m) is TritonGroupNorm]
        assert len(norms) == models.extras.get("triton_group_norms", 0)
        return models, norms

    def residual_pass(models):
        runner = models.extras["step_runner"]
        options = runner.compiler.options if runner.compiler is not None else runner.compile_options
        return options.get("post_grad_custom_post_pass")

    models, norms = load("compile")
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in models.unet.modules()) > 0
    resnets = [m for m in models.unet.modules() if type(m) is TritonResnetBlock2D]
    assert resnets and all(m.bias_in_norm for m in resnets)  # after the shared projections
    assert {m.elements for m in norms} == {2048} and {m.one_program for m in norms} == {5120}
    # The residual sums move into the norms through inductor's post-grad pass, given to both compiled modes.
    assert type(residual_pass(models)) is ResidualAddsIntoGroupNorms
    assert residual_pass(models).counts is models.extras["fused_residual_adds"]
    models, background_norms = load("background-compile")
    assert len(background_norms) == len(norms) and type(residual_pass(models)) is ResidualAddsIntoGroupNorms
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS", "0")
    models, norms_without_sums = load("compile")
    assert len(norms_without_sums) == len(norms) and residual_pass(models) is None
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS")
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_BIAS_IN_NORM", "0")  # conv1's bias added to the time embedding apart
    resnets = [m for m in load("compile")[0].unet.modules() if type(m) is TritonResnetBlock2D]
    assert resnets and not any(m.bias_in_norm for m in resnets)
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_BIAS_IN_NORM")
    assert load("cudagraph")[1] == []
    lora = [{"path": str(tiny_lcm_lora / LORA_WEIGHT_NAME), "scale": 1.0}]
    assert load("compile", loras=lora, lora_merge_mode="runtime_peft")[1] == []
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM", "0")  # small groups in two kernels too
    assert {(m.elements, m.one_program) for m in load("compile")[1]} == {(2048, 0)}
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM", "20480")
    assert {m.one_program for m in load("compile")[1]} == {20480}
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM")
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM", "4096")
    assert {m.elements for m in load("compile")[1]} == {4096}
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM", "many")  # not a number: the default, one warning
    with caplog.at_level(logging.WARNING, logger=acc.__name__):
        assert {m.elements for m in load("compile")[1]} == {2048}
    assert sum("TRITON_GROUP_NORM" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM", "0")
    models, norms = load("compile")
    assert norms == [] and residual_pass(models) is None


class _CountingBackend:
    """A torch.compile backend (inductor by default), counting the graphs it compiles and the calls
    of what it compiled."""

    def __init__(self, inner: str = "inductor"):
        self.inner = inner
        self.compiled = self.runs = 0

    def __call__(self, gm, inputs):
        from torch._dynamo import lookup_backend

        self.compiled += 1
        fn = lookup_backend(self.inner)(gm, inputs)

        def run(*args):
            self.runs += 1
            return fn(*args)

        return run


class _Block(torch.nn.Module):  # defined here: dynamo compiles its forward (torch.nn's own it leaves to eager)
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x).relu() * 2


@pytest.mark.parametrize("projections", ["separate", "fused and shared"])
def test_background_compile_each_shape_eager_at_once_then_compiled(tiny_sd15, sd15_models, projections):
    """background-compile: each new batch shape runs at once with the eager modules (here without
    graphs, on the CPU) while a thread compiles them for it; the next step of that shape runs the
    compiled code, which the frame thread never compiles itself; same frames as eager throughout,
    also with the graph modes' projection rewrites (whose shared results live on the UNet)."""
    from torch._dynamo.utils import counters

    from scope_streamdiffusion.engine import load_models
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler
    from scope_streamdiffusion.engine.projections import fuse_projections, share_conditioning_projections

    settings = StreamSettings(num_inference_steps=2, cfg_type=CfgType.SELF, guidance_scale=1.2)
    frames = make_frames(9)
    reference = StreamDiffusion(sd15_models, width=64, height=64, settings=settings)
    expected = [reference(f) for f in frames[:6]]
    reference.update(num_inference_steps=1)  # a new batch shape mid-stream
    expected += [reference(f) for f in frames[6:]]

    models = load_models(str(tiny_sd15), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=False)
    if projections != "separate":
        assert fuse_projections(models.unet) and share_conditioning_projections(models.unet)
    modules = {"unet": models.unet, "vae.encoder": models.vae.encoder, "vae.decoder": models.vae.decoder}
    # dynamo's own graphs, run as traced (inductor's code generation takes minutes on 2 CPU cores here):
    # what is tested here is which code runs where; inductor itself runs in the test below and on the GPU.
    backend = _CountingBackend("eager")
    compiler = BackgroundCompiler(modules, backend=backend)
    runner = acc.StepGraphs("background-compile", use_graphs=False, compiler=compiler)
    models.extras.update(step_runner=runner, acceleration="background-compile")
    engine = StreamDiffusion(models, width=64, height=64, settings=settings)
    got = [engine(f) for f in frames[:2]]  # priming (eager), then the first stream-batch step: recorded
    assert not runner.last_compiled and compiler.thread is not None
    compiler.wait(timeout=900)
    assert len(compiler.ready) == 1 and not compiler.failed, compiler.failed
    assert set(compiler.compiled) == set(modules)
    graphs, runs = counters["stats"]["unique_graphs"], backend.runs
    got += [engine(f) for f in frames[2:6]]
    assert runner.last_compiled and counters["stats"]["unique_graphs"] == graphs  # compiled, not on this thread
    assert backend.runs >= runs + 4 * 3  # the compiled UNet, encoder and decoder ran for each frame

    engine.update(num_inference_steps=1)  # a new UNet batch: eager at once, compiled in the background
    got.append(engine(frames[6]))
    assert not runner.last_compiled
    compiler.wait(timeout=900)
    assert len(compiler.ready) == 2 and not compiler.failed, compiler.failed
    graphs = counters["stats"]["unique_graphs"]
    got += [engine(f) for f in frames[7:]]
    assert runner.last_compiled and counters["stats"]["unique_graphs"] == graphs
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-4

    runner.invalidate()  # new weights (a LoRA scale): the shapes start over, eager at once
    engine(frames[0])
    assert not runner.last_compiled
    compiler.wait(timeout=900)
    engine(frames[1])
    assert runner.last_compiled and len(compiler.ready) == 1  # the old weights' shapes were forgotten


def _background_engines(models, reference_models, runner):
    """A 1-step engine on ``models`` run by ``runner`` (background-compile), the same on the eager
    reference models, and three frames."""
    models.extras.update(step_runner=runner, acceleration="background-compile")
    settings = StreamSettings(num_inference_steps=1)
    return (StreamDiffusion(models, width=64, height=64, settings=settings),
            StreamDiffusion(reference_models, width=64, height=64, settings=settings), make_frames(3))


@pytest.mark.parametrize("error", [RuntimeError, torch.cuda.OutOfMemoryError])
def test_background_compile_a_failing_compiled_capture_keeps_the_eager_graph(tiny_sd15, sd15_models, monkeypatch,
                                                                            caplog, error):
    """When the compiled code of a shape fails to capture, or does not fit in memory beside its eager
    graph, that shape keeps its eager graph (one warning) instead of the whole stream falling to
    eager PyTorch or stopping."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    caplog.set_level(logging.WARNING)
    models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False)
    compiler = BackgroundCompiler({"unet": models.unet})
    # Compiled at once (the shapes are not compiled for real: the capture fails before any call).
    monkeypatch.setattr(compiler, "submit",
                        lambda key, specs, generation: key not in compiler.failed and not compiler.ready.add(key))
    runner = acc.StepGraphs("background-compile", compiler=compiler)

    def capture(st, *args):  # no CUDA here: the step then runs eagerly over the static buffers
        if st.compiled:
            raise error("capture failed")

    monkeypatch.setattr(runner, "_capture", capture)
    engine, reference, frames = _background_engines(models, sd15_models, runner)
    got = [engine(f) for f in frames]  # eager graph; compiled capture fails; its eager graph again
    assert not runner.last_compiled and not runner.failed
    assert list(compiler.failed.values()) == [f"{error.__name__}: capture failed"]
    assert not compiler.ready and len(runner._steps) == 1
    assert max((engine_out - reference(f)).abs().max().item() for engine_out, f in zip(got, frames)) <= 1e-5
    assert len([r for r in caplog.records if "failed to capture" in r.getMessage()]) == 1


def test_background_compile_shortens_the_gil_switch_interval_while_it_runs():
    """The frame thread's PyTorch calls release the GIL; a short interval bounds how long each waits to
    get it back from the compiler. Given back when the last compilation ends, unless changed meanwhile."""
    from scope_streamdiffusion.engine import background_compile as bg

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        bg._shorten_switch_interval()
        bg._shorten_switch_interval()  # two pipelines compiling at once
        assert sys.getswitchinterval() == pytest.approx(bg.SWITCH_INTERVAL_S)
        bg._restore_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(bg.SWITCH_INTERVAL_S)  # one still compiles
        bg._restore_switch_interval()
        assert sys.getswitchinterval() == 0.005
        bg._shorten_switch_interval()
        sys.setswitchinterval(0.02)  # the application chose its own meanwhile: kept
        bg._restore_switch_interval()
        assert sys.getswitchinterval() == 0.02
    finally:
        sys.setswitchinterval(before)


def _in_generations(*objects):
    """Whether each object is in the collector's generations (a frozen one is in none of them)."""
    ids = {id(o) for o in gc.get_objects()}
    return [id(o) in ids for o in objects]


def _wait_until_frozen(*objects, timeout_s: float = 30.0) -> None:
    """Wait (bounded) for a paced block's background thread to freeze these objects."""
    deadline = time.monotonic() + timeout_s
    while any(_in_generations(*objects)) and time.monotonic() < deadline:
        time.sleep(0.01)


class _Cycle:
    """Cyclic garbage: only the collector frees it."""

    def __init__(self):
        self.me = self


@pytest.fixture
def unfrozen():
    """Nothing frozen to start with. Some interpreters freeze a few hundred objects at start-up (375
    on the GPU machine's Python 3.12.3); the first paced compilation hands them back anyway."""
    gc.unfreeze()


def test_gc_paced_full_collections_scan_only_new_objects_and_nothing_is_kept(unfrozen):
    """A full collection holds the GIL while it scans every tracked object (a compilation makes
    millions: the stream stopped for up to 1.8 s on the GPU). While paced, the objects alive are
    frozen again and again, so a full collection scans only newer ones; two compilers at once share
    it; when the last ends, everything returns to the collector and the garbage made meanwhile is freed."""
    from scope_streamdiffusion.engine import background_compile as bg

    gc.collect()
    assert gc.get_freeze_count() == 0
    keep = [[] for _ in range(50_000)]  # long-lived objects the collector tracks, as a compiler's are
    tracked = sum(len(gc.get_objects(generation=g)) for g in range(3))
    with bg.gc_paced(every_s=0.05):
        in_sight = sum(len(gc.get_objects(generation=g)) for g in range(3))
        assert gc.get_freeze_count() >= 50_000 and in_sight < tracked // 10
        cycle = _Cycle()
        ref = weakref.ref(cycle)
        later = [[] for _ in range(20_000)]
        _wait_until_frozen(cycle, later[-1])  # frozen again, in the background
        assert _in_generations(cycle, *later) == [False] * 20_001
        with bg.gc_paced(every_s=0.05):  # a second compiler
            pass
        assert gc.get_freeze_count() > 0  # the first still compiles
        del cycle  # garbage now, but frozen while it was alive: out of the collector's sight until the end
        gc.collect()
        assert ref() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None
    with bg.gc_paced(every_s=3600):  # (no second freeze during this block)
        young = _Cycle()  # garbage made and dropped between two freezes: young collections still free it
        young_ref = weakref.ref(young)
        del young
        gc.collect(0)
        assert young_ref() is None
    del keep, later


@pytest.mark.parametrize("case", ["no thread", "no GIL"])
def test_gc_paced_runs_unpaced_without_a_thread_or_without_a_gil(monkeypatch, case, unfrozen):
    """A process at its thread limit compiles unpaced: nothing is frozen (nothing would unfreeze it).
    So does free-threaded Python, where a freeze visits the whole heap with every thread stopped."""
    from scope_streamdiffusion.engine import background_compile as bg

    def refuse(self):
        raise RuntimeError("can't start new thread")

    if case == "no thread":
        monkeypatch.setattr(bg.threading.Thread, "start", refuse)
    else:
        monkeypatch.setattr(bg.sys, "_is_gil_enabled", lambda: False, raising=False)
    seen = []
    with bg.gc_paced():
        seen.append(gc.get_freeze_count())
    assert seen == [0] and gc.get_freeze_count() == 0 and bg._gc_users == 0


def test_gc_paced_leaves_a_hosts_own_frozen_objects_frozen():
    """gc.unfreeze cannot tell whose objects it hands back: where the host froze a heap of its own
    (here the test process's whole heap, far over HOST_FROZEN_MAX), the compilation runs unpaced
    and the host's freeze stands afterwards. Checked per object (frozen objects are outside every
    generation): the freeze count alone also drops when a frozen object is freed, which other
    threads of the test process may do at any time."""
    from scope_streamdiffusion.engine import background_compile as bg

    hosts = _Cycle()
    gc.freeze()
    try:
        assert gc.get_freeze_count() > bg.HOST_FROZEN_MAX and _in_generations(hosts) == [False]
        with bg.gc_paced(every_s=0.01):
            made = [_Cycle() for _ in range(1000)]  # a paced block's next freeze would take these
            time.sleep(0.2)
            assert _in_generations(hosts, *made) == [False] + [True] * len(made)
        assert _in_generations(hosts) == [False] and gc.get_freeze_count() > 0 and bg._gc_users == 0
        del made
    finally:
        gc.unfreeze()
    assert _in_generations(hosts) == [True]


def test_gc_paced_paces_over_a_few_objects_frozen_at_start_up(monkeypatch):
    """A few objects frozen before any compilation (an interpreter's start-up froze 375 on a GPU
    machine) are not a host's heap: pacing stays on, and they return to the collector at the end
    with everything frozen meanwhile. A host's heap (over HOST_FROZEN_MAX) is the test above. (The
    test process can only freeze its whole heap: the limit is raised to that heap's size.)"""
    from scope_streamdiffusion.engine import background_compile as bg

    early = [_Cycle() for _ in range(300)]
    gc.freeze()
    try:
        assert _in_generations(*early) == [False] * 300
        monkeypatch.setattr(bg, "HOST_FROZEN_MAX", gc.get_freeze_count() + 1000)
        with bg.gc_paced(every_s=0.01):
            made = [_Cycle() for _ in range(1000)]
            _wait_until_frozen(made[0], made[-1])
            assert _in_generations(made[0], made[-1]) == [False, False]  # paced: frozen in the background
        assert _in_generations(*early, made[0], made[-1]) == [True] * 302 and bg._gc_users == 0
    finally:
        gc.unfreeze()


def test_background_compile_paces_the_collector_while_it_compiles(unfrozen):
    """The compiler's thread paces the collector while it compiles, and stops when it is done."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    inside, release, frozen = threading.Event(), threading.Event(), []

    def backend(gm, inputs):
        frozen.append(gc.get_freeze_count())
        inside.set()
        release.wait(60)
        return gm.forward

    block = _Block()
    compiler = BackgroundCompiler({"unet": block}, backend=backend)
    recording = {}
    with torch.no_grad(), compiler.running(False, recording):
        block(torch.randn(2, 4))
    assert gc.get_freeze_count() == 0
    assert compiler.submit("shape", recording)
    thread = compiler.thread
    assert inside.wait(60)
    assert gc.get_freeze_count() > 0
    release.set()
    thread.join(120)
    assert compiler.ready == {"shape"} and frozen[0] > 0 and gc.get_freeze_count() == 0


def test_background_compile_bookkeeping_partial_modules_routes_and_cancel():
    """Only the modules a step called are compiled (text-to-image never calls the encoder); a thread
    runs the compiled code only inside ``running(True)``; a dropped pipeline compiles nothing more;
    the switch interval is given back when the thread ends."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    interval = sys.getswitchinterval()
    torch.manual_seed(0)
    modules = {name: _Block() for name in ("unet", "vae.encoder", "vae.decoder")}
    backend = _CountingBackend()
    compiler = BackgroundCompiler(modules, backend=backend)
    x = torch.randn(2, 4)
    recording = {}
    with torch.no_grad(), compiler.running(False, recording):
        expected = modules["unet"](x), modules["vae.decoder"](x)  # a text-to-image step: no encoder call
    assert set(recording) == {"unet", "vae.decoder"} and len(recording["unet"]) == 1
    assert not compiler.submit("shape", {})  # nothing recorded: nothing to compile
    assert compiler.submit("shape", recording) and not compiler.submit("shape", recording)  # under way
    compiler.wait(timeout=600)
    assert compiler.is_ready("shape") and set(compiler.compiled) == {"unet", "vae.decoder"}, compiler.failed
    assert sys.getswitchinterval() == interval  # given back once the compilation ended
    assert backend.compiled == 1  # both modules: one class, one shape (dynamo's weights are inputs)
    with torch.no_grad(), compiler.running(True):
        got = modules["unet"](x), modules["vae.decoder"](x)
    assert backend.compiled == 1 and backend.runs == 4  # two example runs, then these two: compiled code
    assert all(torch.allclose(a, b) for a, b in zip(expected, got))
    with torch.no_grad(), compiler.running(True):
        other = modules["unet"](x[:1])  # a shape not compiled (e.g. a guard that fails): eager, not compiled here
    assert backend.compiled == 1 and backend.runs == 4 and torch.allclose(other, expected[0][:1])
    with torch.no_grad():
        modules["vae.encoder"](x)  # outside running(): eager, whatever other threads do
    assert "vae.encoder" not in compiler.compiled
    compiler.reject("shape", RuntimeError("capture failed"))  # this shape stays on its eager graph
    assert not compiler.is_ready("shape") and not compiler.submit("shape", recording)
    compiler._jobs.append(("queued", recording, 0, 0))  # as if queued behind a running one
    compiler._pending.add("queued")
    compiler.forget(1)  # new weights: queued compilations for the old ones go
    assert not compiler._jobs and not compiler._pending and not compiler.ready
    assert not compiler.submit("late", recording, generation=0)  # a frame that began before the change
    compiler.cancel_event.set()  # the pipeline was dropped
    assert not compiler.submit("other", recording)


def test_background_compile_a_dead_worker_fails_its_shapes_and_frees_its_models(monkeypatch, caplog):
    """A compiler thread that dies (here: the cache folder cannot be made) fails what was queued,
    once, loudly, and a later shape starts a new thread; the modules are freed by reference counting
    (no cycle through the dispatcher), as with the other modes."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    caplog.set_level(logging.WARNING)

    def unusable(mode=None):
        raise PermissionError("read-only cache folder")

    monkeypatch.setattr(inductor, "prepare_compilation", unusable)
    module = torch.nn.Linear(4, 4)
    compiler = BackgroundCompiler({"unet": module})
    recording = {}
    with torch.no_grad(), compiler.running(False, recording):
        module(torch.randn(1, 4))
    assert compiler.submit("a", recording)
    compiler.wait(timeout=60)
    assert compiler.thread is None and not compiler._pending and "PermissionError" in compiler.failed["a"]
    assert compiler.submit("b", recording)  # a new thread, which fails the same way: warned once
    compiler.wait(timeout=60)
    assert set(compiler.failed) == {"a", "b"} and len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    gc.disable()
    try:
        ref = weakref.ref(module)
        del module, compiler
        assert ref() is None
    finally:
        gc.enable()


def test_background_compile_tries_again_when_a_capture_interrupted_it():
    """The compiled code's first run (kernel benchmarks that synchronise the device) fails while the
    frame thread captures a graph: the shape is compiled again a moment later, not given up."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    runs = []

    def backend(gm, inputs):
        def run(*args):
            runs.append(len(runs))
            if len(runs) == 1:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            return gm.forward(*args)

        return run

    block = _Block()
    compiler = BackgroundCompiler({"unet": block}, backend=backend)
    recording = {}
    with torch.no_grad(), compiler.running(False, recording):
        block(torch.randn(2, 4))
    assert compiler.submit("shape", recording)
    compiler.wait(timeout=120)
    assert compiler.ready == {"shape"} and not compiler.failed and len(runs) == 2


@pytest.mark.parametrize("call", ["new prompt", "static step", "priming"])
def test_module_calls_wait_for_a_torch_fx_trace_on_another_thread(sd15_models, call):
    """torch.fx tracing (what AOTAutograd does for each module the background compiler compiles)
    patches nn.Module for the whole process: a module called on another thread meanwhile fails
    (found on the GPU: a new prompt's text encoder, a compiled capture). Once a background compiler
    exists, a trace and the engine's module calls take turns: encoding a new prompt, the step over
    the static buffers (as captures and eager steps run it), the eager priming of a stream batch."""
    from torch.fx import symbolic_trace

    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    BackgroundCompiler({"unet": torch.nn.Linear(4, 4)})  # guards every torch.fx trace from now on
    inside, release = threading.Event(), threading.Event()

    class SlowToTrace(torch.nn.Module):
        def forward(self, x):
            inside.set()  # the trace is under way: nn.Module is patched process-wide
            release.wait(60)
            return x + 1

    steps = 2 if call == "priming" else 1
    runner = None if call == "new prompt" else acc.StepGraphs("cudagraph", use_graphs=False)
    sd15_models.extras.pop("step_runner", None)
    if runner is not None:
        sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=steps))
        frame = make_frames(1)[0]
        engine(frame)
        if call == "new prompt":
            engine.update(prompts=(("a new prompt: the text encoder runs", 1.0),))
        elif call == "priming":
            engine.update(seed=5)  # a new seed restarts the stream batch: its first call primes eagerly
        tracer = threading.Thread(target=symbolic_trace, args=(SlowToTrace(),))
        tracer.start()
        outcome = {}

        def frame_call():
            try:
                outcome["out"] = engine(frame)
            except Exception as exc:  # noqa: BLE001 - what a call without the lock would do
                outcome["error"] = exc

        try:
            assert inside.wait(60)
            with pytest.raises(NameError, match="not installed as a submodule"):
                torch.nn.Linear(2, 2)(torch.zeros(1, 2))  # a module call that does not wait: the hazard
            worker = threading.Thread(target=frame_call)
            worker.start()
            worker.join(1.0)
            assert worker.is_alive() and not outcome, outcome  # waiting for the trace
            release.set()
            worker.join(60)
            assert "error" not in outcome, outcome.get("error")
            out = outcome["out"]
            assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
        finally:
            release.set()
            tracer.join(60)
    finally:
        sd15_models.extras.pop("step_runner", None)


def test_compile_mode_never_waits_for_a_trace_elsewhere(sd15_models):
    """In compile mode the frame thread compiles, and dynamo takes its compile lock before a trace
    takes FX_TRACING: were the frame thread to hold FX_TRACING first, a compilation on another thread
    (a background compiler still running after a reload, another pipeline) would deadlock with it.
    So compile mode's step does not take FX_TRACING (other modes do, see the test above)."""
    from scope_streamdiffusion.engine.background_compile import FX_TRACING

    runners = {mode: acc.StepGraphs(mode, use_graphs=False) for mode in ("compile", "cudagraph")}
    engines = {}
    for mode, runner in runners.items():
        sd15_models.extras["step_runner"] = runner
        engines[mode] = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        engines[mode](make_frames(1)[0])  # prompts encoded (that waits for a trace in every mode: no compiling there)
    held, release = threading.Event(), threading.Event()

    def trace_elsewhere():
        with FX_TRACING:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=trace_elsewhere)
    holder.start()
    finished, workers = {}, []
    try:
        assert held.wait(60)
        for mode, engine in engines.items():
            sd15_models.extras["step_runner"] = runners[mode]
            workers.append(threading.Thread(target=lambda m=mode, e=engine: finished.setdefault(m, e(make_frames(1)[0]))))
            workers[-1].start()
            workers[-1].join(20 if mode == "compile" else 1.0)
        assert "compile" in finished and "cudagraph" not in finished  # cudagraph waits for the trace
    finally:
        release.set()
        holder.join(60)
        for worker in workers:
            worker.join(60)
        sd15_models.extras.pop("step_runner", None)
    assert "cudagraph" in finished  # once the trace ended


def test_background_compile_the_process_exits_cleanly_while_it_compiles():
    """A daemon thread left inside the compiler at interpreter exit aborts the process (exit code
    134): the command line ending a short video, Scope shutting down. It is stopped first."""
    import os
    import subprocess
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(acc.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    script = Path(__file__).with_name("exit_while_compiling.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert "compiling at exit: True" in done.stdout  # else the test proves nothing
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr and "failed" not in done.stderr, done.stderr[-2000:]


def test_step_graphs_are_bounded_and_least_recently_used_go_first(sd15_models, monkeypatch):
    """Sweeping shapes for hours must not pile up graphs: at most MAX_GRAPHS stay, the ones in use."""
    monkeypatch.setattr(acc, "MAX_GRAPHS", 2)
    runner = acc.StepGraphs(use_graphs=False)
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        frame = make_frames(1)[0]

        def run(cfg_type, add_noise=True):
            engine.update(cfg_type=cfg_type, guidance_scale=1.5, do_add_noise=add_noise)
            engine(frame)
            return next(reversed(runner._steps))  # the key just used is the most recent

        first = run(CfgType.NONE)
        run(CfgType.FULL)
        assert run(CfgType.NONE) == first  # used again: now the most recent
        third = run(CfgType.NONE, add_noise=False)  # a third shape evicts the least recently used (FULL)
        assert len(runner._steps) == 2 and set(runner._steps) == {first, third}
    finally:
        sd15_models.extras.pop("step_runner", None)


def test_static_step_txt2img_and_new_shape_gets_its_own_graph(sd15_models):
    runner = acc.StepGraphs(use_graphs=False)
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        a = engine(None)
        engine.update(seed=5)
        b = engine(None)
        assert (a - b).abs().max() > 1e-3 and len(runner._steps) == 1
        engine.update(num_inference_steps=2)  # batch shape change: one more step graph, once
        engine(make_frames(1)[0])
        engine(make_frames(1)[0])
        engine(make_frames(1, seed=3)[0])
        assert len(runner._steps) == 2
    finally:
        sd15_models.extras.pop("step_runner", None)


# ----- ONNX export (the tensorrt mode's input) -----------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_onnx_export_matches_pytorch_with_dynamic_axes(tmp_path, family, request):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from diffusers import UNet2DConditionModel

    from scope_streamdiffusion.engine.tensorrt_export import UNetForExport, example_inputs, export_unet_onnx

    folder = request.getfixturevalue(f"tiny_{family}")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    path = export_unet_onnx(unet, tmp_path / "unet.onnx", height=64, width=64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    wrapper = UNetForExport(unet)
    # Other batch, resolution (non-square) and token count than the export example.
    for batch, height, width, tokens in [(3, 128, 64, 154), (1, 64, 64, 77)]:
        inputs = example_inputs(unet, batch=batch, height=height, width=width, tokens=tokens, seed=batch)
        with torch.no_grad():
            ref = wrapper(*inputs).numpy()
        out = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        assert out.shape == ref.shape
        assert abs(out - ref).max() <= 1e-4 * max(1.0, abs(ref).max())


def test_engine_cache_key_follows_weights_and_profile(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    from scope_streamdiffusion.engine.tensorrt_export import Profile, engine_path, weights_fingerprint

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    before = weights_fingerprint(unet)
    assert weights_fingerprint(unet) == before
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)  # e.g. a LoRA fused into the weights
    after = weights_fingerprint(unet)
    assert after != before
    a = engine_path(after, Profile(), "10.0", "GPU", root=tmp_path)
    assert a != engine_path(after, Profile(max_size=768), "10.0", "GPU", root=tmp_path)
    assert a != engine_path(before, Profile(), "10.0", "GPU", root=tmp_path)
    assert Profile().accepts(torch.zeros(2, 4, 64, 96), 77) and not Profile().accepts(torch.zeros(2, 4, 160, 64), 77)
    # The profile a pipeline asks for fits its stream: 1280x720 at 2 frames per call, 4 steps of full CFG.
    stream = Profile.for_stream(1280, 720, 2)
    assert stream.accepts(torch.zeros(16, 4, 90, 160), 77) and not Profile().accepts(torch.zeros(16, 4, 90, 160), 77)
    assert stream.shapes(4, 1024, False)["sample"][1] == (2, 4, 90, 160)  # optimum: its own shape
    assert Profile.for_stream(512, 512) == Profile()


# ----- the bench command ---------------------------------------------------------------------------
def test_bench_arguments_and_json_on_the_tiny_model(tiny_sd15, tiny_taesd, tmp_path):
    from scope_streamdiffusion import bench

    parser = bench.add_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--random-weights"])
    assert args.random_weights == "auto" and args.modes == bench.DEFAULT_MODES
    assert parser.parse_args(["--random-weights", "sdxl"]).random_weights == "sdxl"
    assert bench.main(["--model", str(tiny_sd15), "--modes", "bogus"]) == 2
    assert bench.main(["--model", str(tiny_sd15), "--device", "gpu7"]) == 2  # the pipeline's device check
    assert bench.main(["--model", str(tiny_sd15), "--frames", "0"]) == 2
    assert bench.main(["--model", str(tiny_sd15), "--frame-buffer-size", "0"]) == 2
    # A bench whose every row failed (a model that is not there) exits non-zero.
    assert bench.main(["--model", str(tmp_path / "missing"), "--workloads", "sd-turbo-img2img", "--modes", "none",
                       "--no-baseline", "--device", "cpu", "--frames", "1"]) == 1

    out = tmp_path / "bench.json"
    code = bench.main([
        "--model", str(tiny_sd15), "--tiny-vae-id", str(tiny_taesd), "--workloads", "sd-turbo-img2img,sd15-lcm4-self",
        "--modes", "none,cudagraph", "--frames", "2", "--warmup", "1", "--width", "64", "--height", "64",
        "--device", "cpu", "--check", "--profile", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "results", "checks", "ratios"}
    assert {"date", "versions", "hardware", "command"} <= set(report["meta"])
    rows = {(r["workload"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(w, m) for w in ("sd-turbo-img2img", "sd15-lcm4-self") for m in ("diffusers", "none", "cudagraph")}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert {"fps_p50", "fps", "p50_ms", "p99_ms", "load_s", "first_frame_s", "startup_s"} <= set(row)
        if row["mode"] != "diffusers":  # no CUDA: no kernel time nor graph replays, but the profile runs
            assert row["profile"]["calls"] == 10 and row["profile"]["graph_replay_ms_per_call"] is None
            assert row["taesd_rewrites"] == {}  # eager (the CPU's fallback) rewrites nothing
    assert rows[("sd-turbo-img2img", "cudagraph")]["acceleration"] == "none"  # CPU: fell back
    checks = {(c["workload"], c["mode"]): c for c in report["checks"]}
    lcm = checks[("sd15-lcm4-self", "none")]
    assert lcm["determinism_max_abs"] == 0.0 and lcm["batch_vs_sequential_max_abs"] <= 1e-5
    assert lcm["recaptures_on_param_change"] == 0 and lcm["seed_changes_output_max_abs"] > 1e-3
    ratios = {r["workload"]: r for r in report["ratios"]}
    assert "none/diffusers" in ratios["sd-turbo-img2img"]


def test_bench_modulate_moves_strength_on_every_call_as_scope_passes_it(tiny_sd15):
    from scope_streamdiffusion import bench
    from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), prompt="a cat", width=64, height=64, strength=0.5,
                                    use_tiny_vae=False)
    wl = bench.WORKLOADS["sd-turbo-img2img"]
    frame = bench.make_frames(1, 64, 64, torch.device("cpu"))[0]
    call, seen = bench._pipeline_call(pipe, wl, modulate=True), []
    for _ in range(12):
        assert call([frame])["video"].shape == (1, 64, 64, 3)
        seen.append(pipe.engine.settings.strength)
    assert len(set(seen)) == 12 and all(0.25 <= s <= 0.75 for s in seen)
    fixed = bench._pipeline_call(pipe, wl, modulate=False)
    fixed([frame])
    assert pipe.engine.settings.strength == seen[-1]  # without it a call sends the frames only


def test_profile_sorts_kernels_into_families():
    """--profile's per-family totals, by kernel name (the names as CUDA's profiler reports them)."""
    from types import SimpleNamespace

    from scope_streamdiffusion import bench

    def kernel(name, us, count):
        return SimpleNamespace(key=name, self_device_time_total=us, count=count)

    kinds = bench._kernel_kinds([
        kernel("triton_per_fused_native_group_norm_silu_3", 400.0, 20),
        kernel("triton_poi_fused_add_7", 100.0, 20),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 550.0, 32),
        kernel("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", 700.0, 29),
        kernel("nvjet_sm90_hsh_56x64_64x14_4x2_h_bz_bias_TNN", 150.0, 20),
        kernel("Memset (Unknown)", 70.0, 79),
        kernel("void at::native::something_else", 10.0, 2),
    ], n=10)
    assert list(kinds) == ["convolution", "attention", "triton", "gemm", "memset/copy", "other"]  # by time
    assert kinds["triton"] == {"ms_per_frame": 0.05, "calls_per_frame": 4.0}
    assert kinds["convolution"]["calls_per_frame"] == 2.9 and kinds["gemm"]["ms_per_frame"] == 0.015


def test_bench_frame_buffer_size_feeds_groups_and_counts_frames(tiny_sd15, tiny_taesd, tmp_path):
    from scope_streamdiffusion import bench

    out = tmp_path / "bench.json"
    code = bench.main([
        "--model", str(tiny_sd15), "--tiny-vae-id", str(tiny_taesd), "--workloads", "sd-turbo-img2img,sd-turbo-txt2img",
        "--modes", "none", "--frames", "3", "--warmup", "1", "--width", "64", "--height", "64",
        "--frame-buffer-size", "2", "--device", "cpu", "--check", "--profile", "--json", str(out),
        "--source-size", "80x48",  # frames as a webcam sends them: resized on the way in
    ])
    assert code == 0
    report = json.loads(out.read_text())
    for row in report["results"]:  # the diffusers baseline too: two images per call
        assert "error" not in row, row.get("error")
        assert row["frames_per_call"] == 2 and row["calls"] == 3 and row["source_size"] == "80x48"
        assert row["fps_p50"] == pytest.approx(2e3 / row["p50_ms"], rel=0.01)
    none = [r for r in report["results"] if r["mode"] == "none"]
    assert all(r["profile"]["frames_per_call"] == 2 for r in none)
    for check in report["checks"]:
        assert check["determinism_max_abs"] == 0.0 and check["seed_changes_output_max_abs"] > 1e-3


def test_inductor_options_are_opt_in_and_freezing_is_off_with_runtime_loras(monkeypatch, caplog):
    import torch._inductor.config as inductor_config

    from scope_streamdiffusion.engine.lora import LoadedLora

    fused = LoadedLora("a.safetensors", 0.8, "permanent_merge", "a")
    runtime = LoadedLora("b.safetensors", 0.5, "runtime_peft", "b", ("unet",))
    assert inductor.can_freeze(None) and inductor.can_freeze([fused]) and not inductor.can_freeze([fused, runtime])
    monkeypatch.delenv("SCOPE_STREAMDIFFUSION_INDUCTOR", raising=False)
    assert inductor.inductor_options() == {}  # the default: inductor's own
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_INDUCTOR", "freezing=1,conv_1x1_as_mm=1,coordinate_descent_tuning=0")
    assert inductor.inductor_options() == {**inductor.FROZEN_OPTIONS, "coordinate_descent_tuning": False}
    with caplog.at_level(logging.WARNING):
        assert inductor.inductor_options(allow_freezing=False)["freezing"] is False
        monkeypatch.setenv("SCOPE_STREAMDIFFUSION_INDUCTOR", "no_such_option=1")
        assert inductor.inductor_options() == {}  # ignored with a warning, never a failing compilation
        monkeypatch.setenv("SCOPE_STREAMDIFFUSION_INDUCTOR", "triton.cudagraphs=1,triton.no_such=1,max_autotune_gemm_backends=1")
        assert inductor.inductor_options() == {"triton.cudagraphs": True}  # sub-configs; booleans only
        with inductor.compiling(inductor.inductor_options()):
            assert inductor_config.triton.cudagraphs is True
        assert inductor_config.triton.cudagraphs is False
    assert any("runtime LoRA" in r.getMessage() for r in caplog.records)
    assert any("no_such_option" in r.getMessage() for r in caplog.records)
    before = inductor_config.freezing, inductor_config.conv_1x1_as_mm
    with inductor.compiling(inductor.FROZEN_OPTIONS):
        assert inductor_config.freezing is True and inductor_config.conv_1x1_as_mm is True
    assert (inductor_config.freezing, inductor_config.conv_1x1_as_mm) == before  # restored afterwards


def test_a_graph_captured_while_weights_change_is_not_kept(sd15_models):
    """weights_changed() (a runtime LoRA scale, from Scope's update thread) during a capture: that
    graph may hold the old weights, so it serves its own frame only and the next frame captures anew."""
    runner = acc.StepGraphs(use_graphs=False)
    made = []
    original = runner._buffers

    def buffers_then_weights_change(*args):
        made.append(original(*args))
        if len(made) == 1:
            runner.invalidate()
        return made[-1]

    runner._buffers = buffers_then_weights_change
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        engine(make_frames(1)[0])
        assert not runner._steps
        engine(make_frames(1)[0])
        engine(make_frames(1)[0])
        assert len(made) == 2 and len(runner._steps) == 1
    finally:
        sd15_models.extras.pop("step_runner", None)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler")
def test_frozen_weights_are_released_with_the_models():
    """With freezing, compiled code keeps the weights alive after their module is gone: the
    parameters and the generated code's frozen copies are freed when the module is collected, so
    reloading a compiled pipeline does not leak a copy of its UNet."""
    import torch._inductor.config as inductor_config

    class Net(torch.nn.Module):  # (dynamo does not trace nn.Sequential's own forward)
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.b(self.a(x).relu())

    def alive(refs):
        return [r() for r in refs if r() is not None and r().numel() > 0]

    def compiled(release: bool):
        model = Net().eval()
        model.requires_grad_(False).compile(dynamic=False)
        runner = acc.StepGraphs("compile", use_graphs=False, compile_options={"freezing": True})
        if release:  # as accelerate() does
            inductor.release_weights_with(model)
            weakref.finalize(model, inductor.release_constants, runner._generated)
        x = torch.randn(2, 32)
        with torch.no_grad(), inductor.compiling(runner.compile_options, runner._generated):
            assert inductor_config.freezing
            torch.testing.assert_close(model(x), model.forward(x))  # forward: eager (compile wraps __call__)
        assert not inductor_config.freezing and runner._generated, "freezing did not take effect"
        frozen = [weakref.ref(v) for m in runner._generated for v in vars(m).values() if isinstance(v, torch.Tensor)]
        return model, runner, [weakref.ref(p) for p in model.parameters()], frozen

    torch._dynamo.reset()
    try:
        model, runner, weights, _ = compiled(release=False)
        del model
        gc.collect()
        assert alive(weights), "the compiled code no longer holds the weights: release_weights_with is obsolete"
        model, runner, weights, frozen = compiled(release=True)
        del model
        gc.collect()
        assert not alive(weights) and not alive(frozen)
    finally:
        torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager_once_and_keeps_streaming(sd15_models, monkeypatch, caplog):
    """A compiled module that fails (e.g. a Triton error on an unusual GPU) must not fail every frame:
    the capture fails, the compiled call fails once more, then the modules run eagerly, with one warning."""
    import contextlib

    frames = make_frames(3)
    expected = _run(sd15_models, None, frames, num_inference_steps=1)
    forced = []

    @contextlib.contextmanager
    def stance():  # what torch.compiler.set_stance("force_eager") does for compiled modules
        forced.append(True)
        yield

    monkeypatch.setattr(acc, "eager_stance", stance)
    original = StreamDiffusion._denoise_eager

    def compiled_call_fails(self, *args):
        if not forced:
            raise RuntimeError("triton: no kernel image is available")
        return original(self, *args)

    monkeypatch.setattr(StreamDiffusion, "_denoise_eager", compiled_call_fails)
    runner = acc.StepGraphs("compile", use_graphs=True)  # on the CPU the capture itself fails first
    with caplog.at_level(logging.WARNING):
        got = _run(sd15_models, runner, frames, num_inference_steps=1)
    assert runner.failed and runner.force_eager
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-5
    assert sum("running them eagerly" in r.getMessage() for r in caplog.records) == 1


INTERRUPTED = ("CUDA error: operation failed due to a previous error during capture\n"
               "Search for `cudaErrorStreamCaptureInvalidated' in https://docs.nvidia.com/cuda/...")


@pytest.mark.parametrize("interruptions", [2, 99])
def test_a_capture_interrupted_by_another_thread_is_tried_again(sd15_models, monkeypatch, caplog, interruptions):
    """Another thread that synchronises the device during a capture (the background compiler
    benchmarking kernels: found on the GPU) makes CUDA fail the capture. The stream must not fall to
    eager PyTorch for good: that call runs without a graph, the capture is tried again 2, then 4...
    calls later, and only a capture that keeps failing gives up (one warning). Same frames throughout."""
    frames = make_frames(3)
    settings = StreamSettings(num_inference_steps=1)
    reference = StreamDiffusion(sd15_models, width=64, height=64, settings=settings)
    expected = [reference(frames[i % 3]) for i in range(40)]
    runner = acc.StepGraphs("cudagraph", use_graphs=True)
    attempts = []

    def capture(st, engine, *args):  # no CUDA here: a capture that works leaves no graph (eager step)
        attempts.append(runner._calls)
        if len(attempts) <= interruptions:
            raise RuntimeError(INTERRUPTED)

    monkeypatch.setattr(runner, "_capture", capture)
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=settings)
        with caplog.at_level(logging.INFO):
            got = [engine(frames[i % 3]) for i in range(40)]
    finally:
        sd15_models.extras.pop("step_runner", None)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if interruptions == 2:
        assert attempts == [1, 3, 7] and runner.failed is None and len(runner._steps) == 1
        assert not warnings and not runner._retries
    else:  # four interrupted captures are tried again; the fifth gives up, loudly, once
        assert attempts == [1, 3, 7, 15, 31] and "cudaErrorStreamCaptureInvalidated" in runner.failed
        assert len(warnings) == 1 and "running the step without graphs" in warnings[0]
    assert not acc.capture_interrupted(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert acc.capture_interrupted(RuntimeError("operation not permitted when stream is capturing"))


def test_interruptions_give_up_once_too_many_failed_graphs_are_kept(sd15_models, monkeypatch, caplog):
    """Each interrupted capture on CUDA keeps its graph object (the pinned-memory allocator still
    refers to it, and every pinned allocation consults it): past MAX_ABANDONED an interruption turns
    graphs off like any failed capture, however long a compilation keeps them coming."""
    runner = acc.StepGraphs("cudagraph", use_graphs=True)
    runner._abandoned = [object()] * acc.MAX_ABANDONED

    def capture(st, engine, *args):
        raise RuntimeError(INTERRUPTED)

    monkeypatch.setattr(runner, "_capture", capture)
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        with caplog.at_level(logging.WARNING):
            out = engine(make_frames(1)[0])
    finally:
        sd15_models.extras.pop("step_runner", None)
    assert out.shape == (1, 3, 64, 64) and runner.interrupted == 0
    assert "cudaErrorStreamCaptureInvalidated" in runner.failed
    assert sum("running the step without graphs" in r.getMessage() for r in caplog.records) == 1


def test_interrupted_captures_are_counted_per_capture_and_not_while_compiling(tiny_sd15, sd15_models, monkeypatch):
    """Tries are counted per capture (shape, weights, eager or compiled): a compiled capture given up
    after five interruptions, then new weights, must not leave a count that makes the next eager
    capture give up at its first interruption. And while a background compilation runs (a known
    interrupter for seconds) interruptions do not count towards giving up."""
    from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

    models = load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False)
    compiler = BackgroundCompiler({"unet": models.unet})
    monkeypatch.setattr(compiler, "submit",  # compiled at once (the capture stub below never runs it)
                        lambda key, specs, generation: key not in compiler.failed and not compiler.ready.add(key))
    runner = acc.StepGraphs("background-compile", compiler=compiler)
    eager_interruptions = []

    def capture(st, *args):  # CPU: a capture that works leaves no graph (the step runs eagerly)
        if st.compiled or eager_interruptions:
            if not st.compiled:
                eager_interruptions.pop()
            raise RuntimeError(INTERRUPTED)

    monkeypatch.setattr(runner, "_capture", capture)
    engine, reference, frames = _background_engines(models, sd15_models, runner)
    for i in range(40):  # the eager capture works; the compiled one is interrupted 5 times: rejected
        assert (engine(frames[i % 3]) - reference(frames[i % 3])).abs().max().item() <= 1e-5
    assert len(compiler.failed) == 1 and runner.failed is None and runner.interrupted == 4
    runner.invalidate()  # new weights (a LoRA scale): the shapes start over
    eager_interruptions.append(1)  # the new eager capture is interrupted once
    for i in range(10):  # (then captured, compiled at once, and the compiled capture interrupted again)
        engine(frames[i % 3])
    assert runner.failed is None and not eager_interruptions and runner.interrupted >= 5

    # A compilation under way: interruptions go on being retried, every 16 calls at most, however many.
    busy = threading.Event()
    compiler.thread = threading.Thread(target=busy.wait, args=(60,))
    compiler.thread.start()
    try:
        runner.invalidate()
        compiler.ready.clear()
        monkeypatch.setattr(compiler, "submit", lambda *args: False)  # stays uncompiled: eager captures
        eager_interruptions.extend([1] * 1000)
        before = runner.interrupted
        for i in range(120):
            engine(frames[i % 3])
        assert runner.failed is None and runner.interrupted - before >= 8
    finally:
        busy.set()
        compiler.thread.join(60)
    for i in range(40):  # the compilation ended: the next interruptions count, and the fifth gives up
        engine(frames[i % 3])
    assert runner.failed is not None and "cudaErrorStreamCaptureInvalidated" in runner.failed


def test_out_of_memory_during_capture_is_reported_not_turned_into_a_fallback(sd15_models, monkeypatch):
    """OOM while capturing is memory, not a graph problem: it reaches the pipeline's OOM handling and
    the graphs stay on for the next try."""
    def no_memory(device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(acc, "_capture_stream", no_memory)
    runner = acc.StepGraphs("cudagraph", use_graphs=True)
    sd15_models.extras["step_runner"] = runner
    try:
        engine = StreamDiffusion(sd15_models, width=64, height=64, settings=StreamSettings(num_inference_steps=1))
        with pytest.raises(torch.cuda.OutOfMemoryError):
            engine(make_frames(1)[0])
        assert runner.failed is None and not runner._steps
    finally:
        sd15_models.extras.pop("step_runner", None)


def test_fp8_is_refused_with_a_reason_where_it_cannot_run(monkeypatch):
    from scope_streamdiffusion.engine import quantization
    from scope_streamdiffusion.engine.lora import LoadedLora

    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_FP8", "1")
    assert quantization.fp8_requested()
    assert "CUDA" in quantization.fp8_unavailable(torch.device("cpu"))
    # Only linear layers whose sizes fp8 matrix products accept are swapped.
    ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert quantization._fp8_friendly(torch.nn.Linear(320, 1280), ff)
    assert not quantization._fp8_friendly(torch.nn.Linear(320, 1000), ff)
    assert not quantization._fp8_friendly(torch.nn.Conv2d(320, 320, 1), ff)
    assert not quantization._fp8_friendly(torch.nn.Linear(320, 1280), "time_embedding.linear_1")  # one row
    runtime = LoadedLora("b.safetensors", 0.5, "runtime_peft", "b", ("unet",))
    assert "LoRA" in quantization.fp8_unavailable(torch.device("cpu"), [runtime])


def test_fp8_asked_for_another_mode_than_compile_says_so_once(tiny_sd15, caplog, monkeypatch):
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_FP8", "1")
    caplog.set_level(logging.WARNING)
    for mode, warnings in (("auto", 1), ("none", 1), ("compile", 1)):  # compile: only its fallback's, on the CPU
        caplog.clear()
        load_models(str(tiny_sd15), device=CPU, dtype=torch.float32, use_tiny_vae=False, acceleration=mode)
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(messages) == warnings, messages
        assert ("FP8" in messages[0]) == (mode != "compile"), messages


@pytest.mark.parametrize("rewritten", [False, True])
def test_fp8_takes_the_attention_blocks_linear_layers_that_compute(rewritten):
    """fp8 swaps the layers that read a row per pixel (attention blocks), after the fused and shared
    projections: the fused q/k/v layer, not its views; no time-embedding or prompt projection."""
    from scope_streamdiffusion.engine.projections import fuse_projections, share_conditioning_projections
    from scope_streamdiffusion.engine.quantization import _fp8_friendly
    from scope_streamdiffusion.testing.tiny_models import _tiny_unet

    unet = _tiny_unet("sdxl").eval()
    if rewritten:
        assert fuse_projections(unet) and share_conditioning_projections(unet)
    taken = {name for name, module in unet.named_modules() if _fp8_friendly(module, name)}
    suffixes = {re.sub(r"^.*attentions\.\d+\.(transformer_blocks\.\d+\.)?", "", name) for name in taken}
    self_attention = ["attn1.to_qkv"] if rewritten else ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    cross_attention = ["attn2.to_q"] if rewritten else ["attn2.to_q", "attn2.to_k", "attn2.to_v"]
    assert suffixes == {*self_attention, "attn1.to_out.0", *cross_attention, "attn2.to_out.0", "ff.net.0.proj",
                        "ff.net.2", "proj_in", "proj_out"}
    blocks = sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))
    transformers = sum(1 for name, _ in unet.named_modules() if name.endswith(".proj_in"))
    assert blocks and len(taken) == blocks * (len(self_attention) + len(cross_attention) + 4) + 2 * transformers
    linear = {name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    assert any("time_embedding" in name or "add_embedding" in name for name in linear - taken)
