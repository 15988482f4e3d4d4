"""The shared part of this package's inductor graph passes (GroupNorms' residual sums, split
attentions): set as inductor options only while this pipeline compiles, each counts what it changed
and keys inductor's on-disk cache on its module's source, so an edited pass compiles afresh."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # older torch: no custom passes; the rewrites are not made
    CustomGraphPass = None

if CustomGraphPass is not None:

    class CountingPass(CustomGraphPass):
        """A pass whose :meth:`rewrite` returns how many places it changed. ``counts``: ``"graphs"`` the
        pass saw and ``counted`` the places changed (neither when inductor's cache serves a graph)."""

        counted = "changed"

        def __init__(self, counts: dict | None = None):
            self.counts = counts if counts is not None else {}

        def rewrite(self, graph: torch.fx.Graph) -> int:
            raise NotImplementedError

        def cache_key(self) -> bytes:
            """What else than the module's source decides the rewrite."""
            return b""

        def __call__(self, graph: torch.fx.Graph) -> None:
            changed = self.rewrite(graph)
            self.counts["graphs"] = self.counts.get("graphs", 0) + 1
            self.counts[self.counted] = self.counts.get(self.counted, 0) + changed

        def uuid(self) -> str:
            source = Path(sys.modules[type(self).__module__].__file__).read_bytes()
            return hashlib.sha256(source + self.cache_key()).hexdigest()
else:
    CountingPass = None
