"""GPU check behind BENCHMARKS.md's footnote on releasing frozen weights: load, run and unload a tiny
compiled pipeline (frozen weights) three times and print the CUDA memory left after each unload.

    SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1 python3 scripts/gpu-release-check.py on
    SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1 python3 scripts/gpu-release-check.py off

"off" disables the release (as before the fix), to see the difference.
"""

import gc
import sys

import torch

from scope_streamdiffusion.engine import acceleration
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

if sys.argv[1:] == ["off"]:
    acceleration.release_weights_with = lambda module: None


def allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


base = allocated()
for i in range(3):
    pipe = StreamDiffusionPipeline(model_id="tiny-random", width=128, height=128, acceleration="compile",
                                   num_inference_steps=1, cfg_type="none", strength=0.5)
    frame = torch.randint(0, 255, (1, 128, 128, 3), dtype=torch.uint8, device="cuda")
    for _ in range(4):
        out = pipe(video=[frame])["video"]
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.engine.models.unet.parameters())
    loaded = allocated()
    del pipe, out
    after = allocated()
    print(f"release={sys.argv[1]} load {i}: unet {unet_bytes / 2**20:.2f} MiB, allocated over baseline: "
          f"loaded {(loaded - base) / 2**20:.2f} MiB, after unload {(after - base) / 2**20:.2f} MiB", flush=True)
