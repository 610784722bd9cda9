"""What the GPU gives on the work a decode step is made of: memory copy bandwidth, a large bf16
matmul, and cuBLAS on the exact dense matmuls of one decode step at the engine's row count, each
against the datasheet ceilings the roofline divides by. GPU only.

    python -m benchmarks.bench_ceilings                   # 1,024 rows (32 members x 32 prompts)
    python -m benchmarks.bench_ceilings --rows 2048

Each figure is the median of 7 replays of a CUDA graph of `--launches` calls (no Python launch cost).
The per-step sum of the matmuls is the time the engine's own matmuls cannot beat while they go
through cuBLAS: beside bench_engine's --profile (which times the same kernels inside the step),
it tells how much of the roofline a step made of these kernels, one after the other, can reach.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.bench_attention import timed
from benchmarks.gpu_peaks import gpu_peaks

# hidden, intermediate, layers, q heads, kv heads, head dim, vocab (the presets of es_core.models)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 64, 151936),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 128, 151936),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--launches", type=int, default=12)
    args = p.parse_args()
    dev = torch.device("cuda")
    peaks = gpu_peaks(dev)
    print(f"{torch.cuda.get_device_name(dev)}; datasheet {peaks.describe()}")

    src = torch.empty(2**30, dtype=torch.bfloat16, device=dev)  # 2 GiB, far beyond the L2
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), launches=args.launches)
    moved = 2 * src.numel() * src.element_size()  # read + written
    print(f"copy 2 GiB: {moved / t / 1e12:.2f} TB/s read + written ({100 * moved / t / peaks.bandwidth:.0f}% of the datasheet)")
    del src, dst

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    t = timed(lambda: a @ b, launches=args.launches)
    print(f"matmul 8192^3 bf16: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s ({100 * 2 * 8192**3 / t / peaks.bf16_dense:.0f}% of the datasheet)")
    del a, b

    n = args.rows
    for name, (d, inter, layers, hq, hkv, hd, vocab) in SHAPES.items():
        x = {k: torch.randn(n, k, dtype=torch.bfloat16, device=dev) for k in {d, hq * hd, inter}}
        linears = {"qkv": ((hq + 2 * hkv) * hd, d), "o": (d, hq * hd), "gate_up": (2 * inter, d), "down": (d, inter), "head": (vocab, d)}
        step_us, step_flops = 0.0, 0.0
        parts = []
        for part, (out_f, in_f) in linears.items():
            w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device=dev) * 0.02
            t = timed(lambda: F.linear(x[in_f], w), launches=args.launches)
            flops = 2 * n * out_f * in_f
            times = 1 if part == "head" else layers
            step_us += times * t * 1e6
            step_flops += times * flops
            parts.append(f"{part} [{n}x{in_f}]x[{in_f}x{out_f}] {t * 1e6:.1f} us = {100 * flops / t / peaks.bf16_dense:.0f}%")
        floor_us = step_flops / peaks.bf16_dense * 1e6
        print(f"{name}, {n} rows: the step's dense matmuls through cuBLAS {step_us:,.0f} us, their FLOP floor {floor_us:,.0f} us "
              f"({100 * floor_us / step_us:.0f}% of it); " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
