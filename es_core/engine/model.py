"""A Llama-family decoder as plain tensors and functions, built from an HF model's weights.

Follows gpt-fast's `model.py` (fused wqkv and w1/w3, positions passed explicitly, the KV cache
outside the weights) and HF's Llama/Qwen2 numerics (RMSNorm in float32, rotate-half RoPE from the
HF model's own `inv_freq`), so greedy tokens match HF/PEFT on CPU float32. Departures: every
Linear that carries LoRA takes a population of adapters (`population_lora.lora_delta`); the layer
is split into two pure functions around the attention so that torch.compile never sees the cache
mutation (the cache write and SDPA run between them, inside the captured CUDA graph); the second
splits again around the SiLU-LoRA kernel where that runs (`attention_out_gate_up_shrink`,
`mlp_down`). The residual stream is carried as a pair (x, the MLP's output) and summed in the next
norm, where the add costs no kernel of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from es_core.engine.population_lora import LayerLoRA, centre_delta, lora_delta, lora_delta_fused, lora_shrink

SUPPORTED = ("llama", "qwen2")


class UnsupportedModel(ValueError):
    """A model family the engine does not implement: one line naming it."""


@dataclass(frozen=True)
class DecoderConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float

    @property
    def q_out(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def fused_out(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Parts (module name, out features) of each fused Linear, in output order."""
        return {
            "qkv": (("q_proj", self.q_out), ("k_proj", self.kv_out), ("v_proj", self.kv_out)),
            "o": (("o_proj", self.hidden),),
            "gate_up": (("gate_proj", self.intermediate), ("up_proj", self.intermediate)),
            "down": (("down_proj", self.hidden),),
        }

    @property
    def fused_in(self) -> dict[str, int]:
        return {"qkv": self.hidden, "o": self.q_out, "gate_up": self.hidden, "down": self.intermediate}


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [q_out + 2 kv_out, D]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [D, q_out]
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor  # [D]
    w13: torch.Tensor  # [2 I, D]: gate then up
    w2: torch.Tensor  # [D, I]


@dataclass
class Decoder:
    config: DecoderConfig
    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D] (the embedding itself when tied)
    inv_freq: torch.Tensor  # [head_dim / 2], float32, from the HF rotary module
    rope_scaling: float  # HF's attention_scaling of cos/sin

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: torch.nn.Module) -> "Decoder":
        """Views of an HF Llama/Qwen2 model's weights (q/k/v and gate/up concatenated: copies)."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise UnsupportedModel(f"embedded engine supports {SUPPORTED}, not model_type {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"embedded engine needs hidden_act silu, not {cfg.hidden_act!r}")
        if getattr(cfg, "use_sliding_window", False):
            raise UnsupportedModel("embedded engine does not implement sliding-window attention")
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"embedded engine supports position-independent RoPE scaling only, not {rope_type!r}")
        base = model.model
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        config = DecoderConfig(
            n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, n_heads=n_heads,
            n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps),
        )
        layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            biases = [att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]
            if mlp.gate_proj.bias is not None:
                raise UnsupportedModel("embedded engine does not implement MLP biases")
            layers.append(LayerWeights(
                attn_norm=layer.input_layernorm.weight,
                wqkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
                bqkv=torch.cat(biases) if biases[0] is not None else None,
                wo=att.o_proj.weight, bo=att.o_proj.bias,
                mlp_norm=layer.post_attention_layernorm.weight,
                w13=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                w2=mlp.down_proj.weight,
            ))
        rotary = base.rotary_emb
        return cls(config, base.embed_tokens.weight, layers, base.norm.weight, model.lm_head.weight,
                   rotary.inv_freq.detach().float(), float(getattr(rotary, "attention_scaling", 1.0)))

    def rope_tables(self, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n_positions, head_dim] in the model dtype, computed exactly as HF does."""
        pos = torch.arange(n_positions, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def num_parameter_bytes(self) -> int:
        """Bytes of weights one decode step reads (the tied matrix once)."""
        seen, total = set(), 0
        tensors = [self.embed, self.norm, self.lm_head]
        for w in self.layers:
            tensors += [w.attn_norm, w.wqkv, w.bqkv, w.wo, w.bo, w.mlp_norm, w.w13, w.w2]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


# --- the layer, as pure functions around attention ---------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def linear_with_centre(h, weight, bias, lora: LayerLoRA, group: str) -> torch.Tensor:
    """The Linear of fused group `group` with the shared centre's LoRA (when the engine has one):
    the weights every member starts from, before the member's own delta."""
    out = F.linear(h, weight, bias)
    delta = centre_delta(h, lora.centre, group)
    return out if delta is None else out + delta


def attention_in(x, residual, norm_w, wqkv, bqkv, lora: LayerLoRA, cos, sin, cfg: DecoderConfig, fused: bool = False):
    """x: [N, T, D] and `residual`, the previous layer's MLP output (None before the first layer),
    -> the residual stream x + residual, q [N, H, T, hd], k and v [N, Hkv, T, hd] (RoPE applied to q
    and k). The add is left to this function so that it fuses into the norm's kernel (on an H100 it
    was a kernel of its own after the down matmul: 3 us per layer). `fused`: the LoRA as
    reductions (population_lora.lora_delta_fused), for torch.compile."""
    delta = lora_delta_fused if fused else lora_delta
    if residual is not None:
        x = x + residual
    n, t, _ = x.shape
    h = rms_norm(x, norm_w, cfg.eps)
    qkv = linear_with_centre(h, wqkv, bqkv, lora, "qkv")  # [N, T, q_out + 2 kv_out]
    if lora.qkv is not None:
        qkv = qkv + delta(h, lora.qkv)
    q, k, v = qkv.split([cfg.q_out, cfg.kv_out, cfg.kv_out], dim=-1)
    q = q.view(n, t, cfg.n_heads, cfg.head_dim)
    k = k.view(n, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.view(n, t, cfg.n_kv_heads, cfg.head_dim)
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [N, T, 1, hd]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    return x, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_out_mlp(x, attn, wo, bo, mlp_norm, w13, w2, lora: LayerLoRA, cfg: DecoderConfig, fused: bool = False):
    """x: [N, T, D] residual, attn: [N, H, T, hd] -> the residual after attention and the MLP's
    output [N, T, D] (the layer's output is their sum, taken by the next attention_in)."""
    delta = lora_delta_fused if fused else lora_delta
    x, h, gu = attention_out_gate_up(x, attn, wo, bo, mlp_norm, w13, lora, cfg, fused)
    if lora.gate_up is not None:
        gu = gu + delta(h, lora.gate_up)
    gate, up = gu.split([cfg.intermediate, cfg.intermediate], dim=-1)
    return x, mlp_down(F.silu(gate) * up, w2, lora, cfg, fused)


def attention_out_gate_up(x, attn, wo, bo, mlp_norm, w13, lora: LayerLoRA, cfg: DecoderConfig, fused: bool = False):
    """attention_out_mlp up to the gate/up Linear: the residual after attention [N, T, D], its norm
    h (the Linear's input) and the Linear's base output [N, T, 2I], without its LoRA."""
    delta = lora_delta_fused if fused else lora_delta
    n, t, _ = x.shape
    a = attn.transpose(1, 2).reshape(n, t, cfg.q_out)
    o = linear_with_centre(a, wo, bo, lora, "o")
    if lora.o is not None:
        o = o + delta(a, lora.o)
    x = x + o
    h = rms_norm(x, mlp_norm, cfg.eps)
    return x, h, linear_with_centre(h, w13, None, lora, "gate_up")


def attention_out_gate_up_shrink(x, attn, wo, bo, mlp_norm, w13, lora: LayerLoRA, cfg: DecoderConfig, fused: bool = False):
    """attention_out_gate_up, and the gate/up LoRA's shrink u = h A^T [N*T, k*w] for silu_lora."""
    x, h, gu = attention_out_gate_up(x, attn, wo, bo, mlp_norm, w13, lora, cfg, fused)
    return x, gu, lora_shrink(h, lora.gate_up)


def mlp_down(m, w2, lora: LayerLoRA, cfg: DecoderConfig, fused: bool = False):
    """The down Linear of the activation m [N, T, I] -> [N, T, D]."""
    delta = lora_delta_fused if fused else lora_delta
    d = linear_with_centre(m, w2, None, lora, "down")
    if lora.down is not None:
        d = d + delta(m, lora.down)
    return d


def final_norm(x, residual, norm_w, eps: float) -> torch.Tensor:
    """The last layer's residual stream x + residual [N, D], normed for the head."""
    return rms_norm(x + residual, norm_w, eps)


def greedy_head(x, residual, norm_w, lm_head, eps: float) -> torch.Tensor:
    """x + residual: [N, D] last hidden states -> greedy next token ids [N] (first index on ties, as HF)."""
    logits = F.linear(final_norm(x, residual, norm_w, eps), lm_head)  # [N, V]
    return logits.argmax(dim=-1)
