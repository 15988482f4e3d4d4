"""Scope's plugin base classes when Scope is installed, else minimal local equivalents.

Scope is not on PyPI, so the package must work without it. The fallbacks keep the names, fields
and the JSON that Scope's ``get_schema_with_metadata()`` produces, so the same config class serves
both. Importing Scope's modules here loads neither torch nor diffusers.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

try:  # pragma: no cover - exercised by the Scope-only test module
    from scope.core.pipelines.artifacts import HuggingfaceRepoArtifact
    from scope.core.pipelines.base_schema import BasePipelineConfig, ModeDefaults, ui_field_config
    from scope.core.pipelines.interface import Pipeline, Requirements

    SCOPE_AVAILABLE = True
except ImportError:
    SCOPE_AVAILABLE = False

    class Requirements(BaseModel):
        input_size: int

    class Pipeline:
        """Scope's ``Node`` contract: ``get_config_class()``, ``prepare(**kw)``, ``__call__(**kw)``."""

        @classmethod
        def get_config_class(cls):
            return None

        def prepare(self, **kwargs) -> Requirements | None:
            return None

        def __call__(self, **kwargs) -> dict:
            raise NotImplementedError

    class HuggingfaceRepoArtifact(BaseModel):
        repo_id: str
        files: list[str]

    class ModeDefaults(BaseModel):
        model_config = ConfigDict(extra="forbid")
        default: bool = False
        height: int | None = None
        width: int | None = None
        denoising_steps: list[int] | None = None
        noise_scale: float | None = None
        noise_controller: bool | None = None
        input_size: int | None = None
        default_temporal_interpolation_steps: int | None = None

    def ui_field_config(*, order: int | None = None, component: str | None = None, modes: list[str] | None = None,
                        is_load_param: bool = False, label: str | None = None,
                        category: Literal["configuration", "input"] | None = None, modulatable: bool = False,
                        modulatable_min: float | None = None, modulatable_max: float | None = None) -> dict:
        ui: dict[str, Any] = {"category": category or "configuration", "is_load_param": is_load_param}
        for key, value in (("order", order), ("component", component), ("modes", modes), ("label", label)):
            if value is not None:
                ui[key] = value
        if modulatable:
            ui["modulatable"] = True
        if modulatable_min is not None:
            ui["modulatable_min"] = modulatable_min
        if modulatable_max is not None:
            ui["modulatable_max"] = modulatable_max
        return {"ui": ui}

    class BasePipelineConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pipeline_id: ClassVar[str] = "base"
        pipeline_name: ClassVar[str] = "Base Pipeline"
        pipeline_description: ClassVar[str] = "Base pipeline configuration"
        pipeline_version: ClassVar[str] = "1.0.0"
        docs_url: ClassVar[str | None] = None
        estimated_vram_gb: ClassVar[float | None] = None
        requires_models: ClassVar[bool] = False
        artifacts: ClassVar[list] = []
        supports_lora: ClassVar[bool] = False
        supports_vace: ClassVar[bool] = False
        produces_video: ClassVar[bool] = True
        produces_audio: ClassVar[bool] = False
        supports_cache_management: ClassVar[bool] = False
        supports_kv_cache_bias: ClassVar[bool] = False
        supports_quantization: ClassVar[bool] = False
        min_dimension: ClassVar[int] = 1
        modified: ClassVar[bool] = False
        recommended_quantization_vram_threshold: ClassVar[float | None] = None
        usage: ClassVar[list] = []
        inputs: ClassVar[list] = ["video"]
        outputs: ClassVar[list] = ["video"]
        modes: ClassVar[dict[str, ModeDefaults]] = {"text": ModeDefaults(default=True)}
        supports_prompts: ClassVar[bool] = True
        default_temporal_interpolation_method: ClassVar[Literal["linear", "slerp"] | None] = "slerp"
        default_temporal_interpolation_steps: ClassVar[int | None] = 0
        default_spatial_interpolation_method: ClassVar[Literal["linear", "slerp"] | None] = "linear"

        # Same names, types, ranges and descriptions as Scope's base fields, so the JSON schema matches.
        height: int = Field(default=512, ge=1, description="Output height in pixels")
        width: int = Field(default=512, ge=1, description="Output width in pixels")
        manage_cache: bool = Field(default=True, description="Enable automatic cache management for performance "
                                                             "optimization")
        base_seed: Annotated[int, Field(ge=0)] = Field(default=42, description="Base random seed for reproducible "
                                                                               "generation")
        denoising_steps: list[int] | None = Field(default=None, description="Denoising step schedule for "
                                                                            "progressive generation")
        lora_merge_strategy: Literal["permanent_merge", "runtime_peft"] | None = None
        noise_scale: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
            default=None, description="Amount of noise to add during video generation (video mode only)")
        noise_controller: bool | None = Field(
            default=None, description="Enable dynamic noise control during generation (video mode only)")
        input_size: int | None = Field(default=1, ge=1, description="Expected input video frame count (video mode "
                                                                     "only)")
        ref_images: list[str] | None = Field(default=None, description="List of reference image paths for VACE "
                                                                       "conditioning")
        vace_context_scale: float = Field(default=1.0, ge=0.0, le=2.0, description="Scaling factor for VACE hint "
                                                                                   "injection (0.0 to 2.0)")

        @classmethod
        def get_pipeline_metadata(cls) -> dict[str, str]:
            return {"id": cls.pipeline_id, "name": cls.pipeline_name, "description": cls.pipeline_description,
                    "version": cls.pipeline_version}

        def is_video_mode(self) -> bool:
            return self.input_size is not None

        @classmethod
        def get_supported_modes(cls) -> list[str]:
            return list(cls.modes)

        @classmethod
        def get_default_mode(cls) -> str:
            return next((name for name, m in cls.modes.items() if m.default), next(iter(cls.modes)))

        @classmethod
        def get_defaults_for_mode(cls, mode: str) -> dict:
            values = cls().model_dump()
            values.update(cls.modes[mode].model_dump(exclude={"default"}, exclude_none=True))
            return values

        @classmethod
        def get_schema_with_metadata(cls) -> dict:
            meta = {
                **cls.get_pipeline_metadata(), "supported_modes": cls.get_supported_modes(),
                "default_mode": cls.get_default_mode(), "supports_prompts": cls.supports_prompts,
                "default_temporal_interpolation_method": cls.default_temporal_interpolation_method,
                "default_temporal_interpolation_steps": cls.default_temporal_interpolation_steps,
                "default_spatial_interpolation_method": cls.default_spatial_interpolation_method,
                "docs_url": cls.docs_url, "estimated_vram_gb": cls.estimated_vram_gb,
                "requires_models": cls.requires_models or bool(cls.artifacts),
                "supports_lora": cls.supports_lora, "supports_vace": cls.supports_vace,
                "supports_cache_management": cls.supports_cache_management,
                "supports_kv_cache_bias": cls.supports_kv_cache_bias,
                "supports_quantization": cls.supports_quantization, "min_dimension": cls.min_dimension,
                "recommended_quantization_vram_threshold": cls.recommended_quantization_vram_threshold,
                "modified": cls.modified, "produces_video": cls.produces_video,
                "produces_audio": cls.produces_audio, "usage": [getattr(u, "value", u) for u in cls.usage],
                "inputs": list(cls.inputs), "outputs": list(cls.outputs),
                "config_schema": cls.model_json_schema(),
            }
            mode_defaults = {name: dump for name, m in cls.modes.items()
                             if (dump := m.model_dump(exclude={"default"}, exclude_none=True))}
            if mode_defaults:
                meta["mode_defaults"] = mode_defaults
            return meta

__all__ = [
    "SCOPE_AVAILABLE", "BasePipelineConfig", "HuggingfaceRepoArtifact", "ModeDefaults", "Pipeline", "Requirements",
    "ui_field_config",
]
