"""GPU check behind BENCHMARKS.md's "Long streams": a Scope-style stream (one ``pipe(video=[frame],
**changes)`` call per frame, parameters changed on the calls) under the default acceleration for
a given time, as an artist's session would: strength modulated on every call (beat sync), the prompt
list sent with every call and changed every 2 s, guidance/delta every 5 s, a new seed every 15 s, 1 <-> 2 steps every 60 s (a new
batch shape, compiled in the background), self-CFG at guidance 1.5 for one minute, webcam-size
frames for one minute. Reports per 10-s window: fps, worst call, allocated/reserved VRAM, the
process's resident memory, graphs held, the machine's busy CPU cores; for each call over 300 ms what
it did (parameters sent, captures and their seconds, prompts encoded, whether a compilation ran, the
garbage collector's time in it); stalls: a watcher thread that wakes every 50 ms records each time
it woke over 250 ms late (the GIL held that long, or the process stopped) with every thread's top
frames just before and just after; exceptions are counted, never fatal; at the end, growth of VRAM
and resident memory between the end of the first pass over every setting and the end.
(faulthandler's timed dump of all threads would show the GIL's holder during the stall, but it reads
other threads' frames while they run and crashed the process once, mid-dump, during a compilation.)

    python3 scripts/soak.py [seconds] [out.json] [acceleration]

SOAK_TRANSITIONS=1: the prompt changes come as transitions instead (Scope's prompt timeline): one every
3 s over 1,000 calls (~5 s), so each starts while the last one runs; the prompt list is resent unchanged.

With a few seconds and a cold inductor cache it also checks a clean exit while the background
compilation runs: the last line says whether a compilation was still running at exit.
"""

import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from measure import GcPauses, rss_mb
from scope_streamdiffusion.bench import WORKLOADS, make_frames, random_weight_model
from scope_streamdiffusion.engine.inductor import cache_root
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 420.0
out_path = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
MINUTE = float(os.environ.get("SOAK_MINUTE", 60))  # the schedule's minute in seconds (shorter: a quick try)
wl = WORKLOADS["sd-turbo-img2img"]
device = torch.device("cuda")
folder, taesd = random_weight_model(wl.arch, cache_root() / "random-weights", device)
PROMPTS = ["a watercolor lighthouse at dusk", "neon city in the rain, cinematic", "an oil painting of a forest",
           "a marble statue, studio light", "pixel art of a castle", "a charcoal sketch of a face"]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine: the compiler's workers are other processes."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]  # guest time is in user
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def top_frames(depth: int = 12) -> dict:
    """Every thread's innermost frames, as text (frames are live: read them now, not later)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = {}
    for ident, frame in sys._current_frames().items():
        lines = []
        while frame is not None and len(lines) < depth:
            lines.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
            frame = frame.f_back
        out[f"{names.get(ident, '?')}#{ident}"] = lines
    return out


stalls = []  # (start time in the stream, ms the watcher overslept, frames before, frames after)


def watch(period: float = 0.05, late_ms: float = 250.0):
    before = top_frames()
    while not done.is_set():
        t0 = time.perf_counter()
        time.sleep(period)
        over = (time.perf_counter() - t0 - period) * 1e3
        after = top_frames()
        if over > late_ms and len(stalls) < 40:
            stalls.append(dict(t=round(t0 - start, 2), ms=round(over), before=before, after=after))
        before = after


done = threading.Event()


def changes_at(t: float, call: int, last: dict) -> dict:
    """The parameters in force at second ``t`` (only those that differ from ``last`` are sent)."""
    minute = int(t // MINUTE)
    want = dict(
        strength=round(0.55 + 0.25 * math.sin(call / 7), 3),
        guidance_scale=1.5 if minute == 3 else 1.0,
        cfg_type="self" if minute == 3 else "none",
        delta=[1.0, 0.8, 0.6][int(t // 5) % 3],
        seed=42 + int(t // 15),
        num_inference_steps=2 if minute % 2 == 1 else 1,
    )
    changed = {k: v for k, v in want.items() if last.get(k) != v}
    if TRANSITIONS:
        index = int(t // 3)
        if last.get("transition_index") != index:
            changed.update(transition_index=index, transition={
                "target_prompts": [{"text": PROMPTS[(index + 1) % len(PROMPTS)], "weight": 1.0}], "num_steps": 1000})
        return dict(changed, prompts=[{"text": PROMPTS[0], "weight": 1.0}])
    # Scope sends the prompt list with every call, changed or not.
    return dict(changed, prompts=[{"text": PROMPTS[int(t // 2) % len(PROMPTS)], "weight": 1.0}])


TRANSITIONS = os.environ.get("SOAK_TRANSITIONS") == "1"
most_prompts = 0  # the longest prompt mix a transition made (texts blended at once)


pipe = StreamDiffusionPipeline(model_id=str(folder), tiny_vae_id=str(taesd), width=wl.size, height=wl.size,
                               acceleration=mode, seed=42, prompt=PROMPTS[0], **wl.settings)
runner = pipe.engine.models.extras.get("step_runner")
compiler = getattr(runner, "compiler", None)
frames = make_frames(8, wl.size, wl.size, device)
webcam = make_frames(8, 480, 640, device, seed=1)  # a source size other than the stream's
calls, errors, last, slow = [], [], {}, []
SLOW_MS = 300
encoder = pipe.engine.prompt_encoder


def counters() -> dict:
    """Running totals that tell what a call did: captures (and their seconds), interrupted
    captures, prompts encoded, compilations finished."""
    return dict(captures=getattr(runner, "captures", 0), capture_s=getattr(runner, "capture_seconds", 0.0),
                interrupted=getattr(runner, "interrupted", 0), encoded=encoder.encode_count,
                compiled=len(compiler.seconds) if compiler else 0)


start = time.perf_counter()
collector = GcPauses(start).start()
gc_pauses = collector.pauses
watcher = threading.Thread(target=watch, name="soak-watcher", daemon=True)
watcher.start()
i = 0
while time.perf_counter() - start < seconds:
    t = time.perf_counter() - start
    kwargs = changes_at(t, i, last)
    last.update(kwargs)
    source = webcam if int(t // MINUTE) == 4 else frames
    before, gc_before = counters(), len(gc_pauses)
    t0 = time.perf_counter()
    try:
        out = pipe(video=[source[i % len(source)]], **kwargs)["video"]
        most_prompts = max(most_prompts, len(pipe.engine.settings.prompts))
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(out).all()) and out.shape[1:] == (wl.size, wl.size, 3)
        if not ok:
            errors.append((round(t, 1), "bad output"))
    except Exception as exc:  # noqa: BLE001 - counted: the stream goes on, as Scope's would
        errors.append((round(t, 1), f"{type(exc).__name__}: {exc}"[:300]))
        traceback.print_exc()
    calls.append((t, (time.perf_counter() - t0) * 1e3, bool(getattr(runner, "last_compiled", False))))
    if calls[-1][1] > SLOW_MS and len(slow) < 100:  # what happened in a slow call, to tell its cause
        after = counters()
        gc_ms = sum(p[2] for p in gc_pauses[gc_before:])
        slow.append(dict(t=round(t, 1), ms=round(calls[-1][1]), sent=sorted(kwargs),
                         compiling=bool(compiler and compiler.busy),
                         **({"gc_ms": round(gc_ms)} if gc_ms >= 1 else {}),
                         **{k: round(after[k] - before[k], 3) for k in after if after[k] != before[k]}))
    i += 1
    if i % 50 == 0 or time.perf_counter() - start >= seconds:
        calls[-1] += (torch.cuda.memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9, rss_mb(),
                      len(runner.graphs()) if runner is not None else 0, cpu_jiffies())

done.set()
watcher.join()
collector.stop()
windows = []
ncpu = os.cpu_count() or 1
for w in range(int(seconds // 10) + 1):
    part = [c for c in calls if w * 10 <= c[0] < (w + 1) * 10]
    if not part:
        continue
    lat = sorted(c[1] for c in part)
    mem = [c for c in part if len(c) > 3]
    windows.append(dict(window_s=w * 10, calls=len(lat), fps_p50=round(1e3 / statistics.median(lat), 1),
                        max_ms=round(lat[-1], 1), compiled=round(sum(c[2] for c in part) / len(part), 2),
                        alloc_gb=round(mem[-1][3], 3) if mem else None,
                        reserved_gb=round(mem[-1][4], 3) if mem else None,
                        rss_mb=round(mem[-1][5]) if mem else None, graphs=mem[-1][6] if mem else None))
    if len(mem) >= 2:  # busy cores between the window's first and last samples
        (b0, t0), (b1, t1) = mem[0][7], mem[-1][7]
        windows[-1]["cpu_cores_busy"] = round(ncpu * (b1 - b0) / max(t1 - t0, 1), 1)
report = dict(seconds=seconds, acceleration=pipe.engine.models.extras.get("acceleration"), calls=len(calls),
              errors=errors[:20], error_count=len(errors), windows=windows,
              graphs=len(runner.graphs()) if runner is not None else 0,
              compile_s=[round(v, 1) for v in compiler.seconds.values()] if compiler else [],
              failed=list(compiler.failed.values()) if compiler else [],
              step_without_graphs=getattr(runner, "failed", None),
              captures_interrupted=getattr(runner, "interrupted", 0),
              compilations_retried=getattr(compiler, "retried", 0),
              peak_vram_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3),
              gc_pauses_over_50ms=[(round(t, 1), g, round(ms)) for t, g, ms, _ in gc_pauses if ms > 50][:50],
              gc_ms_total=round(sum(p[2] for p in gc_pauses)),
              most_prompts_blended=most_prompts, slow_calls=slow, stalls=stalls)
# Every setting above has been seen by the end of minute 5; growth after it would be a leak.
settled = [w for w in windows if w["window_s"] >= 5 * MINUTE and w["rss_mb"] is not None]
if len(settled) >= 2:
    report["growth_after_5_min"] = dict(
        alloc_gb=round(settled[-1]["alloc_gb"] - settled[0]["alloc_gb"], 3),
        reserved_gb=round(settled[-1]["reserved_gb"] - settled[0]["reserved_gb"], 3),
        rss_mb=round(settled[-1]["rss_mb"] - settled[0]["rss_mb"]))
text = json.dumps(report, indent=1)
print(text)
if out_path:
    Path(out_path).write_text(text + "\n")
print("compiling at exit:", bool(compiler and compiler.busy), flush=True)
