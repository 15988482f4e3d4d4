"""The UNet's 61 GroupNorms (SD2.1 / SD-Turbo at 512², one frame; 45 followed by SiLU) on their own,
replayed from one CUDA graph per way of running them: inductor as the pipeline compiles them (each
split in 3-4 kernels: partial sums, their sums, statistics, then the normalisation), inductor with split
reductions off, inductor's cooperative reductions, one Triton kernel per GroupNorm (one program
per group: statistics and normalisation + SiLU in one launch), and the package's two-kernel form
(`engine/group_norm.py`: chunked partial sums, then normalisation finishing them) by its tile sizes.

    python3 scripts/groupnorm-probe.py OUT.json [ROWS]
    python3 scripts/groupnorm-probe.py OUT.json ROWS levels

``levels``: per level of the UNet (8x8 ... 64x64 at 512²), its norms in the two kernels against one
program per group (the package's ``one_program`` path, by tile and warps); then all 61 with groups of
up to N values in one program, for a few N.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# (channels, pixels, followed by SiLU) of each GroupNorm of SD2.1's UNet at 512², in call order.
L64, L32, L16, L8 = 4096, 1024, 256, 64
NORMS = (
    [(320, L64, True)] * 2 + [(320, L64, False)] + [(320, L64, True)] * 2 + [(320, L64, False)]
    + [(320, L32, True), (640, L32, True), (640, L32, False), (640, L32, True), (640, L32, True), (640, L32, False)]
    + [(640, L16, True), (1280, L16, True), (1280, L16, False), (1280, L16, True), (1280, L16, True), (1280, L16, False)]
    + [(1280, L8, True)] * 4
    + [(1280, L8, True)] * 2 + [(1280, L8, False)] + [(1280, L8, True)] * 2
    + [(2560, L8, True), (1280, L8, True)] * 3
    + [(c, L16, True) for c in (2560,)] + [(1280, L16, True), (1280, L16, False), (2560, L16, True), (1280, L16, True),
                                           (1280, L16, False), (1920, L16, True), (1280, L16, True), (1280, L16, False)]
    + [(1920, L32, True), (640, L32, True), (640, L32, False), (1280, L32, True), (640, L32, True), (640, L32, False),
       (960, L32, True), (640, L32, True), (640, L32, False)]
    + [(960, L64, True), (320, L64, True), (320, L64, False), (640, L64, True), (320, L64, True), (320, L64, False),
       (640, L64, True), (320, L64, True), (320, L64, False)]
    + [(320, L64, True)]
)
GROUPS, EPS = 32, 1e-5
_spec = importlib.util.spec_from_file_location("memset_nodes", Path(__file__).resolve().parent / "memset-nodes.py")
_memset_nodes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memset_nodes)
graph_ms = _memset_nodes.graph_ms  # run() captured in a CUDA graph: (ms per replay, outputs, kernel counts)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from scope_streamdiffusion.engine import group_norm as two_kernel  # noqa: E402


@triton.jit
def _group_norm_nhwc(x_ptr, w_ptr, b_ptr, y_ptr, pixels, channels, eps,
                     GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    n, g = tl.program_id(0), tl.program_id(1)
    base = n * pixels * channels + g * GROUP
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < GROUP
    rows = tl.arange(0, BLOCK_P)
    # Shifted sums (by the group's first value) keep E[x^2] - E[x]^2 from cancelling.
    shift = tl.load(x_ptr + base).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(0, pixels, BLOCK_P):
        r = start + rows
        m = (r < pixels)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + base + r[:, None] * channels + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.where(m, v - shift, 0.0)
        acc += v
        acc2 += v * v
    count = pixels * GROUP
    mean_s = tl.sum(tl.sum(acc, 1), 0) / count
    var = tl.sum(tl.sum(acc2, 1), 0) / count - mean_s * mean_s
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    mean = mean_s + shift
    gamma = tl.load(w_ptr + g * GROUP + cols, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * GROUP + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = gamma * rstd
    offset = beta - mean * scale
    for start in range(0, pixels, BLOCK_P):
        r = start + rows
        m = (r < pixels)[:, None] & cmask[None, :]
        ptr = base + r[:, None] * channels + cols[None, :]
        v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        y = v * scale[None, :] + offset[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + ptr, y.to(y_ptr.dtype.element_ty), mask=m)


def group_norm_triton(x, weight, bias, silu: bool, block_p: int = 256, warps: int = 8):
    n, c, h, w = x.shape
    group = c // GROUPS
    y = torch.empty_like(x)  # channels_last in, channels_last out
    block_c = triton.next_power_of_2(group)
    _group_norm_nhwc[(n, GROUPS)](x, weight, bias, y, h * w, c, EPS, GROUP=group, BLOCK_P=max(16, block_p * 16 // block_c),
                                  BLOCK_C=block_c, SILU=silu, num_warps=warps)
    return y


def make_inputs(rows: int):
    gen = torch.Generator("cuda").manual_seed(0)
    out = []
    for c, pixels, silu in NORMS:
        side = int(pixels ** 0.5)
        x = (torch.randn(rows, c, side, side, device="cuda", generator=gen) * 3 + 1).half().to(memory_format=torch.channels_last)
        w = torch.randn(c, device="cuda", generator=gen).half()
        b = torch.randn(c, device="cuda", generator=gen).half()
        out.append((x, w, b, silu))
    return out


def eager(inputs):
    outs = []
    for x, w, b, silu in inputs:
        y = F.group_norm(x, GROUPS, w, b, EPS)
        outs.append(F.silu(y) if silu else y)
    return outs


def compiled(options: dict):
    torch._dynamo.reset()
    return torch.compile(eager, options=options)


def measure(report: dict, name: str, fn, inputs) -> None:
    reference = [y.float() for y in eager(inputs)]
    try:
        ms, outs, detail = graph_ms(lambda: fn(inputs))
    except Exception as exc:
        report[name] = dict(error=repr(exc)[:400])
        print(name, "failed", repr(exc)[:400], flush=True)
        return
    diff = max((o.float() - r).abs().max().item() for o, r in zip(outs, reference))
    row = dict(graph_ms=round(ms, 4), max_abs_vs_eager=diff, kernels=detail["kernels"], kernel_us=detail["kernel_us"])
    report.setdefault(name, []).append(row)
    print(name, row, flush=True)


SHIPPED = (two_kernel.ONE_PROGRAM_TILE, two_kernel.ONE_PROGRAM_WARPS)


def package(one_program: int = 0, tile: int = SHIPPED[0], warps: int = SHIPPED[1]):
    """The package's kernels, groups of up to ``one_program`` values in one program of ``tile``
    values and ``warps`` warps (the package's own by default; R18's run 92 swept with 4 warps)."""
    def run(ins):
        two_kernel.ONE_PROGRAM_TILE, two_kernel.ONE_PROGRAM_WARPS = tile, warps
        try:
            return [two_kernel.group_norm_triton(x, GROUPS, w, b, EPS, silu, one_program=one_program)
                    for x, w, b, silu in ins]
        finally:
            two_kernel.ONE_PROGRAM_TILE, two_kernel.ONE_PROGRAM_WARPS = SHIPPED
    return run


def levels(out: str, rows: int) -> None:
    inputs = make_inputs(rows)
    report = dict(rows=rows, torch=torch.__version__, triton=triton.__version__, levels={}, thresholds={})
    for _ in range(2):
        for pixels in (L8, L16, L32, L64):
            subset = [i for i, (c, p, s) in zip(inputs, NORMS) if p == pixels]
            level = report["levels"].setdefault(f"{int(pixels ** 0.5)}x{int(pixels ** 0.5)} ({len(subset)} norms)", {})
            measure(level, "two-kernel", package(), subset)
            for tile in (2048, 4096, 8192):
                for warps in (4, 8):
                    measure(level, f"one-program-{tile}-{warps}", package(1 << 30, tile, warps), subset)
        for limit in (0, 2560, 5120, 10240, 20480):
            measure(report["thresholds"], f"one-program-up-to-{limit}", package(limit), inputs)
    Path(out).write_text(json.dumps(report, indent=2))


def main(out: str, rows: int = 1) -> None:
    inputs = make_inputs(rows)
    reference = [y.float() for y in eager(inputs)]
    variants = {
        "inductor": lambda: compiled({}),
        "inductor-no-split": lambda: compiled({"split_reductions": False}),
        "inductor-cooperative": lambda: compiled({"triton.cooperative_reductions": True}),
    }
    for block_p, warps in ((64, 4), (128, 8), (256, 8), (512, 16)):
        variants[f"triton-{block_p}-{warps}"] = (lambda block_p=block_p, warps=warps: lambda ins: [
            group_norm_triton(x, w, b, silu, block_p, warps) for x, w, b, silu in ins])
    for elements, block_p, block_c, warps in ((4096, 64, 64, 4), (2048, 64, 64, 4), (8192, 64, 64, 4),
                                              (4096, 32, 64, 4), (4096, 128, 64, 8), (4096, 64, 128, 8)):
        variants[f"two-kernel-{elements}-{block_p}x{block_c}-{warps}"] = (
            lambda e=elements, p=block_p, c=block_c, w=warps: lambda ins: [
                two_kernel.group_norm_triton(x, GROUPS, wt, b, EPS, silu, e, p, c, w) for x, wt, b, silu in ins])
    report = dict(rows=rows, norms=len(NORMS), torch=torch.__version__, triton=triton.__version__, variants={})
    for _ in range(2):
        for name, make in variants.items():
            try:
                fn = make()
                ms, outs, detail = graph_ms(lambda: fn(inputs))
            except Exception as exc:
                report["variants"][name] = dict(error=repr(exc)[:400])
                print(name, "failed", repr(exc)[:400], flush=True)
                continue
            diff = max((o.float() - r).abs().max().item() for o, r in zip(outs, reference))
            row = dict(graph_ms=round(ms, 4), max_abs_vs_eager=diff, kernels=detail["kernels"],
                       kernel_us=detail["kernel_us"])
            report["variants"].setdefault(name, [])
            if isinstance(report["variants"][name], list):
                report["variants"][name].append(row)
            print(name, row, flush=True)
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if sys.argv[3:4] == ["levels"]:
        levels(sys.argv[1], int(sys.argv[2]))
    else:
        main(sys.argv[1], *(int(n) for n in sys.argv[2:3]))
