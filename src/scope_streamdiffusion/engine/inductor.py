"""torch.compile for the ``"compile"`` mode: inductor's on-disk cache, inductor options (frozen
weights, opt-in), giving frozen weights back when the models go away, and compiling the modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where compiled artefacts live (``SCOPE_STREAMDIFFUSION_CACHE`` or ~/.cache/scope-streamdiffusion)."""
    return Path(os.environ.get("SCOPE_STREAMDIFFUSION_CACHE") or Path.home() / ".cache" / "scope-streamdiffusion")


def configure_inductor_cache() -> Path:
    """Point inductor's on-disk caches (FX graph, AOTAutograd, Triton kernels) at our cache dir.

    An existing ``TORCHINDUCTOR_CACHE_DIR`` is respected. Must run before the first compilation.
    """
    try:
        # Importing inductor sets TORCHINDUCTOR_CACHE_DIR to its /tmp default: treat that as unset.
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = default_cache_dir()
    except Exception:  # noqa: BLE001
        torch_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or current == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        functorch_config.enable_autograd_cache = True
    except Exception as exc:  # noqa: BLE001 - older torch: the defaults apply
        logger.debug("inductor cache configuration skipped: %s", exc)
    return path


# Frozen weights, opt-in: SCOPE_STREAMDIFFUSION_INDUCTOR="freezing=1,conv_1x1_as_mm=1". Freezing folds
# the weights into the compiled code as constants (then constant-folds and re-lays them out) and
# 1x1 convolutions become matmuls: 894 -> 820 kernels, +5-10% fps on an H200 (BENCHMARKS.md). Not the
# default: dynamo then guards on each parameter's identity, so every reload of a pipeline compiles
# again and the dead pipeline's cache entries stay until the recompile limit turns compilation off;
# and the option is a process-wide inductor setting while this pipeline compiles.
FROZEN_OPTIONS = {"freezing": True, "conv_1x1_as_mm": True}


def can_freeze(loras) -> bool:
    """No frozen weights with runtime LoRA adapters (their scales change after compilation; fused
    LoRAs are part of the weights before it)."""
    from .lora import has_runtime_adapters

    return not has_runtime_adapters(loras)


def inductor_options(allow_freezing: bool = True) -> dict:
    """Inductor options for this pipeline's compilations, from ``SCOPE_STREAMDIFFUSION_INDUCTOR``
    (``"key=1,other=0"``, booleans, dotted for sub-configs); applied as a patch around them, not left set globally."""
    options = {}
    for item in filter(None, os.environ.get("SCOPE_STREAMDIFFUSION_INDUCTOR", "").split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip().lower() in ("1", "true", "yes")
    import torch._inductor.config as inductor_config

    unknown = [key for key in options if not _has_option(inductor_config, key)]
    if unknown:  # a typo must not break every compilation (config.patch raises on unknown keys)
        logger.warning("SCOPE_STREAMDIFFUSION_INDUCTOR: ignoring unknown or non-boolean inductor option(s) %s.",
                       ", ".join(unknown))
    if options.get("freezing") and not allow_freezing:
        logger.warning("SCOPE_STREAMDIFFUSION_INDUCTOR: freezing is off while runtime LoRA adapters are loaded "
                       "(their scales would not show).")
        options["freezing"] = False
    return {key: value for key, value in options.items() if key not in unknown}


def _has_option(config, key: str) -> bool:
    """``key`` names a boolean inductor option; dotted names reach sub-configs (``triton.enable_pdl``)."""
    *parents, leaf = key.split(".")
    for part in parents:
        config = getattr(config, part, None)
    return isinstance(getattr(config, leaf, None), bool)


@contextlib.contextmanager
def compiling(options: dict, generated: list | None = None):
    """A context in which torch.compile's lazy compilations use ``options`` (nothing when empty).

    Set only while this pipeline's modules compile, never left set: other pipelines in the process
    (Scope may run several) keep inductor's defaults, unless they compile at that very moment.
    With freezing, the code inductor generates here holds the weights as module attributes for the
    rest of the process: those modules are appended to ``generated``, for :func:`release_constants`.
    """
    if not options:
        yield
        return
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    # Only frozen code holds weights; the scan is skipped otherwise (this runs per frame without graphs).
    track = generated is not None and options.get("freezing")
    known = {id(module) for module in PyCodeCache.modules} if track else set()
    try:
        with inductor_config.patch(options):
            yield
    finally:
        if track:
            generated.extend(m for m in PyCodeCache.modules if id(m) not in known and _holds_frozen(m))


def _holds_frozen(module) -> bool:
    return any(name.startswith("_frozen_param") for name in vars(module))


def release_weights_with(module: torch.nn.Module) -> None:
    """Free the storage of ``module``'s weights when the module is garbage collected.

    With freezing, dynamo's compiled code keeps the parameters themselves referenced after the
    module is gone (until ``torch._dynamo.reset()``, which would drop every other pipeline's
    compiled code too): a reloaded compiled pipeline would otherwise leak a copy of its UNet.
    """
    refs = [weakref.ref(t) for t in (*module.parameters(), *module.buffers())]
    weakref.finalize(module, _free_storage, refs)


def _free_storage(refs) -> None:
    for ref in refs:
        tensor = ref()
        if tensor is not None:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def release_constants(generated: list) -> int:
    """Drop the tensors held by generated code modules (their compiled graphs are unreachable once
    the models they were compiled for are gone). Without this every reload of a frozen pipeline
    would keep a copy of its weights on the GPU. Returns how many tensors were dropped."""
    dropped = 0
    for module in generated:
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, name, None)
                dropped += 1
    generated.clear()
    return dropped


def prepare_compilation(mode: str | None = None) -> str | None:
    """Caches and limits for this pipeline's compilations; returns torch.compile's mode
    (``SCOPE_STREAMDIFFUSION_COMPILE_MODE``, experiments; None: the default)."""
    configure_inductor_cache()
    import torch._dynamo

    # One specialisation per batch shape and resolution; keep room for many before falling back.
    torch._dynamo.config.cache_size_limit = max(int(torch._dynamo.config.cache_size_limit), 64)
    return mode or os.environ.get("SCOPE_STREAMDIFFUSION_COMPILE_MODE") or None


def compile_modules(unet: torch.nn.Module, vae: torch.nn.Module, mode: str | None = None) -> list[str]:
    """``torch.compile`` in place (``nn.Module.compile``): identity, config and weights stay shared.
    Static shapes (``dynamic=False``): one specialisation per shape. Compilation happens lazily, at
    the first call of each shape, i.e. inside :meth:`StepGraphs._capture`, which applies the
    inductor options (:func:`compiling`). Runtime LoRA scales are tensors, inputs of
    the compiled graph (:func:`.lora.hold_scales_in_tensors`): a new scale compiles nothing. ``SCOPE_STREAMDIFFUSION_COMPILE_MODE`` sets
    torch.compile's mode (experiments).
    """
    options = dict(dynamic=False, mode=prepare_compilation(mode))
    modules = compiled_modules(unet, vae)
    for module in modules.values():
        module.compile(**options)
    return list(modules)


def compiled_modules(unet: torch.nn.Module, vae: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """What the compile modes compile, by name: the UNet and the VAE's (or TAESD's) encoder and decoder."""
    modules = {"unet": unet}
    for name in ("encoder", "decoder"):
        sub = getattr(vae, name, None)
        if isinstance(sub, torch.nn.Module):
            modules[f"vae.{name}"] = sub
    return modules


def eager_stance():
    """Run compiled modules eagerly (used for the one-off priming frame, whose shapes differ)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")
