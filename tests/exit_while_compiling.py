"""Run by test_acceleration: the process exits while a background compilation is busy in C++ code
with the GIL released (without care, the interpreter's finalisation then aborts the process)."""

import threading

import torch

from busy_compiler import start_compiling

started = threading.Event()
a = torch.randn(1500, 1500)


def slow_backend(gm, inputs):  # a compiler in the middle of long PyTorch calls when the process exits
    started.set()
    for _ in range(200):
        a @ a
    return gm.forward


compiler, block = start_compiling(slow_backend, started)
print("compiling at exit:", compiler.busy, flush=True)
