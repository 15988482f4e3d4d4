"""Stochastic similar-image filter: skip the model when the input barely changed.

``skip_prob = max(0, 1 - (1 - cos) / (1 - threshold))`` where ``cos`` is the cosine similarity of the
new input with the last *processed* input, both in [-1, 1] as the model sees them (in [0, 1] every
vector points into the same corner: unrelated images score ~0.9 and a moving video's frames pass
the default threshold); a frame is skipped when ``skip_prob`` beats a seeded
uniform draw, and never more than ``max_skip_frame`` times in a row. A skip returns the previous
output at once (the calling thread never sleeps).
"""

from __future__ import annotations

import random

import torch


def skip_probability(cos: float, threshold: float) -> float:
    if threshold >= 1.0:
        return 0.0
    return max(0.0, 1.0 - (1.0 - cos) / (1.0 - threshold))


class SimilarImageFilter:
    def __init__(self, threshold: float = 0.98, max_skip_frame: int = 10, seed: int = 0):
        self.threshold = threshold
        self.max_skip_frame = max_skip_frame
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._skipped = 0

    def should_skip(self, frames: torch.Tensor, can_skip: bool = True) -> bool:
        """Decide for ``frames`` (in [0, 1]) and remember them as the reference when they will be
        processed (always, with ``can_skip=False``: the caller has no output to repeat)."""
        flat = frames.detach().reshape(-1).float().mul(2).sub_(1)  # a new tensor: kept below without a copy
        if can_skip and self._reference is not None and self._reference.shape == flat.shape and self._skipped < self.max_skip_frame:
            cos = torch.nn.functional.cosine_similarity(flat, self._reference, dim=0).item()
            p = skip_probability(cos, self.threshold)
            if p > 0.0 and p >= self._rng.random():
                self._skipped += 1
                return True
        self._reference = flat
        self._skipped = 0
        return False
