"""CPU check: the garbage collector's pauses while torch.compile runs in another thread.

A Scope stream keeps running while ``background-compile`` compiles the UNet in a thread; every
full collection of Python's garbage collector holds the GIL, so the stream stops for as long as it
takes, and it takes longer as the compiler's objects pile up (R9 run 41: nine pauses of 0.36-1.8 s).
This compiles a UNet of a real architecture (random weights, CPU, fp32) in a thread while the main
thread runs a small loop, and reports every collection over 20 ms, the loop's stalls, and what the
compilation left alive.

    python scripts/gc-during-compile.py [kind] [policy] [out.json]

kind: sd21 (SD-Turbo's UNet, the default) or ``tiny`` (the test suite's UNet). policy: ``default``
(Python's collector as it is) or ``paced`` (:func:`scope_streamdiffusion.engine.background_compile.gc_paced`).
"""

import contextlib
import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

from measure import GcPauses, rss_mb
from scope_streamdiffusion.engine.background_compile import gc_paced

kind = sys.argv[1] if len(sys.argv) > 1 else "sd21"
policy = sys.argv[2] if len(sys.argv) > 2 else "default"
out_path = sys.argv[3] if len(sys.argv) > 3 else None
torch.set_num_threads(1)
sys.setswitchinterval(1e-4)  # as background-compile sets it while it compiles


if kind == "tiny":
    from scope_streamdiffusion.testing.tiny_models import _tiny_unet

    torch.manual_seed(0)
    unet = _tiny_unet("sd15").eval().requires_grad_(False)
    size, ctx = 8, unet.config.cross_attention_dim
else:
    from scope_streamdiffusion.testing.architectures import build_unet

    unet = build_unet(kind)
    size, ctx = 16, unet.config.cross_attention_dim  # a small latent: the graph, not the arithmetic, is what compiles
inputs = (torch.randn(1, 4, size, size), torch.tensor([999]), torch.randn(1, 77, ctx))
compiled = torch.compile(unet, dynamic=False)

result = {}


def compile_once():
    context = gc_paced() if policy == "paced" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context, torch.no_grad():
        compiled(*inputs)
    result["compile_s"] = round(time.perf_counter() - t0, 1)


gc.collect()
rss0 = rss_mb()
collector = GcPauses(time.perf_counter()).start()
pauses = collector.pauses
worker = threading.Thread(target=compile_once, name="compile")
worker.start()
loop_ms = []
x = torch.randn(64, 64)
while worker.is_alive():  # the stream: small tensor work, one "frame" every ~2 ms
    t0 = time.perf_counter()
    for _ in range(20):
        x = torch.tanh(x @ x * 1e-2)
    time.sleep(0.002)
    loop_ms.append((time.perf_counter() - t0) * 1e3)
collector.stop()
loop_ms.sort()
report = dict(
    kind=kind, policy=policy, python=sys.version.split()[0], torch=torch.__version__,
    compile_s=result.get("compile_s"), loop_iterations=len(loop_ms),
    loop_p50_ms=round(loop_ms[len(loop_ms) // 2], 2), loop_max_ms=round(loop_ms[-1], 1),
    loop_over_100ms=sum(ms > 100 for ms in loop_ms),
    full_collections=sum(g == 2 for _, g, _, _ in pauses),
    gc_ms_total=round(sum(ms for _, _, ms, _ in pauses)), gc_max_ms=round(max((ms for _, _, ms, _ in pauses), default=0), 1),
    pauses_over_20ms=[(round(t, 2), g, round(ms, 1), n) for t, g, ms, n in pauses if ms > 20][:40],
    tracked_objects_end=len(gc.get_objects()), frozen_end=gc.get_freeze_count(),
    rss_mb_start=round(rss0), rss_mb_end=round(rss_mb()),
)
t0 = time.perf_counter()
report["full_collection_after"] = dict(collected=gc.collect(), ms=round((time.perf_counter() - t0) * 1e3, 1))
text = json.dumps(report, indent=1)
print(text)
if out_path:
    Path(out_path).write_text(text + "\n")
