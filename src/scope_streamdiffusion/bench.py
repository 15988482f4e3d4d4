"""``scope-streamdiffusion bench``: frames per second, latency and VRAM per workload and acceleration mode.

Each frame is timed the way Scope runs it: a (1, H, W, 3) uint8 frame already on the device goes
through ``pipe(video=[frame])`` and comes back as the float (1, H, W, 3) output, with a device sync
per frame (latency). Baselines in the same run: diffusers ``AutoPipelineForImage2Image`` (or
text-to-image) built from the same components, fp16, SDPA, with cached prompt embeddings, and this
project's ``"none"`` mode; the ratios are printed.

``--random-weights`` builds the true SD1.5 / SD2.1 / SDXL architectures with random weights (once,
cached as diffusers folders) and loads them through the normal model path, so the bench runs with
no download. Also ``python -m scope_streamdiffusion.bench``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .cli import _percentile

logger = logging.getLogger("scope_streamdiffusion.bench")

MODES = ("none", "xformers", "cudagraph", "compile", "tensorrt")
DEFAULT_MODES = "none,cudagraph,compile"


@dataclass(frozen=True)
class Workload:
    arch: str  # random-weight architecture alias (testing.architectures)
    size: int
    img2img: bool
    settings: dict = field(default_factory=dict)
    target_fps: float | None = None
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    "sd-turbo-img2img": Workload("sd-turbo", 512, True, dict(num_inference_steps=1, strength=0.5, guidance_scale=1.0,
                                                             cfg_type="none"), 180.0, "SD-Turbo 1 step, TAESD"),
    "sd-turbo-txt2img": Workload("sd-turbo", 512, False, dict(num_inference_steps=1, guidance_scale=1.0,
                                                              cfg_type="none"), 220.0, "SD-Turbo 1 step, TAESD"),
    "sd15-lcm4-self": Workload("sd15", 512, True, dict(num_inference_steps=4, strength=0.8, guidance_scale=1.2,
                                                       cfg_type="self", delta=1.0, use_denoising_batch=True),
                               90.0, "SD1.5 (+LCM-LoRA fused) 4-step stream batch, self-CFG, TAESD"),
    "sdxl-turbo-512": Workload("sdxl-turbo", 512, True, dict(num_inference_steps=1, strength=0.5, guidance_scale=1.0,
                                                             cfg_type="none"), None, "SDXL-Turbo 1 step, TAESD-XL"),
    "sdxl-turbo-1024": Workload("sdxl-turbo", 1024, True, dict(num_inference_steps=1, strength=0.5,
                                                               guidance_scale=1.0, cfg_type="none"),
                                30.0, "SDXL-Turbo 1 step, TAESD-XL"),
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--workloads", default="sd-turbo-img2img,sd-turbo-txt2img,sd15-lcm4-self",
                        help=f"comma list of {', '.join(WORKLOADS)} or 'all'")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma list of acceleration modes ({', '.join(MODES)})")
    parser.add_argument("--model", default=None, help="Hugging Face id or diffusers folder used for every workload")
    parser.add_argument("--random-weights", nargs="?", const="auto", default=None, metavar="sd15|sd21|sdxl",
                        help="random weights of the true architecture (no download); without a value each workload "
                             "uses its own (SD-Turbo: sd21, LCM: sd15, SDXL-Turbo: sdxl)")
    parser.add_argument("--tiny-vae-id", default=None, help="TAESD id or folder (default: the model family's)")
    parser.add_argument("--no-tiny-vae", action="store_true", help="use the model's full VAE")
    parser.add_argument("--width", type=int, default=None, help="override the workload's size")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--source-size", default=None, metavar="WxH",
                        help="size of the input frames, e.g. 1280x720 as a webcam sends them to Scope (default: "
                             "the stream's); the pipeline resizes them, the diffusers baseline gets them resized")
    parser.add_argument("--frame-buffer-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=100, help="timed frames per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed frames first (compilation, capture)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    parser.add_argument("--check", action="store_true",
                        help="correctness: seed determinism, batch == sequential, agreement with 'none', no "
                             "re-capture/re-compile on runtime parameter changes")
    parser.add_argument("--modulate", action="store_true",
                        help="move strength on every img2img call as Scope's beat sync does (the workload's "
                             "strength +- 0.25 on a sine, three decimals), passed with the frames as Scope passes it")
    parser.add_argument("--profile", action="store_true", help="profile a few frames per mode (kernel time, top ops)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--cache-dir", default=None, help="where random-weight models are kept")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-' = stdout)")
    return parser


# ----- helpers -------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "triton", "compel", "tensorrt", "xformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return out


def _hardware(device) -> dict:
    info = {"device": str(device), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    return info


def _free(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_frames(count: int, height: int, width: int, device, seed: int = 0):
    """Distinct smooth random (1, H, W, 3) uint8 frames on ``device``."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator("cpu").manual_seed(seed)
    frames = []
    for _ in range(count):
        base = torch.rand(1, 3, max(1, height // 16), max(1, width // 16), generator=gen)
        img = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
        frames.append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(device))
    return frames


def random_weight_model(arch: str, cache_dir: Path, device) -> tuple[Path, Path]:
    """(model folder, TAESD folder) of ``arch`` with random weights, built once."""
    import torch

    from .testing.architectures import build_pipeline_folder

    folder = Path(cache_dir) / f"{arch}-fp16"
    if not (folder / "random_weights.json").exists():
        logger.info("building random-weight %s into %s", arch, folder)
        build_pipeline_folder(arch, folder, dtype=torch.float16, tiny_vae=True,
                              device="cuda" if device.type == "cuda" else "cpu")
        _free(device)
    return folder, folder / "taesd"


def _resolve_arch(workload: Workload, forced: str) -> str:
    from .testing.architectures import resolve_kind

    if forced in (None, "auto"):
        return workload.arch
    return workload.arch if resolve_kind(forced) == resolve_kind(workload.arch) else resolve_kind(forced)


# ----- one workload x mode -------------------------------------------------------------------------
class Runner:
    def __init__(self, args, device, dtype_name):
        self.args, self.device, self.dtype_name = args, device, dtype_name

    def pipeline(self, name: str, wl: Workload, model_id: str, tiny_vae_id, mode: str, width: int, height: int):
        from .pipeline import StreamDiffusionPipeline
        from .schema import DEFAULT_PROMPT

        kwargs = dict(model_id=model_id, width=width, height=height, acceleration=mode,
                      use_tiny_vae=not self.args.no_tiny_vae, tiny_vae_id=tiny_vae_id, seed=42,
                      frame_buffer_size=self.args.frame_buffer_size, prompt=DEFAULT_PROMPT, **wl.settings)
        if self.args.device:
            kwargs["device"] = self.args.device
        if self.dtype_name:
            kwargs["dtype"] = self.dtype_name
        return StreamDiffusionPipeline(**kwargs)

    def time_calls(self, call, inputs, warmup: int, frames: int) -> dict:
        """``frames`` timed calls of ``frame_buffer_size`` frames each; fps counts frames, latency calls."""
        per_call = self.args.frame_buffer_size
        _sync(self.device)
        start = time.perf_counter()
        first = None
        for i in range(max(warmup, 1)):
            call(inputs[i % len(inputs)])
            _sync(self.device)
            if first is None:
                first = time.perf_counter() - start
        warm_total = time.perf_counter() - start
        lat = []
        t_all = time.perf_counter()
        for i in range(frames):
            t0 = time.perf_counter()
            call(inputs[i % len(inputs)])
            _sync(self.device)
            lat.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        ordered = sorted(lat)
        p50, p99 = _percentile(ordered, 50), _percentile(ordered, 99)
        return dict(calls=frames, frames_per_call=per_call, first_frame_s=round(first, 3),
                    warmup_s=round(warm_total, 3), p50_ms=round(p50 * 1e3, 3), p99_ms=round(p99 * 1e3, 3),
                    mean_ms=round(total / frames * 1e3, 3), fps_p50=round(per_call / p50, 2),
                    fps=round(per_call * frames / total, 2), p99_over_p50=round(p99 / p50, 3))

    def peak_vram(self) -> dict:
        import torch

        if self.device.type != "cuda":
            return {}
        return dict(peak_vram_gb=round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3),
                    peak_reserved_gb=round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3))


# What the graph modes did to TAESD (engine/taesd.py), recorded with each result.
TAESD_REWRITES = ("fused_taesd_relus", "taesd_input_layout", "folded_taesd_upsamples", "padded_taesd_convs")


def _pipeline_call(pipe, wl: Workload, modulate: bool):
    """One Scope call per group of frames; with ``modulate`` each img2img call moves strength too."""
    if not (modulate and wl.img2img):
        return (lambda group: pipe(video=group)) if wl.img2img else (lambda group: pipe())
    calls = itertools.count()
    base = wl.settings.get("strength", 1.0)

    def call(group):
        strength = round(min(base + 0.25 * math.sin(next(calls) / 7), 1.0), 3)
        return pipe(video=group, strength=strength)

    return call


def _compile_cache_counts() -> dict:
    """Inductor's and AOTAutograd's on-disk cache hits, misses and bypasses so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return {f"{group}.{key}": int(n) for group in ("inductor", "aot_autograd")
                for key, n in counters[group].items() if "cache" in key}
    except Exception:  # noqa: BLE001
        return {}


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


def _profile(pipe, call, inputs, device, frames: int = 10, per_call: int = 1) -> dict:
    """Kernel time and launches per frame over ``frames`` calls of ``per_call`` frames."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(frames):
            call(inputs[i % len(inputs)])
        _sync(device)
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, attr, 0) > 0 and e.key and not e.key.startswith(("cuda", "aten::"))]
    kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, attr, 0)) for e in kernels)
    top = sorted(kernels, key=lambda e: -getattr(e, "self_device_time_total", getattr(e, attr, 0)))[:15]
    n = frames * per_call
    return dict(
        calls=frames, frames_per_call=per_call,
        graph_replay_ms_per_call=_graph_replay_ms(pipe, device),
        kernel_ms_per_frame=round(kernel_us / 1e3 / n, 3),
        kernel_launches_per_frame=round(sum(e.count for e in kernels) / n, 1),
        top_kernels=[dict(name=e.key[:90], ms_per_frame=round(getattr(e, "self_device_time_total", 0) / 1e3 / n, 3),
                          calls_per_frame=round(e.count / n, 1)) for e in top],
        kernel_kinds=_kernel_kinds(kernels, n),
    )


# Kernel families by name: where a lever can act (inductor's own kernels, cuDNN, cuBLAS, attention).
_KINDS = (("triton", ("triton_",)), ("attention", ("sdpa", "flash", "fmha", "attention")),
          ("convolution", ("fprop", "conv", "implicit_gemm")), ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma")),
          ("memset/copy", ("memset", "memcpy", "copy")))


def _kernel_kinds(kernels, n: int) -> dict:
    """{kind: {ms_per_frame, calls_per_frame}} over the profiled kernels (the first matching kind)."""
    kinds: dict = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in _KINDS if any(w in name for w in words)), "other")
        entry = kinds.setdefault(kind, [0.0, 0])
        entry[0] += getattr(e, "self_device_time_total", 0)
        entry[1] += e.count
    return {k: dict(ms_per_frame=round(us / 1e3 / n, 3), calls_per_frame=round(c / n, 1))
            for k, (us, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


def _graph_replay_ms(pipe, device, replays: int = 50):
    """Median time of the captured step graph replayed back to back (no host work in between):
    what a call costs on the GPU alone, so ``p50 - this`` is the host's share (conversion, parameter
    handling, launches outside the graph, the sync)."""
    import torch

    runner = getattr(pipe, "engine", None) and pipe.engine.models.extras.get("step_runner")
    graphs = runner.graphs() if runner is not None and device.type == "cuda" else []
    if len(graphs) != 1:
        return None
    graph = graphs[0]
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return round(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), 3)


def _source_size(text, width: int, height: int) -> tuple[int, int]:
    """``--source-size`` "WxH" -> (w, h); the stream's size when not given."""
    if not text:
        return width, height
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--source-size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 1 or h < 1:
        raise SystemExit(f"--source-size {text!r}: both sides must be at least 1")
    return w, h


def _unique_numel(module) -> int:
    """Parameters counted once per storage: fused attention projections are views of one weight."""
    seen = {}
    for p in module.parameters():
        try:
            key, count = (p.untyped_storage().data_ptr(), p.device), p.untyped_storage().nbytes() // p.element_size()
        except RuntimeError:  # tensor subclasses (fp8 weights) have no plain storage
            key, count = id(p), p.numel()
        seen.setdefault(key, count)
    return sum(seen.values())


def _max_abs(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _run_check(pipe, wl: Workload, inputs, none_ref):
    """Correctness of one mode on one workload (see --check)."""
    import torch

    engine = pipe.engine
    k = 4
    feed = (lambda i: dict(video=inputs[i % len(inputs)])) if wl.img2img else (lambda i: {})

    def run(count, **first):
        outs = []
        for i in range(count):
            kw = feed(i)
            if i == 0:
                kw.update(first, init_cache=True)
            outs.append(pipe(**kw)["video"].detach().cpu())
        return outs

    result = {}
    a, b = run(k), run(k)
    result["determinism_max_abs"] = max(_max_abs(x, y) for x, y in zip(a, b))
    result["nan_or_inf"] = bool(any(not torch.isfinite(x).all() for x in a))
    if none_ref is not None:
        result["vs_none_max_abs"] = max(_max_abs(x, y) for x, y in zip(a, none_ref))
    other = run(k, seed=43)
    result["seed_changes_output_max_abs"] = max(_max_abs(x, y) for x, y in zip(a, other))
    n = engine.settings.timesteps(wl.img2img).__len__()
    if n > 1 and wl.img2img:
        seq = run(k, seed=42, use_denoising_batch=False)
        batch = run(k, use_denoising_batch=True)
        result["batch_vs_sequential_max_abs"] = max(
            _max_abs(batch[j], seq[max(0, j - (n - 1))]) for j in range(k))
    # Runtime parameters must not re-capture nor re-compile.
    runner = engine.models.extras.get("step_runner")
    run(2, seed=42)
    captures, graphs = (runner.captures if runner else 0), _dynamo_graphs()
    g = engine.settings.guidance_scale
    changes = [dict(prompt="a photo of a red fox in the snow"), dict(seed=7), dict(delta=0.7),
               dict(guidance_scale=g + 0.3 if g > 1.0 else g), dict(strength=0.6)]
    before = run(1)[0]
    changed = []
    for change in changes:
        kw = feed(0)
        kw.update(change)
        changed.append(pipe(**kw)["video"].detach().cpu())
    result["runtime_changes_alter_output"] = bool(_max_abs(before, changed[-1]) > 0)
    result["recaptures_on_param_change"] = (runner.captures if runner else 0) - captures
    result["recompiles_on_param_change"] = _dynamo_graphs() - graphs
    return result, a


def run(args) -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = list(WORKLOADS) if args.workloads == "all" else [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad_modes = [m for m in modes if m not in MODES]
    if unknown or bad_modes:
        print(f"unknown workload(s) {unknown} / mode(s) {bad_modes}; workloads: {', '.join(WORKLOADS)}; "
              f"modes: {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.model is None and args.random_weights is None:
        print("pass --model MODEL_ID or --random-weights (no download)", file=sys.stderr)
        return 2
    if args.frames < 1 or args.frame_buffer_size < 1 or args.warmup < 0:
        print("--frames and --frame-buffer-size must be at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    from .pipeline import _pick_device, _pick_dtype

    try:
        device = _pick_device(args.device)  # the pipeline's choice and checks
    except (RuntimeError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    dtype_name = str(_pick_dtype(args.dtype, device)).removeprefix("torch.")
    from .engine.inductor import cache_root

    cache = Path(args.cache_dir) if args.cache_dir else cache_root() / "random-weights"
    report = dict(
        meta=dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
                  versions=_versions(), hardware=_hardware(device), dtype=dtype_name,
                  inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR")),
        results=[], checks=[], ratios=[],
    )

    def save():
        if args.json and args.json != "-":
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")

    bench = Runner(args, device, dtype_name)
    for name in names:
        wl = WORKLOADS[name]
        width, height = args.width or wl.size, args.height or wl.size
        arch = None
        tiny_vae_id = args.tiny_vae_id
        if args.model:
            model_id = args.model
        else:
            arch = _resolve_arch(wl, args.random_weights)
            t0 = time.perf_counter()
            folder, taesd = random_weight_model(arch, cache, device)
            model_id, tiny_vae_id = str(folder), tiny_vae_id or str(taesd)
            logger.info("%s: random-weight %s ready in %.1fs", name, arch, time.perf_counter() - t0)
        # 8 distinct frames; each call takes frame_buffer_size of them (Scope's groups), in rotation.
        fbs = args.frame_buffer_size
        source_w, source_h = _source_size(args.source_size, width, height)
        frames = make_frames(8, source_h, source_w, device)
        inputs = [[frames[(i * fbs + j) % len(frames)] for j in range(fbs)] for i in range(len(frames))]
        results: dict[str, dict] = {}
        none_ref = None
        for mode in (["diffusers"] if not args.no_baseline else []) + modes:
            row = dict(workload=name, mode=mode, model=model_id, arch=arch, width=width, height=height,
                       strength_modulated=args.modulate and wl.img2img and mode != "diffusers",
                       source_size=f"{source_w}x{source_h}",
                       img2img=wl.img2img, target_fps=wl.target_fps, note=wl.note, **wl.settings)
            # The opt-ins and library switches a figure was measured under.
            env = {k: v for k, v in sorted(os.environ.items()) if mode != "diffusers"
                   and k.startswith(("SCOPE_STREAMDIFFUSION_", "TORCH_BLAS", "TORCHINDUCTOR_"))}
            if env:
                row["env"] = env
            _free(device)
            caches_before = _compile_cache_counts()
            try:
                t0 = time.perf_counter()
                if mode == "diffusers":
                    call, pipe, extra = _diffusers_baseline(bench, name, wl, model_id, tiny_vae_id, width, height)
                else:
                    pipe = bench.pipeline(name, wl, model_id, tiny_vae_id, mode, width, height)
                    call = _pipeline_call(pipe, wl, args.modulate)
                    models = pipe.engine.models
                    extra = dict(acceleration=models.extras.get("acceleration"), unet_params=_unique_numel(models.unet),
                        fp8_linear_layers=models.extras.get("fp8_linear_layers"),
                        shared_projections=models.extras.get("shared_projections"),
                        gemm_small_convs=models.extras.get("gemm_small_convs"),
                        triton_group_norms=models.extras.get("triton_group_norms"),
                        taesd_rewrites={key: models.extras[key] for key in TAESD_REWRITES if key in models.extras})
                    if arch:
                        from .testing.architectures import PARAM_COUNTS, resolve_kind

                        extra["unet_params_expected"] = PARAM_COUNTS[f"unet:{resolve_kind(arch)}"]
                row["load_s"] = round(time.perf_counter() - t0, 3)
                row.update(extra)
                row.update(bench.time_calls(call, inputs, args.warmup, args.frames))
                for key in ("fused_residual_adds", "split_attentions"):  # counted as the graph passes run
                    if mode != "diffusers" and key in pipe.engine.models.extras:
                        row[key] = dict(pipe.engine.models.extras[key])
                row["startup_s"] = round(row["load_s"] + row["warmup_s"], 3)
                # Whether a restart found its compiled graphs on disk (a warm start should show hits only).
                caches = {k: n - caches_before.get(k, 0) for k, n in _compile_cache_counts().items()}
                row["compile_caches"] = {k: n for k, n in caches.items() if n}
                if mode != "diffusers":
                    runner = pipe.engine.models.extras.get("step_runner")
                    if runner is not None:
                        row.update(captures=runner.captures, capture_s=round(runner.capture_seconds, 3),
                                   graph_failed=runner.failed)
                row.update(bench.peak_vram())
                if args.profile:
                    row["profile"] = _profile(pipe, call, inputs, device, per_call=fbs)
                if args.check and mode != "diffusers":
                    check, outs = _run_check(pipe, wl, inputs, none_ref)
                    if mode == "none":
                        none_ref = outs
                    report["checks"].append(dict(workload=name, mode=mode, **check))
            except Exception as exc:  # noqa: BLE001 - record and go on with the next mode
                logger.exception("%s / %s failed", name, mode)
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            finally:
                pipe = call = models = None  # drop every reference: the next mode's peak VRAM is its own
                if mode == "compile":
                    try:
                        torch._dynamo.reset()
                    except Exception:  # noqa: BLE001
                        pass
                _free(device)
            results[mode] = row
            report["results"].append(row)
            print(_row_line(row), flush=True)
            save()
        report["ratios"].append(_ratios(name, results))
        save()
    print()
    print(format_table(report))
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    save()
    failed = [f"{row['workload']}/{row['mode']}" for row in report["results"] if row.get("error")]
    if failed:  # scripts and CI see a bench that measured nothing as failed
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _ratios(name, results) -> dict:
    out = dict(workload=name)
    base, none = results.get("diffusers", {}).get("fps_p50"), results.get("none", {}).get("fps_p50")
    for mode, row in results.items():
        fps = row.get("fps_p50")
        if not fps:
            continue
        if base and mode != "diffusers":
            out[f"{mode}/diffusers"] = round(fps / base, 2)
        if none and mode not in ("none", "diffusers"):
            out[f"{mode}/none"] = round(fps / none, 2)
    return out


def _row_line(row) -> str:
    if "error" in row:
        return f"{row['workload']:<18} {row['mode']:<10} ERROR {row['error'][:200]}"
    return (f"{row['workload']:<18} {row['mode']:<10} {row['fps_p50']:>8.1f} fps  p50 {row['p50_ms']:.2f} ms  "
            f"p99 {row['p99_ms']:.2f} ms  VRAM {row.get('peak_vram_gb', float('nan')):.2f} GB  "
            f"startup {row['startup_s']:.1f} s")


def format_table(report) -> str:
    head = "| workload | mode | fps (p50) | fps (mean) | p50 ms | p99 ms | p99/p50 | peak VRAM GB | startup s | target |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        target = f"≥{r['target_fps']:.0f}" if r.get("target_fps") else ""
        lines.append(f"| {r['workload']} | {r['mode']} | {r['fps_p50']:.1f} | {r['fps']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['p99_over_p50']:.2f} | {r.get('peak_vram_gb', float('nan')):.2f} | "
                     f"{r['startup_s']:.1f} | {target} |")
    for ratio in report["ratios"]:
        parts = [f"{k} {v}x" for k, v in ratio.items() if k != "workload"]
        if parts:
            lines.append(f"ratios {ratio['workload']}: " + ", ".join(parts))
    for c in report["checks"]:
        lines.append("check " + ", ".join(f"{k}={v}" for k, v in c.items()))
    return "\n".join(lines)


# ----- diffusers baseline --------------------------------------------------------------------------
def _diffusers_baseline(bench: Runner, name: str, wl: Workload, model_id, tiny_vae_id, width, height):
    """diffusers AutoPipelineForImage2Image / ForText2Image over the same components (eager, SDPA)."""
    import torch
    from diffusers import (
        AutoPipelineForImage2Image,
        EulerDiscreteScheduler,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from .engine.frames import fit
    from .engine.models import load_models

    device = bench.device
    dtype = getattr(torch, bench.dtype_name)
    models = load_models(model_id, device=device, dtype=dtype, use_tiny_vae=not bench.args.no_tiny_vae,
                         tiny_vae_id=tiny_vae_id, acceleration="none")
    source = models.extras["source"]
    from diffusers import DDPMScheduler

    try:
        config = EulerDiscreteScheduler.load_config(source, subfolder="scheduler")
    except Exception:  # noqa: BLE001
        config = DDPMScheduler().config
    steps = wl.settings.get("num_inference_steps", 1)
    scheduler = (LCMScheduler if steps > 1 else EulerDiscreteScheduler).from_config(config)
    sdxl = models.family.is_sdxl
    parts = dict(vae=models.vae, unet=models.unet, scheduler=scheduler, text_encoder=models.text_encoders[0],
                 tokenizer=models.tokenizers[0])
    if sdxl:
        t2i = StableDiffusionXLPipeline(text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1],
                                        force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt,
                                        add_watermarker=False, **parts)
    else:
        t2i = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      **parts)
    t2i.set_progress_bar_config(disable=True)
    from .schema import DEFAULT_PROMPT

    with torch.no_grad():
        if sdxl:
            pe, _, pooled, _ = t2i.encode_prompt(prompt=DEFAULT_PROMPT, device=device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
            embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        else:
            pe, _ = t2i.encode_prompt(DEFAULT_PROMPT, device, 1, False)
            embeds = dict(prompt_embeds=pe)
    # A call takes frame_buffer_size frames, as ours does: the prompt is repeated per image.
    fbs = bench.args.frame_buffer_size
    embeds = {k: v.repeat(fbs, *([1] * (v.dim() - 1))) for k, v in embeds.items()}
    # Guidance off (scale <= 1): the cheapest diffusers equivalent of the workload.
    common = dict(guidance_scale=0.0 if steps == 1 else 1.0, output_type="pt", **embeds)
    if wl.img2img:
        pipe = AutoPipelineForImage2Image.from_pipe(t2i)
        pipe.set_progress_bar_config(disable=True)
        strength = 0.5 if steps == 1 else wl.settings.get("strength", 0.8)
        # diffusers runs int(num_inference_steps * strength) steps.
        n_sched = max(steps, round(steps / strength + 0.49))

        def call(group):
            image = torch.cat(group).permute(0, 3, 1, 2).to(dtype) / 255.0
            if image.shape[-2:] != (height, width):  # frames from a source of another size
                image = fit(image, width, height)
            with torch.no_grad():
                return pipe(image=image, num_inference_steps=n_sched, strength=strength, **common).images
    else:
        pipe = t2i

        def call(group):
            with torch.no_grad():
                return pipe(num_inference_steps=steps, height=height, width=width,
                            generator=torch.Generator(device).manual_seed(0), **common).images
    extra = dict(acceleration="diffusers " + type(pipe).__name__, unet_params=_unique_numel(models.unet))
    return call, pipe, extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scope-streamdiffusion bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
