"""TAESD's last convolution (64 -> 3 channels, 3x3, at the frame's full size) alone, three ways, each
replayed from a CUDA graph (memset-nodes.py's loop): cuDNN as it is, run to 32 padded channels and
sliced with its bias added after (R13's PaddedOutConv), and the Triton kernel of
engine/few_channel_conv.py at several pixel-run lengths.

    python3 scripts/last-conv-probe.py OUT.json [SIZE ...]

Per size: µs per call, kernels per call, and the largest difference from a float32 convolution.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from scope_streamdiffusion.engine import few_channel_conv
from scope_streamdiffusion.engine.taesd import PaddedOutConv

_spec = importlib.util.spec_from_file_location("memset_nodes", Path(__file__).resolve().parent / "memset-nodes.py")
_memset_nodes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memset_nodes)
graph_ms = _memset_nodes.graph_ms


def main(out_path: str, *sizes: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 3, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    padded = PaddedOutConv(conv)
    packed = few_channel_conv.pack_weight(conv.weight)
    report = {}
    for size in [int(s) for s in sizes] or [512, 1024]:
        x = torch.randn(1, 64, size, size, device="cuda").half().contiguous(memory_format=torch.channels_last)
        want = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
        ways = {"cudnn": lambda: conv(x), "padded": lambda: padded(x)}
        for block in (64, 128, 256):
            def run(block=block):
                few_channel_conv.BLOCK_PIXELS = block
                return few_channel_conv.conv3x3_to_few(x, packed, conv.bias, 3)
            ways[f"triton-{block}"] = run
        rows = {}
        for name, run in ways.items():
            ms, out, detail = graph_ms(run)
            rows[name] = dict(us=round(ms * 1e3, 2), kernels=detail["kernels"],
                              max_abs_vs_fp32=round((out.float() - want).abs().max().item(), 5))
            print(size, name, rows[name], flush=True)
        report[size] = rows
    few_channel_conv.BLOCK_PIXELS = 128
    Path(out_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
