"""Greedy decoding of every member x every prompt in one batch, over token ids only.

Follows gpt-fast's `generate.py`: a static KV cache allocated once per batch layout, positions
passed explicitly, greedy argmax kept on the device (no `.item()` per step), and the decode step
compiled. Departures: rows are member-major (N = members x prompts) so a population of LoRA
adapters runs in one pass (`population_lora`); prompts are left-padded (an attention mask over
cache slots and per-row positions); the whole decode step (all layers, cache writes, argmax, EOS
bookkeeping) is captured as one CUDA graph per attention-length bucket, so each step costs one
graph launch and attention reads only the filled part of the cache (rounded up to `bucket`).
On CUDA three Triton kernels replace generic ops where the profile showed time to win: decode
attention over each row's valid slots (`attention`), the gate/up LoRA inside the SiLU pass at rank
> 2 (`lora_silu`) and the greedy head's matmul + argmax (`head_argmax`). On CPU the same step runs
eagerly in float32, without them.

The engine knows nothing of text, prompts or PEFT files: token ids in, token ids out.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from es_core.engine.attention import sdpa_decode, triton_available, triton_decode
from es_core.engine import head_argmax as fused_head
from es_core.engine import lora_silu
from es_core.engine.model import Decoder, attention_in, attention_out_gate_up_shrink, attention_out_mlp, final_norm, greedy_head, mlp_down
from es_core.engine.population_lora import PopulationLoRA
from es_core.lora import LoRATarget, LoRATensors, StackedLoRA


@dataclass
class GenerationOutput:
    tokens: list[list[list[int]]]  # [member][prompt] -> generated ids, the EOS included when it stopped
    stopped: list[list[bool]]  # [member][prompt]: True if EOS ended it, False if max_new_tokens did


@dataclass
class EngineStats:
    """Where the time of the last `generate` went (seconds; device-synchronized at phase ends)."""

    setup_s: float = 0.0  # buffers, torch.compile and CUDA-graph capture of new batch layouts
    load_s: float = 0.0  # members into the LoRA slots
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    rows: int = 0
    chunks: int = 0
    generated_tokens: int = 0  # tokens up to and including EOS, summed over rows
    row_steps: int = 0  # rows x tokens decoded (finished rows padded included)
    prompt_tokens: int = 0  # real (unpadded) prompt tokens summed over rows
    padded_prompt_len: list[int] = field(default_factory=list)


def _check_groups(prompt_groups: Sequence[Sequence[int]], n_members: int, n_prompts: int) -> int:
    """How many prompts each member decodes, after checking that prompt_groups gives every member as many, in range."""
    if len(prompt_groups) != n_members:
        raise ValueError(f"{len(prompt_groups)} prompt groups for {n_members} members")
    sizes = {len(g) for g in prompt_groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every member needs as many prompts, at least one (got {sorted(sizes)})")
    if any(not 0 <= p < n_prompts for g in prompt_groups for p in g):
        raise ValueError(f"a prompt group names a prompt outside the {n_prompts} given")
    return sizes.pop()


def plan_chunks(n_members: int, n_prompts: int, max_rows: int) -> list[tuple[range, range]]:
    """Rectangular (members, prompts) chunks of at most max_rows rows, member-major."""
    if n_members * n_prompts <= max_rows:
        return [(range(n_members), range(n_prompts))]
    if n_prompts <= max_rows:
        per = max_rows // n_prompts
        return [(range(m, min(m + per, n_members)), range(n_prompts)) for m in range(0, n_members, per)]
    return [(range(m, m + 1), range(p, min(p + max_rows, n_prompts))) for m in range(n_members) for p in range(0, n_prompts, max_rows)]


class _Session:
    """Static buffers (KV cache, LoRA slots, step state) and CUDA graphs of one batch layout."""

    def __init__(self, engine: "PopulationEngine", rows: int, groups: int, cache_len: int, max_new: int, eos: tuple[int, ...]):
        d, cfg, dev = engine.decoder, engine.decoder.config, engine.decoder.device
        self.rows, self.groups, self.cache_len, self.max_new = rows, groups, cache_len, max_new
        self.k = [torch.zeros(rows, cfg.n_kv_heads, cache_len, cfg.head_dim, dtype=d.dtype, device=dev) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.cos, self.sin = d.rope_tables(cache_len)  # [cache_len, hd]
        # cuBLAS ran rank-wide bmm faster at widths of 8 (see PopulationLoRA); the fused reductions need no padding
        bmm = engine.lora_kernel in ("bmm", "triton")
        self.lora = PopulationLoRA(cfg.fused_out, cfg.fused_in, cfg.n_layers, engine.targets, engine.rank, d.dtype, dev,
                                   pad_rank_to=8 if dev.type == "cuda" and bmm else 1,
                                   compact=("gate_up",) if engine.lora_kernel == "triton" else not bmm,
                                   slot_dtype=torch.float32 if engine.lora_dtype == "float32" else d.dtype)
        # the centre every row shares (weights-space ES): one slot, in the model's dtype, since its
        # delta is the accumulated change, not a member's small perturbation (which stays float32)
        self.centre = None
        if engine.centre_rank:
            self.centre = PopulationLoRA(cfg.fused_out, cfg.fused_in, cfg.n_layers, engine.targets, engine.centre_rank, d.dtype, dev,
                                         pad_rank_to=8 if dev.type == "cuda" else 1, compact=True, slot_dtype=d.dtype)
            self.centre.set_members([None], [1.0])
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)  # last token of each row
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)  # its RoPE position
        self.write = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot it is written to
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index into out
        self.valid = torch.zeros(rows, cache_len, dtype=torch.bool, device=dev)  # cache slots holding real tokens (SDPA path)
        self.start = torch.zeros(rows, dtype=torch.int32, device=dev)  # first real slot of each row (Triton path)
        self.done = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.out = torch.zeros(rows, max_new, dtype=torch.long, device=dev)
        self.eos = torch.tensor(eos if eos else [-1], dtype=torch.long, device=dev)
        self.pad = torch.tensor(engine.pad_id, dtype=torch.long, device=dev)
        self.layer_lora: list = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bind_lora(self) -> None:
        self.layer_lora = [self.layer(i) for i in range(self.lora.n_layers)]

    def layer(self, i: int, lo: int = 0, hi: int | None = None):
        """Layer i's member slots lo..hi, with the shared centre where there is one."""
        members = self.lora.layer(i, lo, hi)
        return members if self.centre is None else members._replace(centre=self.centre.layer(i))


FUSED_MAX_RANK = 2  # H100, 1,024 rows: fused reductions beat the bmm pairs at rank 1, lost at rank 8
SILU_MAX_RANK = lora_silu.MAX_WIDTH  # silu_lora reads a member's B as one tile of the rank (padded to 8 or 16)


def _default_lora_kernel(compiled: bool, rank: int) -> str:
    """Measured on an H100 (1,024 rows, decode ms/step, 0.5B / 1.5B shapes): rank 1 fused 4.70 at
    0.5B against 5.36 with the SiLU kernel; rank 8 bmm 5.75 / 11.49, SiLU kernel 5.35 / 10.82."""
    if not compiled:  # eager CUDA graphs (or CPU): bmm; the fused reductions need the compiler
        return "bmm"
    if rank <= FUSED_MAX_RANK:
        return "fused"
    return "triton" if lora_silu.triton is not None and rank <= SILU_MAX_RANK else "bmm"


def _probe_head(decoder: Decoder) -> str:
    """"triton" if head_argmax compiles and launches on this GPU, else "torch" with a warning: its
    launch is sized to the GPU's shared memory, but a GPU it never ran on may still refuse it, and
    a greedy head that falls back is better than a run that fails at its first decode step."""
    try:
        fused_head.head_argmax(torch.zeros(2, decoder.config.hidden, dtype=decoder.dtype, device=decoder.device), decoder.lm_head)
        return "triton"
    except Exception as exc:  # noqa: BLE001 - Triton's compile and launch errors have no common base
        first = (str(exc).splitlines() or [""])[0][:200]
        warnings.warn(f"the fused greedy head does not run on {decoder.device} ({type(exc).__name__}: {first}); "
                      "using F.linear + argmax", RuntimeWarning, stacklevel=3)
        return "torch"


class PopulationEngine:
    """Greedy completions of token-id prompts under a population of LoRA members, batched.

    `targets` and `rank` fix the LoRA structure (which Linears, which rank); members are set per
    call. `compile` (CUDA): torch.compile the layer's pure parts; `cuda_graphs` (CUDA, default on):
    capture the decode step. `attention`: "triton" (CUDA default: reads each row's valid slots
    only, one graph for all steps) or "sdpa" (masked SDPA over the cache filled so far, rounded up
    to `bucket` slots: one graph per bucket). `bucket` also rounds the cache length. `lora_kernel`:
    "fused" (the LoRA as reductions torch.compile fuses into the layer's own kernels; the default when
    compiled at rank <= FUSED_MAX_RANK; eager, it is slow and memory-hungry) or "bmm" (batched
    matmuls; always the prefill's) or "triton" (bmm, but the gate/up LoRA applied inside the SiLU pass
    by `lora_silu.silu_lora`: the default when compiled at FUSED_MAX_RANK < rank <= SILU_MAX_RANK,
    bmm above). `head`: "triton" (CUDA default: the decode step's greedy matmul and argmax in one
    kernel, `head_argmax`) or "torch" (F.linear, then argmax; always the prefill's)."""

    def __init__(self, decoder: Decoder, targets: Sequence[LoRATarget], rank: int, *, pad_id: int, eos_ids: Sequence[int],
                 max_batch_rows: int = 1024, compile: bool = True, cuda_graphs: bool | None = None, bucket: int = 64,
                 prefill_tokens: int = 32768, check_every: int = 16, attention: str = "auto", lora_kernel: str = "auto",
                 head: str = "auto", lora_dtype: str = "float32", centre_rank: int = 0):
        self.decoder, self.targets, self.rank = decoder, list(targets), int(rank)
        # > 0: every call may pass a `centre` of this rank, applied once for all rows (a shared slot)
        self.centre_rank = int(centre_rank)
        if lora_dtype not in ("float32", "model"):
            raise ValueError(f"lora_dtype must be float32 or model (got {lora_dtype!r})")
        # float32: the member evaluated is the member credited (population_lora); model: the slots in
        # the model's dtype, faster at rank > 2 on CUDA but rounded (5.7% off at sigma 0.001 in bf16)
        self.lora_dtype = lora_dtype
        self.pad_id, self.eos_ids = int(pad_id), tuple(int(e) for e in eos_ids)
        self.max_batch_rows, self.bucket, self.prefill_tokens, self.check_every = int(max_batch_rows), int(bucket), int(prefill_tokens), int(check_every)
        cuda = decoder.device.type == "cuda"
        self.cuda_graphs = cuda if cuda_graphs is None else (bool(cuda_graphs) and cuda)
        self.compiled = bool(compile) and cuda
        if attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"attention must be auto, triton or sdpa (got {attention!r})")
        if attention == "triton" and not triton_available(decoder.device):
            raise ValueError("attention='triton' needs CUDA and Triton")
        self.attention = ("triton" if triton_available(decoder.device) else "sdpa") if attention == "auto" else attention
        if lora_kernel not in ("auto", "fused", "bmm", "triton"):
            raise ValueError(f"lora_kernel must be auto, fused, bmm or triton (got {lora_kernel!r})")
        if lora_kernel == "triton" and lora_silu.triton is None:
            raise ValueError("lora_kernel='triton' needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
        if lora_kernel == "triton" and self.rank > SILU_MAX_RANK:
            raise ValueError(f"lora_kernel='triton' takes rank <= {SILU_MAX_RANK} (got {self.rank})")
        self.lora_kernel = _default_lora_kernel(self.compiled, self.rank) if lora_kernel == "auto" else lora_kernel
        if head not in ("auto", "triton", "torch"):
            raise ValueError(f"head must be auto, triton or torch (got {head!r})")
        if head == "triton" and not triton_available(decoder.device):
            raise ValueError("head='triton' needs CUDA and Triton")
        self.head = (_probe_head(decoder) if triton_available(decoder.device) else "torch") if head == "auto" else head
        if self.compiled:
            _raise_recompile_limit(64)
            self._attn_in = torch.compile(attention_in, fullgraph=True, dynamic=False)
            self._attn_out = torch.compile(attention_out_mlp, fullgraph=True, dynamic=False)
            self._head = torch.compile(greedy_head, fullgraph=True, dynamic=False)
            self._final_norm = torch.compile(final_norm, fullgraph=True, dynamic=False)
            self._attn_out_gu = torch.compile(attention_out_gate_up_shrink, fullgraph=True, dynamic=False)
            self._mlp_down = torch.compile(mlp_down, fullgraph=True, dynamic=False)
        else:
            self._attn_in, self._attn_out, self._head = attention_in, attention_out_mlp, greedy_head
            self._attn_out_gu, self._mlp_down, self._final_norm = attention_out_gate_up_shrink, mlp_down, final_norm
        if not cuda:
            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self._session: _Session | None = None
        self._key: tuple | None = None
        self.stats = EngineStats()

    # --- public ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], members: Sequence[LoRATensors | None] | StackedLoRA, max_new_tokens: int,
                 scalings: Sequence[float] | float = 1.0, eos_ids: Sequence[int] | None = None,
                 on_decode: Callable[[], None] | None = None, centre: LoRATensors | None = None,
                 prompt_groups: Sequence[Sequence[int]] | None = None) -> GenerationOutput:
        """Greedy completion of every prompt under every member (None: the base model), or with
        `prompt_groups` of member m's prompts only (indices into `prompts`, as many for every member:
        EGGROLL's groups; result[m][j] is prompt prompt_groups[m][j]'s). `on_decode`
        is called once the first chunk's decoding is under way: on CUDA this thread then mostly waits
        on the GPU, so it is when other CPU work of the caller costs decoding least. `centre` (an
        engine built with centre_rank): a LoRA of that rank under every member, in one shared slot,
        scaling 1 (its scale folded into B)."""
        if centre is not None and not self.centre_rank:
            raise ValueError("this engine has no centre slot (built with centre_rank 0)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if not members or not prompts:
            return GenerationOutput([[] for _ in range(len(members))], [[] for _ in range(len(members))])
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        scalings = [float(scalings)] * len(members) if isinstance(scalings, (int, float)) else [float(s) for s in scalings]
        eos = self.eos_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
        per = len(prompts) if prompt_groups is None else _check_groups(prompt_groups, len(members), len(prompts))
        self.stats = EngineStats()
        tokens = [[[] for _ in range(per)] for _ in range(len(members))]
        stopped = [[False for _ in range(per)] for _ in range(len(members))]
        for mems, prs in plan_chunks(len(members), per, self.max_batch_rows):
            chunk = members.take(mems) if isinstance(members, StackedLoRA) else [members[m] for m in mems]
            chunk_prompts = ([prompts[p] for p in prs] if prompt_groups is None
                             else [[prompts[prompt_groups[m][p]] for p in prs] for m in mems])
            rows = self._run_chunk(chunk_prompts, chunk, [scalings[m] for m in mems], max_new_tokens, eos, on_decode, centre,
                                   per_member=prompt_groups is not None)
            on_decode = None
            for i, m in enumerate(mems):
                for j, p in enumerate(prs):
                    tokens[m][p], stopped[m][p] = rows[i * len(prs) + j]
        self.stats.generated_tokens = sum(len(t) for row in tokens for t in row)
        return GenerationOutput(tokens, stopped)

    def close(self) -> None:
        self._session, self._key = None, None
        if self.decoder.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- one chunk ------------------------------------------------------------------------

    def _run_chunk(self, prompts, members, scalings, max_new: int, eos: tuple[int, ...], on_decode=None,
                   centre: LoRATensors | None = None, per_member: bool = False) -> list[tuple[list[int], bool]]:
        """`prompts`: the prompts every member decodes, or (`per_member`) each member's own, as many each."""
        dev = self.decoder.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        groups, per = len(members), len(prompts[0]) if per_member else len(prompts)
        flat = [p for own in prompts for p in own] if per_member else list(prompts)  # the rows' prompts (shared: one member's)
        rows, t_pad = groups * per, max(len(p) for p in flat)
        cache_len = _round_up(t_pad + max_new - 1, self.bucket)

        t0 = time.perf_counter()
        s = self._get_session(rows, groups, cache_len, max_new, eos)
        sync()
        t1 = time.perf_counter()
        s.lora.set_members(members, scalings)
        if s.centre is not None:
            s.centre.set_members([centre], [1.0])  # None: zeros, no centre
        sync()
        t2 = time.perf_counter()

        # left-padded prompts, rows member-major: shared prompts padded once and repeated for every member
        ids = torch.full((len(flat), t_pad), self.pad_id, dtype=torch.long)
        real = torch.zeros(len(flat), t_pad, dtype=torch.bool)
        for j, p in enumerate(flat):
            ids[j, t_pad - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            real[j, t_pad - len(p):] = True
        repeat = 1 if per_member else groups
        ids, real = ids.to(dev).repeat(repeat, 1), real.to(dev).repeat(repeat, 1)  # [N, T]
        s.start.copy_(torch.tensor([t_pad - len(p) for p in flat] * repeat, dtype=torch.int32))
        self._prefill(s, ids, real, per)
        sync()
        t3 = time.perf_counter()

        # decode: token 0 came from the prefill; step i writes token i
        steps = 1
        if on_decode is not None:
            on_decode()
        for i in range(1, max_new):
            write = t_pad + i - 1
            kv_len = min(_round_up(write + 1, self.bucket), cache_len) if self.attention == "sdpa" else cache_len
            if self.cuda_graphs:
                s.graphs[kv_len].replay()
            else:
                self._decode_step(s, kv_len)
            steps += 1
            if eos and steps % self.check_every == 0 and bool(s.done.all()):  # a sync, so not every step
                break
        out = s.out[:, :steps].cpu()
        t4 = time.perf_counter()

        st = self.stats
        st.setup_s += t1 - t0
        st.load_s += t2 - t1
        st.prefill_s += t3 - t2
        st.decode_s += t4 - t3
        st.decode_steps += steps - 1
        st.rows += rows
        st.chunks += 1
        st.row_steps += rows * steps
        st.prompt_tokens += repeat * sum(len(p) for p in flat)
        st.padded_prompt_len.append(t_pad)

        eos_set = set(eos)
        result = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in eos_set), None)
            result.append((row[: cut + 1], True) if cut is not None else (row[:max_new], False))
        return result

    def _get_session(self, rows: int, groups: int, cache_len: int, max_new: int, eos: tuple[int, ...]) -> _Session:
        key = (rows, groups, cache_len, max_new, eos)
        if self._key == key and self._session is not None:
            return self._session
        self._session, self._key = None, None  # free the old layout's cache first
        if self.decoder.device.type == "cuda":
            torch.cuda.empty_cache()
        s = _Session(self, rows, groups, cache_len, max_new, eos)
        s.lora.set_members([None] * groups, [1.0] * groups)  # allocates the slots (fixed addresses)
        s.bind_lora()
        if self.cuda_graphs and max_new > 1:
            self._capture(s)
        self._session, self._key = s, key
        return s

    # --- prefill --------------------------------------------------------------------------

    def _prefill(self, s: _Session, ids: torch.Tensor, real: torch.Tensor, per: int) -> None:
        """Run the prompts, fill the cache, and leave the first generated token in the state."""
        d, cfg = self.decoder, self.decoder.config
        n, t = ids.shape
        positions = (real.long().cumsum(-1) - 1).clamp_(min=0)  # [N, T], HF's left-padding positions
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril_()
        eye = torch.eye(t, dtype=torch.bool, device=ids.device)
        grp = cfg.n_heads // cfg.n_kv_heads
        first = torch.empty(n, dtype=torch.long, device=ids.device)
        step_groups = max(1, self.prefill_tokens // (per * t))
        for g0 in range(0, s.groups, step_groups):
            g1 = min(g0 + step_groups, s.groups)
            rows = slice(g0 * per, g1 * per)
            x, mlp_out = F.embedding(ids[rows], d.embed), None  # [n, T, D]; the residual stream is x + mlp_out
            cos, sin = s.cos[positions[rows]], s.sin[positions[rows]]  # [n, T, hd]
            # causal over real keys; a padding query sees itself only (no fully-masked row, no NaN)
            mask = ((causal[None] & real[rows][:, None, :]) | eye[None])[:, None]  # [n, 1, T, T]
            for i, w in enumerate(d.layers):
                lora = s.layer(i, g0, g1)
                x, q, k, v = attention_in(x, mlp_out, w.attn_norm, w.wqkv, w.bqkv, lora, cos, sin, cfg)
                s.k[i][rows, :, :t] = k
                s.v[i][rows, :, :t] = v
                attn = F.scaled_dot_product_attention(q, k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1), attn_mask=mask)
                x, mlp_out = attention_out_mlp(x, attn, w.wo, w.bo, w.mlp_norm, w.w13, w.w2, lora, cfg)
            first[rows] = greedy_head(x[:, -1], mlp_out[:, -1], d.norm, d.lm_head, cfg.eps)
        s.valid.zero_()
        s.valid[:, :t] = real
        s.out.fill_(self.pad_id)
        s.out[:, 0] = first
        s.done.copy_((first[:, None] == s.eos[None, :]).any(-1))
        s.tokens.copy_(first)
        s.positions.copy_(positions[:, -1] + 1)
        s.write.fill_(t)
        s.step.fill_(1)

    # --- decode ---------------------------------------------------------------------------

    def _decode_step(self, s: _Session, kv_len: int) -> None:
        """One token for every row; only in-place updates of the session's buffers (graph-safe)."""
        d, cfg = self.decoder, self.decoder.config
        fused = self.lora_kernel == "fused"
        s.valid.index_fill_(1, s.write, True)
        x, mlp_out = F.embedding(s.tokens, d.embed)[:, None, :], None  # [N, 1, D]; the residual stream is x + mlp_out
        cos, sin = s.cos[s.positions][:, None, :], s.sin[s.positions][:, None, :]  # [N, 1, hd]
        mask = s.valid[:, None, None, :kv_len]  # [N, 1, 1, L]
        for i, w in enumerate(d.layers):
            lora = s.layer_lora[i]
            x, q, k, v = self._attn_in(x, mlp_out, w.attn_norm, w.wqkv, w.bqkv, lora, cos, sin, cfg, fused)
            attn = self._attend(s, i, q, k, v, kv_len, mask)
            if self.lora_kernel == "triton" and lora.gate_up is not None:
                # the gate/up LoRA inside the SiLU pass (lora_silu): the graph is split around that kernel
                x, gu, u = self._attn_out_gu(x, attn, w.wo, w.bo, w.mlp_norm, w.w13, lora, cfg, False)
                m = lora_silu.silu_lora(gu.reshape(s.rows, -1), u, lora.gate_up.b, lora.gate_up.parts, s.rows // s.groups)
                mlp_out = self._mlp_down(m.unsqueeze(1), w.w2, lora, cfg, False)
            else:
                x, mlp_out = self._attn_out(x, attn, w.wo, w.bo, w.mlp_norm, w.w13, w.w2, lora, cfg, fused)
        if self.head == "triton":  # the logits never reach memory (head_argmax)
            nxt = fused_head.head_argmax(self._final_norm(x[:, 0], mlp_out[:, 0], d.norm, cfg.eps), d.lm_head)
        else:
            nxt = self._head(x[:, 0], mlp_out[:, 0], d.norm, d.lm_head, cfg.eps)  # [N]
        nxt = torch.where(s.done, s.pad, nxt)  # finished rows keep padding
        s.out.index_copy_(1, s.step, nxt[:, None])
        s.done.logical_or_((nxt[:, None] == s.eos[None, :]).any(-1))
        s.tokens.copy_(nxt)
        s.positions.add_(1)
        s.write.add_(1)
        s.step.add_(1)

    def _attend(self, s: _Session, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, mask: torch.Tensor) -> torch.Tensor:
        """q: [N, H, 1, hd], the new token's k and v [N, Hkv, 1, hd] -> [N, H, 1, hd], the cache
        written. Grouped-query heads are folded into the query length so each KV head is read once
        (no repeat_kv copy); the Triton kernel also writes k and v into the cache itself."""
        n, h, _, hd = q.shape
        qg = q.reshape(n, self.decoder.config.n_kv_heads, -1, hd)  # [N, Hkv, H/Hkv, hd]
        if self.attention == "triton":
            out = triton_decode(qg, s.k[i], s.v[i], s.start, s.write, k[:, :, 0], v[:, :, 0])
        else:
            s.k[i].index_copy_(2, s.write, k)
            s.v[i].index_copy_(2, s.write, v)
            out = sdpa_decode(qg, s.k[i][:, :, :kv_len], s.v[i][:, :, :kv_len], mask)
        return out.reshape(n, h, 1, hd)

    def _capture(self, s: _Session) -> None:
        """Warm up (torch.compile, cuBLAS/SDPA handles) on a side stream, then capture one graph
        per attention length. The warm-up writes garbage into the cache; the prefill resets all."""
        buckets = list(range(self.bucket, s.cache_len + 1, self.bucket)) if self.attention == "sdpa" else [s.cache_len]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for kv_len in (buckets[0], buckets[-1]):
                for _ in range(2):
                    self._decode_step(s, kv_len)
                    s.write.zero_()
                    s.step.zero_()
                    s.positions.zero_()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for kv_len in buckets:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_step(s, kv_len)
            s.graphs[kv_len] = graph
        torch.cuda.synchronize()


def _round_up(x: int, to: int) -> int:
    return max(to, -(-x // to) * to)


def _raise_recompile_limit(limit: int) -> None:
    """Each batch layout, rank and LoRA pattern is its own compiled graph; dynamo's default of 8
    would silently fall back to eager after a few."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < limit:
            setattr(dc, name, limit)
