"""The StreamDiffusion engine. It never imports Scope.

Where things are: ``schedule.py`` (timesteps, strength mapping), ``sampling.py`` (the math of one
step and the stream batch), ``residual_cfg.py`` (guidance and residual CFG),
``similar_image_filter.py``, ``prompts.py`` (compel, cache, blending), ``frames.py`` (frame
conversion), ``models.py`` (loading), ``stream.py`` (the engine object).
"""

from .models import ModelLoadError, StreamModels, load_models
from .residual_cfg import CfgType
from .stream import StreamDiffusion, StreamSettings

__all__ = ["CfgType", "ModelLoadError", "StreamDiffusion", "StreamModels", "StreamSettings", "load_models"]
