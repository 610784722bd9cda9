"""The MLP's SiLU with the gate/up LoRA of a population applied in the same pass (the engine's
`lora_kernel="triton"`).

m = silu(gate + dg) * (up + du), where gate/up are the base output of the fused gate/up Linear
[N, 2I] and dg/du the members' LoRA expand u B^T. Rows are member-major (N = G * R): one program
takes rows of one member only, so its B tile is read once and multiplied on tensor cores for all
of them (`tl.dot`), where the fused reductions of `population_lora.lora_delta_fused` re-read a
member's B for every row (why they lose at rank 8) and the bmm path writes the [N, 2I] delta
to memory and reads it back in the SiLU kernel (H100, 0.5B shape, rank 8: 14.5 us for the expand
bmm, then 14 us for the SiLU pass against 7 us without LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_WIDTH = 16  # the rank block (after padding) silu_lora reads as one tile


def silu_lora_reference(gu: torch.Tensor, u: torch.Tensor, b: torch.Tensor, parts: tuple[tuple[int, int, int], ...], rows_per_member: int) -> torch.Tensor:
    """gu [N, 2I], u [N, k*w] (the shrink x A^T of the parts with LoRA, part j in columns j*w..),
    b compact [G, 2I, w] (scaled), parts (rank block j, first output, outputs) -> m [N, I].
    u is rounded to B's dtype (as a bmm in the model's dtype would), products summed in float32."""
    n, two_i = gu.shape
    w = b.shape[2]
    delta = torch.zeros(n, two_i, dtype=torch.float32, device=gu.device)
    member = torch.arange(n, device=gu.device) // rows_per_member
    for j, first, size in parts:
        bj = b[member, first:first + size].float()  # [N, size, w]
        delta[:, first:first + size] = (u[:, None, j * w:(j + 1) * w].to(b.dtype).float() * bj).sum(-1)
    h = gu.float() + delta
    gate, up = h.split(two_i // 2, dim=-1)
    return (F.silu(gate) * up).to(gu.dtype)


if triton is not None:

    @triton.jit
    def _silu_lora_kernel(GU, U, B, M, R, I, s_gun, s_un, s_bg, s_bo, s_mn,
                          J_GATE: tl.constexpr, J_UP: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        g = tl.program_id(0)  # member
        row_block = tl.program_id(1)
        offs_r = row_block * BM + tl.arange(0, BM)  # rows of member g
        rmask = offs_r < R
        rows = g * R + offs_r
        cols = tl.program_id(2) * BN + tl.arange(0, BN)
        cmask = cols < I
        mask = rmask[:, None] & cmask[None, :]
        gate = tl.load(GU + rows[:, None] * s_gun + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + rows[:, None] * s_gun + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        offs_w = tl.arange(0, W_PAD)
        wmask = offs_w < W
        b_base = B + g * s_bg
        if J_GATE >= 0:
            ug = tl.load(U + rows[:, None] * s_un + J_GATE * W + offs_w[None, :], mask=rmask[:, None] & wmask[None, :], other=0.0)
            bg = tl.load(b_base + cols[:, None] * s_bo + offs_w[None, :], mask=cmask[:, None] & wmask[None, :], other=0.0)
            gate += tl.dot(ug.to(bg.dtype), tl.trans(bg), input_precision=PRECISION)
        if J_UP >= 0:
            uu = tl.load(U + rows[:, None] * s_un + J_UP * W + offs_w[None, :], mask=rmask[:, None] & wmask[None, :], other=0.0)
            bu = tl.load(b_base + (I + cols)[:, None] * s_bo + offs_w[None, :], mask=cmask[:, None] & wmask[None, :], other=0.0)
            up += tl.dot(uu.to(bu.dtype), tl.trans(bu), input_precision=PRECISION)
        m = gate * tl.sigmoid(gate) * up
        tl.store(M + rows[:, None] * s_mn + cols[None, :], m.to(M.dtype.element_ty), mask=mask)


def silu_lora(gu: torch.Tensor, u: torch.Tensor, b: torch.Tensor, parts: tuple[tuple[int, int, int], ...], rows_per_member: int,
              block_rows: int = 32, block_cols: int = 64, num_warps: int = 4) -> torch.Tensor:
    """silu_lora_reference in one Triton kernel. The parts must be gate (outputs 0..I) and/or up
    (I..2I), each whole; w <= 16 (B is read as one tile of its rank). The default launch was the
    fastest of 18 on an H100 (32 members x 32 rows, rank 8, 24 layers in a CUDA graph): 18.5 us per
    layer at the 0.5B shape (128 columns: 20.0), 30.3 at 1.5B (32.7)."""
    n, two_i = gu.shape
    i = two_i // 2
    g, w = b.shape[0], b.shape[2]
    if n != g * rows_per_member:
        raise ValueError(f"{n} rows are not {g} members x {rows_per_member}")
    blocks = {first: j for j, first, size in parts if size == i and first in (0, i)}
    if len(blocks) != len(parts):
        raise ValueError(f"silu_lora needs whole gate/up parts of {i} outputs, got {parts}")
    if w > MAX_WIDTH or gu.stride(-1) != 1 or u.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"silu_lora needs a rank block <= {MAX_WIDTH} and the last dimension contiguous")
    out = torch.empty(n, i, dtype=gu.dtype, device=gu.device)
    block_rows = max(16, block_rows)  # tl.dot's smallest tile
    grid = (g, triton.cdiv(rows_per_member, block_rows), triton.cdiv(i, block_cols))
    _silu_lora_kernel[grid](
        gu, u, b, out, rows_per_member, i, gu.stride(0), u.stride(0), b.stride(0), b.stride(1), out.stride(0),
        J_GATE=blocks.get(0, -1), J_UP=blocks.get(i, -1), W=w, W_PAD=MAX_WIDTH,
        BM=block_rows, BN=block_cols, num_warps=num_warps,
        # float32 B gets float32 products (tl.dot would round them to TF32: a float32 model's greedy
        # tokens then drifted from the bmm path's on the GPU); bf16 products are exact either way
        PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
    )
    return out
