"""A runtime LoRA's scale moved on every few calls while streaming in the graph modes (GPU).

    python scripts/lora-live-check.py OUT.json [MODE ...]   (modes: compile, cudagraph; default both)

SD-Turbo img2img 512² with random weights and a random rank-16 LoRA kept as a runtime adapter. Per
mode: the graphs captured and compiled before and after 30 scale changes (they should not grow),
the latency of the call right after each change, and each scale's frames against the eager
pipeline (``none``) at that scale.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from scope_streamdiffusion import StreamDiffusionPipeline
from scope_streamdiffusion.bench import make_frames, random_weight_model
from scope_streamdiffusion.engine.inductor import cache_root
from scope_streamdiffusion.testing.tiny_models import LORA_WEIGHT_NAME, build_tiny_lcm_lora


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    out_path, modes = sys.argv[1], sys.argv[2:] or ["compile", "cudagraph"]
    device = torch.device("cuda")
    model, taesd = random_weight_model("sd-turbo", cache_root() / "random-weights", device)
    lora_dir = cache_root() / "random-weights" / "sd-turbo-lora16"
    if not (lora_dir / LORA_WEIGHT_NAME).exists():
        build_tiny_lcm_lora(model, lora_dir, rank=16)
    lora = str(lora_dir / LORA_WEIGHT_NAME)
    settings = dict(model_id=str(model), tiny_vae_id=str(taesd), width=512, height=512, num_inference_steps=1,
                    strength=0.5, guidance_scale=1.0, cfg_type="none", seed=3, prompt="a harbour at dusk",
                    loras=[{"path": lora, "scale": 1.0}], lora_merge_mode="runtime_peft")
    frames = make_frames(4, 512, 512, device)

    def frames_at(pipe, scale):
        outs = [pipe(video=[f], lora_scales=[{"path": lora, "scale": scale}] if i == 0 else None)["video"]
                for i, f in enumerate(frames)]
        return torch.cat(outs).float()

    eager = StreamDiffusionPipeline(acceleration="none", **settings)
    checked = (0.5, -1.0, 0.0, 2.0)
    reference = {s: frames_at(eager, s) for s in checked}
    del eager
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "modes": {}}
    for mode in modes:
        start = time.perf_counter()
        pipe = StreamDiffusionPipeline(acceleration=mode, **settings)
        runner = pipe.engine.models.extras.get("step_runner")
        frames_at(pipe, 1.0)
        torch.cuda.synchronize()
        row = {"ready_s": round(time.perf_counter() - start, 1),
               "scales_in_tensors": pipe.engine.models.extras.get("lora_scales_in_tensors"),
               "captures_before": runner.captures, "graphs_before": dynamo_graphs()}
        row["vs_eager_max_abs"] = {str(s): float((frames_at(pipe, s) - reference[s]).abs().max()) for s in checked}
        row["scale_effect_max_abs"] = float((reference[0.0] - reference[2.0]).abs().max())
        after_change, steady = [], []
        gen = torch.Generator().manual_seed(0)
        for i in range(30):  # a slider: a new scale every 5 calls
            for j in range(5):
                scale = round(float(torch.rand((), generator=gen)) * 4 - 2, 3) if j == 0 else None
                t0 = time.perf_counter()
                pipe(video=[frames[j % len(frames)]], lora_scales=[{"path": lora, "scale": scale}] if j == 0 else None)
                torch.cuda.synchronize()
                (after_change if j == 0 else steady).append((time.perf_counter() - t0) * 1000)
        row.update(captures_after=runner.captures, graphs_after=dynamo_graphs(),
                   call_after_change_ms={"p50": round(statistics.median(after_change), 3), "max": round(max(after_change), 3)},
                   other_calls_ms={"p50": round(statistics.median(steady), 3), "max": round(max(steady), 3)})
        report["modes"][mode] = row
        print(mode, json.dumps(row), flush=True)
        del pipe, runner
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
