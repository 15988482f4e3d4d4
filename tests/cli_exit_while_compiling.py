"""Run by test_cli: the command line (`scope-streamdiffusion ARGS`) while a background compilation is
busy, as on a GPU soon after start-up, so that the process's exit waits for the compiler. Prints
"streaming" when the 4th frame goes in (which then waits for the test's Ctrl-C) and "exiting" when the
exit hooks start."""

import atexit
import sys
import threading
import time

import torch

from scope_streamdiffusion import cli
from scope_streamdiffusion.engine.background_compile import BackgroundCompiler
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

started = threading.Event()


def slow_backend(gm, inputs):  # a compiler that holds the exit for longer than the test waits
    started.set()
    time.sleep(120)
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
assert started.wait(120), "the compilation did not start"

real_call = StreamDiffusionPipeline.__call__
calls = 0


def call(self, **kwargs):
    global calls
    calls += 1
    if calls == 4:
        print("streaming", flush=True)
        time.sleep(120)  # until the test's Ctrl-C
    return real_call(self, **kwargs)


StreamDiffusionPipeline.__call__ = call
atexit.register(print, "exiting", flush=True)  # last registered: runs before the compiler is stopped
sys.argv[0] = "scope-streamdiffusion"
sys.exit(cli.main())
