"""CUDA streams of the per-frame step: the capture stream, and a side branch that runs beside it.

A side branch forks from the current stream (it waits for the work already queued there), runs its
block on its own stream, and is joined back later: inside a CUDA-graph capture the two become
parallel branches of the graph. Off CUDA the branch is the block itself and joining does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_STREAMS: dict = {}


def dedicated_stream(device, role: str) -> "torch.cuda.Stream":
    """One stream per (device, role) for the life of the process: each new stream gets its own cuBLAS
    workspace (32 MiB on Hopper), kept until the process ends. (With a new stream per capture, an H200
    kept 33 MiB more after each reload of a compiled pipeline.)"""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, role)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS.setdefault(key, torch.cuda.Stream(device=index))
    return stream


@contextmanager
def side_branch(device) -> Iterator[Callable[[], None]]:
    """``with side_branch(device) as join: <work>`` ... later ``join()``: the work runs beside what
    the current stream does between the block and ``join()``; after ``join()`` the current stream
    sees its results. Tensors the block makes are used only after ``join()``."""
    if torch.device(device).type != "cuda":
        yield lambda: None
        return
    main = torch.cuda.current_stream(device)
    side = dedicated_stream(device, "side-branch")
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield lambda: main.wait_stream(side)
