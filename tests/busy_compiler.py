"""For the scripts that check a process's exit while a background compilation is busy: a small
module whose compilation, with the given backend, is under way when this returns."""

import threading

import torch

from scope_streamdiffusion.engine.background_compile import BackgroundCompiler


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(x).relu()


def start_compiling(backend, started: threading.Event):
    """(compiler, module): keep both referenced (the compiler holds the module weakly). ``backend``
    sets ``started`` when it runs."""
    block = Block()
    compiler = BackgroundCompiler({"unet": block}, backend=backend)
    recording = {}
    with torch.no_grad(), compiler.running(False, recording):
        block(torch.randn(2, 8))
    compiler.submit("shape", recording)
    assert started.wait(120), "the compilation did not start"
    return compiler, block
