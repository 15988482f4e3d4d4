"""The StreamDiffusion engine: loaded models + settings + stream state -> frames.

``StreamDiffusion(models, width=..., height=...)`` then ``engine(images)`` with ``images`` a
``(F, 3, H, W)`` batch in [0, 1] or a uint8 ``(F, h, w, 3)`` one of any size from
:func:`.frames.raw_batch` (img2img), or ``None`` (txt2img). Settings change with
``engine.update(**changes)`` from any thread: a call works on one immutable snapshot of them, so
it never sees a half-applied update. Nothing here reloads a model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import sampling
from .background_compile import FX_TRACING
from .frames import to_unit
from .models import StreamModels
from .prompts import PromptEmbeds, PromptEncoder
from .residual_cfg import CfgType, Guidance, effective_cfg_type, virtual_residual_noise
from .schedule import input_mix, make_schedule, timesteps_from_strength, timesteps_from_t_index_list
from .similar_image_filter import SimilarImageFilter


@dataclass(frozen=True)
class StreamSettings:
    """Runtime parameters of the stream (already validated)."""

    prompts: tuple[tuple[str, float], ...] = (("", 1.0),)
    prompt_interpolation_method: str = "linear"
    negative_prompt: str = ""
    seed: int = 42
    guidance_scale: float = 1.0
    num_inference_steps: int = 1
    strength: float = 0.5
    t_index_list: tuple[int, ...] | None = None
    delta: float = 1.0
    cfg_type: CfgType = CfgType.SELF
    use_denoising_batch: bool = True
    do_add_noise: bool = True
    similar_image_filter: bool = False
    similar_image_filter_threshold: float = 0.98
    similar_image_filter_max_skip_frame: int = 10

    def timesteps(self, img2img: bool) -> list[int]:
        if self.t_index_list:
            return timesteps_from_t_index_list(list(self.t_index_list))
        # Text-to-image starts from pure noise whatever the strength.
        return timesteps_from_strength(self.strength if img2img else 1.0, self.num_inference_steps)


@dataclass
class _Prepared:
    """Everything derived from one settings snapshot, rebuilt only when its inputs change."""

    settings: StreamSettings
    img2img: bool
    sched: object
    noise: torch.Tensor
    guidance: Guidance
    prompt: PromptEmbeds
    negative: PromptEmbeds
    input_a: float
    input_b: float
    # weights_changed() counts (see StreamDiffusion): a snapshot made before a change is stale.
    weights_generation: int = 0
    text_generation: int = 0

    @property
    def shape_key(self):
        s = self.settings
        return (self.sched.num_steps, self.guidance.cfg_type, s.use_denoising_batch, s.seed, self.img2img)


class StreamDiffusion:
    def __init__(self, models: StreamModels, *, width: int, height: int, frame_buffer_size: int = 1,
                 settings: StreamSettings | None = None):
        self.models = models
        self.width, self.height = width, height
        self.frame_buffer_size = frame_buffer_size
        self.device, self.dtype = models.device, models.dtype
        self.latent_shape = (models.latent_channels, height // 8, width // 8)
        self.prompt_encoder = PromptEncoder(
            models.tokenizers, models.text_encoders, is_sdxl=models.family.is_sdxl, device=self.device,
            dtype=self.dtype, force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt,
        )
        self._lock = threading.Lock()
        self._settings = settings or StreamSettings()
        self._prepared: _Prepared | None = None
        # Bumped by weights_changed() (any thread); only the frame thread acts on them.
        self._weights_generation = 0
        self._text_generation = 0
        self._encoded_generation = 0
        self.state = sampling.StreamState()
        self.filter = SimilarImageFilter(seed=self._settings.seed)
        self.last_output: torch.Tensor | None = None
        self.output_lags = False  # whether the last call's outputs belong to an earlier call's frames
        self.frames_skipped = 0
        self._alphas_cumprod = models.alphas_cumprod.to(self.device)
        self._schedules: OrderedDict = OrderedDict()
        if models.family.is_sdxl:
            # (original size, crop top-left, target size): no cropping, native size.
            self._time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)

    # ----- settings -------------------------------------------------------------------------
    @property
    def settings(self) -> StreamSettings:
        return self._settings

    def update(self, **changes) -> StreamSettings:
        """Apply validated setting changes atomically; takes effect at the next call."""
        with self._lock:
            self._settings = dataclasses.replace(self._settings, **changes)
            return self._settings

    def reset(self) -> None:
        """Forget the frames in flight and the filter history (models and settings stay)."""
        with self._lock:
            self.state = sampling.StreamState()
            self.filter.reset(self._settings.seed)
            self.last_output = None

    def weights_changed(self, text_encoders: bool = False, recapture: bool = True) -> None:
        """Model weights changed in place (a runtime LoRA scale): drop what was derived from the old ones.

        Captured CUDA graphs bake the old LoRA scales in, unless they read them from tensors
        (``recapture=False``); the last output (a similar-image skip would return it) was made with
        them; with ``text_encoders`` the prompt embeddings are stale too.
        Called from Scope's update thread while a frame may be running: this drops the captured graphs
        (their runner keeps its own generation count) and counts the change; the frame thread rebuilds
        the rest at its next call, so it never sees half-cleared caches, and a snapshot built while
        the change happened is rebuilt once more. The stream keeps running (no restart on each tick
        of a LoRA slider).
        """
        with self._lock:
            runner = self.models.extras.get("step_runner")
            if runner is not None and recapture:
                runner.invalidate()
            self._weights_generation += 1
            if text_encoders:
                self._text_generation += 1

    # ----- derived state ----------------------------------------------------------------------
    def _noise(self, seed: int, steps: int) -> torch.Tensor:
        # Drawn on the CPU so the same seed gives the same noise on every device.
        gen = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((steps, *self.latent_shape), generator=gen).to(self.device, self.dtype)

    def _schedule(self, timesteps: tuple[int, ...]):
        # Cached: a strength modulated on every frame (beat sync) visits up to 1000 timestep sets per
        # step count (one per first timestep), each a host-to-device copy and a dozen small CPU ops to
        # build; each takes 0.5-2 KiB of GPU memory. Schedules are never written to.
        sched = self._schedules.get(timesteps)
        if sched is not None:
            self._schedules.move_to_end(timesteps)
            return sched
        sched = self._schedules[timesteps] = make_schedule(list(timesteps), self.models.alphas_cumprod, self.device, self.dtype)
        while len(self._schedules) > 1024:
            self._schedules.popitem(last=False)
        return sched

    def _prepare(self, settings: StreamSettings, img2img: bool, generations: tuple[int, int]) -> _Prepared:
        """``generations``: (weights, text-encoder) counts of weights_changed(), read with ``settings``."""
        old = self._prepared
        weights_generation, text_generation = generations
        if old is not None and old.settings == settings and old.img2img == img2img \
                and old.weights_generation == weights_generation:
            return old
        if text_generation != self._encoded_generation:
            self.prompt_encoder.clear()  # embeddings made by the old text-encoder weights
            self._encoded_generation = text_generation
        # Parameters modulated every frame (Scope's beat sync) rebuild only what depends on them.
        timesteps = tuple(settings.timesteps(img2img))
        sched = self._schedule(timesteps)
        if old is not None and old.settings.seed == settings.seed and old.noise.shape[0] == len(timesteps):
            noise = old.noise
        else:
            noise = self._noise(settings.seed, len(timesteps))
        guidance = Guidance(effective_cfg_type(settings.cfg_type, settings.guidance_scale), settings.guidance_scale, settings.delta)
        prompt_key = (settings.prompts, settings.prompt_interpolation_method, settings.negative_prompt)
        if old is not None and old.text_generation == text_generation and (
                old.settings.prompts, old.settings.prompt_interpolation_method, old.settings.negative_prompt) == prompt_key:
            prompt, negative = old.prompt, old.negative
        else:
            blended = self.prompt_encoder.blend(list(settings.prompts), settings.prompt_interpolation_method)
            tokens = max(blended.embeds.shape[1], self.prompt_encoder.encode(settings.negative_prompt).embeds.shape[1])
            negative = self.prompt_encoder.negative(settings.negative_prompt, tokens)
            prompt = blended.with_tokens(tokens, self.prompt_encoder.encode(""))
        # alpha0 from the CPU table: no device sync. t_index_list overrides strength, fade included.
        alpha0 = float(self.models.alphas_cumprod[timesteps[0]].sqrt())
        a, b = input_mix(1.0 if settings.t_index_list else settings.strength, alpha0) if img2img else (0.0, 1.0)
        prepared = _Prepared(settings, img2img, sched, noise, guidance, prompt, negative, a, b,
                             weights_generation, text_generation)
        if old is None or old.shape_key != prepared.shape_key:
            self.state = sampling.StreamState()
        if old is None or old.settings.seed != settings.seed:
            self.filter.reset(settings.seed)
        else:
            # A skip must never return an output made under the old settings.
            self.filter.reset(None)
        self.last_output = None
        self.filter.threshold = settings.similar_image_filter_threshold
        self.filter.max_skip_frame = settings.similar_image_filter_max_skip_frame
        self._prepared = prepared
        return prepared

    # ----- models -----------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        # Raw uint8 frames are converted and resized here: inside the captured step in the graph modes.
        x = (to_unit(images, self.width, self.height, self.dtype) * 2 - 1).to(self.models.vae_dtype)
        if self.models.is_tiny_vae:
            z = vae.encode(x).latents
        else:
            z = vae.encode(x).latent_dist.mean
        return (z * vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        x = vae.decode((latents / vae.config.scaling_factor).to(self.models.vae_dtype)).sample
        # Extreme settings (guidance 20, delta 5, 10 steps) can overflow the latents: the frame then
        # shows black where the decoder gave NaN, never NaN (the stream heals within its steps).
        return torch.nan_to_num((x.float() + 1) / 2, nan=0.0).clamp(0, 1)

    def _noise_predictor(self, p: _Prepared):
        unet = self.models.unet
        sdxl = self.models.family.is_sdxl
        v_pred = self.models.prediction_type == "v_prediction"

        def predict(latents: torch.Tensor, timesteps: torch.Tensor, num_negative: int) -> torch.Tensor:
            rows = latents.shape[0]

            def conditioning(negative: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
                """The negative rows, then the prompt's (no join without negative rows: in a
                captured step it would be a copy of its own)."""
                positive = prompt.expand(rows - num_negative, *prompt.shape[1:])
                if not num_negative:
                    return positive
                return torch.cat([negative.expand(num_negative, *negative.shape[1:]), positive])

            ehs = conditioning(p.negative.embeds, p.prompt.embeds)
            kwargs = {}
            if sdxl:
                pooled = conditioning(p.negative.pooled, p.prompt.pooled)
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self._time_ids.expand(rows, -1)}
            out = unet(latents, timesteps, encoder_hidden_states=ehs, return_dict=False, **kwargs)[0]
            if v_pred:
                abar = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(out.dtype)
                out = sampling.v_to_epsilon(out, latents, abar.sqrt(), (1 - abar).sqrt())
            return out

        return predict

    # ----- one call -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (F, 3, H, W) in [0, 1] or raw uint8 (F, h, w, 3), or None for text-to-image
        -> (F, 3, H, W) in [0, 1]."""
        with self._lock:
            settings = self._settings
            generations = (self._weights_generation, self._text_generation)
        img2img = images is not None
        frames = images.shape[0] if img2img else self.frame_buffer_size
        if img2img and settings.strength <= 0.0 and not settings.t_index_list:
            self.state = sampling.StreamState()  # nothing stale resurfaces when strength rises again
            self.output_lags = False
            return to_unit(images, self.width, self.height).float().clamp(0, 1)
        p = self._prepare(settings, img2img, generations)
        if img2img and settings.similar_image_filter:
            # Without a usable last output (first frame, new settings) the frame is still the reference.
            can_skip = self.last_output is not None and self.last_output.shape[0] == frames
            if self.filter.should_skip(to_unit(images, self.width, self.height), can_skip=can_skip):
                self.frames_skipped += frames
                return self.last_output
        n = p.sched.num_steps
        # A primed stream batch returns the frames given n-1 calls earlier; priming returns its own.
        self.output_lags = bool(p.settings.use_denoising_batch and n > 1 and self.state.holds((n - 1) * frames))
        output = self._denoise(p, images, frames)
        self.last_output = output
        return output

    def _denoise(self, p: _Prepared, images: torch.Tensor | None, frames: int) -> torch.Tensor:
        # Graph modes (acceleration.py) replay this step as a CUDA graph over static buffers.
        runner = self.models.extras.get("step_runner")
        if runner is not None:
            return runner.denoise(self, p, images, frames)
        with FX_TRACING:  # eager modules: not beside a torch.fx trace on another thread
            return self._denoise_eager(p, images, frames)

    def _denoise_eager(self, p: _Prepared, images: torch.Tensor | None, frames: int) -> torch.Tensor:
        sched = p.sched
        noise0 = p.noise[0:1].expand(frames, -1, -1, -1)
        if images is not None:
            z = self.encode_images(images)
            x_new = sampling.noise_input(z, noise0, p.input_a, p.input_b)
        else:
            z = None  # a blank reference image, made only where residual noise needs it
            x_new = noise0.clone()
        residual = None
        if p.guidance.cfg_type.uses_residual_noise:
            # At the first step the input frame is the reference image: its residual is the added noise.
            residual = virtual_residual_noise(x_new, torch.zeros_like(x_new) if z is None else z, sched.alpha[0],
                                              sched.beta[0])
        predict = self._noise_predictor(p)
        add_noise = p.settings.do_add_noise
        use_batch = p.settings.use_denoising_batch
        if use_batch and self.state.holds((sched.num_steps - 1) * frames):
            x0, self.state = sampling.stream_batch(x_new, residual, self.state, sched, p.noise, p.guidance, predict, add_noise)
        else:
            x0, state = sampling.sequential(x_new, residual, sched, p.noise, p.guidance, predict, add_noise)
            # Priming with the first frame's own intermediate latents: no warm-up frames, ever.
            self.state = state if use_batch else sampling.StreamState()
        return self.decode_latents(x0)
