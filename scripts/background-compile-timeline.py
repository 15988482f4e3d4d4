"""GPU check behind BENCHMARKS.md's "background-compile" section: a stream with
acceleration="background-compile" from the load on, per-call latency over time while the modules
compile in the background, the move to the compiled step, the speed after it, and optionally a
change of the number of steps mid-stream (a new batch shape: eager graph at once, compiled later);
then the frames against an eager ("none") pipeline of the same weights.

    python3 scripts/background-compile-timeline.py [workload] [seconds] [out.json] [switch interval s]
                                                   [change at s] [steps after the change]

The switch interval replaces the one the background compilation sets (0.005 is Python's default,
i.e. the behaviour before it set one). Random weights of the workload's true architecture (as
``bench --random-weights``); frames are uint8 on the GPU, one call per frame, synchronised after
each, as in ``bench``.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from scope_streamdiffusion.bench import WORKLOADS, make_frames, random_weight_model
from scope_streamdiffusion.engine import background_compile
from scope_streamdiffusion.engine.inductor import cache_root
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline
from scope_streamdiffusion.schema import DEFAULT_PROMPT

name = sys.argv[1] if len(sys.argv) > 1 else "sd-turbo-img2img"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
out_path = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
if len(sys.argv) > 4:
    background_compile.SWITCH_INTERVAL_S = float(sys.argv[4])
change_at = float(sys.argv[5]) if len(sys.argv) > 5 else None
steps_after = int(sys.argv[6]) if len(sys.argv) > 6 else 2
wl = WORKLOADS[name]
device = torch.device("cuda")
folder, taesd = random_weight_model(wl.arch, cache_root() / "random-weights", device)


def pipeline(mode):
    return StreamDiffusionPipeline(model_id=str(folder), tiny_vae_id=str(taesd), width=wl.size, height=wl.size,
                                   acceleration=mode, seed=42, prompt=DEFAULT_PROMPT, **wl.settings)


frames = make_frames(8, wl.size, wl.size, device)
t0 = time.perf_counter()
pipe = pipeline("background-compile")
load_s = time.perf_counter() - t0
models = pipe.engine.models
runner = models.extras["step_runner"]
compiler = runner.compiler
calls = []  # (seconds since the load ended, latency ms, "compiled" or "eager graph", phase)
start = time.perf_counter()
i, phase = 0, "first"
while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    kwargs = {}
    if change_at is not None and phase == "first" and t - start >= change_at:
        phase, kwargs = "changed", dict(num_inference_steps=steps_after)
    pipe(video=[frames[i % len(frames)]] if wl.img2img else None, **kwargs)
    torch.cuda.synchronize()
    calls.append((t - start, (time.perf_counter() - t) * 1e3,
                  "compiled" if runner.last_compiled else "eager graph", phase))
    i += 1


def summary(part):
    lat = sorted(c[1] for c in part)
    if not lat:
        return None
    p50 = statistics.median(lat)
    return dict(calls=len(lat), fps_p50=round(1e3 / p50, 1), p50_ms=round(p50, 3),
                p99_ms=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3), max_ms=round(lat[-1], 1))


windows = []
for w in range(int(seconds // 10) + 1):
    part = [c for c in calls if w * 10 <= c[0] < (w + 1) * 10]
    if part:
        windows.append(dict(window_s=f"{w * 10}-{w * 10 + 10}", kinds=sorted({c[2] for c in part}), **summary(part)))
report = dict(workload=name, load_s=round(load_s, 2), first_call_ms=round(calls[0][1], 1), windows=windows)
for ph in ("first", "changed"):
    part = [c for c in calls if c[3] == ph]
    if not part:
        continue
    switch = next((k for k, c in enumerate(part) if c[2] == "compiled"), None)
    r = dict(phase_start_s=round(part[0][0], 1), first_call_ms=round(part[0][1], 1),
             eager_graph=summary(part[1:switch] if switch else part[1:]))
    if switch is not None:
        r.update(switch_at_s=round(part[switch][0], 1), switch_call_ms=round(part[switch][1], 1),
                 compiled=summary(part[switch + 1:]), compiled_last_100=summary(part[-100:]))
    report[ph] = r
report["compile_s"] = [round(v, 1) for v in compiler.seconds.values()]
report["failed"] = list(compiler.failed.values())
report["switch_interval_during"] = background_compile.SWITCH_INTERVAL_S
report["switch_interval_after"] = sys.getswitchinterval()
report["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)

# The same frames as eager PyTorch (same weights, same inputs, from a reset stream).
outs = []
for p in (pipe, pipeline("none")):
    if phase == "changed":
        p.update(num_inference_steps=steps_after)
    seq = []
    for k in range(4):
        kw = dict(init_cache=k == 0)
        if wl.img2img:
            kw["video"] = [frames[k]]
        seq.append(p(**kw)["video"].float().cpu())
    outs.append(seq)
report["vs_none_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(*outs))
report["compiled_at_end"] = runner.last_compiled
text = json.dumps(report, indent=1)
print(text)
if out_path:
    Path(out_path).write_text(text + "\n")
