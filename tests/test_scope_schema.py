"""The config as Scope's UI sees it: the JSON of ``get_schema_with_metadata()``.

Runs with the package's fallback base classes (no Scope) and with Scope's real ones; when Scope is
importable, the two JSONs are compared field for field. Nothing here imports torch.
"""

import json
import subprocess
import sys

import pytest

from scope_streamdiffusion import _scope
from scope_streamdiffusion._scope import BasePipelineConfig
from scope_streamdiffusion.schema import SD_TURBO_FILES, TAESD_FILES, StreamDiffusionConfig

META = StreamDiffusionConfig.get_schema_with_metadata()
PROPS = META["config_schema"]["properties"]
# Scope's own base fields we neither use nor show: Scope's UI hides fields without "ui".
BASE_ONLY = set(BasePipelineConfig.model_fields) - {"height", "width", "lora_merge_strategy"}
OURS = [name for name in StreamDiffusionConfig.model_fields if name not in BASE_ONLY]

INPUT = {"negative_prompt", "strength", "guidance_scale", "delta", "num_inference_steps", "seed", "cfg_type",
         "t_index_list"}
LOAD_TIME = {"model_id", "use_lcm_lora", "lcm_lora_id", "use_tiny_vae", "tiny_vae_id", "acceleration",
             "frame_buffer_size", "dtype", "device", "height", "width", "lora_merge_strategy"}
VIDEO_ONLY = {"strength", "similar_image_filter", "similar_image_filter_threshold",
              "similar_image_filter_max_skip_frame"}
MODULATABLE = {"strength", "guidance_scale", "delta"}

TOP_KEYS = [
    "id", "name", "description", "version", "supported_modes", "default_mode", "supports_prompts",
    "default_temporal_interpolation_method", "default_temporal_interpolation_steps",
    "default_spatial_interpolation_method", "docs_url", "estimated_vram_gb", "requires_models", "supports_lora",
    "supports_vace", "supports_cache_management", "supports_kv_cache_bias", "supports_quantization",
    "min_dimension", "recommended_quantization_vram_threshold", "modified", "produces_video", "produces_audio",
    "usage", "inputs", "outputs", "config_schema", "mode_defaults",
]


def test_metadata_keys_in_scopes_order_and_json_serialisable():
    assert list(META) == TOP_KEYS
    json.dumps(META)
    assert META["id"] == "streamdiffusion" and META["name"] == "StreamDiffusion"
    from scope_streamdiffusion import __version__

    assert META["version"] == __version__
    assert META["docs_url"].startswith("https://") and META["estimated_vram_gb"] > 0
    assert META["requires_models"] is True and META["supports_lora"] is True and META["supports_prompts"] is True
    assert META["inputs"] == ["video"] and META["outputs"] == ["video"]
    schema = META["config_schema"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False


def test_every_field_of_ours_has_description_range_and_ui():
    for name in OURS:
        prop = PROPS[name]
        assert prop.get("description"), name
        ui = prop.get("ui")
        assert ui and ui.get("label") and isinstance(ui.get("order"), int), name
        assert ui["category"] == ("input" if name in INPUT else "configuration"), name
        assert ui["is_load_param"] is (name in LOAD_TIME), name
        assert ui.get("modes") == (["video"] if name in VIDEO_ONLY else None), name
        assert bool(ui.get("modulatable")) is (name in MODULATABLE), name
        if prop.get("type") in ("number", "integer"):
            assert "minimum" in prop and "maximum" in prop, name  # a slider in Scope's UI
    for name in BASE_ONLY:
        assert "ui" not in PROPS[name], name


def test_ranges_and_modulation_bounds():
    assert (PROPS["strength"]["minimum"], PROPS["strength"]["maximum"]) == (0.0, 1.2)
    assert (PROPS["similar_image_filter_threshold"]["minimum"], PROPS["similar_image_filter_threshold"]["maximum"]) \
        == (0.9, 1.0)
    for name in MODULATABLE:
        ui = PROPS[name]["ui"]
        assert PROPS[name]["minimum"] <= ui["modulatable_min"] < ui["modulatable_max"] <= PROPS[name]["maximum"]


def test_resolution_and_lora_use_scopes_complex_components():
    assert PROPS["height"]["ui"]["component"] == PROPS["width"]["ui"]["component"] == "resolution"
    assert PROPS["height"]["minimum"] == META["min_dimension"] == 64
    lora = PROPS["lora_merge_strategy"]
    assert lora["ui"]["component"] == "lora" and lora["default"] == "permanent_merge"
    assert set(lora["enum"]) == {"permanent_merge", "runtime_peft"}


def test_modes_video_default_and_text():
    assert META["supported_modes"] == ["video", "text"] and META["default_mode"] == "video"
    assert META["mode_defaults"]["video"]["input_size"] == 1
    assert META["mode_defaults"]["text"] == {"height": 512, "width": 512}
    video = StreamDiffusionConfig.get_defaults_for_mode("video")
    assert video["strength"] == 0.5 and video["height"] == 512 and video["input_size"] == 1


def test_every_field_has_a_plain_default():
    # Scope builds the pipeline from field defaults: default_factory would arrive as PydanticUndefined.
    for name, field in StreamDiffusionConfig.model_fields.items():
        assert field.default_factory is None, name
    StreamDiffusionConfig()  # and the defaults validate


def test_artifacts_list_explicit_files():
    artifacts = {a.repo_id: a.files for a in StreamDiffusionConfig.artifacts}
    assert artifacts == {"stabilityai/sd-turbo": SD_TURBO_FILES, "madebyollin/taesd": TAESD_FILES}
    assert "model_index.json" in SD_TURBO_FILES and "unet/diffusion_pytorch_model.fp16.safetensors" in SD_TURBO_FILES
    for files in artifacts.values():
        assert files and all(f and not f.endswith("/") for f in files)  # never files=[] or whole folders


def test_ui_field_config_shape():
    from scope_streamdiffusion._scope import ui_field_config

    assert ui_field_config() == {"ui": {"category": "configuration", "is_load_param": False}}
    assert ui_field_config(order=2, modes=["video"], modulatable=True, modulatable_min=0.0, modulatable_max=1.0,
                           category="input", label="X", component="lora", is_load_param=True) == {"ui": {
        "category": "input", "is_load_param": True, "order": 2, "component": "lora", "modes": ["video"],
        "label": "X", "modulatable": True, "modulatable_min": 0.0, "modulatable_max": 1.0}}


def test_importing_the_package_loads_neither_torch_nor_diffusers():
    code = ("import sys, scope_streamdiffusion as m; from scope_streamdiffusion.schema import StreamDiffusionConfig; "
            "StreamDiffusionConfig.get_schema_with_metadata(); "
            "print(sorted(k for k in ('torch', 'diffusers', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


FALLBACK_DUMP = """
import json, sys
sys.modules["scope"] = None  # Scope unimportable: the package's own base classes
from scope_streamdiffusion import _scope
from scope_streamdiffusion.schema import StreamDiffusionConfig
assert not _scope.SCOPE_AVAILABLE
print(json.dumps({"meta": StreamDiffusionConfig.get_schema_with_metadata(),
                  "text": StreamDiffusionConfig.get_defaults_for_mode("text"),
                  "ui": _scope.ui_field_config(order=1, modes=["video"], label="L", modulatable=True,
                                               modulatable_max=2.0)}))
"""


@pytest.mark.scope
def test_fallback_schema_equals_scopes():
    if not _scope.SCOPE_AVAILABLE:
        pytest.skip("Scope is not installed")
    from scope.core.pipelines.base_schema import BasePipelineConfig as ScopeBase
    from scope.core.pipelines.base_schema import ui_field_config

    assert issubclass(StreamDiffusionConfig, ScopeBase)
    out = subprocess.run([sys.executable, "-c", FALLBACK_DUMP], capture_output=True, text=True, check=True)
    fallback = json.loads(out.stdout)
    real = json.loads(json.dumps(META))
    assert list(fallback["meta"]) == list(real)
    assert fallback["meta"]["config_schema"] == real["config_schema"]
    assert fallback["meta"] == real
    assert fallback["text"] == json.loads(json.dumps(StreamDiffusionConfig.get_defaults_for_mode("text")))
    assert fallback["ui"] == ui_field_config(order=1, modes=["video"], label="L", modulatable=True,
                                             modulatable_max=2.0)
