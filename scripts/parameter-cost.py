"""CPU check: the host time a Scope call spends on its parameters, as a stream sends them (the prompt
list with every call, strength moved on every call by beat sync), on the test suite's tiny model with
acceleration "none": what the frame thread pays before the step runs.

    python scripts/parameter-cost.py

Prints medians over 2,000 calls (µs): ``update`` with nothing, with the prompt list, with the prompt
list and a new strength; that followed by the preparation it causes; the preparation when nothing
changed.
"""

import math
import statistics
import time

import torch

from scope_streamdiffusion.pipeline import StreamDiffusionPipeline
from scope_streamdiffusion.testing.tiny_models import ensure_tiny_model

PROMPTS = [{"text": "a cat", "weight": 1.0}]


def median_us(fn, n: int = 2000) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    pipe = StreamDiffusionPipeline(model_id=str(ensure_tiny_model("tiny-random")), width=64, height=64, acceleration="none",
                                   use_tiny_vae=False, seed=42, prompt="a cat", num_inference_steps=1, strength=0.5,
                                   guidance_scale=1.0, cfg_type="none", device="cpu", dtype="float32")
    pipe(video=[torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)])
    engine = pipe.engine

    def strength(i):
        return round(0.55 + 0.25 * math.sin(i / 7), 3)  # soak.py's beat sync

    def prepare(i=0):
        with engine._lock:
            settings, generations = engine._settings, (engine._weights_generation, engine._text_generation)
        engine._prepare(settings, True, generations)

    print("update, nothing:", median_us(lambda i: pipe.update()), "µs")
    print("update, the prompt list:", median_us(lambda i: pipe.update(prompts=PROMPTS)), "µs")
    print("update, the prompt list + a new strength:",
          median_us(lambda i: pipe.update(strength=strength(i), prompts=PROMPTS)), "µs")
    print("... + the preparation it causes:",
          median_us(lambda i: (pipe.update(strength=strength(i), prompts=PROMPTS), prepare())), "µs")
    print("the preparation, nothing changed:", median_us(prepare), "µs")


if __name__ == "__main__":
    main()
