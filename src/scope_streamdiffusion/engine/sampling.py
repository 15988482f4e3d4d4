"""The math of one StreamDiffusion step, as small functions over an explicit :class:`StreamState`.

A frame is denoised over ``n`` steps (slots). The *sequential* loop runs the ``n`` UNet calls of a
frame one after another; the *stream batch* runs one UNet batch per call in which slot ``k`` holds
the frame that arrived ``k`` calls ago. Both use the same fixed noise per slot, so they compute the
same function per frame: the stream batch is a schedule, not a different model.

Latent rows are ordered slot-major: rows ``[k*F, (k+1)*F)`` are the ``F`` frames of slot ``k``
(``F`` = frame_buffer_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .residual_cfg import Guidance, guided_noise, unconditional_noise, virtual_residual_noise
from .schedule import Schedule, slot_rows

# predict_noise(latents, timesteps, num_negative) -> epsilon; the first num_negative rows are
# conditioned on the negative prompt, the rest on the prompt.
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class StreamState:
    """Frames in flight between calls: slots 1..n-1 of the stream batch (empty before priming)."""

    latents: torch.Tensor | None = None
    residual_noise: torch.Tensor | None = None

    @property
    def primed(self) -> bool:
        return self.latents is not None

    def holds(self, rows: int) -> bool:
        """Primed for a stream batch of ``rows`` frames in flight ((steps - 1) x frames per call)."""
        return self.latents is not None and self.latents.shape[0] == rows


def v_to_epsilon(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A v-prediction model's output as noise: eps = alpha * v + beta * x."""
    return alpha * v + beta * x


def predict_x0(x: torch.Tensor, eps: torch.Tensor, sched: Schedule) -> torch.Tensor:
    """c_out * (x - beta * eps) / alpha + c_skip * x, in four kernels instead of six (in a captured
    step each is a launch), each multiply-add rounded once."""
    return torch.addcmul(sched.c_skip * x, torch.addcmul(x, sched.beta, eps, value=-1), sched.c_out / sched.alpha)


def noise_input(z: torch.Tensor, noise: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return a * z + b * noise


def renoise(x0: torch.Tensor, noise: torch.Tensor, sched: Schedule, add_noise: bool) -> torch.Tensor:
    return sched.alpha * x0 + sched.beta * noise if add_noise else sched.alpha * x0


def denoise(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    sched: Schedule,
    guidance: Guidance,
    predict_noise: NoisePredictor,
    new_frame_rows: int,
):
    """One UNet batch over the rows of ``x`` -> ``(x0, x0 of the residual noise or None)``."""
    neg = guidance.negative_rows(x.shape[0], new_frame_rows)
    latents = torch.cat([x[:neg], x]) if neg else x
    timesteps = torch.cat([sched.timesteps[:neg], sched.timesteps]) if neg else sched.timesteps
    eps_all = predict_noise(latents, timesteps, neg)
    eps_cond = eps_all[neg:]
    eps_uncond, residual = unconditional_noise(guidance, eps_all[:neg], residual)
    eps = eps_cond if eps_uncond is None else guided_noise(eps_cond, eps_uncond, guidance.scale)
    x0 = predict_x0(x, eps, sched)
    x0_residual = None if residual is None else predict_x0(x, residual, sched)
    return x0, x0_residual


def advance(
    x0: torch.Tensor,
    x0_residual: torch.Tensor | None,
    next_sched: Schedule,
    next_noise: torch.Tensor,
    add_noise: bool,
):
    """Re-noise each x0 estimate to its next step -> ``(latents, residual noise or None)``."""
    x_next = renoise(x0, next_noise, next_sched, add_noise)
    if x0_residual is None:
        return x_next, None
    return x_next, virtual_residual_noise(x_next, x0_residual, next_sched.alpha, next_sched.beta)


def sequential(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    sched: Schedule,
    noise: torch.Tensor,
    guidance: Guidance,
    predict_noise: NoisePredictor,
    add_noise: bool,
):
    """All ``n`` steps of the new frames one after another.

    Returns ``(x0, state)`` where ``state`` holds the frames' intermediate latents at steps
    1..n-1: exactly what the stream batch needs to start without warm-up frames.
    """
    frames = x.shape[0]
    trail_x, trail_r = [], []
    for k in range(sched.num_steps):
        x0, x0_residual = denoise(x, residual, sched.rows(slice(k, k + 1), frames), guidance, predict_noise, frames if k == 0 else 0)
        if k + 1 < sched.num_steps:
            x, residual = advance(
                x0, x0_residual, sched.rows(slice(k + 1, k + 2), frames), slot_rows(noise, slice(k + 1, k + 2), frames), add_noise
            )
            trail_x.append(x)
            trail_r.append(residual)
    if not trail_x:
        return x0, StreamState(latents=x0[:0], residual_noise=None if residual is None else residual[:0])
    return x0, StreamState(
        latents=torch.cat(trail_x), residual_noise=None if trail_r[0] is None else torch.cat(trail_r)
    )


def stream_batch(
    x_new: torch.Tensor,
    residual_new: torch.Tensor | None,
    state: StreamState,
    sched: Schedule,
    noise: torch.Tensor,
    guidance: Guidance,
    predict_noise: NoisePredictor,
    add_noise: bool,
):
    """One UNet batch over all slots: the new frames enter slot 0, slot n-1 leaves as x0."""
    frames = x_new.shape[0]
    x, residual = x_new, residual_new
    if state.latents.shape[0]:  # else one step, no frame in flight: a join would be a copy of its own
        x = torch.cat([x_new, state.latents])
        residual = None if residual_new is None else torch.cat([residual_new, state.residual_noise])
    x0, x0_residual = denoise(x, residual, sched.rows(slice(None), frames), guidance, predict_noise, frames)
    x_next, r_next = advance(
        x0[:-frames],
        None if x0_residual is None else x0_residual[:-frames],
        sched.rows(slice(1, None), frames),
        slot_rows(noise, slice(1, None), frames),
        add_noise,
    )
    return x0[-frames:], StreamState(latents=x_next, residual_noise=r_next)
