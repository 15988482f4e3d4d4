"""Does cuDNN's fused convolution + ReLU (+ residual add) make TAESD faster on the GPU?

TAESD's blocks are conv -> ReLU -> conv -> ReLU -> conv, + skip, ReLU, all at 64 channels up to the
full 512x512 resolution. Under inductor the convolutions are cuDNN calls and each ReLU (or add + ReLU)
a separate memory-bound kernel over the whole activation. cuDNN can run them as one kernel
(torch.cudnn_convolution_relu / cudnn_convolution_add_relu). This measures TAESD's encoder + decoder
(random weights, fp16, channels_last, one 512x512 frame) replayed from a CUDA graph: stock eager,
stock compiled (as the pipeline ran it until R11), and the fused form, eager and compiled (as a
custom op). The probe that led to engine/taesd.py, kept as it ran (its ops are its own, written
before that module); bench-h200.sh parts 42-45 measure the package's code in the pipeline.

    python3 scripts/taesd-fused-conv.py OUT.json [SIZE]
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock


@torch.library.custom_op("taesd_probe::conv_relu", mutates_args=())
def conv_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int) -> torch.Tensor:
    return torch.cudnn_convolution_relu(x, w, b, [stride] * 2, [padding] * 2, [1, 1], 1)


@conv_relu.register_fake
def _(x, w, b, stride, padding):
    return F.conv2d(x, w, b, stride, padding)


@torch.library.custom_op("taesd_probe::conv_add_relu", mutates_args=())
def conv_add_relu(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, b: torch.Tensor | None, padding: int) -> torch.Tensor:
    return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, [1, 1], [padding] * 2, [1, 1], 1)


@conv_add_relu.register_fake
def _(x, w, z, b, padding):
    return F.conv2d(x, w, b, 1, padding)


def fused_block(block: AutoencoderTinyBlock):
    c1, _, c2, _, c3 = block.conv

    def forward(x):
        h = conv_relu(x, c1.weight, c1.bias, 1, 1)
        h = conv_relu(h, c2.weight, c2.bias, 1, 1)
        return conv_add_relu(h, c3.weight, x, c3.bias, 1)

    assert isinstance(block.skip, torch.nn.Identity)
    block.forward = forward


def fuse(vae: AutoencoderTiny):
    for module in vae.modules():
        if isinstance(module, AutoencoderTinyBlock):
            fused_block(module)
    layers = vae.decoder.layers
    first, act = layers[0], layers[1]  # conv(4 -> 64) + ReLU
    assert isinstance(act, torch.nn.ReLU)
    fused_first = torch.nn.Module()
    fused_first.forward = lambda x: conv_relu(x, first.weight, first.bias, 1, 1)
    vae.decoder.layers = torch.nn.Sequential(fused_first, *list(layers)[2:])


def graph_ms(fn, x, iters=200):
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return sorted(samples)[len(samples) // 2], out.clone()


def main():
    out_path = sys.argv[1]
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    torch.backends.cudnn.benchmark = True
    dev, dtype = torch.device("cuda"), torch.float16
    torch.manual_seed(0)
    x = (torch.rand(1, 3, size, size, device=dev, dtype=dtype) * 2 - 1).contiguous(memory_format=torch.channels_last)
    report = {"size": size, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "gpu": torch.cuda.get_device_name()}

    def make(fused: bool):
        torch.manual_seed(0)
        vae = AutoencoderTiny().to(dev, dtype).to(memory_format=torch.channels_last).eval()
        if fused:
            fuse(vae)
        return vae

    def chain(vae):
        enc, dec = vae.encoder, vae.decoder
        return lambda t: dec(enc(t))

    results = {}
    with torch.no_grad():
        stock, fused = make(False), make(True)
        ref = chain(stock)(x)
        got = chain(fused)(x)
        report["fused_vs_stock_max_abs"] = (got.float() - ref.float()).abs().max().item()
        report["stock_abs_mean"] = ref.float().abs().mean().item()
        for name, vae, compiled in (("stock-eager", stock, False), ("fused-eager", fused, False),
                                    ("stock-compiled", stock, True), ("fused-compiled", fused, True)):
            fn = chain(vae)
            t0 = time.perf_counter()
            if compiled:
                torch._dynamo.reset()
                enc, dec = torch.compile(vae.encoder), torch.compile(vae.decoder)
                fn = lambda t, enc=enc, dec=dec: dec(enc(t))  # noqa: E731
                fn(x)
            try:
                ms, out = graph_ms(fn, x)
                results[name] = {"graph_ms": round(ms, 4), "setup_s": round(time.perf_counter() - t0, 1),
                                 "max_abs_vs_stock_eager": (out.float() - ref.float()).abs().max().item()}
            except Exception as exc:  # noqa: BLE001 - report and go on
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(name, results[name], flush=True)
        # Where the time goes: kernel totals per call of the eager variants (10 calls, no graph).
        from torch.profiler import ProfilerActivity, profile
        for name, vae in (("stock", stock), ("fused", fused)):
            fn = chain(vae)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn(x)
                torch.cuda.synchronize()
            rows = sorted(((e.key, e.count / 10, e.device_time_total / 10) for e in prof.key_averages()),
                          key=lambda r: -r[2])
            results[f"{name}-eager-kernels"] = [(k[:90], c, round(us, 1)) for k, c, us in rows[:12]]
            results[f"{name}-eager-kernel-us"] = round(sum(r[2] for r in rows), 1)
            print(name, "kernel us per call", results[f"{name}-eager-kernel-us"], flush=True)
    report["results"] = results
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
