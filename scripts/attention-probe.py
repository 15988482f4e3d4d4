"""The UNet's self-attentions alone: cuDNN's SDPA as PyTorch calls it against the keys split in parts.

    python3 scripts/attention-probe.py OUT.json [SPLITS ...]

At one 512² frame SD2.1's 64x64-level self-attention has 5 heads of 4,096 queries: cuDNN's kernel
works in 128-query tiles, 160 of them for 132 SMs, so one round runs 28 tiles and leaves the rest of
the GPU idle. Split the keys and values in S parts and ask for the parts' log-sum-exps: S times as
many tiles, each S times shorter, in one call (the parts in the batch dimension), then the parts'
outputs weighted by their softmax mass (a pointwise kernel inductor generates). This probe times both,
each compiled as the pipeline compiles (inductor, static shapes) and replayed from a CUDA graph, at
the UNet's self-attention sizes, q/k/v laid out as the fused projection leaves them; and the error
against float32 attention. ``splitP-package``: the split as the package's graph pass inserts it.
"""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


_spec = importlib.util.spec_from_file_location("memset_nodes", Path(__file__).resolve().parent / "memset-nodes.py")
_memset_nodes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memset_nodes)
graph_ms = _memset_nodes.graph_ms  # run() captured in a CUDA graph: (ms per replay, outputs, kernel counts)

SHAPES = {"64x64": (4096, 5), "32x32": (1024, 10), "16x16": (256, 20)}  # tokens, heads (SD2.1, 64 wide)


def qkv(tokens: int, heads: int, rows: int = 1, width: int = 64):
    x = torch.randn(rows, tokens, 3 * heads * width, device="cuda", dtype=torch.float16)
    q, k, v = x.view(rows, tokens, 3, heads, width).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(out):
    rows, heads, tokens, width = out.shape
    return out.transpose(1, 2).reshape(rows, tokens, heads * width)


def sdpa(q, k, v):
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def split_keys(parts: int, repeat: bool = False):
    def fn(q, k, v):
        rows, heads, tokens, width = q.shape
        n = k.shape[2] // parts
        # (rows, heads, parts * n, width) -> (parts * rows, heads, n, width): a view, no copy
        ks = k.unflatten(2, (parts, n)).permute(2, 0, 1, 3, 4).flatten(0, 1)
        vs = v.unflatten(2, (parts, n)).permute(2, 0, 1, 3, 4).flatten(0, 1)
        qs = q.repeat(parts, 1, 1, 1) if repeat else q.expand(parts, *q.shape[1:]) if rows == 1 else \
            q.unsqueeze(0).expand(parts, *q.shape).flatten(0, 1)
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True)[:2]
        out = out.unflatten(0, (parts, rows)).float()
        lse = lse.reshape(parts, rows, heads, tokens, 1)
        weight = torch.softmax(lse, dim=0)  # each part's share of the softmax mass
        return merge_heads((out * weight).sum(0).to(q.dtype))
    return fn


def package_split(parts: int):
    from scope_streamdiffusion.engine.attention_split import _split_attention

    split = _split_attention(torch.ops.aten._scaled_dot_product_cudnn_attention.default, parts, None)
    return lambda q, k, v: merge_heads(split(q, k, v))


def flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return merge_heads(F.scaled_dot_product_attention(q, k, v))


def graph_us(fn, args, calls: int = 10) -> tuple:
    """``fn(*args)`` replayed ``calls`` at a time from one CUDA graph (memset-nodes.py's timing):
    µs per call, and its top kernels per call (name, launches, µs)."""
    ms, _, info = graph_ms(lambda: [fn(*args) for _ in range(calls)], replays=50)
    kernels = [(name, count / calls, round(us / calls, 2)) for name, (count, us) in info["names"].items()]
    return ms * 1e3 / calls, sorted(kernels, key=lambda r: -r[2])[:8]


def main(out_path: str, *splits: str) -> None:
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.cache_size_limit = 256  # one compilation per variant and shape, none run eagerly
    parts_list = [int(s) for s in splits] or [2, 3, 4]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for shape, (tokens, heads) in SHAPES.items():
        for rows in (1, 4):
            if rows == 4 and shape != "64x64":
                continue
            args = qkv(tokens, heads, rows)
            ref = merge_heads(F.scaled_dot_product_attention(*(t.float() for t in args)))
            variants = {"sdpa": sdpa, "flash": flash}
            variants.update({f"split{p}": split_keys(p) for p in parts_list if tokens % p == 0})
            variants[f"split{parts_list[0]}-repeat"] = split_keys(parts_list[0], repeat=True)
            if rows == 1:  # the package's own split (engine/attention_split.py), as its graph pass inserts it
                for p in parts_list:
                    variants[f"split{p}-package"] = package_split(p)
            compiled, entry = {}, {"error": {}, "us": {}, "kernels": {}}
            with torch.no_grad():
                for name, fn in variants.items():
                    try:
                        c = torch.compile(fn, dynamic=False)
                        entry["error"][name] = (c(*args).float() - ref).abs().max().item()
                        compiled[name] = c
                    except Exception as exc:  # noqa: BLE001 - report the variant and go on
                        entry["error"][name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                for _ in range(3):  # alternated rounds: what drifts over time is shared
                    for name, c in compiled.items():
                        us, entry["kernels"][name] = graph_us(c, args)
                        entry["us"].setdefault(name, []).append(round(us, 2))
            entry["median_us"] = {n: statistics.median(v) for n, v in entry["us"].items()}
            key = f"{shape}-rows{rows}"
            report["shapes"][key] = entry
            print(key, entry["median_us"], {n: e if isinstance(e, str) else f"{e:.1e}" for n, e in entry["error"].items()},
                  flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
