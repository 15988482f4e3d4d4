"""The plugin inside a real Daydream Scope: entry-point discovery, the hook, PipelineManager, PipelineProcessor.

Runs only where Scope is importable (see README, Development: "Testing against a real Scope");
skipped otherwise. Drives Scope's own code with a tiny random-weight model on the CPU.
"""

import asyncio
import logging
import os
import queue
import tempfile

import pytest

# Never touch ~/.daydream-scope: Scope reads these when it starts and whenever it resolves a path.
os.environ.setdefault("DAYDREAM_SCOPE_PLUGINS_DIR", tempfile.mkdtemp(prefix="scope-plugins-"))
os.environ.setdefault("DAYDREAM_SCOPE_MODELS_DIR", tempfile.mkdtemp(prefix="scope-models-"))

registry = pytest.importorskip("scope.core.pipelines.registry")  # built-ins + plugins, as Scope starts

import torch  # noqa: E402

from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME  # noqa: E402

pytestmark = pytest.mark.scope

PIPELINE_ID = "streamdiffusion"
PROMPT = [{"text": "a watercolor fox", "weight": 100.0}]


def source_frame(seed=0, h=48, w=80):
    """What Scope's FrameProcessor hands over: (1, H, W, 3) uint8 RGB at the source resolution."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, h, w, 3, generator=gen) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def lora_path(tiny_lcm_lora):
    return str(tiny_lcm_lora / LORA_WEIGHT_NAME)


def load(load_params, node_id=PIPELINE_ID):
    from scope.server.pipeline_manager import PipelineManager

    manager = PipelineManager()
    ok = asyncio.run(manager.load_pipelines([(node_id, PIPELINE_ID, load_params)]))
    assert ok, manager.get_status_info()
    return manager, manager.get_pipeline_by_id(node_id)


@pytest.fixture(scope="module")
def loaded(tiny_sd15, lora_path):
    load_params = {  # the shape Scope's UI sends: resolution, schema overrides, LoRA manager entries
        "height": 64, "width": 64, "model_id": str(tiny_sd15), "use_tiny_vae": False,
        "loras": [{"path": lora_path, "scale": 1.0, "merge_mode": "runtime_peft"}],
        "lora_merge_mode": "permanent_merge",
    }
    return load(load_params)


def processor(pipe, input_mode="video", **params):
    from scope.server.pipeline_processor import PipelineProcessor

    initial = {"input_mode": input_mode, "prompts": PROMPT, "prompt_interpolation_method": "linear",
               "vace_context_scale": 1.0, **params}
    proc = PipelineProcessor(pipe, PIPELINE_ID, initial_parameters=initial)
    inq, outq = queue.Queue(maxsize=30), queue.Queue(maxsize=30)  # bounded, as in Scope's graph
    proc.input_queues["video"] = inq
    proc.output_queues["video"] = [outq]
    return proc, inq, outq


def drain(q):
    packets = []
    while True:
        try:
            packets.append(q.get_nowait())
        except queue.Empty:
            return [getattr(p, "tensor", p) for p in packets]


@pytest.fixture
def no_errors(caplog):
    caplog.set_level(logging.ERROR)
    yield
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, errors  # PipelineProcessor logs pipeline exceptions instead of raising them


def test_discovered_through_entry_point_and_hook():
    from importlib.metadata import entry_points

    from scope.core.plugins import get_plugin_manager

    from scope_streamdiffusion import StreamDiffusionPipeline

    ours = [ep for ep in entry_points(group="scope") if ep.value == "scope_streamdiffusion"]
    assert len(ours) == 1
    assert registry.PipelineRegistry.get(PIPELINE_ID) is StreamDiffusionPipeline
    manager = get_plugin_manager()
    assert manager.get_plugin_for_pipeline(PIPELINE_ID) == "scope-streamdiffusion"
    assert not [f for f in manager.get_failed_plugins() if f.package_name == "scope-streamdiffusion"]


def test_definition_carries_the_full_schema():
    from scope_streamdiffusion.schema import StreamDiffusionConfig

    cls = registry.PipelineRegistry.get(PIPELINE_ID)
    definition = cls.get_definition()
    assert definition.pipeline_meta == StreamDiffusionConfig.get_schema_with_metadata()
    assert "schema_error" not in definition.pipeline_meta
    assert {p.name: p.port_type for p in definition.inputs} == {"video": "video", "prompts": "string"}
    assert [p.name for p in definition.outputs] == ["video"]


def test_artifacts_satisfy_scopes_downloaded_check(tmp_path, monkeypatch):
    from scope.server.models_config import models_are_downloaded

    from scope_streamdiffusion.schema import StreamDiffusionConfig

    monkeypatch.setenv("DAYDREAM_SCOPE_MODELS_DIR", str(tmp_path))
    assert not models_are_downloaded(PIPELINE_ID)
    for artifact in StreamDiffusionConfig.artifacts:
        for name in artifact.files:
            path = tmp_path / artifact.repo_id.split("/")[-1] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"{}")
    assert models_are_downloaded(PIPELINE_ID)
    (tmp_path / "sd-turbo" / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    assert not models_are_downloaded(PIPELINE_ID)


def test_loaded_by_scopes_pipeline_manager(loaded, lora_path):
    manager, pipe = loaded
    from scope_streamdiffusion import StreamDiffusionPipeline

    assert isinstance(pipe, StreamDiffusionPipeline) and (pipe.width, pipe.height) == (64, 64)
    status = manager.get_status_info()
    assert status["status"] == "loaded" and status["pipeline_id"] == PIPELINE_ID
    assert status["loaded_lora_adapters"] == [{"path": lora_path, "scale": 1.0}]


def test_video_mode_through_pipeline_processor(loaded, lora_path, no_errors):
    manager, pipe = loaded
    proc, inq, outq = processor(pipe)
    proc.process_chunk()  # no frame yet: prepare() asked for one, nothing runs
    assert drain(outq) == []
    inq.put(source_frame(0))
    proc.process_chunk()
    (out,) = drain(outq)
    assert out.shape == (1, 64, 64, 3) and out.dtype == torch.uint8

    # Runtime prompt update over the "data channel".
    proc.update_parameters({"prompts": [{"text": "a castle", "weight": 100}], "strength": 0.8})
    inq.put(source_frame(1))
    proc.process_chunk()
    assert len(drain(outq)) == 1
    assert pipe.engine.settings.prompts == (("a castle", 100.0),) and pipe.engine.settings.strength == 0.8

    # A transition arrives once; the pipeline blends over num_steps calls by itself.
    proc.update_parameters({"transition": {"target_prompts": [{"text": "a forest", "weight": 100.0}],
                                           "num_steps": 3, "temporal_interpolation_method": "linear"}})
    mixes = []
    for i in range(4):
        inq.put(source_frame(2 + i))
        proc.process_chunk()
        assert "transition" not in proc.parameters  # Scope dropped it after the first call
        mixes.append(dict(pipe.engine.settings.prompts))
    assert len(drain(outq)) == 4
    assert set(mixes[0]) == {"a castle", "a forest"} and mixes[0]["a forest"] == pytest.approx(1 / 3)
    assert mixes[-1] == {"a forest": 100.0}

    # LoRA scale from the LoRA manager: changes the output, no reload. reset_cache -> init_cache=True.
    def output(**update):
        proc.update_parameters({"reset_cache": True, **update})
        inq.put(source_frame(9))
        proc.process_chunk()
        (frame,) = drain(outq)
        return frame.float()

    unet = pipe.engine.models.unet
    with_lora = output()
    without = output(lora_scales=[{"path": lora_path, "scale": 0.0}])
    assert (with_lora - without).abs().max() > 0
    assert manager.get_status_info()["loaded_lora_adapters"] == [{"path": lora_path, "scale": 0.0}]
    assert pipe.engine.models.unet is unet
    assert "lora_scales" not in proc.parameters  # one-shot
    assert (output() - without).abs().max() == 0  # the scale stays


def test_text_mode_through_pipeline_processor(loaded, no_errors):
    _, pipe = loaded
    proc, inq, outq = processor(pipe, input_mode="text")
    proc.process_chunk()  # text mode: prepare() returns None, __call__ runs without frames
    proc.process_chunk()
    outs = drain(outq)
    assert len(outs) == 2 and all(o.shape == (1, 64, 64, 3) and o.dtype == torch.uint8 for o in outs)
    proc.update_parameters({"prompts": [{"text": "a lighthouse", "weight": 100.0}]})
    proc.process_chunk()
    assert len(drain(outq)) == 1 and pipe.engine.settings.prompts == (("a lighthouse", 100.0),)
    # Switching the running processor to video mode: from now on it waits for frames.
    proc.update_parameters({"input_mode": "video"})
    proc.process_chunk()
    assert drain(outq) == []
    inq.put(source_frame(3))
    proc.process_chunk()
    assert len(drain(outq)) == 1


def test_frame_buffer_size_drives_requirements(tiny_sd15, no_errors):
    _, pipe = load({"height": 64, "width": 64, "model_id": str(tiny_sd15), "use_tiny_vae": False,
                    "frame_buffer_size": 2}, node_id="sd_fbs2")
    proc, inq, outq = processor(pipe)
    inq.put(source_frame(0))
    proc.process_chunk()
    assert drain(outq) == []  # waits for 2 frames
    inq.put(source_frame(1))
    proc.process_chunk()
    outs = drain(outq)
    assert len(outs) == 2 and all(o.shape == (1, 64, 64, 3) for o in outs)
