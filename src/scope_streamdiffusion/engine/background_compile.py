"""``acceleration="background-compile"``: stream at once, compile in the background, then go faster.

The stream starts with the CUDA-graph step (``"cudagraph"``, ready in about a second). Once the
first step ran, the shapes its UNet, encoder and decoder were called with are known: a background
thread compiles those modules for exactly those shapes (``torch.compile``, as ``"compile"`` does,
which costs a minute or two the first time and blocks nothing here), and the frame thread then moves
to the compiled step (``"compile"``), whose capture finds the compiled code ready. A new batch shape
or new weights (a LoRA scale) while it compiles: recorded and compiled again. From the switch on it
is ``"compile"``: a new batch shape (steps, CFG type) compiles on the frame thread, as there. Text to
image never calls the encoder: it stays eager. A failure in the background leaves the stream on
``"cudagraph"`` with one warning; a dropped pipeline stops its compilation after the current
module. While the background thread compiles, the stream runs slower than ``"cudagraph"`` alone
(the compiler shares the CPU and the GIL; BENCHMARKS.md has the timeline).

The compiled callables are the ones ``nn.Module.compile()`` makes (``torch.compile`` of the module's
``_call_impl``), kept aside until the switch: until then the frame thread's own calls of the modules
stay eager and never compile.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import torch

logger = logging.getLogger(__name__)

# Python's GIL switch interval while a background compilation runs. Each PyTorch call releases the
# GIL, and taking it back from a thread busy in Python (dynamo, inductor) waits up to one interval
# (5 ms by default): with a dozen such calls per frame the stream fell to ~10 fps while compiling
# (BENCHMARKS.md). A shorter interval bounds that wait; the compiler only yields more often.
SWITCH_INTERVAL_S = 1e-4

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


def _spec(value):
    """What a call argument looks like, enough to make another one that dynamo's guards accept."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, dict):
        return ("dict", {k: _spec(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_spec(v) for v in value])
    return ("value", value)


def _example(spec):
    kind, *rest = spec
    if kind == "tensor":
        shape, stride, dtype, device = rest
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
    if kind == "dict":
        return {k: _example(v) for k, v in rest[0].items()}
    if kind in ("list", "tuple"):
        items = [_example(v) for v in rest[0]]
        return items if kind == "list" else tuple(items)
    return rest[0]


class BackgroundCompile:
    """Records the modules' call shapes, compiles them on a background thread, installs the result.

    Driven by the frame thread through :func:`~.acceleration.current_runner`: ``start()`` after the
    first step, ``install()`` once ``ready``.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], options: dict | None = None,
                 compile_mode: str | None = None, stream=None, cancel_event: threading.Event | None = None):
        self.modules = modules
        self.options = dict(options or {})
        self.compile_mode = compile_mode
        self.stream = stream  # the CUDA stream the examples run on (None off CUDA)
        self.cancel_event = cancel_event or threading.Event()
        self.stamp = None  # what the frame thread's step looked like when the shapes were taken
        self.specs: dict[str, tuple] = {}
        self.compiled: dict[str, object] = {}
        self.state = "recording"  # -> compiling -> ready -> installed, or failed
        self.error: str | None = None
        self.seconds = 0.0
        self.thread: threading.Thread | None = None
        self._hooks = [module.register_forward_pre_hook(self._recorder(name), with_kwargs=True)
                       for name, module in modules.items()]

    def _recorder(self, name):
        def record(module, args, kwargs):
            self.specs[name] = (_spec(args), _spec(kwargs), torch.is_inference_mode_enabled())

        return record

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self, stamp=None) -> bool:
        """Compile in the background the modules the step called, for the shapes it called them with
        (text-to-image never calls the encoder: it stays eager). False when the UNet was not called yet."""
        if self.state != "recording" or "unet" not in self.specs:
            return False
        self._remove_hooks()  # hooks run inside _call_impl: dynamo must not trace them
        self.stamp = stamp
        self.state = "compiling"
        logger.info("acceleration='background-compile': streaming with 'cudagraph' while the modules compile "
                    "in the background (1-2 minutes the first time per model and shape; faster with inductor's "
                    "cache warm).")
        try:
            self.thread = threading.Thread(target=self._run, name="scope-streamdiffusion-compile", daemon=True)
            self.thread.start()
        except Exception as exc:  # noqa: BLE001 - no thread: the stream goes on as it is
            self._fail(exc)
            return False
        return True

    def again(self) -> "BackgroundCompile":
        """A new recording for the same modules (the shapes or weights changed while compiling)."""
        logger.info("acceleration='background-compile': the stream changed shape or weights while compiling; "
                    "compiling again for the new ones.")
        return BackgroundCompile(self.modules, self.options, self.compile_mode, self.stream, self.cancel_event)

    def _fail(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.state = "failed"
        logger.warning("acceleration='background-compile': the background compilation failed (%s); staying with "
                       "'cudagraph'.", self.error[:300])

    def _run(self) -> None:
        from .inductor import compiling, prepare_compilation

        start = time.perf_counter()
        stream = self.stream
        _shorten_switch_interval()
        try:
            mode = prepare_compilation(self.compile_mode)
            for name, (args_spec, kwargs_spec, inference) in list(self.specs.items()):
                if self.cancel_event.is_set():  # the pipeline was dropped
                    self.state = "failed"
                    self.error = "cancelled"
                    return
                fn = torch.compile(self.modules[name]._call_impl, dynamic=False, mode=mode)
                # The same autograd mode as the frame thread's calls: dynamo guards on it.
                with torch.inference_mode() if inference else torch.no_grad(), compiling(self.options):
                    args, kwargs = _example(args_spec), _example(kwargs_spec)
                    if stream is not None:
                        stream.wait_stream(torch.cuda.current_stream(stream.device))
                        with torch.cuda.stream(stream):
                            fn(*args, **kwargs)
                        stream.synchronize()
                    else:
                        fn(*args, **kwargs)
                self.compiled[name] = fn
            self.seconds = time.perf_counter() - start
            self.state = "ready"
        except Exception as exc:  # noqa: BLE001 - the stream goes on as it is, loudly
            self._fail(exc)
        finally:
            _restore_switch_interval()

    def install(self) -> None:
        """On the frame thread: the modules call their compiled code from now on (as ``compile()`` does)."""
        for name, fn in self.compiled.items():
            self.modules[name]._compiled_call_impl = fn
        self.state = "installed"
        logger.info("acceleration='background-compile': compiled in %.1f s; now running 'compile'.", self.seconds)

    def cancel(self) -> None:
        self._remove_hooks()
        if self.state == "recording":
            self.state = "failed"
