"""scope-streamdiffusion: StreamDiffusion as a Daydream Scope pipeline plugin, a library and a CLI.

Scope imports this module at start-up through the ``scope`` entry point, so it stays import-light:
no torch or diffusers here; the pipeline class is imported when Scope asks for it.
"""

from __future__ import annotations

import logging

import pluggy

from ._version import __version__

hookimpl = pluggy.HookimplMarker("scope")
logger = logging.getLogger("scope_streamdiffusion")


@hookimpl
def register_pipelines(register):
    """Scope hook: register StreamDiffusionPipeline. Never raises (a raise would stop Scope's plugin loading)."""
    try:
        from .pipeline import StreamDiffusionPipeline

        register(StreamDiffusionPipeline)
    except Exception:  # noqa: BLE001
        logger.exception("scope-streamdiffusion could not register its pipeline")


def __getattr__(name):
    # Library use: `from scope_streamdiffusion import StreamDiffusionPipeline` without eager imports.
    if name == "StreamDiffusionPipeline":
        from .pipeline import StreamDiffusionPipeline

        return StreamDiffusionPipeline
    if name == "StreamDiffusionConfig":
        from .schema import StreamDiffusionConfig

        return StreamDiffusionConfig
    raise AttributeError(name)


__all__ = ["StreamDiffusionConfig", "StreamDiffusionPipeline", "__version__", "register_pipelines"]
