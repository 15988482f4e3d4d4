"""Run by test_acceleration: the process exits while a background compilation is busy in C++ code
with the GIL released (without care, the interpreter's finalisation then aborts the process)."""

import threading

import torch

from scope_streamdiffusion.engine.background_compile import BackgroundCompiler

started = threading.Event()
a = torch.randn(1500, 1500)


def slow_backend(gm, inputs):  # a compiler in the middle of long PyTorch calls when the process exits
    started.set()
    for _ in range(200):
        a @ a
    return gm.forward


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(x).relu()


block = Block()
compiler = BackgroundCompiler({"unet": block}, backend=slow_backend)
recording = {}
with torch.no_grad(), compiler.running(False, recording):
    block(torch.randn(2, 8))
compiler.submit("shape", recording)
started.wait(120)
print("compiling at exit:", compiler.busy, flush=True)
