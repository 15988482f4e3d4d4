"""``acceleration="background-compile"`` (what ``"auto"`` runs on CUDA): stream at once, compile
in the background, then go faster, one batch shape at a time.

Each new batch shape of the step (the first one, and later ones: steps, CFG type, frames per call)
is captured at once with the modules running eagerly, as ``"cudagraph"`` does (about a second).
That capture records the shapes the UNet, encoder and decoder were called with; a background thread
compiles those modules for exactly those shapes (``torch.compile``, as ``"compile"`` does: a minute
or two the first time per model and shape, ~30 s with inductor's cache warm), and once it is done
the frame thread captures that shape again with the compiled code, which runs without compiling
anything on the frame thread. New weights that the graphs hold (a LoRA variant's float scale, which dynamo
guards on) start the shapes over; the usual runtime LoRA scales are tensors the graphs read. A failure in the background leaves that shape on the eager graph with one warning; a
dropped pipeline stops its compilation after the current module.

The modules choose per call (:class:`_Route`, per thread): the frame thread runs their compiled
code only for a shape whose compilation is done, eager code otherwise (also for the one-off priming
of a stream batch) - no process-wide compiler stance involved. It runs the compiled code in dynamo's
run-only mode: a guard that fails there (a LoRA variant's float scale changed during a capture) runs that call
eagerly; the frame thread never compiles.

While the background thread compiles, Python's GIL switch interval is kept short: every PyTorch
call of the frame thread releases the GIL, and taking it back from a thread busy in Python waits up
to one interval (BENCHMARKS.md: with the default 5 ms the stream fell to ~10 fps while compiling,
with 0.1 ms it keeps its speed). Python's garbage collector is paced during each compilation
(:func:`gc_paced`): its full collections scan only the objects made in the last second, not the
compiler's millions (each stopped the stream for up to 1.8 s). A process that exits meanwhile stops
the thread first.

torch.fx tracing (AOTAutograd traces each module it compiles) is not safe beside module calls on
other threads: it patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process and sets a
process-wide "tracing" flag, so a module called elsewhere meanwhile goes through the tracer (on the
GPU: a prompt's text encoder failed with "module is not installed as a submodule", a compiled
capture with "FX to symbolically trace a dynamo-optimized function"). So while a background
compiler exists each trace holds :data:`FX_TRACING`, and the frame thread holds it wherever it calls
modules (prompt encoding, captures, eager steps; never around a graph replay): such a call waits for
the trace under way (seconds at most) instead of failing. (Not in ``"compile"`` mode, whose steps
compile: dynamo takes its compile lock before a trace takes FX_TRACING, so a frame thread holding
FX_TRACING first could deadlock with a compilation on another thread.)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gc
import logging
import sys
import threading
import time
import weakref

import torch

logger = logging.getLogger(__name__)

# Python's GIL switch interval while a background compilation runs. Each PyTorch call releases the
# GIL, and taking it back from a thread busy in Python (dynamo, inductor) waits up to one interval
# (5 ms by default): with a dozen such calls per frame the stream fell to ~10 fps while compiling
# (BENCHMARKS.md). A shorter interval bounds that wait; the compiler only yields more often.
SWITCH_INTERVAL_S = 1e-4

# Held by a torch.fx trace (once a background compiler exists) and by the frame thread around module
# calls: the two never overlap (see the module docstring).
FX_TRACING = threading.RLock()


def _one_trace_at_a_time() -> None:
    """Make every torch.fx trace of the process hold FX_TRACING (once; all tracers go through
    ``Tracer.trace``, which is where the process-wide patches are made)."""
    from torch.fx import Tracer

    trace = Tracer.trace
    if getattr(trace, "_holds_fx_tracing", False):
        return

    @functools.wraps(trace)
    def guarded(self, *args, **kwargs):
        with FX_TRACING:
            return trace(self, *args, **kwargs)

    guarded._holds_fx_tracing = True
    Tracer.trace = guarded


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved: float | None = None
_switch_set: float | None = None


def _shorten_switch_interval() -> None:
    global _switch_users, _switch_saved, _switch_set
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, SWITCH_INTERVAL_S))
            _switch_set = sys.getswitchinterval()
        _switch_users += 1


def _restore_switch_interval() -> None:
    """Back to the interval before the first running compilation, unless someone else changed it meanwhile."""
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0 and _switch_saved is not None and sys.getswitchinterval() == _switch_set:
            sys.setswitchinterval(_switch_saved)


# Python's garbage collector while a background compilation runs. A full collection holds the GIL
# while it scans every tracked object, and a compilation piles up millions (dynamo's, FX's,
# inductor's, sympy's): each one stopped the stream for 0.4-1.8 s, nine times in 100 s (BENCHMARKS.md,
# R9 run 41). So the objects alive are frozen (gc.freeze: out of the collector's sight) every
# GC_FREEZE_EVERY_S while a compiler runs, and a full collection scans only what is newer than that
# (CPU, SD2.1's UNet: longest collection 1,058 -> 5 ms). Garbage that was alive at a freeze waits for
# the end (+50 MB there); the unfreeze hands everything back, so the next full collection scans it once.
# gc.unfreeze is all or nothing: where the host froze a heap of its own (a server before it forks
# workers), compilations run unpaced rather than hand that heap back to the collector. A few hundred
# objects frozen before any of this (375 at start-up on the GPU machine of R10, before our package is
# imported) are not a host's heap: pacing stays on and they return to the collector at the end,
# which costs nothing (BENCHMARKS.md R10: counting those as a host's turned pacing off there).
GC_FREEZE_EVERY_S = 1.0
HOST_FROZEN_MAX = 10_000
_gc_lock = threading.Lock()
_gc_users = 0
_gc_stop: threading.Event | None = None


def _freeze_until(stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        with _gc_lock:  # never a freeze after the last user's unfreeze: nothing would unfreeze it
            if stop.is_set() or _gc_stop is not stop or _gc_users == 0:
                return
            gc.freeze()


@contextlib.contextmanager
def gc_paced(every_s: float = GC_FREEZE_EVERY_S):
    """Short full collections while the block runs (one compilation: a bounded time). Shared by
    concurrent compilers: the first in starts the freezing, the last out unfreezes, and what was
    frozen returns to the collector. Without a thread to freeze from, without a GIL, or where the
    host froze more than :data:`HOST_FROZEN_MAX` objects itself, the block runs unpaced."""
    global _gc_users, _gc_stop
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        # Free-threaded Python: a freeze there visits the whole heap with every thread stopped.
        yield
        return
    with _gc_lock:
        # Frozen while no compilation runs: by the host (ours are all unfrozen when the last user leaves).
        hosts = gc.get_freeze_count() if _gc_users == 0 else 0
        if hosts > HOST_FROZEN_MAX:
            logger.debug("garbage-collector pacing off: the process froze %d objects itself", hosts)
            paced = False
        elif _gc_users == 0:
            stop = threading.Event()
            try:
                threading.Thread(target=_freeze_until, args=(stop, every_s), name="scope-streamdiffusion-gc",
                                 daemon=True).start()
            except RuntimeError as exc:  # "can't start new thread": a compilation without pacing
                logger.debug("garbage-collector pacing off: %s", exc)
                paced = False
            else:
                _gc_stop, paced = stop, True
                gc.freeze()
        else:
            paced = True
        if paced:
            _gc_users += 1
    try:
        yield
    finally:
        if paced:
            with _gc_lock:
                _gc_users -= 1
                if _gc_users == 0:
                    gc.unfreeze()  # first: nothing after it may be left frozen, even if interrupted
                    _gc_stop.set()


class _Stopped(BaseException):
    """Raised in a compiler thread when the process exits."""


_COMPILERS: "weakref.WeakSet[BackgroundCompiler]" = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """A daemon thread still inside the compiler when the interpreter finalises aborts the process
    ("terminate called without an active exception", exit code 134: a short video in the command
    line, Scope shutting down): stop those threads (an exception raised in them at their next Python
    line) and wait for them first."""
    threads = []
    for compiler in list(_COMPILERS):
        compiler.cancel_event.set()
        thread = compiler.thread
        if thread is not None and thread.is_alive() and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stopped))
            threads.append(thread)
    for thread in threads:
        thread.join(30)


def _spec(value):
    """What a call argument looks like, enough to make another one that dynamo's guards accept."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, dict):
        return ("dict", {k: _spec(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):  # torch.Size and named tuples too: rebuilt as their own type
        return ("sequence", type(value), [_spec(v) for v in value])
    return ("value", value)


def _example(spec):
    kind, *rest = spec
    if kind == "tensor":
        shape, stride, dtype, device = rest
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
    if kind == "dict":
        return {k: _example(v) for k, v in rest[0].items()}
    if kind == "sequence":
        cls, items = rest[0], [_example(v) for v in rest[1]]
        return cls(*items) if hasattr(cls, "_fields") else cls(items)
    return rest[0]


class _Route(threading.local):
    """Per thread: run the modules' compiled code (``compiled``) or record their call shapes."""

    compiled = False
    recording: dict | None = None


class _Dispatch:
    """A module's ``_compiled_call_impl`` (what ``nn.Module.__call__`` calls when set): its compiled code
    when this thread's route says so, else its eager code (recording the call's shapes if asked).
    Weak references: the module holds this, and its models must go with the last pipeline reference."""

    def __init__(self, compiler: "BackgroundCompiler", name: str, module: torch.nn.Module):
        self.compiler, self.module = weakref.ref(compiler), weakref.ref(module)
        self.name = name

    def __call__(self, *args, **kwargs):
        compiler = self.compiler()
        route = compiler.route if compiler is not None else None
        if route is not None and route.compiled:
            return compiler.cached[self.name](*args, **kwargs)
        if route is not None and route.recording is not None:
            spec = (_spec(args), _spec(kwargs), torch.is_inference_mode_enabled())
            specs = route.recording.setdefault(self.name, [])
            if spec not in specs:
                specs.append(spec)
        return self.module()._call_impl(*args, **kwargs)


class BackgroundCompiler:
    """Compiles the modules on a background thread for the call shapes each step shape recorded.

    The step runner (:class:`~.acceleration.StepGraphs` in ``"background-compile"``) asks
    :meth:`is_ready` for a step's key, runs a capture inside :meth:`running`, hands what it recorded
    to :meth:`submit`, and calls :meth:`forget` with a new weights generation.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], options: dict | None = None, stream=None,
                 cancel_event: threading.Event | None = None, backend="inductor"):
        self.modules = modules
        self.backend = backend  # torch.compile's (tests count what runs with their own)
        self.options = dict(options or {})
        self.stream = stream  # the CUDA stream the examples run on (None off CUDA)
        self.cancel_event = cancel_event or threading.Event()
        self.route = _Route()
        self.compiled: dict[str, object] = {}  # one torch.compile per module; its cache holds every shape
        # What the frame thread calls: the compiled code already made, never compiling (a guard that
        # fails, e.g. a LoRA scale changed during a capture, runs that call eagerly instead).
        self.cached: dict[str, object] = {}
        self.generation = 0  # the weights generation: keys submitted for older ones are not compiled
        self.ready: set = set()  # step keys whose module shapes are compiled
        self.failed: dict = {}  # step key -> error
        self.seconds: dict = {}  # step key -> compile time
        self.retried = 0  # compilations run again after a capture on another thread interrupted them
        self._warned = False
        self._jobs: list = []
        self._pending: set = set()
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        for name, module in modules.items():
            module._compiled_call_impl = _Dispatch(self, name, module)
        _one_trace_at_a_time()
        _COMPILERS.add(self)

    def is_ready(self, key) -> bool:
        return key in self.ready

    @property
    def busy(self) -> bool:
        """A compilation is under way (its thread runs)."""
        thread = self.thread
        return thread is not None and thread.is_alive()

    @contextlib.contextmanager
    def running(self, compiled: bool, recording: dict | None = None):
        """The modules' calls in this block (this thread) run compiled, or eagerly and recorded."""
        route = self.route
        saved = route.compiled, route.recording
        route.compiled, route.recording = compiled, recording
        try:
            yield
        finally:
            route.compiled, route.recording = saved

    def _warn(self, message: str, *args) -> None:
        if not self._warned and not self.cancel_event.is_set():  # a dropped pipeline or the exit: quiet
            self._warned = True
            logger.warning(message, *args)

    def submit(self, key, specs: dict, generation: int = 0) -> bool:
        """Compile in the background what a step of this key called (text-to-image never calls the
        encoder: it stays eager). False when already done, under way or failed, for older weights,
        or when nothing was recorded."""
        with self._lock:
            if not specs or key in self.ready or key in self._pending or key in self.failed \
                    or generation != self.generation or self.cancel_event.is_set():
                return False
            self._pending.add(key)
            self._jobs.append((key, specs, generation, 0))
            if self.thread is None:
                try:
                    self.thread = threading.Thread(target=self._run, name="scope-streamdiffusion-compile",
                                                   daemon=True)
                    self.thread.start()
                except Exception as exc:  # noqa: BLE001 - no thread: the stream goes on as it is
                    self.thread = None
                    self._abandon(exc)
                    return False
        logger.info("acceleration='background-compile': streaming with CUDA graphs while the modules compile in "
                    "the background for this shape (1-2 minutes the first time per model and shape; faster with "
                    "inductor's cache warm).")
        return True

    def forget(self, generation: int) -> None:
        """New weights (generation): the shapes start over; queued compilations for the old ones are
        dropped, so that dragging a LoRA slider does not queue a compilation per tick."""
        with self._lock:
            self.generation = generation
            for job in self._jobs:
                self._pending.discard(job[0])
            self._jobs.clear()
            self.ready.clear()
            self.failed.clear()

    def reject(self, key, exc: Exception) -> None:
        """The compiled code failed to capture for this shape: it stays on its eager graph."""
        with self._lock:
            self.ready.discard(key)
            self.failed[key] = f"{type(exc).__name__}: {exc}"
        self._warn("acceleration='background-compile': the compiled step failed to capture (%s: %s); this shape "
                   "stays on a CUDA graph of the eager modules.", type(exc).__name__, str(exc)[:300])

    def _abandon(self, exc: Exception) -> None:
        """(Under the lock.) What is queued fails with ``exc``: those shapes stay eager, loudly."""
        error = f"{type(exc).__name__}: {exc}"
        for key in self._pending | {job[0] for job in self._jobs}:
            self.failed[key] = error
        self._pending.clear()
        self._jobs.clear()
        self._warn("acceleration='background-compile': the background compilation failed (%s); staying with CUDA "
                   "graphs of the eager modules.", error[:300])

    def wait(self, timeout: float | None = None) -> None:
        """Until the queued compilations end (tests, scripts)."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        _shorten_switch_interval()
        try:
            self._run_jobs()
        except BaseException as exc:  # noqa: BLE001 - the thread ends: nothing may wait for it
            with self._lock:
                self._abandon(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                self.thread = None
        finally:
            _restore_switch_interval()

    def _run_jobs(self) -> None:
        from .acceleration import CAPTURE_RETRIES, capture_interrupted
        from .inductor import prepare_compilation

        mode = prepare_compilation()
        while True:
            with self._lock:
                if not self._jobs or self.cancel_event.is_set():
                    self._pending.clear()
                    self._jobs.clear()
                    self.thread = None
                    return
                key, specs, generation, attempts = self._jobs.pop(0)
            start = time.perf_counter()
            try:
                with gc_paced():  # per compilation: garbage frozen meanwhile waits one compilation at most
                    self._compile(specs, mode)
            except Exception as exc:  # noqa: BLE001 - this shape stays eager, loudly (once)
                if capture_interrupted(exc) and attempts < CAPTURE_RETRIES:
                    # The frame thread was capturing a graph while this ran the new code (whose
                    # kernel benchmarks synchronise the device): the same again in a moment.
                    with self._lock:
                        self.retried += 1
                        if generation == self.generation:  # else new weights meanwhile: dropped
                            self._jobs.insert(0, (key, specs, generation, attempts + 1))
                        else:
                            self._pending.discard(key)
                    self.cancel_event.wait(1.0 * (attempts + 1))
                    continue
                error = f"{type(exc).__name__}: {exc}"
                self._warn("acceleration='background-compile': the background compilation failed (%s); this "
                           "shape stays on CUDA graphs of the eager modules.", error[:300])
                with self._lock:
                    self.failed[key] = error
                    self._pending.discard(key)
                continue
            with self._lock:
                self._pending.discard(key)
                if self.cancel_event.is_set() or generation != self.generation:
                    continue  # dropped pipeline, or compiled for weights that changed meanwhile
                self.seconds[key] = time.perf_counter() - start
                self.ready.add(key)
            logger.info("acceleration='background-compile': compiled in %.1f s; the stream moves to the "
                        "compiled code.", self.seconds[key])

    def _compile(self, specs: dict, mode) -> None:
        from .inductor import compiling

        for name, calls in specs.items():
            for args_spec, kwargs_spec, inference in calls:
                if self.cancel_event.is_set():  # the pipeline was dropped
                    return
                fn = self.compiled.get(name)
                if fn is None:
                    from torch import _dynamo

                    extra = dict(mode=mode) if self.backend == "inductor" else {}
                    fn = self.compiled[name] = torch.compile(self.modules[name]._call_impl, dynamic=False,
                                                             backend=self.backend, **extra)
                    self.cached[name] = _dynamo.run(fn)
                # The same autograd mode as the frame thread's calls: dynamo guards on it. Shapes
                # compiled before (the encoder for another UNet batch) only check their guards.
                with torch.inference_mode() if inference else torch.no_grad(), compiling(self.options):
                    args, kwargs = _example(args_spec), _example(kwargs_spec)
                    if self.stream is not None:
                        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
                        with torch.cuda.stream(self.stream):
                            fn(*args, **kwargs)
                        self.stream.synchronize()
                    else:
                        fn(*args, **kwargs)
