"""A/B of a load-time switch inside ONE process on the GPU: two pipelines of one workload, loaded
with an environment variable set to each of two values, their calls timed in alternating blocks,
so that what differs between processes and machines (host speed, clocks) is shared by both.

    python3 scripts/ab-same-process.py OUT.json WORKLOAD VAR VALUE_A VALUE_B [BLOCKS] [CALLS]

Per block: p50 of a call (frames in, frames out, synchronised), and of its host part alone (until
the pipeline returns, before the device is synchronised); once per pipeline: the step graph alone.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from scope_streamdiffusion import bench

out_path, workload, var, a, b = sys.argv[1:6]
blocks = int(sys.argv[6]) if len(sys.argv) > 6 else 6
calls = int(sys.argv[7]) if len(sys.argv) > 7 else 100
parser = bench.add_arguments(argparse.ArgumentParser())
args = parser.parse_args(["--random-weights", "--workloads", workload, "--modes", "compile", "--no-baseline"])
device = torch.device("cuda")
wl = bench.WORKLOADS[workload]
runner = bench.Runner(args, device, "float16")
from scope_streamdiffusion.engine.inductor import cache_root  # noqa: E402

folder, taesd = bench.random_weight_model(bench._resolve_arch(wl, "auto"), cache_root() / "random-weights", device)
frames = bench.make_frames(8, wl.size, wl.size, device)
pipes, report = {}, dict(workload=workload, var=var, blocks=[], graph_alone_ms={}, extras={})
for value in (a, b):
    os.environ[var] = value
    t0 = time.perf_counter()
    pipe = runner.pipeline(workload, wl, str(folder), str(taesd), "compile", wl.size, wl.size)
    call = bench._pipeline_call(pipe, wl, False)
    for i in range(5):
        call([frames[i % 8]])
    torch.cuda.synchronize()
    pipes[value] = call
    report["extras"][value] = {k: v for k, v in pipe.engine.models.extras.items() if isinstance(v, (bool, int, str, dict))}
    report["graph_alone_ms"][value] = bench._graph_replay_ms(pipe, device)
    print(value, "ready in", round(time.perf_counter() - t0, 1), "s; graph alone", report["graph_alone_ms"][value], flush=True)
for block in range(blocks):
    for value in ((a, b) if block % 2 == 0 else (b, a)):
        call, total, host = pipes[value], [], []
        for i in range(calls):
            t0 = time.perf_counter()
            call([frames[i % 8]])
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            total.append((t2 - t0) * 1e3)
            host.append((t1 - t0) * 1e3)
        row = dict(block=block, value=value, p50_ms=round(statistics.median(total), 3),
                   host_p50_ms=round(statistics.median(host), 3), fps_p50=round(1e3 / statistics.median(total), 1))
        report["blocks"].append(row)
        print(row, flush=True)
for value in (a, b):
    rows = [r for r in report["blocks"] if r["value"] == value]
    report[f"median_of_blocks_{value}"] = dict(p50_ms=statistics.median(r["p50_ms"] for r in rows),
                                              host_p50_ms=statistics.median(r["host_p50_ms"] for r in rows))
    print(value, report[f"median_of_blocks_{value}"])
json.dump(report, open(out_path, "w"), indent=2, default=str)
