"""Decode attention alone: the Triton kernel's bandwidth over the valid KV slots for a sweep of its
launch parameters, against SDPA with a mask (also the correctness reference). GPU only.

    python -m benchmarks.bench_attention                 # SmolLM2 / Qwen2.5-0.5B / 1.5B decode shapes, 1,024 rows
    python -m benchmarks.bench_attention --write-at 269  # the mean context of the engine benchmark (prompts of
                                                         # 137-141 tokens + 128): where its decode spends the average step
"""

from __future__ import annotations

import argparse
import itertools

import torch

from es_core.engine.attention import sdpa_decode, triton_decode

H100_BANDWIDTH = 3.35e12
SHAPES = {"smollm2-135m": (3, 3, 64), "qwen2.5-0.5b": (2, 7, 64), "qwen2.5-1.5b": (2, 6, 128)}  # kv heads, q per kv, head dim


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--write-at", type=int, default=400, help="the new token's slot: each row attends to start..write-at")
    p.add_argument("--cache-len", type=int, default=448)
    args = p.parse_args()
    dev = torch.device("cuda")
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
        for block_l, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
            try:
                out = triton_decode(q, k, v, start, write, block_l=block_l, num_warps=warps, num_stages=stages)
                err = (out.float() - ref.float()).abs().max().item()
                t = timed(lambda: triton_decode(q, k, v, start, write, block_l=block_l, num_warps=warps, num_stages=stages))
            except Exception as exc:  # a launch that does not fit (shared memory) is skipped
                print(f"  block {block_l} warps {warps} stages {stages}: {type(exc).__name__}")
                continue
            print(f"  block {block_l:>3} warps {warps} stages {stages}: {t * 1e6:6.0f} us  {valid_bytes / t / 1e12:.2f} TB/s "
                  f"({100 * valid_bytes / t / H100_BANDWIDTH:.0f}% of peak)  max err {err:.3g}")


if __name__ == "__main__":
    main()
