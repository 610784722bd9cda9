"""The greedy head's matmul and argmax in one Triton kernel: logits are never written to memory.

F.linear then argmax writes the [N, V] logits (1,024 rows x 151,936 tokens: 311 MB in bf16) and
reads them back; on an H100 at the Qwen2.5 shapes the argmax alone took 166 us per decode step
beside the matmul's 395 us (0.5B). Here each program computes one [BM, BN] tile of logits on tensor
cores, rounds it to the model's dtype (as F.linear's output is, so ties resolve as torch.argmax's
do: the lowest index), and writes only each row's best value and index in that tile; a small
argmax over the tiles picks the winner (the first tile holding the maximum, so the lowest index
overall).
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def head_argmax_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, D], w [V, D] -> argmax over V of x w^T, [N] int64."""
    return torch.nn.functional.linear(x, w).argmax(dim=-1)


if triton is not None:

    @triton.jit
    def _head_argmax_kernel(X, W, PV, PI, M, N, K, s_xm, s_wn, s_pm,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # m varies fastest: the programs that share a tile of W run together and read it once
        num_m = tl.cdiv(M, BM)
        pid_m = tl.program_id(0) % num_m
        pid_n = tl.program_id(0) // num_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            a = tl.load(X + offs_m[:, None] * s_xm + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(W + offs_n[:, None] * s_wn + kk[None, :], mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        logits = acc.to(X.dtype.element_ty).to(tl.float32)
        logits = tl.where(offs_n[None, :] < N, logits, float("-inf"))
        best = tl.max(logits, axis=1)
        index = tl.argmax(logits, axis=1, tie_break_left=True) + pid_n * BN
        rmask = offs_m < M
        tl.store(PV + offs_m * s_pm + pid_n, best, mask=rmask)
        tl.store(PI + offs_m * s_pm + pid_n, index, mask=rmask)


def default_launch(dtype: torch.dtype, shared_memory: int | None = None) -> dict:
    """H100, 1,024 rows, bf16 (timed in a CUDA graph against compiled F.linear + argmax): tiles of
    128 x 256 x 64, 8 warps, 3 stages: 519 vs 571 us at the 0.5B shape (vocabulary 151,936), 797 vs
    827 us at 1.5B, 152 vs 163 us at SmolLM2; 128 x 128 tiles lost at 1.5B (906 us). float32 tiles
    are smaller to fit shared memory (the CUDA tests' tiny models). Given a GPU's shared memory per
    block (bytes), fewer stages, then narrower tiles, until the operand buffers fit with a margin
    (an A100 has 164 KiB, consumer GPUs about 100 KiB; the H100 default needs 144 KiB)."""
    if dtype == torch.float32:
        launch = {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 4, "num_stages": 2}
    else:
        launch = {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3}
    if shared_memory is None:
        return launch
    size = 4 if dtype == torch.float32 else 2

    def fits() -> bool:  # 15% for the reduction's scratch and layout conversions
        return 1.15 * (launch["block_m"] + launch["block_n"]) * launch["block_k"] * size * launch["num_stages"] <= shared_memory

    for key, least in (("num_stages", 2), ("block_n", 64), ("block_m", 32), ("block_k", 16)):
        while not fits() and launch[key] > least:
            launch[key] = launch[key] - 1 if key == "num_stages" else launch[key] // 2
    return launch


@functools.cache
def _shared_memory(device: torch.device) -> int | None:
    """The opt-in shared memory per block of a CUDA device in bytes (None elsewhere)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or 99 * 1024


def head_argmax(x: torch.Tensor, w: torch.Tensor, block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """head_argmax_reference without the logits in memory: x [N, D], w [V, D] (the last dimension
    contiguous, same dtype) -> [N] int64. Launch parameters left as None take default_launch's."""
    if x.stride(-1) != 1 or w.stride(-1) != 1 or x.dtype != w.dtype:
        raise ValueError("head_argmax needs x and w of one dtype with the last dimension contiguous")
    given = {"block_m": block_m, "block_n": block_n, "block_k": block_k, "num_warps": num_warps, "num_stages": num_stages}
    launch = default_launch(x.dtype, _shared_memory(x.device)) | {k: v for k, v in given.items() if v is not None}
    block_m, block_n, block_k = launch["block_m"], launch["block_n"], launch["block_k"]
    m, k = x.shape
    n = w.shape[0]
    tiles_n = triton.cdiv(n, block_n)
    best = torch.empty(m, tiles_n, dtype=torch.float32, device=x.device)
    index = torch.empty(m, tiles_n, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(m, block_m) * tiles_n,)
    _head_argmax_kernel[grid](x, w, best, index, m, n, k, x.stride(0), w.stride(0), best.stride(0),
                              BM=block_m, BN=block_n, BK=block_k, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                              PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return index.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()
