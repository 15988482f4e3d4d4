"""Classifier-free guidance, including StreamDiffusion's residual CFG (R-CFG).

``eps = eps_u + g * (eps_c - eps_u)``; the cfg types differ in where ``eps_u`` comes from:

* ``none``: no guidance, one UNet row per latent.
* ``full``: a real negative-prompt UNet row for every latent (2x rows).
* ``self``: ``eps_u = delta * r`` where ``r`` is the *virtual residual noise*: the noise that turns
  the frame's current reference image (the input frame at the first step, the unguided x0 estimate
  after that) into the current latent. The input frame plays the negative prompt, at no UNet cost.
* ``initialize``: like ``self``, but the first step's ``r`` is a real negative-prompt prediction
  (one extra UNet row per new frame).

The residual noise travels with its frame from step to step, so the stream batch and the
sequential loop compute the same function per frame (the reference implementation shifts it
against the frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class CfgType(str, Enum):
    NONE = "none"
    FULL = "full"
    SELF = "self"
    INITIALIZE = "initialize"

    @property
    def uses_residual_noise(self) -> bool:
        return self in (CfgType.SELF, CfgType.INITIALIZE)


def effective_cfg_type(cfg_type: CfgType | str, guidance_scale: float) -> CfgType:
    """Guidance at scale <= 1 is a no-op or an extrapolation away from the prompt: skip its UNet rows."""
    return CfgType.NONE if guidance_scale <= 1.0 else CfgType(cfg_type)


@dataclass(frozen=True)
class Guidance:
    cfg_type: CfgType
    scale: float | torch.Tensor
    delta: float | torch.Tensor

    def negative_rows(self, num_rows: int, new_frame_rows: int) -> int:
        """How many of the leading latent rows also need a negative-prompt UNet row."""
        if self.cfg_type is CfgType.FULL:
            return num_rows
        if self.cfg_type is CfgType.INITIALIZE:
            return new_frame_rows
        return 0


def guided_noise(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def unconditional_noise(
    guidance: Guidance, eps_negative: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(eps_u, residual)`` for the rows of one UNet batch.

    ``eps_negative`` holds the negative-prompt predictions for the leading rows (possibly none).
    For ``initialize`` they replace the leading rows' residual noise.
    """
    if guidance.cfg_type is CfgType.NONE:
        return None, None
    if guidance.cfg_type is CfgType.FULL:
        return eps_negative, None
    assert residual is not None
    k = eps_negative.shape[0]
    if k:
        residual = torch.cat([eps_negative, residual[k:]])
    return guidance.delta * residual, residual


def virtual_residual_noise(
    x_next: torch.Tensor, x0_reference: torch.Tensor, alpha_next: torch.Tensor, beta_next: torch.Tensor
) -> torch.Tensor:
    """The noise r with ``x_next = alpha * x0_reference + beta * r``."""
    return (x_next - alpha_next * x0_reference) / beta_next
