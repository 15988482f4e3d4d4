"""Where the host's share of a graph-mode call goes, measured inside a ``bench`` process.

    python3 scripts/host-profile.py OUT.json WORKLOAD [MODE] [BENCH ARGS...]

Runs ``bench`` for one workload (``--profile`` added) and, right after its own timing and profile,
times the same pipeline's calls again in ways that split a call: the call as ``bench`` times it
(several rounds), the captured graph replayed and synchronised alone, replay + the output's copy,
an idle synchronise, and the host time of each phase of the call (parameters, preparation, the
graph runner, the replay's launch, the output's layout), plus a cProfile of a few hundred calls and
the process's threads. Everything lands in OUT.json; the summary is printed.
"""

import argparse
import cProfile
import functools
import gc
import io
import json
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from scope_streamdiffusion import bench
from scope_streamdiffusion.engine import frames as frames_module

CALLS = 300


def p50_ms(fn, calls: int = CALLS) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 4)


class Phases:
    """Host time per call of wrapped callables (their median over the calls, in ms)."""

    def __init__(self):
        self.times: dict[str, list] = {}

    def wrap(self, name: str, fn):
        times = self.times.setdefault(name, [])

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times.append(time.perf_counter() - t0)

        return timed

    def summary(self) -> dict:
        return {name: dict(p50_ms=round(statistics.median(t) * 1e3, 4), count=len(t))
                for name, t in self.times.items() if t}


def diagnose(pipe, call, inputs, device) -> dict:
    sync = functools.partial(torch.cuda.synchronize, device)
    runner = pipe.engine.models.extras["step_runner"]
    statics = [st for st in runner._steps.values() if st.graph is not None]
    st = statics[-1]
    out = dict(threads=[t.name for t in threading.enumerate()], gc_count=gc.get_count(),
               gc_threshold=gc.get_threshold(), gc_frozen=gc.get_freeze_count(),
               switch_interval=sys.getswitchinterval(), graphs=len(statics))
    timer = bench.Runner(argparse.Namespace(frame_buffer_size=1), device, None)  # bench's own timing
    rounds = []
    for _ in range(3):
        row = dict(bench_p50_ms=timer.time_calls(call, inputs, 5, CALLS)["p50_ms"])
        row["call_sync_ms"] = p50_ms(lambda: (call(inputs[0]), sync()))
        row["call_host_ms"] = p50_ms(lambda: (call(inputs[0])))
        sync()
        row["replay_sync_ms"] = p50_ms(lambda: (st.graph.replay(), sync()))
        row["replay_clone_sync_ms"] = p50_ms(lambda: (st.graph.replay(), st.output.clone(), sync()))
        row["replay_host_ms"] = p50_ms(st.graph.replay)
        sync()
        row["idle_sync_ms"] = p50_ms(sync)
        row["graph_alone_ms"] = bench._graph_replay_ms(pipe, device)
        rounds.append(row)
        print(row, flush=True)
    out["rounds"] = rounds
    # Host time of each phase (the wrappers add ~1 µs each).
    phases = Phases()
    engine = pipe.engine
    to_frames = frames_module.batch_to_frames
    pipe.update = phases.wrap("pipeline.update", pipe.update)
    engine._prepare = phases.wrap("engine._prepare", engine._prepare)
    engine._denoise = phases.wrap("engine._denoise", engine._denoise)
    runner._load = phases.wrap("runner._load", runner._load)
    runner.denoise = phases.wrap("runner.denoise", runner.denoise)
    frames_module.batch_to_frames = phases.wrap("batch_to_frames", frames_module.batch_to_frames)
    whole = phases.wrap("pipeline.__call__ (host)", call)
    try:
        for i in range(CALLS):
            whole(inputs[i % len(inputs)])
            sync()
    finally:
        del pipe.update, engine._prepare, engine._denoise, runner._load, runner.denoise
        frames_module.batch_to_frames = to_frames
    out["phases"] = phases.summary()
    print(out["phases"], flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(CALLS):
        call(inputs[i % len(inputs)])
        sync()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    out["cprofile_tottime"] = text.getvalue()
    print(out["cprofile_tottime"][:6000], flush=True)
    return out


def main(out_path: str, workload: str, mode: str = "compile", *extra: str) -> int:
    found = {}
    original = bench._profile

    def profile_then_diagnose(pipe, call, inputs, device, frames: int = 10, per_call: int = 1):
        result = original(pipe, call, inputs, device, frames, per_call)
        try:
            found["diagnosis"] = diagnose(pipe, call, inputs, device)
        except Exception:  # noqa: BLE001 - the bench's own figures still land
            import traceback

            found["diagnosis_error"] = traceback.format_exc()
            print(found["diagnosis_error"], flush=True)
        return result

    bench._profile = profile_then_diagnose
    bench_json = str(Path(out_path).with_suffix(".bench.json"))
    code = bench.main(["--random-weights", "--workloads", workload, "--modes", mode, "--no-baseline",
                       "--profile", "--json", bench_json, *extra])
    found["bench"] = json.loads(Path(bench_json).read_text())["results"]
    Path(out_path).write_text(json.dumps(found, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
