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

import hashlib
import math
import operator
from pathlib import Path

import torch

QUERY_TILE = 128  # queries per program in cuDNN's Hopper attention kernel (its traces: 160 tiles at 4,096 x 5)
PART_CHOICES = (2, 4)
# A tile's time, fitted to the kernel alone at 4,096 keys in 1, 2 and 4 parts (75.1, 59.0, 52.4 µs
# for 160 tiles: 2, 3 and 5 rounds) and checked at 1,024 keys (80 tiles: 12.0 / 13.1 / 11.9 µs):
TILE_US, KEY_US = 1.9, 0.0087  # a 128-query tile of 64-wide heads: fixed + per key
HEAD_WIDTH = 64  # the model's; other widths (SD1.5's 40) are left whole
COMBINE_US = 1.3  # the parts' combination, per part and million output values (2.5 / 6.8 µs measured)
LAUNCH_US = 2.0  # one kernel more in the graph, its gap included
MIN_GAIN, MIN_GAIN_US = 0.10, 3.0  # predicted savings to act on, relative and absolute


def predicted_us(tiles: int, keys: int, values: int, sms: int, parts: int) -> float:
    """The attention's predicted time with its keys in ``parts``: rounds of tiles, plus the combination."""
    rounds = math.ceil(parts * tiles / sms)
    combine = COMBINE_US * parts * values / 1e6 + LAUNCH_US if parts > 1 else 0.0
    return rounds * (TILE_US + KEY_US * keys / parts) + combine


def key_parts(tiles: int, keys: int, values: int, sms: int) -> int:
    """Parts to split the keys in (1: none) for an attention of ``tiles`` 128-query tiles over ``keys``
    keys with ``values`` output values, on ``sms`` SMs: the fastest predicted, where it saves enough."""
    whole = predicted_us(tiles, keys, values, sms, 1)
    best, best_us = 1, whole
    for parts in PART_CHOICES:
        if keys % parts == 0 and keys // parts >= QUERY_TILE:
            us = predicted_us(tiles, keys, values, sms, parts)
            if us < best_us:
                best, best_us = parts, us
    return best if whole - best_us >= max(MIN_GAIN * whole, MIN_GAIN_US) else 1


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
    def split(q, k, v):
        _, heads, queries, width = q.shape
        n = k.shape[2] // parts
        # (1, heads, parts * n, width) -> (parts, heads, n, width): views, the queries read p times
        ks = k.view(1, heads, parts, n, width).permute(2, 0, 1, 3, 4).reshape(parts, heads, n, width)
        vs = v.view(1, heads, parts, n, v.shape[-1]).permute(2, 0, 1, 3, 4).reshape(parts, heads, n, v.shape[-1])
        out, lse = _attention_call(op, q.expand(parts, heads, queries, width), ks, vs, scale)
        # token-major, as the kernel lays out its output for the fused projections' q: the sum comes
        # out in the layout the output projection reads
        lse = lse.reshape(parts, heads, queries, 1).transpose(1, 2)
        mass = torch.exp(lse - lse.amax(dim=0, keepdim=True))
        mixed = (out.transpose(1, 2).float() * (mass / mass.sum(dim=0, keepdim=True))).sum(dim=0, keepdim=True)
        return mixed.to(out.dtype).transpose(1, 2)
    return split


def _arguments(node) -> tuple | None:
    """(q, k, v, scale) of an attention node the split can replace, else None."""
    if node.target not in (_CUDNN, _CPU_FLASH) or len(node.args) < 3:
        return None
    q, k, v, *rest = node.args
    # anything more than q, k, v (cuDNN's bias and log-sum-exp flag, dropout, causal, debug mask; the
    # CPU kernel's mask) set: leave it
    if any(a is not None and a is not False and a != 0 for a in rest) or any(
            value is not None and value is not False and value != 0 for key, value in node.kwargs.items() if key != "scale"):
        return None
    if any(user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users):
        return None  # the log-sum-exps or other outputs are read: leave it
    return q, k, v, node.kwargs.get("scale")


def split_attention_keys(graph: torch.fx.Graph, sms: int, parts: int | None = None) -> int:
    """Split the keys of the graph's one-row attentions where :func:`key_parts` predicts fewer rounds
    (``parts``: that many wherever they divide the keys, for tests). Returns how many were split."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function"]:
        found = _arguments(node)
        if found is None:
            continue
        q, k, v, scale = found
        qv, kv, vv = (t.meta["val"] for t in (q, k, v))
        rows, heads, queries, width = qv.shape
        keys = kv.shape[2]
        if rows != 1 or kv.shape[0] != 1 or (parts is None and width != HEAD_WIDTH):
            continue
        tiles, values = heads * math.ceil(queries / QUERY_TILE), heads * queries * vv.shape[-1]
        p = parts if parts is not None else key_parts(tiles, keys, values, sms)
        if p <= 1 or keys % p:
            continue
        with detect_fake_mode([qv, kv, vv]), enable_python_dispatcher():
            traced = make_fx(_split_attention(node.target, p, scale), decomposition_table=select_decomp_table())(qv, kv, vv)
        with graph.inserting_before(node):
            inputs = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"], (q, k, v)))
            result = graph.graph_copy(traced.graph, inputs)
        for user in list(node.users):  # the output's getitem, and unread ones of the others
            user.replace_all_uses_with(result)
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # older torch: no custom passes, the attentions stay whole
    CustomGraphPass = None

if CustomGraphPass is not None:

    class AttentionKeysSplit(CustomGraphPass):
        """:func:`split_attention_keys` as inductor's ``post_grad_custom_pre_pass`` (set only while this
        pipeline compiles); ``uuid`` keys inductor's on-disk cache on this file's code and the SM count.
        ``counts``: graphs rewritten and attentions split (not counted when the cache serves a graph)."""

        def __init__(self, sms: int, counts: dict | None = None, parts: int | None = None):
            self.sms, self.counts, self.parts = sms, counts if counts is not None else {}, parts

        def __call__(self, graph: torch.fx.Graph) -> None:
            split = split_attention_keys(graph, self.sms, self.parts)
            self.counts["graphs"] = self.counts.get("graphs", 0) + 1
            self.counts["split"] = self.counts.get("split", 0) + split

        def uuid(self) -> str:
            return hashlib.sha256(Path(__file__).read_bytes() + f"{self.sms} {self.parts}".encode()).hexdigest()


def attention_split_options(device: torch.device, counts: dict | None = None) -> dict:
    """The inductor options that split long attentions' keys: on a Hopper GPU, else none."""
    if CustomGraphPass is None or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {"post_grad_custom_pre_pass": AttentionKeysSplit(sms, counts)}
