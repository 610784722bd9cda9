"""A population of LoRA adapters applied in one batched pass: y = W x + scaling_m * B[m] (A[m] x).

Rows of a batch are member-major: N = G * R rows, member slot g owns rows g*R .. (g+1)*R - 1
(every member sees the same R prompts), so no Python loop over members and no per-row gather of
A and B. A slot whose A and B are zero is the base model.

Fused Linears (q/k/v, gate/up, as in gpt-fast) share one set of slots: the A's of the parts that
carry LoRA are stacked along the rank ([G, k*w, in], part j in rank block j); B is block-diagonal,
[G, out, k*w], or compact, [G, out, w] (output o's row of the B of the part that owns o). Three ways
to apply them:
- `lora_delta`: batched matmuls, u = x A^T per member, then u B^T (block-diagonal: two bmm per
  fused Linear) or u_j B_j^T per part (compact); any length: the prefill, and the CPU path;
- `lora_delta_fused`: the same sums written as two reductions (u over `in`, the delta over the
  rank) for torch.compile, which fuses the first into the layer's norm or activation and the second
  into the op that consumes the Linear's output (rotary, SiLU, the residual add). On an H100 at 1,024
  rows the bmm pairs cost as much as the base matmuls (cuBLAS on rank-wide operands), and the delta
  of gate/up, as large as that Linear's output, went through memory twice; the reductions win at
  rank 1 and lose at rank 8, where each row re-reads its member's B (w values per output) that a
  bmm reads once for the member's rows (README, engine benchmark);
- `lora_silu.silu_lora` (CUDA, ranks 3-16): the gate/up LoRA's expand inside the SiLU kernel, one
  tile of a member's compact B per program on tensor cores; the other Linears use bmm pairs.
The member's scaling (alpha / r) is folded into B when the slots are filled. Slots are float32
whatever the model's dtype, so the member the engine evaluates is the member the ES update credits
(and the adapter file holds): in bf16 slots, theta + sigma * eps rounds to bf16's 8 bits relative to
theta, and at the paper's sigma 0.001 the realised perturbation of A was 4-6% off (L2) the credited
sigma * eps (tests/test_precision.py; 0.2% at sigma 0.05). The LoRA path takes the model's
activations exactly (bf16 -> float32), computes in float32 and adds its delta to the Linear's output
in the model's dtype, as PEFT does with its default autocast_adapter_dtype (float32 adapters on a
bf16 model). float32 matmuls must stay IEEE (torch's default; TF32 would round A to 10 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from es_core.lora import LoRATarget, LoRATensors, StackedLoRA, check_adapter_matches

SLOT_DTYPE = torch.float32  # the members' A and B in the slots (see the module docstring)
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
GROUPS = ("qkv", "o", "gate_up", "down")


class LoRAGroup(NamedTuple):
    """One fused Linear's slots (lo..hi of them)."""

    a: torch.Tensor  # [G, k*w, in]: part j's A in rows j*w .. j*w + r
    b: torch.Tensor  # scaled; compact [G, out, w]: each output's B row (zero where no part carries
    #                  LoRA); else block-diagonal [G, out, k*w]: part j's B in columns j*w .. j*w + r
    parts: tuple[tuple[int, int, int], ...]  # (rank block j, first output, outputs) of each part with LoRA
    compact: bool = True


class LayerLoRA(NamedTuple):
    """One layer's slots per fused Linear, None where no LoRA; `centre`: a LoRA every row shares
    (one slot, `PopulationEngine`'s centre), applied with the base Linear (`centre_delta`)."""

    qkv: LoRAGroup | None = None
    o: LoRAGroup | None = None
    gate_up: LoRAGroup | None = None
    down: LoRAGroup | None = None
    centre: "LayerLoRA | None" = None


NO_LORA = LayerLoRA()


def lora_shrink(h: torch.Tensor, group: LoRAGroup) -> torch.Tensor:
    """u = x A^T of each row's member: h [N, T, in] -> [N*T, k*w] (N = G * R), one bmm in the
    slots' float32 (h converted exactly)."""
    n, t, d_in = h.shape
    g = group.a.shape[0]
    return torch.bmm(h.reshape(g, (n // g) * t, d_in).to(group.a.dtype), group.a.transpose(1, 2)).reshape(n * t, -1)


def lora_delta(h: torch.Tensor, group: LoRAGroup) -> torch.Tensor:
    """h: [N, T, in] -> [N, T, out] with batched matmuls (N = G * R): two in all when B is
    block-diagonal ([G, out, k*w]), one per part when it is compact. Computed in float32, returned
    in h's dtype."""
    n, t, _ = h.shape
    b = group.b
    g, out, w = b.shape[0], b.shape[1], b.shape[2]
    u = lora_shrink(h, group).view(g, (n // g) * t, -1)  # [G, R*T, k*w]
    if not group.compact or len(group.parts) == 1 and group.parts[0][1:] == (0, out):
        return torch.bmm(u, b.transpose(1, 2)).reshape(n, t, out).to(h.dtype)
    delta = _by_part(u, group.parts, out, lambda j, first, size: torch.bmm(u[:, :, j * w:(j + 1) * w], b[:, first:first + size].transpose(1, 2)))
    return delta.reshape(n, t, out).to(h.dtype)


def centre_delta(h: torch.Tensor, centre: LayerLoRA | None, group: str) -> torch.Tensor | None:
    """The shared centre's delta of fused Linear `group` for every row of h (one slot: one bmm pair
    over all rows, in the centre slot's dtype), or None where the centre has none."""
    part = getattr(centre, group) if centre is not None else None
    return None if part is None else lora_delta(h, part)


def lora_delta_fused(h: torch.Tensor, group: LoRAGroup) -> torch.Tensor:
    """lora_delta as reductions, for torch.compile to fuse into its neighbours (float32 sums);
    compact B only. Each part's outputs take its own slice of u: no gather by an index tensor,
    whose int64 reads cost more than the activations (H100, rank 1: the SiLU kernel took 41 us).
    Eager, it materializes [G, R*T, k*w, in]: the compiled decode step only."""
    n, t, d_in = h.shape
    a, b = group.a, group.b
    g, out, w = a.shape[0], b.shape[1], b.shape[2]
    u = (h.reshape(g, (n // g) * t, 1, d_in) * a.unsqueeze(1)).sum(-1, dtype=torch.float32)  # [G, R*T, k*w]
    delta = _by_part(u, group.parts, out, lambda j, first, size: (u[:, :, None, j * w:(j + 1) * w] * b[:, None, first:first + size]).sum(-1))
    return delta.to(h.dtype).reshape(n, t, out)


def _by_part(u: torch.Tensor, parts: tuple[tuple[int, int, int], ...], out: int, part_delta) -> torch.Tensor:
    """[G, R*T, out] from each part's delta, part_delta(j, first, size) -> [G, R*T, size] (compact B:
    part j's outputs use u's rank block j), zeros for the outputs of parts without LoRA."""
    g, rows = u.shape[0], u.shape[1]
    pieces, pos = [], 0
    for j, first, size in parts:
        if first > pos:
            pieces.append(u.new_zeros(g, rows, first - pos))
        pieces.append(part_delta(j, first, size))
        pos = first + size
    if pos < out:
        pieces.append(u.new_zeros(g, rows, out - pos))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


@dataclass(frozen=True)
class _Part:
    target: LoRATarget
    block: int  # rank block j: rows j*r .. (j+1)*r of A, columns of B
    offset: int  # first output feature of this part inside the fused Linear


class PopulationLoRA:
    """Stacked slots for every fused Linear of every layer that carries LoRA (`slot_dtype`, float32
    unless asked otherwise; `dtype` is the model's: its activations')."""

    def __init__(self, fused_out: dict[str, tuple[tuple[str, int], ...]], fused_in: dict[str, int], n_layers: int,
                 targets: Sequence[LoRATarget], rank: int, dtype: torch.dtype, device: torch.device, pad_rank_to: int = 1,
                 compact: bool | Sequence[str] = True, slot_dtype: torch.dtype = SLOT_DTYPE):
        self.targets, self.rank, self.dtype, self.device = list(targets), int(rank), dtype, torch.device(device)
        self.slot_dtype = slot_dtype
        # B compact (lora_delta_fused, silu_lora, or one bmm per part) or block-diagonal (one bmm): all groups, or those named
        self.compact_groups = frozenset(GROUPS if compact is True else () if compact is False else compact)
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
        self._layout: dict[tuple[int, str], tuple[tuple[int, int, int], ...]] = {
            key: tuple((p.block, p.offset, p.target.out_features) for p in parts) for key, parts in self._parts.items()
        }

    def _allocate(self, n_slots: int) -> None:
        self.n_slots = n_slots
        for (layer, group), parts in self._parts.items():
            k = len(parts) * self.block
            self._a[layer, group] = torch.zeros(n_slots, k, self._in[group], dtype=self.slot_dtype, device=self.device)
            self._b[layer, group] = torch.zeros(n_slots, self._out[group], self.block if group in self.compact_groups else k, dtype=self.slot_dtype, device=self.device)

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
                col = 0 if key[1] in self.compact_groups else p.block * w
                b_buf[:, p.offset:p.offset + t.out_features, col:col + r].copy_(b)

    def layer(self, i: int, lo: int = 0, hi: int | None = None) -> LayerLoRA:
        """Layer i's slots lo..hi (a view: the addresses of the full buffers)."""
        hi = self.n_slots if hi is None else hi
        return LayerLoRA(*[
            LoRAGroup(self._a[i, g][lo:hi], self._b[i, g][lo:hi], self._layout[i, g], g in self.compact_groups) if (i, g) in self._a else None
            for g in GROUPS
        ])

    def bytes_per_step(self) -> int:
        """Bytes of A and B one decode step reads (rank padding included)."""
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
