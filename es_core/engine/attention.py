"""Decode attention: one new query per row over its own slice of a left-padded static KV cache.

A Triton kernel in the style of flash-decoding (Dao et al.) / gpt-fast's decode path, without the
split over the sequence: one program per row and KV head (or pair of KV heads, one after the
other) streams the head's keys and values once with an online softmax, the grouped query heads
sharing the KV head as the rows of one small `tl.dot` (no repeat_kv copy). Each row reads only its valid slots [start, end): the left padding
and the unwritten tail of the cache are skipped, so no mask and no per-step shape change (one CUDA
graph serves every step). `end` is read from a device tensor inside the kernel for that reason.

PyTorch's SDPA with a boolean mask is the reference and the CPU path; on an H100 it picked a cuDNN
flash kernel that reached about 0.8 TB/s on this shape (measured: 180 us per layer at 0.5B,
1,024 rows), so the kernel below exists for the GPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU installs run the SDPA path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: q [N, Hkv, G, hd], k/v [N, Hkv, L, hd], mask [N, 1, 1, L] bool -> [N, Hkv, G, hd]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, KN, VN, O, Start, Write, scale_log2,
                       s_qn, s_qh, s_qg, s_kn, s_kh, s_kl, s_vn, s_vh, s_vl, s_nn, s_nh, s_mn, s_mh, s_on, s_oh, s_og,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, NUM_STAGES: tl.constexpr,
                       HEADS: tl.constexpr, NEW_KV: tl.constexpr, PRECISION: tl.constexpr):
        n = tl.program_id(0)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_l = tl.arange(0, BLOCK_L)
        start = tl.load(Start + n).to(tl.int32)
        write = tl.load(Write).to(tl.int32)  # the new token's slot
        for hh in tl.static_range(HEADS):  # HEADS KV heads of row n, one after the other
            h = tl.program_id(1) * HEADS + hh
            q = tl.load(Q + n * s_qn + h * s_qh + offs_g[:, None] * s_qg + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
            k_base = K + n * s_kn + h * s_kh
            v_base = V + n * s_vn + h * s_vh
            m_i = tl.full([G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D], tl.float32)
            if NEW_KV:
                # this program alone owns row n's head h: it writes the new token's K and V into the cache
                # (no separate index_copy) and attends to them from registers, the cache up to write - 1
                kn = tl.load(KN + n * s_nn + h * s_nh + offs_d)
                vn = tl.load(VN + n * s_mn + h * s_mh + offs_d)
                tl.store(k_base + write * s_kl + offs_d, kn)
                tl.store(v_base + write * s_vl + offs_d, vn)
                end = write
            else:
                end = write + 1  # the new token's slot was written before attention
            # a `for` over tl.range (not a while) lets Triton pipeline the loads of the next blocks;
            # V is loaded beside K, before the softmax needs it, so both are in flight at once
            for l0 in tl.range((start // BLOCK_L) * BLOCK_L, end, BLOCK_L, num_stages=NUM_STAGES):
                offs = l0 + offs_l
                valid = (offs >= start) & (offs < end)
                k = tl.load(k_base + offs[:, None] * s_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(v_base + offs[:, None] * s_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [G_PAD, BLOCK_L], log2 units
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
            if NEW_KV:
                s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale_log2  # [G_PAD]
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                # p rounded to V's dtype as the blocks' tl.dot does, so the new slot weighs as a cached one
                acc = acc * alpha[:, None] + p_new.to(vn.dtype).to(tl.float32)[:, None] * vn.to(tl.float32)[None, :]
            acc = acc / l_i[:, None]
            tl.store(O + n * s_on + h * s_oh + offs_g[:, None] * s_og + offs_d[None, :], acc.to(O.dtype.element_ty), mask=offs_g[:, None] < G)


def default_launch(hkv: int, head_dim: int) -> dict:
    """The launch that ran fastest on an H100 (1,024 rows, contexts of 203-331 slots, bf16, timed in a
    CUDA graph by benchmarks/bench_attention.py): blocks of 32 slots, 2 warps, 2 stages; two KV heads
    per program at head dim 64 (0.5B shape: 54 us per layer at context 267, was 59 us with 64-slot
    blocks, 4 warps, one stage), one at 128 (1.5B: 101 us, was 105 us)."""
    heads = 2 if head_dim <= 64 and hkv % 2 == 0 else 1
    return {"block_l": 32, "num_warps": 2, "num_stages": 2, "heads_per_program": heads}


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor, write: torch.Tensor,
                  k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                  block_l: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  heads_per_program: int | None = None) -> torch.Tensor:
    """q [N, Hkv, G, hd], caches [N, Hkv, L, hd], start [N] (first valid slot of each row), write [1]
    (the new token's slot) -> [N, Hkv, G, hd]; attends to slots start..write. With k_new and v_new
    ([N, Hkv, hd], any strides) the kernel also writes them into slot `write`; without, the caller has.
    Launch parameters left as None take `default_launch`'s."""
    n, hkv, g, d = q.shape
    tensors = [q, k_cache, v_cache] + ([k_new, v_new] if k_new is not None else [])
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("triton_decode needs the head dimension contiguous (stride 1)")
    given = {"block_l": block_l, "num_warps": num_warps, "num_stages": num_stages, "heads_per_program": heads_per_program}
    launch = default_launch(hkv, d) | {k: v for k, v in given.items() if v is not None}
    heads = launch["heads_per_program"]
    if hkv % heads:
        raise ValueError(f"heads_per_program={heads} does not divide the {hkv} KV heads")
    out = torch.empty_like(q)
    g_pad = max(16, triton.next_power_of_2(g))
    new_kv = k_new is not None
    kn, vn = (k_new, v_new) if new_kv else (k_cache[:, :, 0], v_cache[:, :, 0])  # placeholders, unread
    _decode_kernel[(n, hkv // heads)](
        q, k_cache, v_cache, kn, vn, out, start, write, (d ** -0.5) * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        G=g, G_PAD=g_pad, D=d, BLOCK_L=launch["block_l"], NUM_STAGES=launch["num_stages"], HEADS=heads, NEW_KV=new_kv,
        num_warps=launch["num_warps"],
        # float32 caches get float32 products (tl.dot would round them to TF32: greedy tokens then
        # drifted from SDPA's on a float32 model); bf16 products are exact either way
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"
