"""The ``scope-streamdiffusion`` command line: run, info, download, bench.

``run`` streams a video file, an image, a folder of images, a webcam or a built-in test pattern
through :class:`~scope_streamdiffusion.pipeline.StreamDiffusionPipeline` and writes a video file or a
folder of images. Every engine parameter is a flag generated from ``StreamDiffusionConfig`` (same
names as the config) and can also come from a TOML/YAML file; flags win over the file.

Errors a user can act on print one line on stderr and exit non-zero; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import difflib
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import types
import typing
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

from ._version import __version__

LATENCY_WINDOW = 100_000  # calls whose latencies the summary's percentiles cover (about an hour at 30 fps)

PROG = "scope-streamdiffusion"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Fields Scope's base config declares for other pipelines: not StreamDiffusion parameters.
_SCOPE_BASE_FIELDS = {"manage_cache", "base_seed", "denoising_steps", "lora_merge_strategy", "noise_scale",
                      "noise_controller", "input_size", "ref_images", "vace_context_scale"}
# `run` options that a config file may also set (besides the engine parameters).
_RUN_KEYS = ("input", "output", "frames", "fps")
_LORA_KEYS = ("loras", "lora_merge_mode")  # load parameters in Scope's format, not config fields
TINY_HELP = ("'tiny-random' (or tiny-random-sdxl) is a tiny random-weight model the package builds itself: "
             "it runs offline on a CPU to check an install end to end (it needs CLIP's vocabulary: "
             "pip install --no-deps open_clip_torch), and its output is noise by nature.")

logger = logging.getLogger("scope_streamdiffusion")


class CliError(Exception):
    """An error the user can act on: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ----- parameters: flags generated from the config schema --------------------------------------------


def engine_fields() -> dict[str, Any]:
    """The config fields that are StreamDiffusion parameters (pydantic FieldInfo by name)."""
    from .schema import StreamDiffusionConfig

    return {name: f for name, f in StreamDiffusionConfig.model_fields.items() if name not in _SCOPE_BASE_FIELDS}


def _unwrap_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _int_list(text: str) -> list[int]:
    # "--t-index-list 32 45", "--t-index-list 32,45" and "--t-index-list '[32, 45]'" all work.
    try:
        return [int(part) for part in text.strip("[] ").replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def _add_field_flag(group, name: str, field) -> None:
    """One flag per config field: ``--name-with-dashes``, plus a hidden ``--name_with_underscores``."""
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    help_text = (field.description or "").replace("%", "%%")
    from .parameters import field_bounds

    ge, le = field_bounds(field)
    if ge is not None and le is not None:
        help_text += f" [range: {ge} to {le}]"
    if field.default not in (None, ""):
        help_text += f" [default: {field.default}]"
    if name == "model_id":
        help_text += " " + TINY_HELP
    kwargs: dict[str, Any] = {"dest": name, "default": None}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif origin is list:
        kwargs.update(type=_int_list, nargs="+", metavar="INT")
    elif annotation in (int, float):
        kwargs.update(type=annotation, metavar=annotation.__name__.upper())
    else:
        kwargs.update(type=str, metavar="TEXT")
    dashed = f"--{name.replace('_', '-')}"
    group.add_argument(*(["--model", dashed] if name == "model_id" else [dashed]), help=help_text, **kwargs)
    if "_" in name:  # the config's own spelling works too, without cluttering --help
        group.add_argument(f"--{name}", help=argparse.SUPPRESS, **kwargs)


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    values = {}
    for name in engine_fields():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], list):  # nargs="+" of int lists
            value = [i for part in value for i in part]
        values[name] = value
    if args.prompt is not None:
        values["prompt"] = args.prompt
    return values


def load_config_file(path: str) -> dict[str, Any]:
    """A flat TOML/YAML mapping of config keys (dashes or underscores) -> validated values."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CliError(f"Config file '{path}' does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's to fix
        reason = " ".join(str(exc).split())
        raise CliError(f"Cannot parse config file '{path}': {reason}") from exc
    if not isinstance(data, dict):
        raise CliError(f"Config file '{path}' must hold a mapping of parameter names to values.")
    return _validate_config(data, path)


def _validate_config(data: dict[str, Any], path: str) -> dict[str, Any]:
    from pydantic import TypeAdapter, ValidationError

    fields = engine_fields()
    known = {*fields, "prompt", "prompts", "model", *_RUN_KEYS, *_LORA_KEYS}
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CliError(f"Unknown key '{raw_key}' in config file '{path}'.{hint}")
        if key == "model":
            key = "model_id"
        if key in fields:
            try:
                value = TypeAdapter(fields[key].annotation).validate_python(value)
            except ValidationError as exc:
                reason = exc.errors()[0].get("msg", "invalid value")
                raise CliError(f"Config file '{path}': {raw_key} = {value!r} is invalid ({reason}).") from exc
        elif key in _RUN_KEYS:
            problem = _run_option_problem(key, value)
            if problem:
                raise CliError(f"Config file '{path}': {raw_key} = {value!r} is invalid ({problem}).")
        out[key] = value
    return out


MAX_FPS = 1000  # a frame rate beyond this is a typo (and gives a video no player can show)


def _run_option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the run option ``key`` (input, output, frames, fps); None if it can."""
    if key in ("input", "output"):
        return None if isinstance(value, str) and value else "expected a path"
    if key == "fps" and isinstance(value, str):  # a rate as a fraction, e.g. "30000/1001"
        try:
            value = float(Fraction(value))
        except (ValueError, ZeroDivisionError):
            return "expected a frame rate such as 30 or 30000/1001"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number"
    if key == "frames":
        return None if isinstance(value, int) and value >= 1 else "expected a whole number of frames, at least 1"
    return None if math.isfinite(value) and 0 < value <= MAX_FPS else f"expected a frame rate above 0, at most {MAX_FPS}"


def resolve_run_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline parameters, run options): defaults < config file < flags."""
    file_values = load_config_file(args.config) if args.config else {}
    run_opts = {k: file_values.pop(k) for k in _RUN_KEYS if k in file_values}
    for key in _RUN_KEYS:
        if getattr(args, key, None) is not None:
            run_opts[key] = getattr(args, key)
            problem = _run_option_problem(key, run_opts[key])
            if problem:
                raise CliError(f"--{key} {run_opts[key]}: {problem}.", EXIT_USAGE)
    flags = _flag_values(args)
    if "prompt" in flags:  # a prompt flag replaces the file's prompt list
        file_values.pop("prompts", None)
    if getattr(args, "lora", None):  # --lora flags replace the file's list
        flags["loras"] = [_lora_flag(value) for value in args.lora]
    if getattr(args, "lora_merge_mode", None):
        flags["lora_merge_mode"] = args.lora_merge_mode
    return {**file_values, **flags}, run_opts


def _lora_flag(value: str) -> dict[str, Any]:
    """``PATH`` or ``PATH=SCALE`` -> Scope's LoRA entry (an existing path may itself contain '=')."""
    path, sep, scale = value.rpartition("=")
    if not sep or Path(value).expanduser().exists():
        return {"path": value}
    try:
        number = float(scale)
    except ValueError:
        if Path(path).expanduser().exists():
            raise CliError(f"--lora {value}: '{scale}' is not a scale. Fix: give a number, e.g. {path}=0.8") from None
        return {"path": value}  # an '=' that belongs to the path
    if not math.isfinite(number):
        raise CliError(f"--lora {value}: the scale must be a finite number, e.g. {path}=0.8")
    return {"path": path, "scale": number}


# ----- run -------------------------------------------------------------------------------------------


def _check_device(name: str | None) -> None:
    """CUDA/MPS asked for but absent: one clear line before any model is loaded (the pipeline's check)."""
    from .pipeline import _pick_device

    try:
        _pick_device(name)
    except (RuntimeError, ValueError) as exc:
        raise CliError(str(exc)) from exc


def _within_range(params: dict[str, Any], *names: str) -> list:
    """Load parameters clamped as the pipeline will (warned once here; it then sees the clean values)."""
    from .parameters import ParameterCoercer
    from .schema import StreamDiffusionConfig

    coercer = ParameterCoercer(StreamDiffusionConfig)
    defaults = coercer.defaults()
    for name in names:
        params[name] = coercer.coerce(name, params.get(name, defaults[name]), defaults[name])
    return [params[name] for name in names]


def _default_output(input_spec: str | None, kind_hint: str) -> str:
    from .video_io import is_webcam

    if input_spec is None or input_spec == "testpattern":
        return "testpattern-streamdiffusion.mp4"
    if input_spec == "text":
        return "text-streamdiffusion" + (".png" if kind_hint == "image" else ".mp4")
    if is_webcam(input_spec):
        return "webcam-streamdiffusion.mp4"
    path = Path(input_spec)
    if kind_hint == "folder":
        return f"{path.name}-streamdiffusion/"
    if kind_hint == "image":
        return f"{path.stem}-streamdiffusion.png"
    return f"{path.stem}-streamdiffusion.mp4"


def stream_lag_calls(pipe, img2img: bool = True) -> int:
    """How many calls an output lags its input: n-1 in stream-batch mode with n steps, else 0."""
    settings = pipe.engine.settings
    if not settings.use_denoising_batch:
        return 0
    if img2img and settings.strength <= 0.0 and not settings.t_index_list:  # strength 0 returns the input as is
        return 0
    return max(len(settings.timesteps(img2img)) - 1, 0)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = q / 100 * (len(sorted_values) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


@contextlib.contextmanager
def _signals_handled(handler, *signums):
    """``handler`` for ``signums`` inside the block (main thread only: Python sets handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            if old is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(signum, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# While the output file is finalised a second Ctrl-C (or a TERM) must not leave it half-written.
_finalising = functools.partial(_signals_handled, signal.SIG_IGN, signal.SIGINT, signal.SIGTERM)
# `kill`/`docker stop` (SIGTERM) stops a run as Ctrl-C does: the video is finalised, not lost.
_term_as_interrupt = functools.partial(_signals_handled, _interrupt, signal.SIGTERM)


class _Runner:
    """Feeds frames to the pipeline in groups of ``frame_buffer_size`` and writes aligned outputs.

    Stream batch with n steps returns, for each call that runs the model, the frames that went in
    n-1 such calls earlier (the first n-1 calls return frame 0). A call the similar-image filter skips
    runs nothing: its frames show what the last group that ran shows, which comes out later. So the
    runner numbers the groups that ran, remembers for each input group which of those it shows, and
    writes each output once it has come out. Once the input ends it feeds the last frame n-1 more
    times, so output frame k always belongs to input frame k and the output has exactly as many
    frames as the input.
    """

    def __init__(self, pipe, writer, source, progress):
        self.pipe, self.writer, self.source, self.progress = pipe, writer, source, progress
        self.group_size = pipe.frame_buffer_size
        self.text = source.text  # text-to-image: no input frames
        self.lag_calls = stream_lag_calls(pipe, img2img=not self.text)
        self.ran = 0  # calls that ran the model
        self.pending: collections.deque[tuple[int, int]] = collections.deque()  # (group that ran, frames to write)
        self.results: dict[int, list] = {}  # outputs of the groups that ran, until written
        self.frames_in = 0
        self.frames_out = 0
        # Bounded: a webcam may stream for days. Percentiles cover the most recent calls.
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.calls = 0
        self.busy_s = 0.0

    def _call(self, frames: list, count: int, **params) -> None:
        """One call with ``frames``, of which the first ``count`` are input frames to write (0: a flush)."""
        from .video_io import uint8_frame

        engine = getattr(self.pipe, "engine", None)
        skipped_before = getattr(engine, "frames_skipped", 0)
        start = time.perf_counter()
        out = self.pipe(video=None if self.text else frames, **params)["video"]
        outputs = uint8_frame(out)  # the whole call at once, to the CPU: also waits for the GPU
        elapsed = time.perf_counter() - start
        self.latencies.append(elapsed)
        self.calls += 1
        self.busy_s += elapsed
        if self.ran and getattr(engine, "frames_skipped", 0) > skipped_before:
            shows = self.ran - 1  # skipped: these frames show the last group that ran
        else:
            shows = self.ran
            if self.ran >= self.lag_calls:
                self.results[self.ran - self.lag_calls] = outputs
            self.ran += 1
        if count:
            self.pending.append((shows, count))
        self._write_ready()

    def _write_ready(self) -> None:
        while self.pending and self.pending[0][0] in self.results:
            shows, count = self.pending.popleft()
            for frame in self.results[shows][:count]:
                # Output k shows input frame k: its capture time is the oldest one not yet written.
                stamp = self.source.timestamps.popleft() if self.source.live else None
                self.writer.write(frame, stamp)
                self.frames_out += 1
        # Kept: what the oldest pending group shows, or (none pending) the last group that ran, which the
        # next group shows if it is skipped.
        needed = self.pending[0][0] if self.pending else self.ran - 1
        for done in [k for k in self.results if k < needed]:
            del self.results[done]

    def run(self) -> None:
        group: list = []
        last = None
        for frame in self.source.frames:
            group.append(frame)
            last = frame
            self.frames_in += 1
            if len(group) == self.group_size:
                self._call(group, len(group))
                self.progress.update(len(group))
                self._postfix()
                group = []
        if self.frames_in == 0:
            raise CliError(f"Input '{self.source.name}' gave no frames. Fix: check that it plays, or give another --input.")
        if group:  # a short last group: pad it with its last frame (those outputs are cut)
            self._call(group + [last] * (self.group_size - len(group)), len(group))
            self.progress.update(len(group))
        # Flush the frames still in flight. Filter off: the repeated frame would be "similar" and skipped.
        for _ in range(self.lag_calls):
            self._call([last] * self.group_size, 0, similar_image_filter=False)

    def _postfix(self) -> None:
        if self.latencies:
            self.progress.set_postfix_str(f"{self.latencies[-1] * 1000:.0f} ms/call", refresh=False)


def _check_writable(output: str, kind: str) -> None:
    """An output that cannot be written: one line now, not after the model loaded and every frame ran."""
    target = Path(output).expanduser()
    if kind != "folder" and target.is_dir():
        raise CliError(f"Output '{output}' is a folder. Fix: name a file, or end the path with '/' for images.")
    if kind == "folder" and target.exists() and not target.is_dir():
        raise CliError(f"Output '{output}' is a file, not a folder. Fix: choose another --output.")
    existing = target if kind == "folder" else target.parent
    while not existing.exists():  # missing folders are made: the first one that exists must take a file
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise CliError(f"Cannot write '{output}': no file can be made in '{existing}' ({exc.strerror}). "
                       "Fix: choose another --output.") from exc


def _open_pipeline(params: dict[str, Any]):
    from .engine import ModelLoadError
    from .pipeline import StreamDiffusionPipeline

    try:
        return StreamDiffusionPipeline(**params)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from .engine.frames import snap_to_multiple
    from .video_io import open_source, open_writer, output_kind

    params, opts = resolve_run_settings(args)
    _check_device(params.get("device"))
    input_spec = opts.get("input")
    # The test pattern is made at the size the pipeline will run at.
    width, height = (snap_to_multiple(v) for v in _within_range(params, "width", "height"))
    source = open_source(input_spec, width=width, height=height, frames=opts.get("frames"), fps=opts.get("fps"))
    try:
        output = opts.get("output") or _default_output(input_spec, "folder" if input_spec and Path(input_spec).is_dir()
                                                      else ("image" if source.total == 1 else "video"))
        kind = output_kind(output)
        if kind == "image" and source.total != 1:
            raise CliError(f"Output '{output}' is one image but the input has several frames. Fix: write a "
                           "video (out.mp4) or a folder (out/).")
        if input_spec and not source.text and \
                Path(output).expanduser().resolve() == Path(input_spec).expanduser().resolve():
            raise CliError("The output would overwrite the input. Fix: choose another --output.")
        _check_writable(output, kind)
        _hide_library_progress_bars(args.debug)
        model = params.get("model_id", "stabilityai/sd-turbo")
        _status(args, f"Loading {model} ...")
        start = time.perf_counter()
        pipe = _open_pipeline(params)
        load_s = time.perf_counter() - start
        writer = open_writer(output, width=pipe.width, height=pipe.height, fps=source.fps, audio=source.audio,
                             variable_rate=source.live)
        summary = _stream(args, pipe, source, writer, output, load_s)
    finally:
        source.close()
    _print_summary(args, summary)
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def _stream(args, pipe, source, writer, output: str, load_s: float) -> dict[str, Any]:
    from tqdm import tqdm

    interrupted = False
    progress = tqdm(total=source.total, unit="frame", desc="run", dynamic_ncols=True, file=sys.stderr,
                    disable=args.no_progress, smoothing=0.1)
    runner = _Runner(pipe, writer, source, progress)
    start = time.perf_counter()
    try:
        with _redirect_logging_to(progress):
            runner.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wall = time.perf_counter() - start
        progress.close()
        with _finalising():
            writer.close()
    if interrupted:
        print(f"{PROG}: interrupted: kept the {runner.frames_out} frames done so far in {output}", file=sys.stderr)
    for warning in getattr(writer, "warnings", []):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    lat = sorted(runner.latencies)
    busy, calls = runner.busy_s, runner.calls
    return {
        "input": source.name,
        "output": str(output),
        "width": pipe.width,
        "height": pipe.height,
        "source_fps": float(source.fps),
        "frames_in": runner.frames_in,
        "frames_out": runner.frames_out,
        "frames_skipped": int(getattr(pipe.engine, "frames_skipped", 0)),
        "lag_frames": runner.lag_calls * runner.group_size,
        "calls": calls,
        "frames_per_call": runner.group_size,
        "latency_ms": {"mean": 1000 * busy / calls if calls else 0.0,
                       "p50": 1000 * _percentile(lat, 50), "p99": 1000 * _percentile(lat, 99)},
        "fps": runner.frames_in / wall if wall > 0 else 0.0,
        "pipeline_fps": calls * runner.group_size / busy if busy > 0 else 0.0,
        "wall_s": wall,
        "load_s": load_s,
        "interrupted": interrupted,
    }


def _print_summary(args, s: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(s, indent=2))
        return
    lat = s["latency_ms"]
    per = f" (per call of {s['frames_per_call']} frames)" if s["frames_per_call"] > 1 else ""
    print(f"frames    {s['frames_in']} in, {s['frames_out']} out, {s['frames_skipped']} skipped by the "
          f"similar-image filter")
    print(f"latency   mean {lat['mean']:.1f} ms, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms{per}")
    print(f"fps       {s['fps']:.1f} end to end, {s['pipeline_fps']:.1f} in the pipeline "
          f"({s['wall_s']:.1f} s; model load {s['load_s']:.1f} s)")
    print(f"output    {s['output']} ({s['width']}x{s['height']} at {s['source_fps']:g} fps)"
          + (" - interrupted" if s["interrupted"] else ""))


@contextlib.contextmanager
def _redirect_logging_to(progress):
    """Library warnings during the run go through tqdm.write so they don't break the bar."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # very old tqdm
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.getLogger("scope_streamdiffusion")]):
        yield


def _status(args, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr, flush=True)


def _hide_library_progress_bars(debug: bool) -> None:
    """diffusers/transformers draw loading bars; the CLI has its own progress."""
    if debug:
        return
    for name in ("diffusers", "transformers"):
        try:
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass


# Libraries that print their log records through handlers of their own. Other libraries' records reach
# the root logger, whose handler the CLI sets up to show only this package's (see main).
_LIBRARIES_WITH_HANDLERS = ("diffusers", "transformers", "huggingface_hub", "torch")


_VERBOSITY_VARIABLES = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY")


def _quiet_libraries() -> None:
    """Without --debug, libraries' log lines and Python warnings stay off stderr: a failure still shows,
    as the one-line error main makes of its exception (and torch.cuda's warnings, which explain a GPU
    that is not found, stay)."""
    for name in _VERBOSITY_VARIABLES:  # the level each library sets when it is first imported
        os.environ.setdefault(name, "critical")
    importlib.import_module("torch")  # its import sets its loggers' levels (every command imports it anyway)
    for name in _LIBRARIES_WITH_HANDLERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if not sys.warnoptions:  # python -W or PYTHONWARNINGS still decide
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"torch\.cuda")


def _from_this_package(record: logging.LogRecord) -> bool:
    return record.name.partition(".")[0] == logger.name or record.levelno >= logging.CRITICAL


@contextlib.contextmanager
def _command_output(debug: bool, restore: bool):
    """The command's stderr: its log handler (as logging.basicConfig: only where none is set up) showing,
    without --debug, only this package's records. With ``restore`` (main called from Python) the
    process's logging, warnings filters and environment (:func:`_quiet_libraries` changes them) are as
    before afterwards."""
    root = logging.getLogger()
    saved_levels = {name: logging.getLogger(name).level for name in ("", *_LIBRARIES_WITH_HANDLERS)}
    saved_env = {name: os.environ.get(name) for name in _VERBOSITY_VARIABLES}
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        if not debug:
            handler.addFilter(_from_this_package)
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.WARNING)
    with contextlib.ExitStack() as stack:
        if restore:
            stack.enter_context(warnings.catch_warnings())
        try:
            yield
        finally:
            if restore:
                if handler is not None:
                    root.removeHandler(handler)
                for name, level in saved_levels.items():
                    logging.getLogger(name or None).setLevel(level)
                for name, value in saved_env.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


# ----- info ------------------------------------------------------------------------------------------

def _known_models() -> dict[str, list[str]]:
    from .schema import SD_TURBO_FILES, TAESD_FILES

    # SDXL: SD's files plus the second text encoder and its tokenizer (the folder must load on its own).
    second = [f.replace("text_encoder/", "text_encoder_2/").replace("tokenizer/", "tokenizer_2/")
              for f in SD_TURBO_FILES if f.startswith(("text_encoder/", "tokenizer/"))]
    return {
        "stabilityai/sd-turbo": SD_TURBO_FILES,
        "madebyollin/taesd": TAESD_FILES,
        "madebyollin/taesdxl": TAESD_FILES,
        "stabilityai/sdxl-turbo": SD_TURBO_FILES + second,
        "latent-consistency/lcm-lora-sdv1-5": ["pytorch_lora_weights.safetensors"],
        "latent-consistency/lcm-lora-sdxl": ["pytorch_lora_weights.safetensors"],
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _file_present(root: Path | None, repo: str, filename: str) -> bool:
    # Either weight variant counts: fp16 files for GPUs, plain ones for CPUs.
    names = {filename, filename.replace(".fp16.", ".")}
    if root is not None:
        return any((root / n).is_file() for n in names)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _presence(root: Path | None, repo: str, files: list[str]) -> str:
    found = sum(_file_present(root, repo, f) for f in files)
    return "complete" if found == len(files) else ("partial" if found else "missing")


def gather_info() -> dict[str, Any]:
    import platform

    import torch
    from huggingface_hub import constants

    from .engine.models import scope_models_dir

    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": prop.name, "memory_gb": round(prop.total_memory / 2**30, 1),
                         "capability": f"{prop.major}.{prop.minor}"})
    accel: dict[str, dict[str, Any]] = {}
    xformers_version = _version("xformers")
    accel["xformers"] = {"installed": xformers_version, "usable": bool(xformers_version and cuda and _importable("xformers")),
                         "note": None if xformers_version else "pip install xformers (matching your torch)"}
    triton = _importable("triton")
    accel["torch.compile"] = {"installed": torch.__version__, "usable": bool(triton and cuda),
                              "note": None if triton and cuda else ("needs CUDA" if not cuda else "needs triton")}
    trt = _importable("tensorrt")
    accel["tensorrt"] = {"installed": _version("tensorrt") or (_tensorrt_version() if trt else None),
                         "usable": bool(trt and cuda),
                         "note": "pip install 'scope-streamdiffusion[tensorrt]'" if not trt else
                         (None if _importable("onnx") else "pip install onnx (to build engines)")}
    scope_dir = scope_models_dir()
    models = []
    for repo, files in _known_models().items():
        local = scope_dir / repo.split("/")[-1]
        models.append({"id": repo, "scope_dir": _presence(local, repo, files) if local.is_dir() else "missing",
                       "hf_cache": _presence(None, repo, files)})
    # Same rule as testing.tiny_models.default_cache_dir (not imported: it loads diffusers).
    tiny = Path(os.environ.get("SCOPE_STREAMDIFFUSION_CACHE") or Path.home() / ".cache" / "scope-streamdiffusion")
    models.append({"id": "tiny-random", "cache": "built" if (tiny / "tiny-random" / "model_index.json").is_file()
                   else "built on first use"})
    return {
        "scope_streamdiffusion": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": {"available": cuda, "torch_cuda": torch.version.cuda, "gpus": gpus},
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "libraries": {name: _version(name) for name in
                      ("diffusers", "transformers", "compel", "peft", "accelerate", "huggingface_hub", "av")},
        "acceleration": accel,
        "auto_acceleration": _auto_acceleration(cuda),
        "model_dirs": {"scope": str(scope_dir), "scope_exists": scope_dir.is_dir(), "hf_cache": str(constants.HF_HUB_CACHE),
                       "hf_offline": bool(getattr(constants, "HF_HUB_OFFLINE", False)), "tiny_models": str(tiny)},
        "models": models,
    }


def _auto_acceleration(cuda: bool) -> str:
    """What ``acceleration="auto"`` runs on this machine's default device."""
    import torch

    from .engine.acceleration import resolve_acceleration

    return resolve_acceleration("auto", torch.device("cuda" if cuda else "cpu"))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - broken installs count as unusable
        return False


def _tensorrt_version() -> str | None:
    try:
        return importlib.import_module("tensorrt").__version__
    except Exception:  # noqa: BLE001
        return None


def cmd_info(args: argparse.Namespace) -> int:
    info = gather_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cuda = info["cuda"]
    print(f"scope-streamdiffusion {info['scope_streamdiffusion']}  Python {info['python']}  ({info['platform']})")
    print(f"torch {info['torch']}  CUDA {'yes (' + str(cuda['torch_cuda']) + ')' if cuda['available'] else 'no'}"
          f"{'  MPS yes' if info['mps'] else ''}")
    for gpu in cuda["gpus"]:
        print(f"  GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gb']} GiB, compute {gpu['capability']}")
    print("libraries  " + "  ".join(f"{k} {v or '-'}" for k, v in info["libraries"].items()))
    print("acceleration")
    for name, a in info["acceleration"].items():
        state = "usable" if a["usable"] else "not usable"
        note = f" ({a['note']})" if a["note"] else ""
        print(f"  {name:14} {state}{note}")
    print(f"  auto runs      {info['auto_acceleration']}")
    dirs = info["model_dirs"]
    print("model lookup (first match wins)")
    print(f"  Scope models dir  {dirs['scope']}{'' if dirs['scope_exists'] else ' (does not exist)'}")
    print(f"  Hugging Face cache  {dirs['hf_cache']}{' (offline)' if dirs['hf_offline'] else ''}")
    print(f"  tiny test models  {dirs['tiny_models']}")
    print("models")
    for m in info["models"]:
        if "cache" in m:
            print(f"  {m['id']:38} {m['cache']}")
        else:
            print(f"  {m['id']:38} Scope dir: {m['scope_dir']:8}  HF cache: {m['hf_cache']}")
    return 0


# ----- download --------------------------------------------------------------------------------------


def download_target_dir(explicit: str | None) -> Path | None:
    """Scope's models dir when Scope is set up here, else None (the Hugging Face cache)."""
    from .engine.models import scope_models_dir

    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("DAYDREAM_SCOPE_MODELS_DIR") or (Path.home() / ".daydream-scope").exists():
        return scope_models_dir()
    return None


def _allow_patterns(repo: str) -> list[str]:
    """Config/tokenizer files plus one weight file per component: fp16 safetensors if the repo has them."""
    known = _known_models()
    if repo in known:
        return list(known[repo])
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo)
    patterns = ["*.json", "*.txt"]
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:  # old repos: pickled weights, never the flax/onnx/tf copies
        weights = [f for f in files if f.endswith(".bin") and not f.split("/")[-1].startswith(("flax", "tf_"))]
    by_folder: dict[str, list[str]] = {}
    for f in weights:
        by_folder.setdefault(f.rsplit("/", 1)[0] if "/" in f else "", []).append(f)
    for folder_files in by_folder.values():
        fp16 = [f for f in folder_files if ".fp16." in f]
        patterns += fp16 or [f for f in folder_files if ".fp16." not in f]
    return patterns


def _hub_error(repo: str, exc: Exception) -> CliError:
    names = {cls.__name__ for cls in type(exc).__mro__}
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        names |= {cls.__name__ for cls in type(cause).__mro__}
    text = " ".join(str(exc).split())[:200]
    if "GatedRepoError" in names:
        return CliError(f"'{repo}' is gated on the Hugging Face hub. Fix: accept its licence on huggingface.co "
                        "and log in (`hf auth login` or HF_TOKEN).")
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError"}:
        return CliError(f"'{repo}' was not found on the Hugging Face hub. Fix: check the id (e.g. stabilityai/sd-turbo).")
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError", "Timeout",
                "TimeoutException", "ConnectTimeout", "ReadTimeout", "NameResolutionError", "MaxRetryError"} \
            or "offline" in text.lower():
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        return CliError(f"Cannot download '{repo}': the Hugging Face hub is unreachable{offline}. Fix: check the "
                        "internet connection (and HF_ENDPOINT / proxy settings), unset HF_HUB_OFFLINE, or copy the "
                        "model folder over from a machine that has it.")
    return CliError(f"Cannot download '{repo}' ({type(exc).__name__}: {text}).")


def cmd_download(args: argparse.Namespace) -> int:
    from .schema import DEFAULT_MODEL_ID

    repos = args.models or [DEFAULT_MODEL_ID, "madebyollin/taesd"]
    target = download_target_dir(args.dir)
    for repo in repos:
        if repo.startswith("tiny-random"):
            from .testing.tiny_models import ensure_tiny_model, ensure_tiny_taesd

            try:
                path = ensure_tiny_model(repo)
            except ValueError as exc:
                raise CliError(str(exc)) from exc
            ensure_tiny_taesd()
            print(f"{repo}: {path} (built locally)")
            continue
        from huggingface_hub import snapshot_download

        try:
            patterns = _allow_patterns(repo)
            if target is not None:
                path = snapshot_download(repo, allow_patterns=patterns, local_dir=str(target / repo.split("/")[-1]))
            else:
                path = snapshot_download(repo, allow_patterns=patterns)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
            raise _hub_error(repo, exc) from exc
        print(f"{repo}: {path}")
    return 0


# ----- bench (implemented in scope_streamdiffusion.bench) ----------------------------------------------


def _load_bench():
    try:
        return importlib.import_module("scope_streamdiffusion.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "scope_streamdiffusion.bench":
            raise
        return None


# ----- parser and main -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="StreamDiffusion (real-time Stable Diffusion on video) from the command line.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    # Subcommands accept --debug too; SUPPRESS keeps the top-level value when it is not repeated.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", parents=[common], help="stream a video, images, a webcam or a test pattern through the model",
        description="Stream frames through StreamDiffusion and write a video file or a folder of images. "
                    "Every engine parameter is a flag; a --config file supplies values, flags override it. "
                    + TINY_HELP)
    io = run.add_argument_group("input and output")
    io.add_argument("-i", "--input", default=None,
                    help="video file, image, folder of images, webcam:N or /dev/videoN, 'testpattern' "
                         "(a built-in moving pattern; the default) or 'text' (text-to-image from the prompt; one "
                         "image unless --frames says more, all alike for a fixed prompt and seed)")
    io.add_argument("-o", "--output", default=None,
                    help="video file (.mp4 .mkv .mov .avi: h264, else mpeg4; .webm: VP9; the input's audio copied when the "
                         "container can hold it), animated .gif (no audio), one image (.png .jpg) for a one-frame "
                         "input, or a folder of PNG images (any other path, or one ending in '/'). Default: in the "
                         "current folder, named after the input, e.g. clip-streamdiffusion.mp4")
    io.add_argument("--frames", type=int, default=None, help="stop after N frames (the test pattern's length, default 120)")
    io.add_argument("--fps", type=float, default=None,
                    help="frame rate of images and the test pattern (default 30); videos keep their own")
    io.add_argument("--config", default=None, help="TOML or YAML file of parameters (flags override it)")
    io.add_argument("--json", action="store_true", help="print the summary as JSON")
    io.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar or notices")
    engine = run.add_argument_group("engine parameters (same names as the config; defaults from it)")
    engine.add_argument("--prompt", default=None, help="the prompt (a config file may give weighted 'prompts' instead)")
    for name, field in engine_fields().items():
        _add_field_flag(engine, name, field)
    lora = run.add_argument_group("LoRAs (a config file may give 'loras' as a list of {path, scale, merge_mode})")
    lora.add_argument("--lora", action="append", default=None, metavar="PATH[=SCALE]",
                      help="a LoRA file or folder (a name in Scope's lora folder works too), with its scale "
                           "(default 1.0); repeat for several")
    lora.add_argument("--lora-merge-mode", choices=["permanent_merge", "runtime_peft"], default=None,
                      help="fuse the LoRAs into the weights (fastest, the default) or keep them as adapters")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", parents=[common], help="versions, GPU, acceleration backends and models found")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=cmd_info)

    dl = sub.add_parser(
        "download", parents=[common], help="fetch model files (default: stabilityai/sd-turbo and madebyollin/taesd)",
        description="Fetch the files a model needs (fp16 diffusers weights, configs, tokenizer) into Scope's models "
                    "dir when DAYDREAM_SCOPE_MODELS_DIR is set or ~/.daydream-scope exists, else into the Hugging "
                    "Face cache. 'tiny-random' is built locally instead.")
    dl.add_argument("models", nargs="*", metavar="MODEL", help="Hugging Face ids")
    dl.add_argument("--dir", default=None, help="download into DIR/<repo name> instead")
    dl.set_defaults(func=cmd_download)

    bench = sub.add_parser("bench", parents=[common], help="measure fps and latency (see BENCHMARKS.md)")
    bench.set_defaults(func=None)
    parser._bench_parser = bench  # filled by scope_streamdiffusion.bench when `bench` is the command
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _exit_now(signum, frame):
    """Ctrl-C while the process exits (the command done, its output finalised): exit at once and quietly,
    not with the traceback of the exit hook it lands in (e.g. the wait for a background compilation)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # this process's command line (main from Python passes its argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _command_output("--debug" in argv, restore=not as_program):
            return _main(argv)
    finally:
        if as_program and threading.current_thread() is threading.main_thread():
            # Exit hooks run last-registered first (this one after every module the command imported
            # registered its own): from the first of them on, a Ctrl-C ends the process at once.
            atexit.register(signal.signal, signal.SIGINT, _exit_now)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    bench = None
    if _command_of(argv) == "bench":
        bench = _load_bench()
        if bench is None:
            print(f"{PROG}: error: the bench command is not available in this install "
                  "(scope_streamdiffusion.bench is missing)", file=sys.stderr)
            return EXIT_USAGE
        bench.add_arguments(parser._bench_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _term_as_interrupt():
            if not args.debug:  # after parsing: --help needs no torch
                _quiet_libraries()
            if bench is not None:
                return int(bench.run(args) or 0)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become one line
        if args.debug:
            raise
        from .video_io import MediaError

        code = exc.code if isinstance(exc, CliError) else EXIT_ERROR
        known = isinstance(exc, (CliError, MediaError)) or type(exc).__name__ == "ModelLoadError"
        message = _one_line(exc) if known else f"{type(exc).__name__}: {_one_line(exc)} (run with --debug for details)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
