"""What the long-running checks (soak.py on the GPU, gc-during-compile.py on the CPU) measure
besides time: the process's resident memory and the garbage collector's pauses."""

import gc
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class GcPauses:
    """Every collection while active, as (start in s since ``t0``, generation, ms, objects freed).
    A full collection holds the GIL throughout, whichever thread runs it."""

    def __init__(self, t0: float):
        self.t0, self.pauses, self._started = t0, [], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self._started - self.t0, info["generation"],
                                (time.perf_counter() - self._started) * 1e3, info["collected"]))

    def start(self) -> "GcPauses":
        gc.callbacks.append(self)
        return self

    def stop(self) -> None:
        gc.callbacks.remove(self)
