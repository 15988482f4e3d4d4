"""Long self-attentions with their keys split in parts (compiled modes, Hopper GPUs).

At one 512² frame SD2.1's 64x64-level self-attention has 5 heads of 4,096 queries. cuDNN's attention
kernel on Hopper works through 128-query tiles with one persistent program per SM: 160 tiles for 132
SMs take two rounds, the second with 28 tiles and the other SMs idle. With the keys and values split
in ``p`` parts (the parts in the batch dimension of one call, the queries the same for each) there are
``p`` times as many tiles, each ``p`` times shorter, so the last round wastes less; each part's output
is then weighted by its share of the softmax mass (from its log-sum-exp) and the parts summed, a
pointwise kernel inductor generates. This is exact up to rounding: softmax over all keys is the
mass-weighted mix of the softmaxes over the parts.

Alone, on an H200: 76 -> 61 µs per call at 4 parts; the 32x32 level's 80 tiles (one round already)
and LCM's 4-row batch (640 tiles: five full rounds) get slower (BENCHMARKS.md, R19). So the parts are
chosen per attention from a model of the kernel fitted to those measurements (rounds of tiles, each a
fixed cost plus one per key, and the combination's pass), and only on Hopper, whose kernel the model
describes; more than one row is left alone (the queries would need a copy per part).
``SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION=0`` turns it off.

The rewrite is an inductor pass over the ATen graph (``post_grad_custom_pre_pass``): it replaces the
attention operator's node with the split call and the combination, traced from :func:`_split_attention`.
"""

from __future__ import annotations

import logging
import math
import operator

import torch

from .graph_passes import CountingPass

logger = logging.getLogger(__name__)

QUERY_TILE = 128  # queries per program in cuDNN's Hopper attention kernel (its traces: 160 tiles at 4,096 x 5)
PART_CHOICES = (2, 4)
MIN_KEYS_PER_PART = 128  # shorter parts: the fit below has no measurement there
# A tile's time, fitted to the kernel alone at 4,096 keys in 1, 2 and 4 parts (75.1, 59.0, 52.4 µs
# for 160 tiles: 2, 3 and 5 rounds) and checked at 1,024 keys (80 tiles: 12.0 / 13.1 / 11.9 µs):
TILE_US, KEY_US = 1.9, 0.0087  # a 128-query tile of 64-wide heads: fixed + per key
HEAD_WIDTH = 64  # the model's; other widths (SD1.5's 40) are left whole
COMBINE_US = 1.3  # the parts' combination, per part and million output values (2.5 / 6.8 µs measured)
LAUNCH_US = 2.0  # one kernel more in the graph, its gap included
MIN_GAIN, MIN_GAIN_US = 0.10, 3.0  # predicted savings to act on, relative and absolute


def predicted_us(tiles: int, keys: int, outputs: int, sms: int, parts: int) -> float:
    """An attention's predicted time with its keys in ``parts``: rounds of ``tiles`` 128-query tiles over
    ``keys`` keys on ``sms`` SMs, plus the combination's pass over ``outputs`` output elements a part."""
    rounds = math.ceil(parts * tiles / sms)
    combine = COMBINE_US * parts * outputs / 1e6 + LAUNCH_US if parts > 1 else 0.0
    return rounds * (TILE_US + KEY_US * keys / parts) + combine


def key_parts(tiles: int, keys: int, outputs: int, sms: int) -> int:
    """Parts to split the keys in (1: none), as :func:`predicted_us` takes them: the fastest predicted,
    where it saves enough."""
    whole = predicted_us(tiles, keys, outputs, sms, 1)
    best, best_us = 1, whole
    for parts in part_choices(keys):
        us = predicted_us(tiles, keys, outputs, sms, parts)
        if us < best_us:
            best, best_us = parts, us
    return best if whole - best_us >= max(MIN_GAIN * whole, MIN_GAIN_US) else 1


def part_choices(keys: int) -> list[int]:
    """The part counts that divide ``keys`` into parts of at least ``MIN_KEYS_PER_PART``."""
    return [p for p in PART_CHOICES if keys % p == 0 and keys // p >= MIN_KEYS_PER_PART]


# The attention operators the pass knows how to call with their log-sum-exps: cuDNN's (the pipeline's
# on a GPU) and PyTorch's CPU flash kernel (the tests' way through the same pass).
_CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention.default
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _attention_call(op, q, k, v, scale):
    """``op`` on q, k, v asking for the log-sum-exps: (output, lse)."""
    if op is _CUDNN:
        out, lse = op(q, k, v, None, True, scale=scale)[:2]
    else:
        out, lse = op(q, k, v, scale=scale)
    return out, lse


def _split_attention(op, parts: int, scale):
    """What replaces ``op(q, k, v)``: one call over the keys in ``parts``, then the parts mixed."""
    def split(q, k, v):
        _, heads, queries, width = q.shape
        n = k.shape[2] // parts  # keys a part
        # (1, heads, parts * n, width) -> (parts, heads, n, width): views; the queries broadcast (stride 0)
        ks = k.view(1, heads, parts, n, width).permute(2, 0, 1, 3, 4).reshape(parts, heads, n, width)
        vs = v.view(1, heads, parts, n, v.shape[-1]).permute(2, 0, 1, 3, 4).reshape(parts, heads, n, v.shape[-1])
        out, lse = _attention_call(op, q.expand(parts, heads, queries, width), ks, vs, scale)
        # Each part's share of the softmax mass; the parts' outputs mixed by it in float32. Both taken
        # token-major (the kernel's layout for the fused projections' q), so the mix comes out in the
        # layout the output projection reads, as the kernel's own output did.
        share = torch.softmax(lse.reshape(parts, heads, queries, 1).transpose(1, 2), dim=0)
        mixed = (out.transpose(1, 2).float() * share).sum(dim=0, keepdim=True)
        return mixed.to(out.dtype).transpose(1, 2)
    return split


def _is_set(value) -> bool:
    """An optional argument given (a tensor, True, a non-zero number)."""
    return isinstance(value, torch.fx.Node) or bool(value)


def _bare_attention(node) -> tuple | None:
    """(q, k, v, scale) of an attention the split can replace: the operator known, q, k and v alone
    (no mask, bias, dropout, causal mask, log-sum-exps asked for; only the output read), one row,
    k and v of q's heads and of one length, their fake values known; else None."""
    if node.target not in (_CUDNN, _CPU_FLASH) or len(node.args) < 3:
        return None
    q, k, v, *rest = node.args
    if any(_is_set(a) for a in rest) or any(_is_set(value) for key, value in node.kwargs.items() if key != "scale"):
        return None
    if any(user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users):
        return None
    vals = [getattr(t, "meta", {}).get("val") for t in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in vals):
        return None
    qv, kv, vv = vals
    if qv.shape[0] != 1 or kv.shape[:2] != qv.shape[:2] or vv.shape[:3] != kv.shape[:3]:
        return None  # more than one row (the queries would need a copy a part), or grouped heads
    return q, k, v, node.kwargs.get("scale")


def split_attention_keys(graph: torch.fx.Graph, sms: int, parts: int | None = None) -> int:
    """Split the keys of the graph's bare one-row float16 attentions with 64-wide heads where
    :func:`key_parts` predicts a gain (``parts``: that many wherever they divide the keys, any width
    and dtype, for tests). Returns how many were split; one that fails to rewrite is left whole, with
    a warning (the split only buys speed)."""
    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function"]:
        found = _bare_attention(node)
        if found is None:
            continue
        q, k, v, scale = found
        _, heads, queries, width = q.meta["val"].shape
        keys = k.meta["val"].shape[2]
        if parts is None:
            # float16 only: its rounding of each part's output is far below the fit's gain; bfloat16's
            # is not (the mix's error about doubles), and the fit was measured in float16.
            if width != HEAD_WIDTH or q.meta["val"].dtype != torch.float16:
                continue
            tiles, outputs = heads * math.ceil(queries / QUERY_TILE), heads * queries * v.meta["val"].shape[-1]
            p = key_parts(tiles, keys, outputs, sms)
        else:
            p = parts
        if p <= 1 or keys % p:
            continue
        try:
            _replace(graph, node, _split_attention(node.target, p, scale), (q, k, v))
        except Exception as exc:  # noqa: BLE001 - an unforeseen graph: that attention stays whole
            logger.warning("an attention of %s keys left whole (%s: %s)", keys, type(exc).__name__, exc)
            continue
        count += 1
    return count


def _replace(graph: torch.fx.Graph, node, fn, inputs: tuple) -> None:
    """``node`` (and its getitems) replaced by ``fn`` traced into ATen ops on the inputs' fake values,
    with inductor's decompositions; the new nodes carry their fake values as inductor expects."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [t.meta["val"] for t in inputs]
    with detect_fake_mode(vals), enable_python_dispatcher():
        traced = make_fx(fn, decomposition_table=select_decomp_table())(*vals)
    with graph.inserting_before(node):
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        result = graph.graph_copy(traced.graph, dict(zip(placeholders, inputs)))
    for user in list(node.users):  # the output's getitem, and unread ones of the others
        user.replace_all_uses_with(result)
        graph.erase_node(user)
    graph.erase_node(node)


if CountingPass is not None:

    class AttentionKeysSplit(CountingPass):
        """:func:`split_attention_keys` as inductor's ``post_grad_custom_pre_pass``; ``counts["split"]``:
        the attentions split."""

        counted = "split"

        def __init__(self, sms: int, counts: dict | None = None, parts: int | None = None):
            super().__init__(counts)
            self.sms, self.parts = sms, parts

        def rewrite(self, graph: torch.fx.Graph) -> int:
            return split_attention_keys(graph, self.sms, self.parts)

        def cache_key(self) -> bytes:
            return f"{self.sms} {self.parts}".encode()


def attention_split_options(device: torch.device, counts: dict | None = None) -> dict:
    """The inductor options that split long attentions' keys: on a Hopper GPU, else none."""
    if CountingPass is None or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {"post_grad_custom_pre_pass": AttentionKeysSplit(sms, counts)}
