"""How long cuDNN takes for TAESD's first and last convolutions, and for the same work padded.

TAESD's encoder starts with a 3 -> 64 channel 3x3 convolution and its decoder ends with a 64 -> 3 one,
both at the frame's full size. With 3 channels on one side cuDNN picks kernels that do not use
shared memory ("indexed_wo_smem"): on an H200 in the compiled step 36 and 57 us at 512x512, more
than a 64 -> 64 convolution there (R13's kernel traces). This times each (fp16, channels_last,
cudnn.benchmark, replayed from a CUDA graph) with the 3 channels padded to 4, 8, 16 (and 32 for the
last convolution; zero weights),
the work the pipeline could run instead.

    python3 scripts/conv-shapes.py OUT.json [SIZE]
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

spec = importlib.util.spec_from_file_location("taesd_fused_conv", Path(__file__).resolve().parent / "taesd-fused-conv.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def main(out_path: str, size: int = 512) -> None:
    torch.backends.cudnn.benchmark = True
    dev, dtype = torch.device("cuda"), torch.float16
    torch.manual_seed(0)
    report = {"size": size, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "last": {}, "first": {}}
    x64 = cl(torch.randn(1, 64, size, size, device=dev, dtype=dtype))
    for cout in (3, 4, 8, 16, 32):
        w, b = cl(torch.randn(cout, 64, 3, 3, device=dev, dtype=dtype) * 0.05), torch.randn(cout, device=dev, dtype=dtype)
        for bias in (True, False):
            ms, _ = probe.graph_ms(lambda t, w=w, b=b if bias else None: F.conv2d(t, w, b, padding=1), x64)
            report["last"][f"64->{cout}{'' if bias else ' no bias'}"] = round(ms * 1e3, 1)
    for cin in (3, 4, 8, 16):
        x = cl(torch.randn(1, cin, size, size, device=dev, dtype=dtype))
        w, b = cl(torch.randn(64, cin, 3, 3, device=dev, dtype=dtype) * 0.2), torch.randn(64, device=dev, dtype=dtype)
        for bias in (True, False):
            ms, _ = probe.graph_ms(lambda t, w=w, b=b if bias else None: F.conv2d(t, w, b, padding=1), x)
            report["first"][f"{cin}->64{'' if bias else ' no bias'}"] = round(ms * 1e3, 1)
        # the same on an NCHW input (how the frame may arrive)
        ms, _ = probe.graph_ms(lambda t, w=w, b=b: F.conv2d(t, w, b, padding=1), x.contiguous())
        report["first"][f"{cin}->64 NCHW input"] = round(ms * 1e3, 1)
    print(json.dumps(report, indent=1))
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *(int(v) for v in sys.argv[2:3]))
