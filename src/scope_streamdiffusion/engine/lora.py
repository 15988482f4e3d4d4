"""User LoRAs, loaded through diffusers + peft, in the format Scope sends.

Load time: ``loras=[{"path": str, "scale": float, "merge_mode"?: str}]`` and a global
``lora_merge_mode`` ("permanent_merge", the default, or "runtime_peft"); a per-entry ``merge_mode``
wins over the global one.

* ``permanent_merge``: the LoRA is fused into the weights at ``scale`` and its adapter removed, so
  it costs nothing per frame; its scale is fixed until the model is reloaded.
* ``runtime_peft``: the peft adapter stays in the UNet (and text encoders, if the LoRA has parts for
  them); :func:`set_lora_scales` changes its weight between frames without a reload.

``path`` is kept exactly as received: Scope matches runtime ``lora_scales`` updates and its
``loaded_lora_adapters`` report by that string.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MERGE_MODES = ("permanent_merge", "runtime_peft")
DEFAULT_MERGE_MODE = "permanent_merge"
SCALE_RANGE = (-10.0, 10.0)  # Scope's LoRAConfig / LoRAScaleUpdate bounds
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
FAMILY_NAMES = {"sd15": "SD1.5", "sd21": "SD2.x", "sdxl": "SDXL"}


@dataclass
class LoraSpec:
    path: str
    scale: float
    merge_mode: str


@dataclass
class LoadedLora:
    path: str  # exactly as received
    scale: float
    merge_mode: str
    adapter_name: str
    components: tuple[str, ...] = ()  # "unet", "text_encoder", "text_encoder_2" (runtime adapters only)

    @property
    def is_runtime(self) -> bool:
        return self.merge_mode == "runtime_peft"


def has_runtime_adapters(loras) -> bool:
    """Whether any LoRA is kept as a live adapter (its scale changes after load): frozen weights,
    fp8 and fused projections can't be used with those."""
    return any(lora.is_runtime for lora in loras or [])


def clamp_scale(value, default: float = 1.0) -> tuple[float, bool]:
    """(the scale to use, whether it is ``value`` as given): not a number -> ``default``; out of range -> clamped."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        return default, False
    if math.isnan(scale):
        return default, False
    clamped = min(max(scale, SCALE_RANGE[0]), SCALE_RANGE[1])
    return clamped, clamped == scale


_SCALE_WARNING = "LoRA '%s': scale %r is not a number in [%s, %s]; using %s."


def _merge_mode(value, default: str) -> str:
    if value in MERGE_MODES:
        return value
    if value is not None:
        logger.warning("Unknown LoRA merge mode %r (expected one of %s); using %r.", value, MERGE_MODES, default)
    return default


def parse_loras(loras, lora_merge_mode: str | None = None) -> list[LoraSpec]:
    """Scope's ``loras`` load parameter -> specs; a malformed entry is a :class:`ModelLoadError`."""
    from .models import ModelLoadError

    default = _merge_mode(lora_merge_mode, DEFAULT_MERGE_MODE)
    if loras is None:
        return []
    if isinstance(loras, (str, dict)):
        loras = [loras]
    if not isinstance(loras, (list, tuple)):
        raise ModelLoadError(f"loras={loras!r} is not a list. Fix: pass loras=[{{'path': '/path/to/lora.safetensors', "
                             "'scale': 1.0}].")
    specs: list[LoraSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(loras):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
            raise ModelLoadError(f"loras[{i}]={entry!r} has no 'path'. Fix: each LoRA is {{'path': "
                                 "'/path/to/lora.safetensors', 'scale': 1.0, 'merge_mode': 'runtime_peft'}.")
        if entry["path"] in seen:
            logger.warning("LoRA '%s' is listed twice; loading it once.", entry["path"])
            continue
        seen.add(entry["path"])
        scale, as_given = clamp_scale(entry.get("scale", 1.0))
        if not as_given:
            logger.warning(_SCALE_WARNING, entry["path"], entry.get("scale"), *SCALE_RANGE, scale)
        specs.append(LoraSpec(entry["path"], scale, _merge_mode(entry.get("merge_mode"), default)))
    return specs


def _lora_dirs() -> list[Path]:
    from .models import scope_models_dir

    dirs = [Path(d).expanduser() for d in (os.environ.get("DAYDREAM_SCOPE_LORA_DIR"),
                                           os.environ.get("DAYDREAM_SCOPE_LORA_SHARED_DIR")) if d]
    return [*dirs, scope_models_dir() / "lora"]


def _weights_source(path: Path) -> tuple[str, dict]:
    """A local LoRA file or folder -> (folder, {"weight_name": file}): diffusers 0.36 offline needs the name."""
    from .models import ModelLoadError

    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise ModelLoadError(f"LoRA folder '{path}' holds no .safetensors file. Fix: point to the LoRA file "
                             "or the folder that holds it.")
    return str(path), {"weight_name": files[0].name}


def resolve_lora(path: str) -> tuple[str, dict]:
    """(source, load_lora_weights kwargs) for a LoRA file, folder, name in Scope's LoRA folder, or hub id."""
    from .models import ModelLoadError, _looks_like_path

    local = Path(path).expanduser()
    if local.exists():
        return _weights_source(local)
    if not local.is_absolute():
        for folder in _lora_dirs():
            for candidate in (folder / path, folder / f"{path}.safetensors"):
                if candidate.exists():
                    return _weights_source(candidate)
    if _looks_like_path(path) or path.endswith((".safetensors", ".bin", ".pt")):
        raise ModelLoadError(
            f"LoRA file '{path}' does not exist. Fix: check the path, or put the file in Scope's LoRA folder "
            f"({_lora_dirs()[-1]}) and pick it in the LoRA list."
        )
    return path, {}  # a Hugging Face id


def does_not_fit(exc: Exception) -> bool:
    """Whether a diffusers/peft loading error says the LoRA was made for another model."""
    text = str(exc).lower()
    return any(k in text for k in ("size mismatch", "shape", "target modules", "no lora", "unexpected key"))


def _adapters(pipe) -> dict[str, set[str]]:
    return {component: set(names) for component, names in pipe.get_list_adapters().items()}


def _components_of(pipe, adapter_name: str) -> tuple[str, ...]:
    return tuple(sorted(c for c, names in _adapters(pipe).items() if adapter_name in names))


def _load_one(pipe, spec: LoraSpec, adapter_name: str, model_id: str, family) -> tuple[str, ...]:
    from .models import ModelLoadError, _load_error

    source, kwargs = resolve_lora(spec.path)
    base = FAMILY_NAMES.get(family.base, family.base)
    fix = (f"Fix: use a LoRA trained for {base} models like '{model_id}' (SD1.5, SD2.x and SDXL LoRAs only fit "
           "their own family), or remove it from the LoRA list.")
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
        if does_not_fit(exc):
            first = str(exc).strip().splitlines()
            detail = (first[1] if len(first) > 1 else first[0]).strip().rstrip(".")[:300]
            raise ModelLoadError(f"LoRA '{spec.path}' does not fit model '{model_id}' ({base}): {detail}. {fix}") \
                from exc
        raise _load_error("LoRA", spec.path, exc) from exc
    components = _components_of(pipe, adapter_name)
    if not components:
        raise ModelLoadError(f"LoRA '{spec.path}' has no weights that match model '{model_id}' ({base}). {fix}")
    return components


def apply_loras(pipe, specs: list[LoraSpec], model_id: str, family) -> list[LoadedLora]:
    """Load ``specs`` into the diffusers ``pipe`` (before its components are taken apart)."""
    if not specs:
        return []
    loaded: list[LoadedLora] = []
    # Permanent ones first, one at a time: fuse at their own scale, then drop the adapter.
    for i, spec in enumerate(specs):
        if spec.merge_mode != "permanent_merge":
            continue
        name = f"lora_{i}"
        _load_one(pipe, spec, name, model_id, family)
        pipe.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
        pipe.unload_lora_weights()
        loaded.append(LoadedLora(spec.path, spec.scale, spec.merge_mode, name))
        logger.info("LoRA '%s' merged permanently at scale %s.", spec.path, spec.scale)
    runtime = []
    for i, spec in enumerate(specs):
        if spec.merge_mode != "runtime_peft":
            continue
        name = f"lora_{i}"
        components = _load_one(pipe, spec, name, model_id, family)
        runtime.append(LoadedLora(spec.path, spec.scale, spec.merge_mode, name, components))
        logger.info("LoRA '%s' loaded as a runtime adapter (%s) at scale %s.", spec.path, ", ".join(components),
                    spec.scale)
    if runtime:
        modules = {c: getattr(pipe, c) for c in ("unet", *TEXT_ENCODERS) if getattr(pipe, c, None) is not None}
        set_lora_scales(modules, runtime)
    by_path = {lora.path: lora for lora in (*loaded, *runtime)}
    return [by_path[spec.path] for spec in specs]


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def hold_scales_in_tensors(unet) -> bool:
    """Give the UNet's runtime adapters their scales as 0-dim tensors on its device, which
    :func:`set_lora_scales` then changes in place.

    peft keeps a scale as a Python float, which torch.compile bakes into its graph: every new value
    of a LoRA slider would compile the UNet again (and after 64 values compilation stops), and every
    captured CUDA graph would hold the old value. A tensor is an input of the compiled graph and is
    read from memory by a captured one, so a new scale needs neither. Returns False, changing
    nothing, when a layer reads its scale in its own way (a LoRA variant such as DoRA).
    """
    import torch

    layers = _lora_layers(unet)
    if not layers or any(getattr(layer, "lora_variant", None) for layer in layers):
        return False
    for layer in layers:
        device = layer.get_base_layer().weight.device
        for name, value in layer.scaling.items():
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=device)
    return True


def _set_held_scales(unet, loras: list[LoadedLora]) -> bool:
    """Write ``loras``' scales into the tensors that hold them; False when they are not held so.

    Layer by layer, not through ``set_adapters``: that also marks the adapters' weights trainable,
    which a compiled graph guards on (one more compile at the first change). peft's ``set_scale``
    formula is applied here rather than called: it would put a float in place of the tensor for a
    moment, which a capture or trace on another thread could bake in."""
    import torch

    layers = _lora_layers(unet)
    if not layers or not all(isinstance(v, torch.Tensor) for layer in layers for v in layer.scaling.values()):
        return False
    for layer in layers:
        for lora in loras:
            name = lora.adapter_name
            held = layer.scaling.get(name)
            if held is None:
                continue
            rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
            held.fill_(lora.scale * layer.lora_alpha[name] / rank)
    return True


def set_lora_scales(modules: dict, loras: list[LoadedLora]) -> set[str]:
    """Give every runtime adapter in ``loras`` its ``scale``; returns the components that changed.

    ``modules`` maps component names ("unet", "text_encoder", "text_encoder_2") to the modules.
    Scales held in tensors (:func:`hold_scales_in_tensors`) are written in place.
    """
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    touched: set[str] = set()
    for component, module in modules.items():
        active = [lora for lora in loras if lora.is_runtime and component in lora.components]
        if not active:
            continue
        names, weights = [lora.adapter_name for lora in active], [lora.scale for lora in active]
        if component != "unet":
            set_adapters_for_text_encoder(names, module, weights)
        elif not _set_held_scales(module, active):
            module.set_adapters(names, weights)
        touched.add(component)
    return touched


class RuntimeLoraScales:
    """Scope's runtime ``lora_scales=[{"path", "scale"}]`` applied to the loaded LoRAs, without a reload.

    Permanently merged LoRAs cannot change; unknown paths and malformed entries are ignored; each
    problem warns once.
    """

    def __init__(self, loras: list[LoadedLora]):
        self.loras = loras
        self._warned: set[str] = set()

    @property
    def report(self) -> list[dict]:
        """``loaded_lora_adapters`` as Scope reads it (paths exactly as received)."""
        return [{"path": lora.path, "scale": lora.scale} for lora in self.loras]

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def update(self, updates, modules: dict) -> set[str]:
        """Apply ``updates``; returns the components whose weights changed (empty: nothing to do)."""
        if isinstance(updates, dict):
            updates = [updates]
        if not isinstance(updates, (list, tuple)):
            self._warn_once("<type>", "Ignoring lora_scales=%r: expected [{'path': ..., 'scale': ...}].", updates)
            return set()
        by_path = {lora.path: lora for lora in self.loras}
        changed = False
        for item in updates:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                self._warn_once("<type>", "Ignoring lora_scales entry %r: expected {'path': ..., 'scale': ...}.", item)
                continue
            lora = by_path.get(item["path"])
            if lora is None:
                self._warn_once(item["path"], "lora_scales names '%s', which is not loaded; loaded: %s. Adding a LoRA "
                                "needs a reload.", item["path"], [x.path for x in self.loras] or "none")
                continue
            scale, as_given = clamp_scale(item.get("scale"), lora.scale)
            if not as_given:
                self._warn_once(f"{lora.path}\0scale", _SCALE_WARNING, lora.path, item.get("scale"), *SCALE_RANGE, scale)
            if scale == lora.scale:
                continue
            if not lora.is_runtime:
                self._warn_once(lora.path, "LoRA '%s' was merged permanently at scale %s; its scale cannot change "
                                "while streaming. Fix: load it with merge mode 'runtime_peft'.", lora.path, lora.scale)
                continue
            lora.scale, changed = scale, True
        return set_lora_scales(modules, self.loras) if changed else set()
