"""Prompt encoding with compel weighting, an LRU cache of embeddings, and prompt blending.

compel syntax works in every prompt: ``(word)1.3``, ``word++``, ``word--``, and prompts over 77
tokens (encoded in 77-token chunks, not truncated). Each distinct text is encoded once and kept in
a bounded LRU cache; blends of several weighted prompts are mixed in embedding space. Plain prompts
(no syntax) skip compel's parser, whose answer for them is known.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .background_compile import FX_TRACING

logger = logging.getLogger(__name__)
# compel's syntax characters: a prompt that its parser or conditioning rejects is used without them.
_SYNTAX = re.compile(r'[()\[\]+\\"]')


@dataclass(frozen=True)
class PromptEmbeds:
    embeds: torch.Tensor  # (1, tokens, dim)
    pooled: torch.Tensor | None = None  # (1, pooled_dim), SDXL only

    def with_tokens(self, tokens: int, pad: "PromptEmbeds") -> "PromptEmbeds":
        """Pad to ``tokens`` with chunks of ``pad`` (the empty prompt), as compel does."""
        missing = tokens - self.embeds.shape[1]
        if missing <= 0:
            return self
        reps = -(-missing // pad.embeds.shape[1])
        filler = pad.embeds.repeat(1, reps, 1)[:, :missing]
        return PromptEmbeds(torch.cat([self.embeds, filler], dim=1), self.pooled)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last dim (falls back to lerp for near-parallel vectors)."""
    a32, b32 = a.float(), b.float()
    an = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    bn = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps))
    so = torch.sin(omega)
    out = torch.where(
        so.abs() < 1e-4,
        (1 - t) * a32 + t * b32,
        torch.sin((1 - t) * omega) / so * a32 + torch.sin(t * omega) / so * b32,
    )
    return out.to(a.dtype)


def blend(items: list[tuple[PromptEmbeds, float]], method: str, pad: PromptEmbeds) -> PromptEmbeds:
    """Mix weighted embeddings; weights are normalised to sum to 1 (all-zero weights -> equal)."""
    if len(items) == 1:
        return items[0][0]
    total = sum(max(w, 0.0) for _, w in items)
    weights = [max(w, 0.0) / total if total > 0 else 1.0 / len(items) for _, w in items]
    tokens = max(e.embeds.shape[1] for e, _ in items)
    padded = [e.with_tokens(tokens, pad) for e, _ in items]
    if method == "slerp" and len(items) == 2:
        t = weights[1]
        pooled = None if padded[0].pooled is None else slerp(padded[0].pooled, padded[1].pooled, t)
        return PromptEmbeds(slerp(padded[0].embeds, padded[1].embeds, t), pooled)
    embeds = sum(w * e.embeds for w, e in zip(weights, padded))
    pooled = None if padded[0].pooled is None else sum(w * e.pooled for w, e in zip(weights, padded))
    return PromptEmbeds(embeds, pooled)


# A plain prompt: words without compel's syntax characters (a hyphen only inside a word), one space
# apart, a comma only at a word's end. compel's parser returns such a text unchanged as one fragment
# of weight 1 (checked against compel 2.1 and 2.5 by tests/test_engine.py), but takes 37-50 ms of
# CPU for it (pyparsing; scripts/prompt-miss.py): the host time of a new prompt in a live stream.
_WORD = r"(?:[^\s()\[\]+\-\\\",]|(?<=[^\W_])-(?=[^\W_]))+"
PLAIN_PROMPT = re.compile(rf"{_WORD},?(?: {_WORD},?)*")


@functools.cache
def compel_class():
    """compel's ``Compel``, with plain prompts not run through its parser."""
    from compel import Compel
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    class PlainPromptsCompel(Compel):
        @classmethod
        def parse_prompt_string(cls, prompt_string: str) -> Conjunction:
            if PLAIN_PROMPT.fullmatch(prompt_string):
                return Conjunction([FlattenedPrompt([Fragment(prompt_string, 1.0)])])
            return super().parse_prompt_string(prompt_string)

    return PlainPromptsCompel


class PromptEncoder:
    """Text -> :class:`PromptEmbeds` for SD1.5/SD2.x (one CLIP) and SDXL (two CLIPs + pooled)."""

    def __init__(self, tokenizers, text_encoders, *, is_sdxl: bool, device, dtype, cache_size: int = 64,
                 force_zeros_for_empty_prompt: bool = False):
        from compel import ReturnedEmbeddingsType

        Compel = compel_class()
        if is_sdxl:
            # compel prints a deprecation notice on stdout for two encoders; stdout is the CLI's --json.
            with contextlib.redirect_stdout(io.StringIO()):
                self._compel = Compel(
                    tokenizer=tokenizers,
                    text_encoder=text_encoders,
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=[False, True],
                    truncate_long_prompts=False,
                    device=str(device),
                )
        else:
            self._compel = Compel(
                tokenizer=tokenizers[0], text_encoder=text_encoders[0], truncate_long_prompts=False, device=str(device)
            )
        self.is_sdxl = is_sdxl
        self.device = device
        self.dtype = dtype
        self.cache_size = cache_size
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self.encode_count = 0  # texts actually run through the text encoder (for tests and stats)

    @torch.no_grad()
    def encode(self, text: str) -> PromptEmbeds:
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        self.encode_count += 1
        try:
            result = self._run_compel(text)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed syntax must not fail every frame of a stream
            plain = " ".join(_SYNTAX.sub(" ", text).split())
            if plain == text:
                raise
            logger.warning("Prompt %r is not valid compel syntax (%s: %s); using it as plain text: %r.",
                           text, type(exc).__name__, str(exc)[:200], plain)
            result = self.encode(plain)
        self._cache[text] = result
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def _run_compel(self, text: str) -> PromptEmbeds:
        with FX_TRACING:  # the text encoders run: not beside a torch.fx trace elsewhere (background_compile)
            if self.is_sdxl:
                embeds, pooled = self._compel(text)
                return PromptEmbeds(embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype))
            return PromptEmbeds(self._compel(text).to(self.device, self.dtype))

    def negative(self, text: str, tokens: int = 0) -> PromptEmbeds:
        """The negative prompt padded to ``tokens``.

        SDXL models trained with zeroed unconditional embeddings want zeros for an empty negative
        (zeroed after padding, so long positive prompts don't pad it with non-zero chunks).
        """
        embeds = self.encode(text).with_tokens(tokens, self.encode(""))
        if not text.strip() and self.force_zeros_for_empty_prompt:
            return PromptEmbeds(torch.zeros_like(embeds.embeds), None if embeds.pooled is None else torch.zeros_like(embeds.pooled))
        return embeds

    def blend(self, prompts: list[tuple[str, float]], method: str = "linear") -> PromptEmbeds:
        return blend([(self.encode(text), weight) for text, weight in prompts], method, self.encode(""))

    def clear(self) -> None:
        """Forget cached embeddings (the text encoders' weights changed)."""
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)
