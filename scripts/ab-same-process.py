"""A/B of a load-time switch inside ONE process on the GPU: two pipelines of one workload, loaded
with an environment variable set to each of two values, their calls timed in alternating blocks
(A B, B A, A B, ...), so that what differs between processes and machines (host speed, clocks) is
shared by both.

    python3 scripts/ab-same-process.py OUT.json WORKLOAD VAR VALUE_A VALUE_B [BLOCKS] [CALLS] [MODE]

VAR ``env`` sets several variables per side: VALUE_A / VALUE_B are ``NAME=VALUE,NAME=VALUE``
(``SCOPE_STREAMDIFFUSION_AB_DTYPE=bfloat16`` loads that side in bfloat16).
The second pipeline may run the first one's compiled code: dynamo reuses a compiled module's code for
another instance of the same structure (R13 run 59: its inductor-option A/B compared one code twice).
So where the two sides differ in what is compiled (SCOPE_STREAMDIFFUSION_INDUCTOR, _COMPILE_MODE or
_GEMM_SMALL_CONVS, _TRITON_GROUP_NORM, _FUSE_RESIDUAL_ADDS, _GROUP_NORM_ONE_PROGRAM, _SPLIT_ATTENTION,
_BIAS_IN_NORM, _FP8) dynamo is reset before the second load (the first pipeline's captured graph replays all the same).

Per block: p50 of a call (frames in, frames out, synchronised), and of its host part alone (until
the pipeline returns, before the device is synchronised); once per pipeline: the step graph alone.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from scope_streamdiffusion import bench
from scope_streamdiffusion.engine.inductor import cache_root


def load(workload: str, var: str, value: str, frames, mode: str = "compile") -> tuple:
    """A pipeline of ``workload`` in ``mode`` loaded with ``var=value``, warmed up: (call, pipeline)."""
    for name, setting in ([item.split("=", 1) for item in value.split(",") if item] if var == "env" else [(var, value)]):
        os.environ[name] = setting
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--random-weights", "--workloads", workload, "--modes", mode, "--no-baseline"])
    wl = bench.WORKLOADS[workload]
    folder, taesd = bench.random_weight_model(bench._resolve_arch(wl, "auto"), cache_root() / "random-weights",
                                              torch.device("cuda"))
    dtype = os.environ.get("SCOPE_STREAMDIFFUSION_AB_DTYPE", "float16")  # this script's own: a side's dtype
    pipe = bench.Runner(args, torch.device("cuda"), dtype).pipeline(
        workload, wl, str(folder), str(taesd), mode, wl.size, wl.size)
    call = bench._pipeline_call(pipe, wl, False)
    for i in range(5):
        call([frames[i % len(frames)]])
    torch.cuda.synchronize()
    return call, pipe


def time_block(call, frames, calls: int) -> dict:
    total, host = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        call([frames[i % len(frames)]])
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        total.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    p50 = statistics.median(total)
    return dict(p50_ms=round(p50, 3), host_p50_ms=round(statistics.median(host), 3), fps_p50=round(1e3 / p50, 1))


def main(out_path: str, workload: str, var: str, a: str, b: str, blocks: int = 6, calls: int = 100,
         mode: str = "compile") -> None:
    size = bench.WORKLOADS[workload].size
    frames = bench.make_frames(8, size, size, torch.device("cuda"))
    calls_by_value, report = {}, dict(workload=workload, mode=mode, var=var, blocks=[], graph_alone_ms={}, extras={})
    compile_settings = ("SCOPE_STREAMDIFFUSION_INDUCTOR", "SCOPE_STREAMDIFFUSION_COMPILE_MODE",
                        "SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS", "SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM",
                        "SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS", "SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM",
                        "SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION", "SCOPE_STREAMDIFFUSION_BIAS_IN_NORM",
                        "SCOPE_STREAMDIFFUSION_FP8", "SCOPE_STREAMDIFFUSION_AB_DTYPE")
    for value in (a, b):
        t0 = time.perf_counter()
        if value == b and any(name in f"{var} {a} {b}" for name in compile_settings):
            torch._dynamo.reset()
        calls_by_value[value], pipe = load(workload, var, value, frames, mode)
        extras = pipe.engine.models.extras
        report["extras"][value] = {k: v for k, v in extras.items() if isinstance(v, (bool, int, str, dict))}
        report["graph_alone_ms"][value] = bench._graph_replay_ms(pipe, torch.device("cuda"))
        print(value, "ready in", round(time.perf_counter() - t0, 1), "s; graph alone",
              report["graph_alone_ms"][value], flush=True)
    for block in range(blocks):
        for value in ((a, b) if block % 2 == 0 else (b, a)):
            row = dict(block=block, value=value, **time_block(calls_by_value[value], frames, calls))
            report["blocks"].append(row)
            print(row, flush=True)
    for value in (a, b):
        rows = [r for r in report["blocks"] if r["value"] == value]
        report[f"median_of_blocks_{value}"] = dict(p50_ms=statistics.median(r["p50_ms"] for r in rows),
                                                  host_p50_ms=statistics.median(r["host_p50_ms"] for r in rows))
        print(value, report[f"median_of_blocks_{value}"])
    Path(out_path).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:6], *(int(n) for n in sys.argv[6:8]), *sys.argv[8:9])
