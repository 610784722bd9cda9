"""Decode attention alone: the Triton kernel's bandwidth over the valid KV slots with its default
launch and a sweep of launch parameters, against SDPA with a mask (also the correctness reference),
each timed as 12 launches in one CUDA graph. GPU only.

    python -m benchmarks.bench_attention                 # SmolLM2 / Qwen2.5-0.5B / 1.5B decode shapes, 1,024 rows
    python -m benchmarks.bench_attention --write-at 269  # the mean context of the engine benchmark (prompts of
                                                         # 137-141 tokens + 128): where its decode spends the average step
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.gpu_peaks import gpu_peaks
from es_core.engine.attention import default_launch, sdpa_decode, triton_decode

SHAPES = {"smollm2-135m": (3, 3, 64), "qwen2.5-0.5b": (2, 7, 64), "qwen2.5-1.5b": (2, 6, 128)}  # kv heads, q per kv, head dim


def timed(fn, launches: int = 12, repeats: int = 7) -> float:
    """Seconds per call: `launches` calls captured in one CUDA graph (a Triton launch from Python
    costs about as much CPU time as the kernel runs, which made un-graphed timings vary by 20%),
    the median of `repeats` replays."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / launches / 1e3)
    return sorted(times)[repeats // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--write-at", type=int, default=400, help="the new token's slot: each row attends to start..write-at")
    p.add_argument("--cache-len", type=int, default=448)
    p.add_argument("--no-sweep", action="store_true", help="the default launch only")
    p.add_argument("--bandwidth", type=float, default=None, help="peak memory bandwidth, bytes/s (default: the GPU's datasheet)")
    args = p.parse_args()
    dev = torch.device("cuda")
    peaks = gpu_peaks(dev, args.bandwidth)
    print(f"{torch.cuda.get_device_name(dev)}; peak: {peaks.describe()}")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, cache_len, write_at = args.rows, args.cache_len, args.write_at
    for name, (hkv, grp, hd) in SHAPES.items():
        q = torch.randn(rows, hkv, grp, hd, generator=g).to(dev, torch.bfloat16)
        k = torch.randn(rows, hkv, cache_len, hd, generator=g).to(dev, torch.bfloat16)
        v = torch.randn(rows, hkv, cache_len, hd, generator=g).to(dev, torch.bfloat16)
        start = torch.randint(0, 8, (rows,), generator=g, dtype=torch.int32).to(dev)
        write = torch.tensor([write_at], dtype=torch.long, device=dev)
        slots = torch.arange(cache_len, device=dev)
        mask = ((slots[None, :] >= start[:, None]) & (slots[None, :] <= write_at))[:, None, None, :]
        ref = sdpa_decode(q, k, v, mask)
        valid_bytes = float(((write_at + 1 - start).sum() * hkv * hd * 2 * 2).item())
        t = timed(lambda: sdpa_decode(q, k, v, mask))
        print(f"{name}: SDPA {t * 1e6:.0f} us, {valid_bytes / t / 1e12:.2f} TB/s")

        def report(out, fn) -> str:
            err = (out.float() - ref.float()).abs().max().item()
            t = timed(fn)
            return f"{t * 1e6:6.1f} us  {valid_bytes / t / 1e12:.2f} TB/s ({100 * valid_bytes / t / peaks.bandwidth:.0f}% of peak)  max err {err:.3g}"
        print(f"  default {default_launch(hkv, hd)}: {report(triton_decode(q, k, v, start, write), lambda: triton_decode(q, k, v, start, write))}")
        for block_l, warps, stages, heads in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3), (1, 2)):
            if hkv % heads or args.no_sweep:
                continue
            launch = dict(block_l=block_l, num_warps=warps, num_stages=stages, heads_per_program=heads)
            try:
                line = report(triton_decode(q, k, v, start, write, **launch), lambda: triton_decode(q, k, v, start, write, **launch))
            except Exception as exc:  # a launch that does not fit (shared memory) is skipped
                line = type(exc).__name__
            print(f"  block {block_l:>3} warps {warps} stages {stages} heads/program {heads}: {line}")


if __name__ == "__main__":
    main()
