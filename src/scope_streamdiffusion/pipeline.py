"""StreamDiffusionPipeline: Scope's pipeline face over the engine (frames in, frames out).

``StreamDiffusionPipeline(**kwargs)`` loads the models once; ``pipe(**kwargs)`` takes
``video=[frames]`` (any layout/size/dtype/device; none = text-to-image) plus any parameters and
returns ``{"video": (T, H, W, 3) float32 in [0, 1]}`` on the pipeline's device. A parameter value
stays in force until a later call changes it; unknown keys are ignored.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

from ._scope import Pipeline, Requirements
from .parameters import ParameterCoercer
from .schema import DEFAULT_PROMPT, StreamDiffusionConfig

logger = logging.getLogger("scope_streamdiffusion")


def _pick_device(name: str | None):
    """The torch device for ``name`` (None: CUDA when there is one); a device that is not there is
    one clear error, raised before any model is loaded."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device '{name}'. Fix: use cuda, cuda:N, cpu or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device='{name}' was requested but CUDA is not available (torch {torch.__version__}). "
                           "Fix: install a CUDA build of torch and check the GPU driver (nvidia-smi), or use "
                           "device='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device='{name}': this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device='{name}' was requested but MPS is not available. Fix: use device='cpu'.")
    return device


def _pick_dtype(name: str | None, device):
    import torch

    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _plain_load_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Library callers' objects as the config's plain values: a torch.device or dtype as its name,
    a path object as a string. A model that is not a string is an error, not the default model."""
    import torch

    out = dict(kwargs)
    if isinstance(out.get("device"), torch.device):
        out["device"] = str(out["device"])
    if isinstance(out.get("dtype"), torch.dtype):
        out["dtype"] = str(out["dtype"]).removeprefix("torch.")
    for key in ("model_id", "tiny_vae_id", "lcm_lora_id"):
        if isinstance(out.get(key), os.PathLike):
            out[key] = os.fspath(out[key])
    if "model_id" in out and not isinstance(out["model_id"], str):
        raise ValueError(f"model_id={out['model_id']!r} is not a model. Fix: pass a Hugging Face id "
                         "(stabilityai/sd-turbo) or the path of a diffusers folder.")
    return out


class PromptTransition:
    """Blends from one weighted prompt list to another over ``num_steps`` calls."""

    # A source that is itself a blend (a transition started mid-transition) keeps its texts of at least
    # this share, at most SOURCE_TEXTS of them: a chain of such transitions would otherwise blend (and
    # encode, past the prompt cache) every text it ever named, each call.
    MIN_SHARE, SOURCE_TEXTS = 0.01, 8

    def __init__(self, source, target, num_steps: Any, method: str):
        total = sum(max(w, 0.0) for _, w in source)
        if len(source) > 1 and total > 0:
            kept = sorted((p for p in source if max(p[1], 0.0) >= self.MIN_SHARE * total), key=lambda p: -p[1])
            source = tuple(kept[: self.SOURCE_TEXTS]) or source
        self.source, self.target = source, target
        try:  # as sent: a string, NaN or a list is no transition (the target at once), never an error
            steps = float(num_steps)
        except (TypeError, ValueError):
            steps = 0.0
        self.num_steps, self.method, self.step = int(steps) if math.isfinite(steps) and steps > 0 else 0, method, 0

    def next(self):
        """(prompts, interpolation method) for the next call, and whether the transition is over."""
        self.step += 1
        if self.step >= self.num_steps:
            return self.target, True
        a = self.step / self.num_steps
        total_s = sum(w for _, w in self.source) or 1.0
        total_t = sum(w for _, w in self.target) or 1.0
        mix: dict[str, float] = {}  # a text in both lists (a transition started mid-transition) once
        for prompts, share, total in ((self.source, 1 - a, total_s), (self.target, a, total_t)):
            for text, weight in prompts:
                mix[text] = mix.get(text, 0.0) + share * weight / total
        return tuple(mix.items()), False


STEADY_CALLS = 3  # calls at a changed source size before its frames are resized inside the step graph


class StreamDiffusionPipeline(Pipeline):
    @classmethod
    def get_config_class(cls):
        return StreamDiffusionConfig

    def __init__(self, **kwargs: Any):
        from .engine import StreamDiffusion, StreamSettings, load_models
        from .engine.frames import snap_to_multiple

        kwargs = _plain_load_values(kwargs)
        self._coercer = ParameterCoercer(StreamDiffusionConfig)
        # update() may come from another thread (Scope's parameter updates) while a call applies its own.
        self._params_lock = threading.RLock()
        self.params = self._coercer.defaults()
        self.params.update(self._seed_changes(self._coercer.changes(kwargs, self.params)))
        p = self.params
        self.device = _pick_device(p["device"])
        self.dtype = _pick_dtype(p["dtype"], self.device)
        self.width, self.height = snap_to_multiple(p["width"]), snap_to_multiple(p["height"])
        self.frame_buffer_size = p["frame_buffer_size"]
        # uint8 frames go to the model step raw and are converted (and resized) inside its graph;
        # SCOPE_STREAMDIFFUSION_RAW_FRAMES=0 converts every frame on the host first, as before.
        self._raw_frames = os.environ.get("SCOPE_STREAMDIFFUSION_RAW_FRAMES", "1") != "0"
        self._source_size: tuple[int, int] | None = None
        self._source_calls = 0  # consecutive calls at that size
        self._settings_fields = set(StreamSettings.__dataclass_fields__)
        self._transition: PromptTransition | None = None
        self._interp_method = self._interpolation(kwargs, "linear")
        # The first usable one of prompts and prompt (prompts=None or [] next to a prompt is no prompt).
        usable = (self._coercer.prompts(key, kwargs[key]) for key in ("prompts", "prompt") if kwargs.get(key) is not None)
        self.prompts = next((p for p in usable if p is not None), None) or ((DEFAULT_PROMPT, 1.0),)
        self._coercer.seen("prompts", kwargs.get("prompts"))
        self._coercer.seen("prompt", kwargs.get("prompt"))
        models = load_models(
            p["model_id"], device=self.device, dtype=self.dtype, use_lcm_lora=p["use_lcm_lora"],
            lcm_lora_id=p["lcm_lora_id"], use_tiny_vae=p["use_tiny_vae"], tiny_vae_id=p["tiny_vae_id"],
            acceleration=p["acceleration"], loras=kwargs.get("loras"),
            # Scope's UI sends lora_merge_mode; the schema field is the fallback for other callers.
            lora_merge_mode=kwargs.get("lora_merge_mode") or p.get("lora_merge_strategy"),
            stream_shape=(self.width, self.height, self.frame_buffer_size),
        )
        from .engine.lora import RuntimeLoraScales, has_runtime_adapters

        self._lora_scales = RuntimeLoraScales(list(models.extras.get("loras") or []))
        # Scope's status report; its UI sends lora_scales only for these exact path strings.
        self.loaded_lora_adapters: list[dict] = self._lora_scales.report
        if has_runtime_adapters(self._lora_scales.loras) and models.extras.get("acceleration") == "tensorrt":
            logger.warning("acceleration='tensorrt' builds the UNet with the LoRA scales of load time: runtime "
                           "lora_scales changes will not show. Use acceleration='cudagraph' to change them live.")
        settings = StreamSettings(**self._settings_changes(p), prompts=self.prompts,
                                  prompt_interpolation_method=self._interp_method)
        self.engine = StreamDiffusion(models, width=self.width, height=self.height,
                                      frame_buffer_size=self.frame_buffer_size, settings=settings)

    # ----- parameters ---------------------------------------------------------------------------
    @staticmethod
    def _interpolation(kwargs, default: str) -> str:
        method = kwargs.get("prompt_interpolation_method", default)
        return method if method in ("linear", "slerp") else default

    def _settings_changes(self, values: dict[str, Any]) -> dict[str, Any]:
        from .engine import CfgType

        out = {k: v for k, v in values.items() if k in self._settings_fields}
        if "cfg_type" in out:
            out["cfg_type"] = CfgType(out["cfg_type"])
        if out.get("t_index_list") is not None:
            out["t_index_list"] = tuple(out["t_index_list"])
        return out

    def _seed_changes(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Scope's ``base_seed``, when it changes, is the seed: its beat-synced cache reset sends a new
        random one with ``init_cache`` for new noise. A ``seed`` changed in the same call wins."""
        if "base_seed" in changes and "seed" not in changes:
            # Folded into the seed's range: Scope draws base_seed from [0, 2**31) but sets no upper bound.
            seed = self._coercer.coerce("seed", changes["base_seed"] % 2**31, self.params["seed"])
            if seed != self.params["seed"]:
                changes["seed"] = seed
        return changes

    def _prompt_changes(self, kwargs: dict[str, Any], advance: bool) -> dict[str, Any]:
        """New prompts or a new transition from ``kwargs``; with ``advance`` (a call, not an update)
        a running transition also moves one step."""
        changes: dict[str, Any] = {}
        transition, target = kwargs.get("transition"), None
        if transition is None:  # Scope delivers a transition once: the same one may come again later
            self._coercer.seen("transition", None)
        if isinstance(transition, dict) and not self._coercer.seen("transition", transition):
            target = self._coercer.prompts("transition", transition.get("target_prompts"))
        for key in ("prompts", "prompt"):  # prompts wins over prompt, a new transition over both (Scope's rule)
            if key in kwargs and not self._coercer.seen(key, kwargs[key]):
                prompts = self._coercer.prompts(key, kwargs[key])
                if prompts is None or target is not None or "prompts" in changes:
                    continue
                self.prompts, self._transition = prompts, None
                changes["prompts"] = prompts
        if target is not None:
            # From what is on screen, a running transition's blend included (not its target: a jump).
            self._transition = PromptTransition(self.engine.settings.prompts, target, transition.get("num_steps", 0),
                                                transition.get("temporal_interpolation_method", "linear"))
            self.prompts = target
        if "prompt_interpolation_method" in kwargs:
            self._interp_method = self._interpolation(kwargs, self._interp_method)
        method = self._interp_method  # the user's choice; a slerp transition borrows it only while it runs
        if self._transition is not None:
            if not advance:
                return changes  # the transition's next step comes with the next call
            prompts, done = self._transition.next()
            changes["prompts"] = prompts
            if not done and self._transition.method == "slerp" and len(prompts) == 2:
                method = "slerp"
            if done:
                self._transition = None
        if method != self.engine.settings.prompt_interpolation_method:
            changes["prompt_interpolation_method"] = method
        return changes

    def update(self, **kwargs: Any) -> None:
        """Apply runtime parameters without processing a frame (a running transition does not move)."""
        self._apply(kwargs, advance=False)

    def _apply(self, kwargs: dict[str, Any], advance: bool) -> None:
        with self._params_lock:
            changes = self._seed_changes(self._coercer.changes(kwargs, self.params))
            self.params.update(changes)
            settings = {**self._settings_changes(changes), **self._prompt_changes(kwargs, advance)}
            if settings:
                self.engine.update(**settings)
            if kwargs.get("lora_scales") is not None:
                self._update_lora_scales(kwargs["lora_scales"])

    def _update_lora_scales(self, updates: Any) -> None:
        models = self.engine.models
        if models.extras.get("acceleration") == "tensorrt":
            return  # the engine holds the load-time scales (warned at load); the report stays true to it
        modules = {"unet": models.unet, **dict(zip(("text_encoder", "text_encoder_2"), models.text_encoders))}
        touched = self._lora_scales.update(updates, modules)
        if touched:
            # The UNet's scales held in tensors change in place: its graphs stay (no re-capture or re-compile).
            recapture = "unet" in touched and not models.extras.get("lora_scales_in_tensors")
            self.engine.weights_changed(text_encoders=bool(touched - {"unet"}), recapture=recapture)
            self.loaded_lora_adapters = self._lora_scales.report

    # ----- Scope's calls --------------------------------------------------------------------------
    def prepare(self, **kwargs: Any) -> Requirements | None:
        """Video mode (Scope passes ``video=True``): wait for ``frame_buffer_size`` frames; text mode: None."""
        if kwargs.get("video") or kwargs.get("input_mode") == "video":
            return Requirements(input_size=self.frame_buffer_size)
        return None

    def __call__(self, **kwargs: Any) -> dict:
        import torch

        from .engine.frames import batch_to_frames, frames_to_batch, raw_batch

        if kwargs.get("init_cache"):
            self.engine.reset()
            self._source_size = None  # a new stream: its first size goes raw at once
        self._apply(kwargs, advance=True)
        video = kwargs.get("video")
        try:
            if video is None or isinstance(video, bool):
                out = self.engine(None)
            else:
                batch = self._raw(raw_batch(video)) if self._raw_frames else None
                if batch is None:
                    batch = frames_to_batch(video, self.width, self.height, self.device, self.dtype)
                outs = [self._run_chunk(chunk) for chunk in batch.split(self.frame_buffer_size)]
                out = outs[0] if len(outs) == 1 else torch.cat(outs)  # one group: no copy
        except torch.cuda.OutOfMemoryError as exc:
            # Free what this call allocated (the half-advanced buffers too); Scope stops the stream on OOM.
            batch = out = None
            self.engine.reset()
            torch.cuda.empty_cache()
            raise torch.cuda.OutOfMemoryError(
                f"GPU out of memory running {self.engine.models.model_id} at {self.width}x{self.height}, "
                f"frame_buffer_size={self.frame_buffer_size}, {self.engine.settings.num_inference_steps} steps. "
                "Fix: lower the resolution, steps or frames per call, use the tiny VAE, or free GPU memory."
            ) from exc
        return {"video": batch_to_frames(out)}

    def _raw(self, batch):
        """The raw uint8 batch on the device, for frames at the stream's size, at the size a stream
        starts with, or from a source that changed size and is steady again (the same size for
        STEADY_CALLS calls in a row): the graph modes capture one graph per source size, so sizes that
        keep changing take the general path instead. A stream's first size goes raw at once: learning
        it over a few calls would capture a graph for the general path first and another one a few
        frames later (a second pause of seconds in compile mode, measured on an H200)."""
        if batch is None:
            return None
        size = tuple(batch.shape[1:3])
        if size == self._source_size:
            self._source_calls += 1
        else:
            self._source_calls = STEADY_CALLS if self._source_size is None else 1
        self._source_size = size
        if size != (self.height, self.width) and self._source_calls < STEADY_CALLS:
            return None
        return batch.to(self.device, non_blocking=True)

    def _run_chunk(self, chunk):
        import torch

        count = chunk.shape[0]
        if count == self.frame_buffer_size:
            return self.engine(chunk)
        # A short group is padded with its last frame. Without lag its outputs are this group's, so
        # the padding's outputs are dropped; in a multi-step stream batch the outputs belong to an
        # earlier group, so all of them are returned (none is dropped or misattributed).
        out = self.engine(torch.cat([chunk, chunk[-1:].expand(self.frame_buffer_size - count, -1, -1, -1)]))
        return out if self.engine.output_lags else out[:count]
