"""Acceleration modes: how the per-frame step runs on the GPU.

On a fast GPU an eager UNet call is bound by kernel launches (an H200 spends ~40 ms launching
what it computes in ~5), so real time needs the host out of the loop:

* ``"none"``: eager PyTorch, SDPA attention. The reference for correctness.
* ``"xformers"``: eager, xformers memory-efficient attention (when importable, on CUDA).
* ``"cudagraph"``: the whole per-frame step (VAE/TAESD encode, noising, the UNet batch, x0, the
  stream-batch bookkeeping, decode) is captured once in ONE CUDA graph with static buffers and
  replayed for every frame. Eager kernels, no compiler: ready in seconds.
* ``"compile"``: ``torch.compile`` (inductor) of the UNet and the VAE/TAESD encoder and decoder,
  then the same whole-step CUDA graph. The fastest mode without extra installs; the compilation
  costs minutes the first time for each model and shape, and inductor's on-disk caches (under
  ``~/.cache/scope-streamdiffusion/inductor``) make later starts faster. Frozen weights are
  opt-in (:mod:`.inductor`).
* ``"background-compile"``: each batch shape runs as ``"cudagraph"`` at once while a background
  thread compiles the modules for it, then as ``"compile"`` (:mod:`.background_compile`): compile's
  speed without its blocking start, and no stop when the shape changes.
* In all of them, each attention's query/key/value projections run as one GEMM, so do all the
  time-embedding projections and all the prompt key/value projections (:mod:`.projections`), and
  TAESD's ReLUs run inside its convolutions (:mod:`.taesd`).
* ``"tensorrt"``: the UNet runs as a TensorRT engine (see :mod:`.tensorrt_export`), inside the
  same whole-step CUDA graph.
* ``"auto"`` (the default): ``"background-compile"`` on CUDA (``"cudagraph"`` without Triton),
  ``"none"`` elsewhere, silently.

Runtime parameters never re-capture or re-compile: the prompt embeddings, guidance scale, delta,
timesteps (strength / t_index_list of the same length), the per-step noise (seed) and the input
mix live in static buffers that are refreshed before a replay. A change of the UNet batch shape
(number of steps, CFG type, frame_buffer_size, prompt token count, txt2img vs img2img) captures
one more graph once; graphs are cached per shape (the 16 most recently used). A runtime LoRA scale
is a tensor the graph reads (:func:`.lora.hold_scales_in_tensors`): a change neither re-captures
nor re-compiles (a LoRA variant such as DoRA keeps peft's float scales and re-captures). A requested mode that cannot run here falls
back to ``"none"`` with ONE warning, never silently (``"tensorrt"`` without the ``tensorrt``
package is a :class:`~.models.ModelLoadError` naming the install command instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections import Counter, OrderedDict

import torch

from . import sampling
from .background_compile import FX_TRACING
from .inductor import (
    can_freeze,
    compile_modules,
    compiled_modules,
    compiling,
    eager_stance,
    inductor_options,
    release_constants,
    release_weights_with,
)
from .lora import has_runtime_adapters
from .projections import fuse_projections, share_conditioning_projections
from .prompts import PromptEmbeds
from .quantization import apply_fp8, fp8_requested
from .residual_cfg import Guidance
from .schedule import Schedule
from .small_convs import MAX_PIXELS, gemm_small_convs
from .taesd import fold_upsamples, fuse_relus, pad_thin_convs

logger = logging.getLogger(__name__)

ACCELERATIONS = ("auto", "none", "xformers", "cudagraph", "compile", "background-compile", "tensorrt")
GRAPH_MODES = ("cudagraph", "compile", "background-compile", "tensorrt")
MAX_GRAPHS = 16  # captured step graphs kept per pipeline (one per batch shape)
CAPTURE_RETRIES = 4  # captures of one shape interrupted by another thread, retried before giving up
MAX_RETRY_WAIT = 64  # calls between two tries at most
# Failed captures whose graph objects are kept (see StepGraphs._after_failed_capture) before an
# interruption counts as a failure: each leaves a filter that every pinned host allocation consults.
MAX_ABANDONED = 16


def capture_interrupted(exc: BaseException) -> bool:
    """An error of a capture rather than of the work itself: while one thread captures, CUDA refuses
    a device-wide synchronisation from any other thread (a background compilation benchmarking its
    kernels, another pipeline of the process) and invalidates the capture. Both sides see such an
    error; neither is the step's fault, so both are retried. (Also torch.fx tracing on a thread that
    does not hold ``FX_TRACING``, see :mod:`.background_compile`.)"""
    text = str(exc)
    return "StreamCapture" in text or "stream is capturing" in text or "during capture" in text \
        or "symbolically trace a dynamo-optimized" in text  # torch.fx tracing on another thread


def _fallback(requested: str, reason: str) -> str:
    logger.warning("acceleration=%r cannot run here (%s); falling back to 'none' (eager PyTorch).", requested, reason)
    return "none"


def has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton as _has_triton

        return bool(_has_triton())
    except Exception:  # noqa: BLE001
        return False


def resolve_acceleration(requested: str, device: torch.device) -> str:
    """The mode that will actually run: ``requested`` if it can, else ``"none"`` (one warning).

    Raises :class:`~.models.ModelLoadError` for ``"tensorrt"`` on CUDA without the package.
    """
    requested = (requested or "auto").lower()
    if requested not in ACCELERATIONS:
        return _fallback(requested, f"unknown mode; expected one of {', '.join(ACCELERATIONS)}")
    cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if not cuda:
            return "none"
        return "background-compile" if has_triton() else "cudagraph"
    if requested == "none":
        return "none"
    if not cuda:
        return _fallback(requested, f"it needs a CUDA device, the pipeline runs on '{torch.device(device).type}'")
    if requested == "compile" and not has_triton():
        return _fallback(requested, "torch.compile needs Triton, which is not importable")
    if requested == "background-compile" and not has_triton():
        logger.warning("acceleration='background-compile' cannot compile here (torch.compile needs Triton, which "
                       "is not importable); running 'cudagraph'.")
        return "cudagraph"
    if requested == "tensorrt":
        from .tensorrt_export import require_tensorrt

        require_tensorrt()
    return requested


# ----- the whole-step CUDA graph ------------------------------------------------------------------
@dataclasses.dataclass
class _Static:
    """Static buffers of one graphed step shape and the graph that reads them."""

    prepared: object  # a _Prepared whose tensors are the static buffers below
    images: torch.Tensor | None
    sched: Schedule
    noise: torch.Tensor
    scalars: torch.Tensor  # (4,) float32: guidance scale, delta, input a, input b
    embeds: list  # [(static, source attr)] prompt / negative embeds and pooled
    state: sampling.StreamState
    use_batch: bool
    output: torch.Tensor | None = None
    graph: object = None
    loaded: object = None
    compiled: bool = False  # background-compile: captured with the compiled modules


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device, role: str = "capture") -> "torch.cuda.Stream":
    """One side stream per device and role (captures; background compilation) for the life of the
    process: each new stream gets its own cuBLAS workspace (32 MiB on Hopper), kept until the process
    ends. (With a new stream per capture, an H200 kept 33 MiB more after each reload of a compiled
    pipeline.)"""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get((index, role))
    if stream is None:
        stream = _CAPTURE_STREAMS.setdefault((index, role), torch.cuda.Stream(device=index))
    return stream


def _clone(t):
    return None if t is None else t.detach().clone()


class StepGraphs:
    """Runs ``StreamDiffusion._denoise_eager`` as replayed CUDA graphs, one per batch shape.

    ``use_graphs=False`` keeps the static-buffer plumbing but calls the step eagerly (CPU tests).
    ``compile_options``: inductor options for compilations triggered by the step (compile mode).
    ``compiler``: background-compile's :class:`~.background_compile.BackgroundCompiler`.
    """

    def __init__(self, mode: str = "cudagraph", *, use_graphs: bool = True, warmup: int = 2,
                 compile_options: dict | None = None, compiler=None):
        self.mode = mode
        self.compiler = compiler
        self.last_compiled = False  # whether the last step ran compiled code (background-compile)
        self.use_graphs = use_graphs
        self.compile_options = dict(compile_options or {})
        # Generated code holding frozen weights (released with the models, see accelerate()).
        self._generated: list = []
        self._generation = 0
        self.force_eager = False  # compile mode whose compiled modules failed: run them eagerly
        self.warmup = warmup
        self.captures = 0
        self.capture_seconds = 0.0
        self.failed: str | None = None
        self._steps: OrderedDict[tuple, _Static] = OrderedDict()  # least recently used first
        self._calls = 0
        self.interrupted = 0  # captures interrupted by another thread (then tried again)
        # (key, generation, compiled) -> (interrupted captures, the call from which to try again)
        self._retries: dict = {}
        # Where the frame thread runs modules it holds FX_TRACING (see background_compile), except in
        # compile mode: there its calls compile, and dynamo takes its compile lock before a trace
        # takes FX_TRACING, so holding FX_TRACING first could deadlock with a compilation elsewhere.
        self._modules_run = contextlib.nullcontext() if mode == "compile" else FX_TRACING
        self._steps_lock = threading.Lock()  # invalidate() comes from another thread
        self._pool = None  # the memory pool the step graphs share
        self._capturing = None  # (graph, pool) of the capture under way
        self._abandoned: list = []  # graphs of failed captures the allocators still refer to (<= MAX_ABANDONED)
        self.cleanups: Counter = Counter()  # what cleaning up after failed captures found

    def invalidate(self) -> None:
        """Drop every captured graph (weights changed in place, e.g. a runtime LoRA scale).

        May come from another thread (Scope's parameter updates) while a frame captures: the
        generation tells the capture that its graph holds the old weights and must not be kept."""
        with self._steps_lock:
            self._generation += 1
            self._steps.clear()
            self._retries.clear()
            # Every graph of the pool goes: new captures take a new pool (torch asserts that a pool
            # it is asked to share is still alive).
            self._pool = None
            if self.compiler is not None:  # under the lock: a frame submits for one generation or the other
                self.compiler.forget(self._generation)

    def graphs(self) -> list:
        """The captured CUDA graphs (one per batch shape seen so far)."""
        return [st.graph for st in list(self._steps.values()) if st.graph is not None]

    # -- keys and buffers --
    @staticmethod
    def _key(p, images, frames) -> tuple:
        s = p.settings
        return (
            None if images is None else (tuple(images.shape), images.dtype),
            frames,
            p.sched.num_steps,
            p.guidance.cfg_type,
            bool(s.use_denoising_batch),
            bool(s.do_add_noise),
            tuple(p.prompt.embeds.shape),
            tuple(p.negative.embeds.shape),
        )

    def _buffers(self, engine, p, images, frames) -> _Static:
        sched = p.sched.clone()
        noise = _clone(p.noise)
        scalars = torch.zeros(4, device=engine.device, dtype=torch.float32)
        prompt = PromptEmbeds(_clone(p.prompt.embeds), _clone(p.prompt.pooled))
        negative = PromptEmbeds(_clone(p.negative.embeds), _clone(p.negative.pooled))
        embeds = [(prompt.embeds, "prompt", "embeds"), (negative.embeds, "negative", "embeds")]
        if prompt.pooled is not None:
            embeds += [(prompt.pooled, "prompt", "pooled"), (negative.pooled, "negative", "pooled")]
        guidance = Guidance(p.guidance.cfg_type, scalars[0], scalars[1])
        static_p = dataclasses.replace(p, sched=sched, noise=noise, guidance=guidance, prompt=prompt,
                                       negative=negative, input_a=scalars[2], input_b=scalars[3])
        use_batch = bool(p.settings.use_denoising_batch)
        state = sampling.StreamState()
        if use_batch:
            rows = (p.sched.num_steps - 1) * frames
            shape = (rows, *engine.latent_shape)
            latents = torch.zeros(shape, device=engine.device, dtype=engine.dtype)
            residual = (torch.zeros(shape, device=engine.device, dtype=engine.dtype)
                        if p.guidance.cfg_type.uses_residual_noise else None)
            state = sampling.StreamState(latents, residual)
        static_images = None if images is None else torch.empty_like(images, memory_format=torch.contiguous_format)
        return _Static(static_p, static_images, sched, noise, scalars, embeds, state, use_batch)

    def _load(self, st: _Static, engine, p, images) -> None:
        """Copy this call's inputs into the static buffers (no host sync, no allocation)."""
        if images is not None:
            st.images.copy_(images)
        if st.loaded is not p:
            # A modulated parameter (guidance, strength...) changes one part of ``p``: copy only the
            # parts whose source object changed (they are never written to, and kept referenced here).
            loaded = st.loaded
            if loaded is None or loaded.sched is not p.sched:
                st.sched.copy_(p.sched)
            if loaded is None or loaded.noise is not p.noise:
                st.noise.copy_(p.noise)
            for static, owner, attr in st.embeds:
                if loaded is None or getattr(loaded, owner) is not getattr(p, owner):
                    static.copy_(getattr(getattr(p, owner), attr))
            values = (p.guidance.scale, p.guidance.delta, p.input_a, p.input_b)  # Python floats
            before = None if loaded is None else (loaded.guidance.scale, loaded.guidance.delta, loaded.input_a,
                                                  loaded.input_b)
            for i, v in enumerate(values):
                if before is None or before[i] != v:  # strength moves a and b only
                    st.scalars[i].fill_(v)
            st.loaded = p
        state = engine.state
        if st.use_batch and state.primed and state.latents is not st.state.latents:
            st.state.latents.copy_(state.latents)
            if st.state.residual_noise is not None:
                st.state.residual_noise.copy_(state.residual_noise)

    def _step(self, st: _Static, engine, frames: int) -> torch.Tensor:
        """The step over the static buffers; the new stream state is written back into them."""
        engine.state = sampling.StreamState(st.state.latents, st.state.residual_noise) if st.use_batch \
            else sampling.StreamState()
        out = engine._denoise_eager(st.prepared, st.images, frames)
        if st.use_batch:
            new = engine.state
            st.state.latents.copy_(new.latents)
            if st.state.residual_noise is not None:
                st.state.residual_noise.copy_(new.residual_noise)
        return out

    def _capture(self, st: _Static, engine, p, images, frames) -> None:
        with self._modules_run:  # the modules run here (warm-up, capture): no torch.fx trace elsewhere meanwhile
            cuda = torch.device(engine.device).type == "cuda"
            stream = torch.cuda.current_stream(engine.device) if cuda else None
            try:
                self._capture_step(st, engine, p, images, frames)
            except BaseException:
                if stream is not None:
                    self._after_failed_capture(stream, engine.device)
                raise
            finally:
                self._capturing = None

    def _after_failed_capture(self, stream, device) -> None:
        """Leave no trace of a capture that failed, so that the stream goes on and a later capture
        works. When its end fails (an interrupted capture), torch.cuda.graph leaves the capture
        stream current for this thread, and the allocators (device, and pinned host memory in recent
        torch) still recording into the graphs' memory pool for it, through filters that refer to
        the graph object: a later capture into that pool fails ("already recording to mempool_id")."""
        with torch.cuda.device(device):  # set_stream also makes the stream's device current: only here
            torch.cuda.set_stream(stream)
        if self._capturing is None:  # it failed before its capture began
            return
        graph, pool = self._capturing
        try:
            graph.pool()  # raises unless the capture ended: then torch ended the recording too
            return
        except RuntimeError:
            pass
        # Later captures go into a new pool (graphs already captured keep theirs), and the graph
        # object lives on: the host allocator's recording cannot be ended from Python.
        if self._pool == pool:
            self._pool = None
        self._abandoned.append(graph)
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        try:
            torch._C._cuda_endAllocateToPool(index, pool)
        except Exception as exc:  # noqa: BLE001 - not recording (the failure came before it began)
            self.cleanups["not recording"] += 1
            logger.debug("the failed capture's pool was not recording: %s", exc)
            return
        self.cleanups["recording ended"] += 1
        try:  # recording was open, so nothing released what its start took: release it once
            torch._C._cuda_releasePool(index, pool)
        except Exception as exc:  # noqa: BLE001 - the capture's own error is the one to report
            logger.debug("releasing the failed capture's pool: %s", exc)

    def _capture_step(self, st: _Static, engine, p, images, frames) -> None:
        saved = engine.state
        start = time.perf_counter()
        if self.mode == "compile":  # so that a first start of minutes does not look like a hang
            logger.info("acceleration='compile': compiling for %d step(s), %d frame(s) per call (1-2 minutes "
                        "the first time per model and shape; inductor's on-disk cache makes later starts faster)...",
                        p.sched.num_steps, frames)
        try:
            self._load(st, engine, p, images)
            side = _capture_stream(engine.device)
            # The model's device, also when it is not the current one (cuda:1): streams, syncs, capture.
            with torch.cuda.device(engine.device):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), compiling(self.compile_options, self._generated):
                    for _ in range(self.warmup):  # compiles (compile mode), autotunes cuDNN, warms allocators
                        self._step(st, engine, frames)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                pool, graph = self._pool, torch.cuda.CUDAGraph()
                self._capturing = (graph, pool)
                # thread_local: a background compilation's allocations and syncs do not break it.
                with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    st.output = self._step(st, engine, frames)
                torch.cuda.synchronize()
            st.graph = graph
            self.captures += 1
            if self.mode == "compile":
                logger.info("acceleration='compile': ready in %.1f s.", time.perf_counter() - start)
        finally:
            engine.state = saved
            st.loaded = None  # warm-up advanced the static state: reload everything
            self.capture_seconds += time.perf_counter() - start

    def _eager(self, engine, p, images, frames: int) -> torch.Tensor:
        """The step without a graph. In compile mode, when the compiled modules themselves fail (the
        usual reason a capture failed), they run eagerly from then on instead of failing every frame."""
        self.last_compiled = False
        with self._modules_run:
            return self._eager_step(engine, p, images, frames)

    def _eager_step(self, engine, p, images, frames: int) -> torch.Tensor:
        if not self.force_eager:
            try:
                with compiling(self.compile_options, self._generated):
                    return engine._denoise_eager(p, images, frames)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - fall back once, loudly
                if self.mode != "compile":
                    raise
                self.force_eager = True
                logger.warning("acceleration='compile': the compiled modules failed (%s: %s); running them "
                               "eagerly.", type(exc).__name__, str(exc)[:300])
        with eager_stance():
            return engine._denoise_eager(p, images, frames)

    def _running(self, st: _Static, recording: dict | None):
        """background-compile: the modules run compiled for a shape whose compilation is done, else
        eagerly (recording their call shapes when asked)."""
        if self.compiler is None:
            return contextlib.nullcontext()
        return self.compiler.running(st.compiled, recording)

    # -- the call --
    def denoise(self, engine, p, images, frames: int) -> torch.Tensor:
        n = p.sched.num_steps
        use_batch = bool(p.settings.use_denoising_batch)
        state = engine.state
        if use_batch and n > 1 and not state.holds((n - 1) * frames):
            # Priming runs the steps one after another (other UNet shapes): once, eagerly. (One step
            # needs no priming: its stream state is empty.) The stance is process-wide: only where
            # the modules are compiled (a background compilation may run meanwhile).
            self.last_compiled = False
            with self._modules_run, eager_stance() if self.mode == "compile" else contextlib.nullcontext():
                return engine._denoise_eager(p, images, frames)
        if self.failed:
            return self._eager(engine, p, images, frames)
        key = self._key(p, images, frames)
        compiler = self.compiler
        with self._steps_lock:
            generation = self._generation
            st = self._steps.get(key)
            if st is not None:
                self._steps.move_to_end(key)
        # background-compile: a shape's compiled code is ready: capture it (its eager graph stays
        # until that worked).
        upgrade = compiler is not None and st is not None and not st.compiled and compiler.is_ready((key, generation))
        recording = None
        if st is None or upgrade:  # a capture is due (nothing of this below runs on a plain replay)
            ready = upgrade or (compiler is not None and compiler.is_ready((key, generation)))
            self._calls += 1  # calls that wanted a capture: the clock of the retries
            retry_key = (key, generation, ready)  # what the capture would be: its own count of tries
            retry = self._retries.get(retry_key)
            if retry is not None and self._calls < retry[1]:
                # An interrupted capture waits a few calls: this one runs as the shape did before.
                if st is None:
                    return self._eager(engine, p, images, frames)
                upgrade = False
        if st is None or upgrade:
            new = self._buffers(engine, p, images, frames)
            if compiler is not None:
                new.compiled = ready
                recording = None if new.compiled else {}  # what the eager step calls, to compile it
            if self.use_graphs:
                try:
                    with self._running(new, recording):
                        self._capture(new, engine, p, images, frames)
                except Exception as exc:  # noqa: BLE001 - fall back once, loudly
                    oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                    attempts = (retry or (0, 0))[0] + 1
                    # A compilation running here is a known interrupter (its kernel benchmarks go on
                    # for seconds): such tries do not count towards giving up.
                    compiling_now = compiler is not None and compiler.busy
                    if capture_interrupted(exc) and (attempts <= CAPTURE_RETRIES or compiling_now) \
                            and len(self._abandoned) < MAX_ABANDONED:
                        # Another thread synchronised the device meanwhile: try again 2, 4, 8... calls later.
                        if compiling_now:
                            attempts = min(attempts, CAPTURE_RETRIES)
                        self._retries[retry_key] = (attempts, self._calls + min(2 ** attempts, MAX_RETRY_WAIT))
                        self.interrupted += 1
                        logger.info("acceleration=%r: a CUDA graph capture was interrupted (%s); trying again "
                                    "shortly.", self.mode, str(exc)[:200])
                        if st is None:
                            return self._eager(engine, p, images, frames)
                        new = None  # this call: the shape's eager graph
                    elif new.compiled and (st is not None or not oom):
                        # This shape's compiled code (not graphs) failed, or did not fit beside the
                        # eager graph: the shape stays on its eager graph.
                        self._retries.pop(retry_key, None)
                        compiler.reject((key, generation), exc)
                        if st is None:
                            return self.denoise(engine, p, images, frames)  # its eager graph, once
                        new = None
                    elif oom:
                        raise  # memory, not the graph: the pipeline frees and reports it; capture again later
                    else:
                        self._retries.clear()
                        self.failed = f"{type(exc).__name__}: {exc}"
                        logger.warning("acceleration=%r: CUDA graph capture failed (%s); running the step without "
                                       "graphs.", self.mode, self.failed[:300])
                        if compiler is not None:
                            compiler.cancel_event.set()  # nothing will use what it compiles
                        return self._eager(engine, p, images, frames)
            if new is not None:
                st = new
                self._retries.pop(retry_key, None)
                with self._steps_lock:
                    if generation == self._generation:  # else weights changed meanwhile: this frame only
                        self._steps[key] = st
                        self._steps.move_to_end(key)
                        # Bounded for streams that run for hours while steps, CFG type or prompt length
                        # are swept: the least recently used graph goes (captured again if it comes back).
                        while len(self._steps) > MAX_GRAPHS:
                            self._steps.popitem(last=False)
        self._load(st, engine, p, images)
        if st.graph is not None:
            st.graph.replay()
            out = st.output
        else:
            with self._modules_run, compiling(self.compile_options, self._generated), self._running(st, recording):
                out = self._step(st, engine, frames)
        if recording:
            compiler.submit((key, generation), recording, generation)
        self.last_compiled = st.compiled
        engine.state = st.state if use_batch else sampling.StreamState()
        # The static output is overwritten by the next replay: hand out a copy.
        return out.clone()


def _switch(name: str) -> bool:
    """An on/off environment variable: on unless set to "0"."""
    return os.environ.get(name, "1") != "0"


def _size_setting(name: str, default: int, unit: str) -> int | None:
    """An environment variable that turns a rewrite off ("0") or sets its size (a number > 1)."""
    value = os.environ.get(name, "1").strip()
    if value == "0":
        return None
    if not value.isdecimal():
        logger.warning("%s=%r is not a number of %s (0 turns it off); using %d.", name, value, unit, default)
    return int(value) if value.isdecimal() and int(value) > 1 else default


def _background_compiler(models, options: dict):
    """``"background-compile"``: the compiler that moves each step shape to compiled code later."""
    from .background_compile import BackgroundCompiler

    stream = _capture_stream(models.device, "background-compile") if models.device.type == "cuda" else None
    compiler = BackgroundCompiler(compiled_modules(models.unet, models.vae), options, stream=stream)
    # A dropped pipeline stops its compilation (after the module being compiled) and frees its models.
    weakref.finalize(models, compiler.cancel_event.set)
    return compiler


# ----- wiring -------------------------------------------------------------------------------------
def accelerate(models, requested: str, stream_shape: tuple[int, int, int] | None = None):
    """Apply the acceleration mode to loaded :class:`~.models.StreamModels` (in place) and return them.

    Sets ``models.extras["acceleration"]`` (the mode that runs) and, for graph modes,
    ``models.extras["step_runner"]`` (a :class:`StepGraphs`) that the engine calls per frame.
    ``stream_shape`` (width, height, frame_buffer_size) tunes a TensorRT engine's profile.
    """
    if (requested or "").lower() == "xformers":
        mode = models.extras.get("attention", "none")  # models._set_attention applied it or warned once
    else:
        mode = resolve_acceleration(requested, models.device)
    models.extras["acceleration"] = mode
    if fp8_requested() and (requested or "auto").lower() != "compile":  # never silently
        logger.warning("SCOPE_STREAMDIFFUSION_FP8 is for acceleration='compile' only: %r runs without fp8.",
                       requested or "auto")
    if mode not in GRAPH_MODES:
        return models
    torch.backends.cudnn.benchmark = True
    # Fused q/k/v projections: -0.16 to -0.25 ms of GPU time per SD-Turbo frame on an H200 (BENCHMARKS.md,
    # R4); the time-embedding and prompt key/value projections as one GEMM each: -0.11 to -0.21 ms (R12).
    # SCOPE_STREAMDIFFUSION_FUSE_QKV=0 / _SHARE_PROJECTIONS=0 keep them apart. TensorRT fuses its own;
    # runtime LoRAs sit on them.
    rewrite = mode != "tensorrt" and not has_runtime_adapters(models.extras.get("loras"))
    if rewrite and _switch("SCOPE_STREAMDIFFUSION_FUSE_QKV"):
        models.extras["fused_projections"] = fuse_projections(models.unet)
    if rewrite and _switch("SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS"):
        models.extras["shared_projections"] = share_conditioning_projections(models.unet)
    # The 3x3 convolutions over <= 64 pixels (the 8x8 level at one 512² frame) compiled as GEMMs (R15);
    # SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS=N (> 1) moves the limit to N pixels.
    compiled = rewrite and mode in ("compile", "background-compile")
    if compiled and (limit := _size_setting("SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS", MAX_PIXELS, "pixels")):
        models.extras["gemm_small_convs"] = gemm_small_convs(models.unet, limit)
    # The UNet's GroupNorms (+ the SiLU after them) compiled as two Triton kernels each (R16), one for
    # small groups (R18);
    # SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM=N (> 1) sets the values one statistics program sums;
    # SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM=N (> 1) runs groups of up to N values in one kernel;
    # SCOPE_STREAMDIFFUSION_BIAS_IN_NORM=0 adds a ResNet's conv1 bias to its time embedding in a kernel
    # of its own again (R20: the operator takes both).
    # Imported here: the module loads diffusers' ResNet block and Triton, which other callers of this
    # module (the CLI's mode resolution) do not need.
    from .group_norm import ELEMENTS_PER_PROGRAM, ONE_PROGRAM_VALUES, triton_group_norms

    if compiled and (elements := _size_setting("SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM", ELEMENTS_PER_PROGRAM, "values")):
        one_program = _size_setting("SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM", ONE_PROGRAM_VALUES, "values")
        models.extras["triton_group_norms"] = triton_group_norms(models.unet, elements, one_program or 0,
                                                                 _switch("SCOPE_STREAMDIFFUSION_BIAS_IN_NORM"))
    # ... and, at one row, the residual sums read next by a norm (with the biases added last to them)
    # computed inside its operator (R17); SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS=0 keeps them apart.
    pass_options = {}
    if models.extras.get("triton_group_norms") and _switch("SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS"):
        from .group_norm import residual_add_options

        pass_options = residual_add_options(models.extras.setdefault("fused_residual_adds", {}))
    # On Hopper, the long self-attentions whose 128-query tiles leave the SMs' last round mostly idle
    # with their keys split in parts (R19); SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION=0 keeps them whole.
    if mode in ("compile", "background-compile") and _switch("SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION"):
        from .attention_split import attention_split_options

        counts = {}
        if split := attention_split_options(models.device, counts):
            pass_options |= split
            models.extras["split_attentions"] = counts
    # TAESD's ReLUs inside its convolutions: +1.5-2.7% fps on an H200 (BENCHMARKS.md, R11).
    if _switch("SCOPE_STREAMDIFFUSION_FUSE_TAESD"):
        # SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT=0: the decoder's first stage in its input's layout (R13).
        input_layout = _switch("SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT")
        models.extras["fused_taesd_relus"] = fuse_relus(models.vae, input_layout=input_layout)
        models.extras["taesd_input_layout"] = input_layout and models.extras["fused_taesd_relus"] > 0
    # TAESD's decoder upsamplings + convolutions as transposed convolutions (BENCHMARKS.md, R13).
    if _switch("SCOPE_STREAMDIFFUSION_FOLD_UPSAMPLES"):
        models.extras["folded_taesd_upsamples"] = fold_upsamples(models.vae)
    # ... and its 3-channel first and last convolutions padded (R13).
    if _switch("SCOPE_STREAMDIFFUSION_PAD_THIN_CONVS"):
        models.extras["padded_taesd_convs"] = pad_thin_convs(models.vae)
    options, compiler = {}, None
    if mode in ("compile", "background-compile"):
        options = inductor_options(allow_freezing=can_freeze(models.extras.get("loras"))) | pass_options
    if mode == "compile":
        if fp8_requested():  # after the rewrites: the fused q/k/v layers are the ones swapped
            apply_fp8(models)
        compile_modules(models.unet, models.vae)
    elif mode == "background-compile":
        if options.pop("freezing", False):  # frozen weights need the release hooks below, per compilation
            logger.warning("acceleration='background-compile': frozen weights (SCOPE_STREAMDIFFUSION_INDUCTOR) are "
                           "not applied; use acceleration='compile' for them.")
        compiler = _background_compiler(models, options)
    elif mode == "tensorrt":
        from .tensorrt_export import Profile, tensorrt_unet

        models.unet = tensorrt_unet(models, Profile.for_stream(*stream_shape) if stream_shape else None)
    # SCOPE_STREAMDIFFUSION_STEP_GRAPH=0: no whole-step graph (to compare with compile's own cudagraphs).
    # With a background compiler the frame thread never compiles: its options stay with the compiler, not
    # patched around the frame thread's steps too (inductor's config is process-wide in older torch).
    runner = StepGraphs(mode, compile_options=options if compiler is None else {}, compiler=compiler,
                        use_graphs=_switch("SCOPE_STREAMDIFFUSION_STEP_GRAPH"))
    models.extras["step_runner"] = runner
    if options.get("freezing"):
        # The compiled code outlives the models and keeps their weights: give them back with the models.
        for module in (models.unet, getattr(models.vae, "encoder", None), getattr(models.vae, "decoder", None)):
            if isinstance(module, torch.nn.Module):
                release_weights_with(module)
        weakref.finalize(models.unet, release_constants, runner._generated)
    return models
