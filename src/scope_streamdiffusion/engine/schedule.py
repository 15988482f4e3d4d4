"""Which timesteps a frame is denoised at, and the per-step coefficients.

Two ways to choose the timesteps:

* ``strength`` + ``num_inference_steps`` (the default). The first timestep is
  ``t0 = floor(min(strength, 1) * 999)`` and the ``n`` steps are spaced evenly below it,
  ``t_k = floor(t0 * (n - k) / n)``. ``strength = 1`` with 4 steps gives 999, 749, 499, 249 (the
  trailing schedule SDXL-Lightning and LCM are trained on); 1 step at ``strength = 0.5`` is t = 499.
  Every strength gives its own timesteps, so the slider has no dead zone. Above 1.0 the timesteps
  stay at ``strength = 1`` and the input latent is faded out of the first noised latent instead
  (see :func:`input_mix`), reaching pure noise at 1.2.
* ``t_index_list``: indices into the 50-step LCM grid ``t = 999 - 20 i`` (the reference
  StreamDiffusion's knob), e.g. ``[32, 45]`` -> 359, 99.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
LCM_GRID_STEPS = 50
MAX_STRENGTH = 1.2


def timesteps_from_strength(strength: float, num_steps: int) -> list[int]:
    t0 = math.floor(min(max(strength, 0.0), 1.0) * (NUM_TRAIN_TIMESTEPS - 1))
    return [math.floor(t0 * (num_steps - k) / num_steps) for k in range(num_steps)]


def timesteps_from_t_index_list(t_index_list: list[int]) -> list[int]:
    stride = NUM_TRAIN_TIMESTEPS // LCM_GRID_STEPS
    return [NUM_TRAIN_TIMESTEPS - 1 - stride * int(i) for i in t_index_list]


def input_mix(strength: float, alpha0: float) -> tuple[float, float]:
    """Coefficients (a, b) of the first noised latent ``a * z + b * noise``.

    Up to strength 1 this is the forward process ``(sqrt(abar), sqrt(1 - abar))``. From 1 to 1.2 the
    input's share fades linearly to zero while the noise grows to keep unit variance.
    """
    fade = min(max((strength - 1.0) / (MAX_STRENGTH - 1.0), 0.0), 1.0)
    a = alpha0 * (1.0 - fade)
    return a, math.sqrt(max(1.0 - a * a, 0.0))


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """Consistency-model boundary condition: x0 = c_skip * x + c_out * x0_hat (c_skip ~ 0 for t >~ 50)."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / torch.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients, each shaped (n, 1, 1, 1) so they broadcast over latents."""

    timesteps: torch.Tensor  # (n,) long
    alpha: torch.Tensor  # sqrt(abar_t)
    beta: torch.Tensor  # sqrt(1 - abar_t)
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def rows(self, steps: slice, rows_per_step: int) -> "Schedule":
        """The coefficients of ``steps``, each repeated for the ``rows_per_step`` frames of a slot."""

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x[steps].repeat_interleave(rows_per_step, dim=0)

        return Schedule(pick(self.timesteps), pick(self.alpha), pick(self.beta), pick(self.c_skip), pick(self.c_out))


def make_schedule(
    timesteps: list[int], alphas_cumprod: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Schedule:
    t = torch.tensor(timesteps, dtype=torch.long)
    abar = alphas_cumprod.double()[t]
    c_skip, c_out = lcm_boundary_scalings(t.double())

    def col(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 1, 1).to(device=device, dtype=dtype)

    return Schedule(
        timesteps=t.to(device),
        alpha=col(abar.sqrt()),
        beta=col((1 - abar).sqrt()),
        c_skip=col(c_skip),
        c_out=col(c_out),
    )
