"""Run by test_cli: the command line (`scope-streamdiffusion ARGS`) while a background compilation is
busy, as on a GPU soon after start-up, so that the process's exit waits for the compiler. Prints
"streaming" when the 4th frame goes in (which then waits for the test's Ctrl-C) and "exiting" when the
exit hooks start."""

import atexit
import sys
import threading
import time

from busy_compiler import start_compiling
from scope_streamdiffusion import cli
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

started = threading.Event()


def slow_backend(gm, inputs):  # a compiler that holds the exit for longer than the test waits
    started.set()
    time.sleep(120)
    return gm.forward


compiler, block = start_compiling(slow_backend, started)

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
