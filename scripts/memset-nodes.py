"""The step graph's memset nodes: in a CUDA graph each cuDNN attention call, each split-K convolution
of the UNet's 8x8 level, some cuBLAS GEMMs and some of TAESD's convolutions are preceded by a memset
node (R14's kernel trace: 64 per txt2img call, 4 bytes, 400 or 880 before the 8x8 convolutions; in
the profiler's view 3.6-8.2 us from the previous kernel's end to the next one's start).

``sdpa``: the UNet's 32 attention calls (SD2.1 / SD-Turbo at 512², one frame) replayed from one CUDA
graph per choice of SDPA backend: cuDNN's (PyTorch's pick on Hopper), FlashAttention-2,
memory-efficient, and mixes (cuDNN for the long self-attentions only).
``conv``: the 14 convolutions of the UNet's 8x8 level, as cuDNN runs them and as one GEMM over
gathered 3x3 patches.

    python3 scripts/memset-nodes.py OUT.json [ROWS] [sdpa,conv]
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from scope_streamdiffusion.engine.small_convs import patch_gemm

HEAD = 64
# (tokens, heads) of each transformer block of SD2.1's UNet at 512² in call order: down 2+2+2, mid 1, up 3+3+3.
BLOCKS = [(4096, 5)] * 2 + [(1024, 10)] * 2 + [(256, 20)] * 2 + [(64, 20)] + [(256, 20)] * 3 + [(1024, 10)] * 3 + [(4096, 5)] * 3
BACKENDS = dict(cudnn=SDPBackend.CUDNN_ATTENTION, flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION)


def heads(x, n):  # (B, S, n*D) -> (B, n, S, D) as a view, as diffusers' processors make them
    return x.view(x.shape[0], x.shape[1], n, HEAD).transpose(1, 2)


def make_inputs(rows: int):
    gen = torch.Generator("cuda").manual_seed(0)
    calls = []
    for tokens, n in BLOCKS:
        q = torch.randn(rows, tokens, 3 * n * HEAD, device="cuda", dtype=torch.float16, generator=gen)
        ctx = torch.randn(rows, 77, 2 * n * HEAD, device="cuda", dtype=torch.float16, generator=gen)
        qs, ks, vs = q.chunk(3, dim=-1)
        kc, vc = ctx.chunk(2, dim=-1)
        calls.append(("self", tokens, heads(qs, n), heads(ks, n), heads(vs, n)))
        calls.append(("cross", tokens, heads(qs, n), heads(kc, n), heads(vc, n)))
    return calls


def choose(policy: str, kind: str, tokens: int) -> SDPBackend:
    if policy in BACKENDS:
        return BACKENDS[policy]
    long_backend, other = policy.split("+")  # e.g. "cudnn+flash": cuDNN for self-attention over 4096 tokens
    return BACKENDS[long_backend] if kind == "self" and tokens >= 4096 else BACKENDS[other]


def run_all(calls, policy):
    outs = []
    for kind, tokens, q, k, v in calls:
        with sdpa_kernel(choose(policy, kind, tokens)):
            outs.append(F.scaled_dot_product_attention(q, k, v))
    return outs


def graph_ms(run, replays: int = 200) -> tuple:
    """``run()`` captured in a CUDA graph: (ms per replay, its outputs, kernel counts and times)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {}  # kernel name: [count, microseconds]
    for e in kernels:
        row = names.setdefault(e.name[:90], [0, 0.0])
        row[0] += 1
        row[1] = round(row[1] + e.device_time, 1)
    return start.elapsed_time(end) / replays, outs, dict(
        kernels=len(kernels), memsets=sum("emset" in e.name for e in kernels),
        kernel_us=round(sum(e.device_time for e in kernels), 1), names=names)


def compare(report: dict, section: str, variants: dict, rounds: int = 2) -> None:
    """Each variant's graph, ``rounds`` times in turn; outputs against the first variant's."""
    reference = None
    for _ in range(rounds):
        for name, run in variants.items():
            try:
                ms, outs, detail = graph_ms(run)
            except Exception as exc:  # a backend that cannot run these shapes
                report[section][name] = dict(error=repr(exc)[:300])
                print(section, name, "failed", repr(exc)[:300], flush=True)
                continue
            if reference is None:
                reference = [o.clone() for o in outs]
            diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, reference))
            row = dict(graph_ms=round(ms, 4), max_abs_vs_first=diff, **detail)
            report[section].setdefault(name, [])
            if isinstance(report[section][name], list):
                report[section][name].append(row)
            print(section, name, {k: v for k, v in row.items() if k != "names"}, flush=True)
            print("   ", sorted(row["names"].items(), key=lambda kv: -kv[1][1])[:6], flush=True)


# The 14 convolutions of SD2.1's 8x8 level (down block 3 and mid: 1280 -> 1280; up block 0: 2560 -> 1280, then 1280).
CONV_INPUTS = [1280] * 8 + [2560, 1280] * 3


def conv_variants(rows: int) -> dict:
    gen = torch.Generator("cuda").manual_seed(1)
    cl = torch.channels_last
    xs = {c: torch.randn(rows, c, 8, 8, device="cuda", dtype=torch.float16, generator=gen).to(memory_format=cl)
          for c in set(CONV_INPUTS)}
    layers = [(torch.randn(1280, c, 3, 3, device="cuda", dtype=torch.float16, generator=gen).mul(0.01).to(memory_format=cl),
               torch.randn(1280, device="cuda", dtype=torch.float16, generator=gen)) for c in CONV_INPUTS]
    # (Cout, 3, 3, Cin) flattened: the order the patches below are gathered in.
    mats = [w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) for w, _ in layers]

    def cudnn():
        return [F.conv2d(xs[w.shape[1]], w, b, padding=1) for w, b in layers]

    def cudnn_no_bias():  # inductor adds the bias in the next fused kernel
        return [F.conv2d(xs[w.shape[1]], w, None, padding=1) for w, _ in layers]

    def patches_mm():  # the pipeline's compiled form (engine/small_convs.py), its gathers eager here
        return [patch_gemm(xs[w.shape[1]], w, b) for w, b in layers]

    def patches_mm_no_bias():
        return [patch_gemm(xs[w.shape[1]], w, None) for w, _ in layers]

    def weights_first():  # out^T = W @ patches^T: the weight as the GEMM's M side
        outs = []
        for (w, b), m in zip(layers, mats):
            x = xs[w.shape[1]].permute(0, 2, 3, 1)  # NHWC view of the channels_last tensor
            p = F.pad(x, (0, 0, 1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1)  # (N, 8, 8, C, 3, 3)
            p = p.permute(0, 1, 2, 4, 5, 3).reshape(-1, m.shape[1])
            outs.append(torch.mm(m, p.t()).t().reshape(x.shape[0], 8, 8, -1).permute(0, 3, 1, 2))
        return outs

    return dict(cudnn=cudnn, patches_mm=patches_mm, cudnn_no_bias=cudnn_no_bias,
                patches_mm_no_bias=patches_mm_no_bias, weights_first=weights_first)


def main(out: str, rows: int = 1, parts: str = "sdpa,conv") -> None:
    report = dict(rows=rows, torch=torch.__version__, cudnn=torch.backends.cudnn.version(), sdpa={}, conv={})
    torch.backends.cudnn.benchmark = True
    calls = make_inputs(rows)
    if "sdpa" in parts:
        compare(report, "sdpa", {policy: (lambda policy=policy: run_all(calls, policy))
                                 for policy in ("cudnn", "flash", "efficient", "cudnn+flash", "cudnn+efficient")})
    compare(report, "conv", conv_variants(rows))
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], *(int(n) for n in sys.argv[2:3]), *sys.argv[3:4])
