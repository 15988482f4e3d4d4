"""Where a call's GPU time goes, kernel by kernel; and TAESD's decoder with its upsamplings three ways.

    python3 scripts/kernel-trace.py trace OUT_DIR WORKLOAD [WORKLOAD ...]
    python3 scripts/kernel-trace.py decoder OUT_DIR WORKLOAD
    python3 scripts/kernel-trace.py compare OUT_DIR WORKLOAD VAR
    python3 scripts/kernel-trace.py now OUT_DIR WORKLOAD [WORKLOAD ...]

``trace``, for each workload: gzipped chrome traces of 3 calls of the compiled step (graph replays: each
kernel's name, duration and grid) and of 2 eager calls (mode ``none``: the CPU op that launched each
kernel), with TAESD as it was before R13 (R13's three rewrites off, as in run 57, before they existed). ``decoder``: TAESD's decoder (the
workloads' random weights, fp16, channels_last, ReLUs fused as in the pipeline) compiled and
replayed from a CUDA graph, in alternating rounds: as it was, with its upsamplings folded into
transposed convolutions (``engine/taesd.py``), and as sub-pixel convolutions (a 2x2 convolution to
four times the channels, then interleaved: this probe's own). ``compare``: the compiled step's trace
with the load-time switch VAR off (0), then on (1), in one process. ``now``: the compiled step's trace
with every setting at its default.
"""

import copy
import gzip
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from scope_streamdiffusion import bench
from scope_streamdiffusion.engine.inductor import cache_root
from scope_streamdiffusion.engine.taesd import _is_nearest_2x, _is_plain_3x3, fold_upsamples, fuse_relus

HERE = Path(__file__).resolve().parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ab = _script("ab-same-process")
R12_TAESD = ",".join(f"SCOPE_STREAMDIFFUSION_{name}=0" for name in ("TAESD_INPUT_LAYOUT", "FOLD_UPSAMPLES", "PAD_THIN_CONVS"))
graph_ms = _script("taesd-fused-conv").graph_ms


def trace(out: Path, workload: str, mode: str, calls: int, settings: str = R12_TAESD, tag: str = "") -> None:
    size = bench.WORKLOADS[workload].size
    frames = bench.make_frames(4, size, size, torch.device("cuda"))
    call, pipe = ab.load(workload, "env", settings, frames, mode=mode)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call([frames[i % len(frames)]])
        torch.cuda.synchronize()
    raw = out / f"{workload}-{mode}{tag}.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(workload, mode, "traced; graph alone", bench._graph_replay_ms(pipe, torch.device("cuda")), flush=True)


class SubPixelConv(torch.nn.Module):
    """Nearest 2x upsampling + 3x3 convolution as a 2x2 convolution (padding 1) to 4x the channels,
    one group per output phase, interleaved after."""

    def __init__(self, conv):
        super().__init__()
        w = conv.weight.detach().float()
        # phase 0 reads low-res rows m-1 (w0), m (w1 + w2); phase 1 rows m (w0 + w1), m+1 (w2):
        # output p of the padded 2x2 convolution reads rows p-1, p, so phase a is at p = m + a.
        taps = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float32, device=w.device)
        w4 = torch.einsum("akr,bls,oirs->aboikl", taps, taps, w).reshape(-1, w.shape[1], 2, 2)
        self.w4 = w4.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        self.bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        self.out = conv.out_channels

    def forward(self, x):
        n, _, h, w = x.shape
        y = F.conv2d(x, self.w4, self.bias, padding=1).view(n, 2, 2, self.out, h + 1, w + 1)
        rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], dim=-1) for a in (0, 1)]
        return torch.stack(rows, dim=-3).reshape(n, self.out, 2 * h, 2 * w).contiguous(memory_format=torch.channels_last)


def sub_pixel(vae) -> int:
    layers, count = vae.decoder.layers, 0
    for i in range(len(layers) - 1):
        if _is_nearest_2x(layers[i]) and _is_plain_3x3(layers[i + 1]):
            layers[i], layers[i + 1] = torch.nn.Identity(), SubPixelConv(layers[i + 1])
            count += 1
    return count


def decoders(out: Path, workload: str, rounds: int = 5) -> dict:
    from diffusers import AutoencoderTiny

    wl = bench.WORKLOADS[workload]
    _, taesd = bench.random_weight_model(bench._resolve_arch(wl, "auto"), cache_root() / "random-weights", torch.device("cuda"))
    base = AutoencoderTiny.from_pretrained(str(taesd), torch_dtype=torch.float16).to("cuda").eval()
    base.to(memory_format=torch.channels_last)
    fuse_relus(base)
    variants = {"as-is": base, "transposed": copy.deepcopy(base), "sub-pixel": copy.deepcopy(base)}
    report = {"workload": workload, "folded": fold_upsamples(variants["transposed"]),
              "sub_pixel": sub_pixel(variants["sub-pixel"]), "rounds": []}
    z = torch.randn(1, 4, wl.size // 8, wl.size // 8, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    runs = {}
    with torch.no_grad():
        ref = base.decoder(z)
        for name, vae in variants.items():
            t0 = time.perf_counter()
            fn = torch.compile(vae.decoder, dynamic=False)
            fn(z)
            ms, result = graph_ms(fn, z)
            report[name] = {"compile_s": round(time.perf_counter() - t0, 1), "graph_ms": round(ms, 4),
                            "max_abs_vs_as_is_eager": (result.float() - ref.float()).abs().max().item()}
            runs[name] = fn
            print(name, report[name], flush=True)
        for _ in range(rounds):  # alternated: what drifts over time is shared
            report["rounds"].append({name: round(graph_ms(fn, z, iters=100)[0], 4) for name, fn in runs.items()})
            print(report["rounds"][-1], flush=True)
        for name, fn in runs.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(z)
                torch.cuda.synchronize()
            rows = sorted(((e.key, e.count / 5, e.device_time_total / 5) for e in prof.key_averages()
                           if e.device_time_total > 0 and not e.key.startswith(("aten::", "cuda"))), key=lambda r: -r[2])
            report[name]["top_kernels_us_no_graph"] = [(k[:100], c, round(us, 1)) for k, c, us in rows[:10]]
    (out / f"decoder-{workload}.json").write_text(json.dumps(report, indent=1))
    return report


def main(what: str, out_dir: str, *workloads: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    if what == "decoder":
        decoders(out, workloads[0])
        return
    if what == "now":
        for workload in workloads:
            trace(out, workload, "compile", 3, "", "-now")
        return
    if what == "compare":
        workload, var = workloads
        for value in ("0", "1"):
            trace(out, workload, "compile", 3, f"{var}={value}", f"-{var.lower()}-{value}")
        return
    for workload in workloads:
        for mode, calls in (("compile", 3), ("none", 2)):
            try:
                trace(out, workload, mode, calls)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(workload, mode, "failed:", repr(exc)[:300], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
