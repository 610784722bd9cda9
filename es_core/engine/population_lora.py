"""A population of LoRA adapters applied in one batched pass: y = W x + scaling_m * B[m] (A[m] x).

Rows of a batch are member-major: N = G * R rows, member slot g owns rows g*R .. (g+1)*R - 1
(every member sees the same R prompts). The LoRA path is then two batched matmuls over the G
members, with no Python loop over members and no per-row gather of A and B: `x.view(G, R*T, in)
@ A^T -> [G, R*T, r] @ B^T -> [G, R*T, out]`. A slot whose A and B are zero is the base model.

Fused Linears (q/k/v, gate/up, as in gpt-fast) share one LoRA pair: the A's of the parts that carry
LoRA are stacked along the rank ([G, k*r, in]) and the B's placed block-diagonally in
[G, out_total, k*r], so each fused Linear costs two bmm whatever the number of parts. The member's
scaling (alpha / r) is folded into B when the slots are filled. Slots are cast to the model dtype
on the device; the adapters themselves stay float32 in files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from es_core.lora import LoRATarget, LoRATensors, StackedLoRA, check_adapter_matches

GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
GROUPS = ("qkv", "o", "gate_up", "down")


class LayerLoRA(NamedTuple):
    """One layer's (a [G, k*r, in], b [G, out, k*r]) per fused Linear, None where no LoRA."""

    qkv: tuple[torch.Tensor, torch.Tensor] | None = None
    o: tuple[torch.Tensor, torch.Tensor] | None = None
    gate_up: tuple[torch.Tensor, torch.Tensor] | None = None
    down: tuple[torch.Tensor, torch.Tensor] | None = None


NO_LORA = LayerLoRA()


def lora_delta(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h: [N, T, in], a: [G, k*r, in], b: [G, out, k*r] (scaled) -> [N, T, out], N = G * R."""
    n, t, d_in = h.shape
    g = a.shape[0]
    u = torch.bmm(h.reshape(g, (n // g) * t, d_in), a.transpose(1, 2))  # [G, R*T, k*r]
    return torch.bmm(u, b.transpose(1, 2)).reshape(n, t, b.shape[1])  # [N, T, out]


@dataclass(frozen=True)
class _Part:
    target: LoRATarget
    block: int  # rank block j: rows j*r .. (j+1)*r of A, columns of B
    offset: int  # first output feature of this part inside the fused Linear


class PopulationLoRA:
    """Stacked slots for every fused Linear of every layer that carries LoRA."""

    def __init__(self, fused_out: dict[str, tuple[tuple[str, int], ...]], fused_in: dict[str, int], n_layers: int,
                 targets: Sequence[LoRATarget], rank: int, dtype: torch.dtype, device: torch.device, pad_rank_to: int = 1):
        self.targets, self.rank, self.dtype, self.device = list(targets), int(rank), dtype, torch.device(device)
        # Each part's rank block is zero-padded to a multiple of pad_rank_to (exact: zero rows of A,
        # zero columns of B). On an H100, rank 1 (blocks of width 1-3) ran slower than rank 8:
        # 13.2 vs 11.8 ms per decode step at 1.5B, cuBLAS bmm being slow on unaligned widths.
        self.block = -(-self.rank // pad_rank_to) * pad_rank_to
        self.n_layers = n_layers
        self._parts: dict[tuple[int, str], list[_Part]] = {}
        self._out: dict[str, int] = {g: sum(o for _, o in parts) for g, parts in fused_out.items()}
        self._in = dict(fused_in)
        offsets = {g: {} for g in fused_out}
        for g, parts in fused_out.items():
            off = 0
            for module, out in parts:
                offsets[g][module] = off
                off += out
        order = {module: i for parts in fused_out.values() for i, (module, _) in enumerate(parts)}
        by_group: dict[tuple[int, str], list[LoRATarget]] = {}
        for t in self.targets:
            if t.module not in GROUP_OF:
                raise ValueError(f"embedded engine cannot put LoRA on {t.path} (modules: {sorted(GROUP_OF)})")
            by_group.setdefault((t.layer, GROUP_OF[t.module]), []).append(t)
        for key, ts in by_group.items():
            ts = sorted(ts, key=lambda t: order[t.module])
            self._parts[key] = [_Part(t, j, offsets[key[1]][t.module]) for j, t in enumerate(ts)]
        self.n_slots = 0
        self._a: dict[tuple[int, str], torch.Tensor] = {}
        self._b: dict[tuple[int, str], torch.Tensor] = {}

    def _allocate(self, n_slots: int) -> None:
        self.n_slots = n_slots
        for (layer, group), parts in self._parts.items():
            k = len(parts) * self.block
            self._a[layer, group] = torch.zeros(n_slots, k, self._in[group], dtype=self.dtype, device=self.device)
            self._b[layer, group] = torch.zeros(n_slots, self._out[group], k, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def set_members(self, members: Sequence[LoRATensors | None] | StackedLoRA, scalings: Sequence[float]) -> None:
        """Fill slot g with member g (None: zeros, the base model). Buffers keep their addresses
        while the number of members stays the same (captured CUDA graphs stay valid)."""
        if len(members) != len(scalings):
            raise ValueError(f"{len(members)} members but {len(scalings)} scalings")
        stacked = isinstance(members, StackedLoRA)
        # a stacked population shares one layout: its first member stands for all
        for m in (members.member(0),) if stacked and len(members) else () if stacked else members:
            if m is not None:
                check_adapter_matches(m, self.targets, self.rank)
        if len(members) != self.n_slots:
            self._allocate(len(members))
        scale = torch.tensor([float(s) for s in scalings], dtype=torch.float32)[:, None, None]
        r, w = self.rank, self.block
        for key, parts in self._parts.items():
            a_buf, b_buf = self._a[key], self._b[key]
            for p in parts:
                t = p.target
                if stacked:
                    a = _get_stacked(members, t.key_a, (r, t.in_features))  # [G, r, in]
                    b = _get_stacked(members, t.key_b, (t.out_features, r)) * scale  # [G, out, r]
                else:
                    a = torch.stack([_get(m, t.key_a, (r, t.in_features)) for m in members])
                    b = torch.stack([_get(m, t.key_b, (t.out_features, r)) for m in members]) * scale
                a_buf[:, p.block * w:p.block * w + r].copy_(a)
                b_buf[:, p.offset:p.offset + t.out_features, p.block * w:p.block * w + r].copy_(b)

    def layer(self, i: int, lo: int = 0, hi: int | None = None) -> LayerLoRA:
        """Layer i's slots lo..hi (a view: the addresses of the full buffers)."""
        hi = self.n_slots if hi is None else hi
        return LayerLoRA(*[(self._a[i, g][lo:hi], self._b[i, g][lo:hi]) if (i, g) in self._a else None for g in GROUPS])

    def bytes_per_step(self) -> int:
        """Bytes of A and B one decode step reads (zero blocks of B included)."""
        return sum(t.numel() * t.element_size() for t in [*self._a.values(), *self._b.values()])

    def flops_per_row(self) -> int:
        """Multiply-adds x2 of the LoRA path per row and token."""
        return sum(2 * (a.shape[1] * a.shape[2] + b.shape[1] * b.shape[2]) for a, b in zip(self._a.values(), self._b.values()))


def _get(member: LoRATensors | None, key: str, shape: tuple[int, int]) -> torch.Tensor:
    if member is None or key not in member:
        return torch.zeros(shape, dtype=torch.float32)
    return member[key].detach().to("cpu", torch.float32)


def _get_stacked(members: StackedLoRA, key: str, shape: tuple[int, int]) -> torch.Tensor:
    if key not in members.tensors:
        return torch.zeros((len(members), *shape), dtype=torch.float32)
    return members.tensors[key].detach().to("cpu", torch.float32)
