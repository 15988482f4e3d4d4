"""CPU check: the host time of a new prompt text, with compel's parser and with the plain-prompt
shortcut (engine/prompts.py). A prompt typed live reaches the engine as a new text on each change;
its cost is paid on the frame thread.

    python scripts/prompt-miss.py

Prints, as medians over 40 new texts each: the parse alone (what the shortcut removes) and a whole
cache miss on the test suite's tiny model (parse + tiny text encoder; a real CLIP adds its own
encoder time on the GPU, the same either way).
"""

import statistics
import time

import torch
from compel import Compel

from scope_streamdiffusion.engine import StreamDiffusion, StreamSettings, load_models
from scope_streamdiffusion.engine.prompts import compel_class
from scope_streamdiffusion.testing.tiny_models import ensure_tiny_model

BASE = "portrait of a woman, oil painting, highly detailed, dramatic lighting, trending on artstation, 8k, take"


def median_ms(fn, tag: str, n: int = 40) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(f"{BASE} {tag}{i}")
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


models = load_models(str(ensure_tiny_model("tiny-random")), device=torch.device("cpu"), dtype=torch.float32,
                     use_tiny_vae=False)
encoder = StreamDiffusion(models, width=64, height=64, settings=StreamSettings()).prompt_encoder
median_ms(encoder.encode, "warm-up", 5)
rows = [("parse only", median_ms(Compel.parse_prompt_string, "a"), median_ms(compel_class().parse_prompt_string, "b"))]
shortcut = median_ms(encoder.encode, "c")
encoder._compel.__class__ = Compel  # the same encoder with compel's own parse
rows.append(("whole miss, tiny model", median_ms(encoder.encode, "d"), shortcut))
print(f"a new prompt of {len(BASE) + 4} characters, median of 40 (ms):")
for name, parser, fast in rows:
    print(f"  {name:24s} compel's parser {parser:6.1f}   shortcut {fast:6.1f}")
