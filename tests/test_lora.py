"""User LoRAs in Scope's format: load parameters, runtime scales, errors. Tiny random LoRAs, real peft."""

import gc
import logging

import pytest
import torch

from scope_streamdiffusion import StreamDiffusionPipeline
from scope_streamdiffusion.engine import ModelLoadError
from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME, build_tiny_lcm_lora

SIZE = dict(width=64, height=64, use_tiny_vae=False, prompt="a cat")
ATOL = 1e-5


def frame(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 64, 64, 3, generator=gen) * 255).to(torch.uint8)


def run(pipe, **kw):
    # init_cache: every call starts from the same stream state, so outputs compare exactly.
    return pipe(video=[frame()], init_cache=True, **kw)["video"]


@pytest.fixture(scope="module")
def lora_file(tiny_lcm_lora):
    return str(tiny_lcm_lora / LORA_WEIGHT_NAME)  # Scope sends the absolute path of a .safetensors file


@pytest.fixture(scope="module")
def base_output(tiny_sd15):
    return run(StreamDiffusionPipeline(model_id=str(tiny_sd15), **SIZE))


@pytest.fixture(scope="module")
def text_encoder_lora(tiny_sd15, tmp_path_factory):
    """A random LoRA with UNet and text-encoder parts, saved in diffusers format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    text = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    text = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), text)
    dest = tmp_path_factory.mktemp("te-lora")
    StableDiffusionPipeline.save_lora_weights(dest, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text),
                                              weight_name="style.safetensors", safe_serialization=True)
    return str(dest / "style.safetensors")


def test_runtime_peft_scale_changes_without_reload(tiny_sd15, lora_file, base_output):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 1.0,
                                                                     "merge_mode": "runtime_peft"}],
                                   lora_merge_mode="permanent_merge", **SIZE)
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 1.0}]
    unet = pipe.engine.models.unet
    full = run(pipe)
    assert (full - base_output).abs().max() > 1e-3
    off = run(pipe, lora_scales=[{"path": lora_file, "scale": 0.0}])
    assert (off - base_output).abs().max() < ATOL
    assert pipe.engine.models.unet is unet  # same model: no reload
    half = run(pipe, lora_scales=[{"path": lora_file, "scale": 0.5}])
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 0.5}]
    assert (half - full).abs().max() > 1e-4 and (half - base_output).abs().max() > 1e-4
    # A runtime scale gives exactly what loading at that scale gives.
    fresh = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 0.5}],
                                    lora_merge_mode="runtime_peft", **SIZE)
    assert (run(fresh) - half).abs().max() < ATOL
    assert (run(pipe) - half).abs().max() < ATOL  # the scale persists; lora_scales came once


def test_permanent_merge_changes_output_and_keeps_its_scale(tiny_sd15, lora_file, base_output, caplog):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 0.5}], **SIZE)
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 0.5}]
    assert not getattr(pipe.engine.models.unet, "peft_config", None)  # fused: no adapter left
    merged = run(pipe)
    assert (merged - base_output).abs().max() > 1e-4
    runtime = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 0.5}],
                                      lora_merge_strategy="runtime_peft", **SIZE)
    assert (run(runtime) - merged).abs().max() < 1e-4  # same LoRA, same scale, other mechanism
    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        for scale in (0.0, 2.0):
            again = run(pipe, lora_scales=[{"path": lora_file, "scale": scale}])
            assert (again - merged).abs().max() < ATOL
        run(pipe, lora_scales=[{"path": "/not/loaded.safetensors", "scale": 1.0}])
    assert sum("merged permanently" in r.getMessage() for r in caplog.records) == 1
    assert sum("not loaded" in r.getMessage() for r in caplog.records) == 1
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 0.5}]


def test_bad_runtime_scales_are_clamped_or_kept_with_one_warning(tiny_sd15, lora_file, caplog):
    """An out-of-range scale is clamped to Scope's [-10, 10], a non-number keeps the last scale: each
    LoRA warns once, however often the value comes."""
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 0.5}],
                                   lora_merge_mode="runtime_peft", **SIZE)
    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        for value in (1e9, float("inf"), 1e9):
            pipe.update(lora_scales=[{"path": lora_file, "scale": value}])
            assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 10.0}]
        for value in ("abc", None, float("nan")):
            pipe.update(lora_scales=[{"path": lora_file, "scale": value}])
            assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 10.0}]
        pipe.update(lora_scales=[{"path": lora_file, "scale": -3.0}])  # in range: no warning
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": -3.0}]
    assert sum("not a number in [-10.0, 10.0]" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        loaded = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 99}],
                                         lora_merge_mode="runtime_peft", **SIZE)
    assert loaded.loaded_lora_adapters == [{"path": lora_file, "scale": 10.0}]
    assert sum("scale 99 is not a number in" in r.getMessage() for r in caplog.records) == 1


def test_runtime_scales_change_a_compiled_unet_without_a_new_graph(tiny_sd15, lora_file, monkeypatch):
    """peft keeps a scale as a float, which torch.compile bakes into the graph: every value of a LoRA
    slider would compile the UNet again (after 64 values not at all) and re-capture its CUDA graphs.
    Held in a tensor on the device it is an input: one graph for every scale, each output the eager
    UNet's at that scale, and the captured graphs are kept."""
    from torch._dynamo.testing import CompileCounterWithBackend

    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 1.0}],
                                   lora_merge_mode="runtime_peft", **SIZE)
    models = pipe.engine.models
    assert models.extras["lora_scales_in_tensors"]
    unet = models.unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    counter = CompileCounterWithBackend("aot_eager")  # through AOTAutograd, as inductor gets it
    compiled = torch.compile(unet, backend=counter, dynamic=False)
    changes = []
    monkeypatch.setattr(pipe.engine, "weights_changed", lambda **kw: changes.append(kw))
    torch._dynamo.reset()
    try:
        outputs = []
        for scale in (1.0, 0.5, -2.0, 0.3, 0.0):
            pipe.update(lora_scales=[{"path": lora_file, "scale": scale}])
            with torch.no_grad():
                got = compiled(sample, 500, context).sample
                want = unet(sample, 500, context).sample
            assert (got - want).abs().max() < 1e-5
            outputs.append(got)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1  # one compiled graph for five scales
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4 and (outputs[0] - outputs[2]).abs().max() > 1e-4
    assert changes and all(kw == {"text_encoders": False, "recapture": False} for kw in changes)


def test_text_encoder_lora_reencodes_prompts_on_scale_change(tiny_sd15, text_encoder_lora):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": text_encoder_lora, "scale": 1.0}],
                                   lora_merge_mode="runtime_peft", **SIZE)
    (lora,) = pipe._lora_scales.loras
    assert lora.components == ("text_encoder", "unet")
    full = run(pipe)
    encoded = pipe.engine.prompt_encoder.encode_count
    off = run(pipe, lora_scales=[{"path": text_encoder_lora, "scale": 0.0}])
    assert pipe.engine.prompt_encoder.encode_count > encoded  # stale embeddings were dropped
    plain = run(StreamDiffusionPipeline(model_id=str(tiny_sd15), **SIZE))
    assert (off - plain).abs().max() < ATOL and (full - plain).abs().max() > 1e-4


def test_lora_that_does_not_fit_is_one_clear_error(tiny_sd15, tiny_sdxl, tmp_path):
    sdxl_lora = build_tiny_lcm_lora(tiny_sdxl, tmp_path / "xl-lora") / LORA_WEIGHT_NAME
    gc.collect()
    unets = sum(type(o).__name__ == "UNet2DConditionModel" for o in gc.get_objects())
    with pytest.raises(ModelLoadError, match=r"(?s)does not fit model.*SD1\.5.*Fix"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": str(sdxl_lora), "scale": 1.0}], **SIZE)
    gc.collect()
    assert sum(type(o).__name__ == "UNet2DConditionModel" for o in gc.get_objects()) <= unets  # nothing half-loaded
    with pytest.raises(ModelLoadError, match=r"(?s)does not exist.*Fix"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": str(tmp_path / "gone.safetensors")}],
                                **SIZE)
    with pytest.raises(ModelLoadError, match=r"(?s)has no 'path'.*Fix"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"scale": 1.0}], **SIZE)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 4)
    with pytest.raises(ModelLoadError, match="Fix"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": str(garbage)}], **SIZE)
    from safetensors.torch import save_file

    not_a_lora = tmp_path / "weights.safetensors"  # readable, but no LoRA weights in it
    save_file({"some.weight": torch.zeros(4, 4)}, str(not_a_lora))
    with pytest.raises(ModelLoadError, match="Fix: check that it is a LoRA"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": str(not_a_lora)}], **SIZE)


def test_lora_found_by_name_in_scopes_lora_folder(tiny_sd15, tiny_lcm_lora, monkeypatch, base_output):
    monkeypatch.setenv("DAYDREAM_SCOPE_LORA_DIR", str(tiny_lcm_lora))
    name = LORA_WEIGHT_NAME.removesuffix(".safetensors")
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": name, "scale": 1.0}], **SIZE)
    assert pipe.loaded_lora_adapters == [{"path": name, "scale": 1.0}]
    assert (run(pipe) - base_output).abs().max() > 1e-3


def test_tensorrt_keeps_the_load_time_scales(tiny_sd15, lora_file):
    """A TensorRT UNet has no adapters to rescale: lora_scales are ignored (warned at load) and the
    report keeps the scales the engine was built with."""
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), loras=[{"path": lora_file, "scale": 1.0}],
                                   lora_merge_mode="runtime_peft", **SIZE)
    pipe.engine.models.extras["acceleration"] = "tensorrt"  # as accelerate() records it
    before = run(pipe)
    after = run(pipe, lora_scales=[{"path": lora_file, "scale": 0.0}])
    assert (after - before).abs().max() < ATOL
    assert pipe.loaded_lora_adapters == [{"path": lora_file, "scale": 1.0}]
