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
from dataclasses import dataclass, field

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
    # make_schedule's five tensors are views of this one byte buffer: a strength modulated on every
    # frame then costs one host-to-device copy to build a schedule and one copy to load it into the
    # static buffers of a CUDA graph, not five of each. (Never dataclasses.replace() a field of a
    # Schedule that has one: the storage would no longer hold it.)
    storage: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.timesteps, self.alpha, self.beta, self.c_skip, self.c_out

    def rows(self, steps: slice, rows_per_step: int) -> "Schedule":
        """The coefficients of ``steps``, each repeated for the ``rows_per_step`` frames of a slot
        (:func:`slot_rows`)."""
        return Schedule(*(slot_rows(x, steps, rows_per_step) for x in self.tensors()))

    def clone(self) -> "Schedule":
        """New buffers laid out as these (one storage when these have one)."""
        if self.storage is None:
            return Schedule(*(x.clone() for x in self.tensors()))
        return self._views(self.storage.clone())

    def copy_(self, other: "Schedule") -> None:
        """Copy ``other``'s values into these buffers: one copy when both share a layout (which
        the step count and the dtype decide; runs on every call while strength moves)."""
        mine, theirs = self.storage, other.storage
        if mine is not None and theirs is not None and mine.shape == theirs.shape \
                and self.timesteps.shape == other.timesteps.shape and self.alpha.dtype == other.alpha.dtype:
            mine.copy_(theirs)
        else:
            for a, b in zip(self.tensors(), other.tensors()):
                a.copy_(b)

    def _views(self, storage: torch.Tensor) -> "Schedule":
        """The same tensors as views of ``storage``, a buffer laid out as ``self.storage``."""
        base = self.storage.data_ptr()
        return Schedule(*(_view(storage, x.data_ptr() - base, x) for x in self.tensors()), storage=storage)


def slot_rows(t: torch.Tensor, steps: slice, rows_per_step: int) -> torch.Tensor:
    """Rows ``steps`` of ``t``, each repeated for the ``rows_per_step`` frames of a slot (views at one
    frame a slot: in a captured step a copy is a launch of its own)."""
    return t[steps] if rows_per_step == 1 else t[steps].repeat_interleave(rows_per_step, dim=0)


def _view(storage: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of ``storage`` from ``start`` as a tensor of ``like``'s dtype and shape."""
    return storage[start:start + like.numel() * like.element_size()].view(like.dtype).view(like.shape)


def _packed(parts: list[torch.Tensor], pin: bool) -> Schedule:
    """A CPU Schedule of ``parts`` whose tensors are views of one byte buffer (16-byte aligned)."""
    spans, size = [], 0
    for x in parts:
        spans.append(size)
        size += -(-x.numel() * x.element_size() // 16) * 16
    storage = torch.zeros(size, dtype=torch.uint8, pin_memory=pin)
    views = [_view(storage, start, x) for x, start in zip(parts, spans)]
    for view, x in zip(views, parts):
        view.copy_(x)
    return Schedule(*views, storage=storage)


def make_schedule(
    timesteps: list[int], alphas_cumprod: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Schedule:
    """``alphas_cumprod``: the scheduler's table, on the CPU (a device table would cost a device sync)."""
    t = torch.tensor(timesteps, dtype=torch.long)
    abar = alphas_cumprod.to("cpu")[t].double()  # the steps' entries only (a cache miss runs this per call)
    c_skip, c_out = lcm_boundary_scalings(t.double())

    def col(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 1, 1).to(dtype)

    # Pinned on CUDA, so the copy does not wait for the work already queued on the GPU (the pinned
    # block is not reused before the copy has run).
    cuda = torch.device(device).type == "cuda"
    host = _packed([t, col(abar.sqrt()), col((1 - abar).sqrt()), col(c_skip), col(c_out)], pin=cuda)
    return host._views(host.storage.to(device, non_blocking=cuda))  # one host-to-device copy
