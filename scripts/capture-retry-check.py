"""GPU check of the retry of interrupted CUDA graph captures (engine/acceleration.py,
``CAPTURE_RETRIES``): a thread synchronises the device in a loop while a new batch shape is
captured, as a background compilation's kernel benchmarks do; then it stops.

For each shape (1, 2 and 3 steps, in turn): a few calls with the interrupter running, then calls
without it; strength moves on every call. Expected: captures interrupted and tried again (``interrupted`` > 0), never given up
(``failed`` stays None), every shape captured in the end (captures after an interrupted one
work), and every output equal, within fp16 tolerance, to the same stream run
eagerly (``acceleration="none"``) in the same process. Prints one JSON report.

    python3 scripts/capture-retry-check.py [out.json]
"""

import json
import logging
import math
import sys
import threading
from pathlib import Path

import torch

from scope_streamdiffusion.bench import WORKLOADS, make_frames, random_weight_model
from scope_streamdiffusion.engine.inductor import cache_root
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

INTERRUPTED_CALLS, CLEAN_CALLS = 6, 20
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("scope_streamdiffusion.engine.acceleration").setLevel(logging.DEBUG)
wl = WORKLOADS["sd-turbo-img2img"]
device = torch.device("cuda")
folder, taesd = random_weight_model(wl.arch, cache_root() / "random-weights", device)


def load(acceleration: str) -> StreamDiffusionPipeline:
    return StreamDiffusionPipeline(model_id=str(folder), tiny_vae_id=str(taesd), width=wl.size, height=wl.size,
                                   acceleration=acceleration, seed=42, prompt="a lighthouse", **wl.settings)


class Interrupter(threading.Thread):
    """Synchronises the device as fast as it can until stopped; its refused syncs are counted."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.syncs, self.refused, self.messages = threading.Event(), 0, 0, set()

    def run(self):
        while not self.stop.is_set():
            try:
                torch.cuda.synchronize(device)
                self.syncs += 1
            except RuntimeError as exc:  # the sync was refused during the capture
                self.refused += 1
                self.messages.add(str(exc).splitlines()[0][:160])


graph, ref = load("cudagraph"), load("none")
runner = graph.engine.models.extras.get("step_runner")
frames = make_frames(8, wl.size, wl.size, device)
phases, worst, call = [], 0.0, 0
for steps in (1, 2, 3):
    before = dict(interrupted=runner.interrupted, captures=runner.captures)
    interrupter = Interrupter()
    interrupter.start()
    for i in range(INTERRUPTED_CALLS + CLEAN_CALLS):
        if i == INTERRUPTED_CALLS:
            interrupter.stop.set()
            interrupter.join()
        # Strength moved on every call, as Scope's beat sync does: a new schedule on most calls.
        strength = round(0.6 + 0.25 * math.sin(call / 7), 3)
        kwargs = dict(video=[frames[call % len(frames)]], num_inference_steps=steps, strength=strength)
        out = graph(**kwargs)["video"]
        expected = ref(**kwargs)["video"]
        worst = max(worst, float((out.float() - expected.float()).abs().max()))
        call += 1
    torch.cuda.synchronize()
    phases.append(dict(steps=steps, interrupted=runner.interrupted - before["interrupted"],
                       captures=runner.captures - before["captures"], syncs=interrupter.syncs,
                       refused_syncs=interrupter.refused, refusals=sorted(interrupter.messages)[:3],
                       graphs=len(runner.graphs()), reserved_gb=round(torch.cuda.memory_reserved() / 1e9, 3)))
report = dict(torch=torch.__version__, phases=phases, failed=runner.failed, max_abs_vs_none=round(worst, 5),
              cleanups=dict(runner.cleanups), abandoned_graphs=len(runner._abandoned),
              ok=bool(runner.failed is None and all(p["interrupted"] > 0 and p["captures"] >= 1 for p in phases)
                      and len(runner.graphs()) == len(phases) and worst < 0.02))
text = json.dumps(report, indent=1)
print(text)
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(text + "\n")
