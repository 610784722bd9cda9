"""Tokens/s of a LoRA population on Countdown prompts: PEFT vs HF generate vs the embedded engine.

In one run, on the same device and prompts (Countdown chat prompts, every row forced to
--new-tokens: EOS ignored everywhere so every method does the same work):
  (a) PEFT, adapter by adapter (set_adapter + generate over the prompts), timed on the first
      --peft-adapters adapters (a rate: the loop over all members takes members/k times longer);
  (b) PEFT, one mixed-adapter batch (generate(adapter_names=...)), --peft-batch-tokens new tokens;
  (c) HF generate on the base model alone, cache_implementation="static" (compiled on CUDA),
      members x prompts rows, timed after a warm-up call;
  (d) the embedded engine, a different adapter per member, timed after a warm-up call.
Prints d/a and d/c, a roofline (weights + LoRA + KV-cache bytes per decode step over the memory
bandwidth) and the fraction of it (d)'s decode reaches, compile/warm-up time apart, peak memory.

  python -m benchmarks.bench_engine                      # the full GPU benchmark
  python -m benchmarks.bench_engine --smoke              # CPU smoke: SmolLM2, 4 members x 4 prompts, 32 tokens
  python -m benchmarks.bench_engine --models qwen2.5-1.5b-random --methods d --memory-check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from es_core.countdown.problems import generated_splits
from es_core.countdown.prompt import render_prompts
from es_core.engine.generate import PopulationEngine
from es_core.engine.model import Decoder
from es_core.engine.population_lora import PopulationLoRA
from es_core.lora import find_targets, init_centre, save_adapter, spec_from_tensors
from es_core.models import load_causal_lm, load_tokenizer, resolve_base_model, resolve_device
from es_core.settings import DEFAULT_LORA_MODULES, ModelSettings

from benchmarks.gpu_peaks import Peaks, gpu_peaks

MODELS = ["smollm2-135m", "qwen2.5-0.5b-random", "qwen2.5-1.5b-random"]


@dataclass
class Row:
    model: str
    method: str
    rank: int
    rows: int
    new_tokens: int
    seconds: float
    tok_s: float
    warmup_s: float = 0.0
    peak_gib: float = 0.0
    extra: dict = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default="a,b,c,d", help="subset of a,b,c,d")
    p.add_argument("--ranks", default="1,8")
    p.add_argument("--members", type=int, default=32)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--peft-adapters", type=int, default=2, help="(a) is timed over this many adapters")
    p.add_argument("--peft-batch-tokens", type=int, default=32, help="new tokens of (b), the slowest method")
    p.add_argument("--layers", default="all", help="'all' or a count of first layers carrying LoRA")
    p.add_argument("--memory-check", action="store_true", help="also: 64 members of rank 8 in one batch at the last model")
    p.add_argument("--variants", default="compile", help="engine variants for (d): compile (the default engine), graphs "
                   "(no torch.compile), eager (no compile, no graphs), sdpa (SDPA decode attention), nolora (base rows only), bmm / fused "
                   "(LoRA as batched matmuls / as reductions compiled into the layer, whatever the rank), triton (bmm, the gate/up LoRA "
                   "inside the SiLU kernel, es_core/engine/lora_silu.py), torch-head (the greedy head as F.linear + argmax, not head_argmax), "
                   "model-dtype-lora (the LoRA slots in the model dtype, generation.lora_dtype=model: rounded, faster at rank > 2)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of (d)'s decode step")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: smollm2-135m, 4 members x 4 prompts, rank 1, 32 tokens")
    p.add_argument("--sanity", action="store_true", help="first check the CUDA path: graphs == eager, compiled ~ eager, base rows ~ HF")
    p.add_argument("--cache-dir", default=os.environ.get("ES_MODEL_CACHE", str(Path(tempfile.gettempdir()) / "es-models")))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write all rows here")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth of the roofline, bytes/s (default: the GPU's datasheet)")
    p.add_argument("--bf16-flops", type=float, default=None, help="dense bf16 FLOP/s of the FLOP floor (default: the GPU's datasheet)")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table of rows saved by earlier runs' --json "
                   "(for example --methods d and --methods a,c run as two GPU commands), run nothing")
    args = p.parse_args(argv)
    if args.summarize:
        rows = []
        for path in args.summarize:
            try:
                rows += [Row(**row) for row in json.loads(Path(path).read_text())]
            except (OSError, ValueError, TypeError) as exc:  # missing, not JSON, not rows of --json
                p.error(f"--summarize {path}: not a file of --json rows ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        print_summary(rows, on_cpu=False)
        return 0
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown --variants {sorted(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.smoke:
        args.models, args.ranks, args.members, args.prompts, args.new_tokens = "smollm2-135m", "1", 4, 4, 32
        args.peft_adapters, args.peft_batch_tokens = 2, 32

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.peaks = gpu_peaks(device, args.bandwidth, args.bf16_flops)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, dtype {dtype}; roofline ceilings {args.peaks.describe()}", flush=True)
    results: list[Row] = []
    methods = set(args.methods.split(","))
    models = args.models.split(",")
    if args.sanity:
        sanity(models[0], args, device)
    for name in models:
        results += bench_model(name, args, device, methods, memory_check=args.memory_check and name == models[-1])
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    print_summary(results, on_cpu=device.type != "cuda")
    print(f"\nwall time of the whole run (compile and warm-up included): {time.perf_counter() - t_start:.1f} s")
    return 0


def label_of(name: str) -> str:
    """A preset's name, or a model folder's name without its hash suffix."""
    path = Path(name)
    return path.name.rsplit("-", 1)[0] if path.is_dir() else name


def sanity(name: str, args, device) -> None:
    """The CUDA path against the eager one on the same inputs: captured graphs must give the same
    tokens; compiled kernels round differently in bf16, so only agreement is reported."""
    resolved = resolve_base_model(ModelSettings(name=name), Path(args.cache_dir))
    model = load_causal_lm(resolved.path, "auto", str(device))
    tokenizer = load_tokenizer(resolved.path)
    decoder = Decoder.from_hf(model)
    targets = find_targets(model, list(range(model.config.num_hidden_layers)), list(DEFAULT_LORA_MODULES))
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(100, 40000, (int(n),), generator=g).tolist() for n in torch.randint(60, 140, (8,), generator=g)]
    members = make_members(targets, 8, 4) + [None]
    runs = {}
    for variant, comp, graphs in [("eager", False, False), ("graphs", False, True), ("compile+graphs", True, True)]:
        engine = PopulationEngine(decoder, targets, 8, pad_id=tokenizer.pad_token_id, eos_ids=(), compile=comp, cuda_graphs=graphs)
        t0 = time.perf_counter()
        runs[variant] = engine.generate(ids, members, 80, 2.0).tokens
        print(f"sanity {label_of(name)} {variant}: {time.perf_counter() - t0:.1f} s (setup {engine.stats.setup_s:.1f} s)", flush=True)
        engine.close()

    def agree(x, y):
        flat = [(a, b) for rx, ry in zip(x, y) for px, py in zip(rx, ry) for a, b in zip(px, py)]
        return sum(a == b for a, b in flat) / len(flat)

    print(f"SANITY graphs == eager: {runs['graphs'] == runs['eager']}; compiled vs eager token agreement {agree(runs['compile+graphs'], runs['eager']):.3f}")
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
    with torch.inference_mode():
        hf = model.generate(**batch, max_new_tokens=80, min_new_tokens=80, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hf_rows = hf[:, batch["input_ids"].shape[1]:].tolist()
    print(f"SANITY base rows vs HF generate (bf16) token agreement {agree([hf_rows], [runs['eager'][-1]]):.3f}; "
          f"members differ from base: {[runs['eager'][m] != runs['eager'][-1] for m in range(4)]}", flush=True)
    del model, decoder
    gc.collect()
    torch.cuda.empty_cache()


def bench_model(name: str, args, device, methods: set[str], memory_check: bool) -> list[Row]:
    out: list[Row] = []
    t0 = time.perf_counter()
    resolved = resolve_base_model(ModelSettings(name=name), Path(args.cache_dir))
    name = label_of(name)
    model = load_causal_lm(resolved.path, "auto", str(device))
    tokenizer = load_tokenizer(resolved.path)
    print(f"\n== {name}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    problems, _ = generated_splits(args.prompts, 1, seed=7)
    texts = render_prompts(problems[: args.prompts], "chat", tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers if args.layers == "all" else int(args.layers)))
    targets = find_targets(model, layers, list(DEFAULT_LORA_MODULES))
    lens = [len(i) for i in ids]
    print(f"prompts: {len(ids)} x {min(lens)}..{max(lens)} tokens; LoRA on {len(targets)} Linears ({len(layers)} layers)", flush=True)
    decoder = Decoder.from_hf(model)
    ranks = [int(r) for r in args.ranks.split(",")]

    if "d" in methods:
        for rank in ranks:
            members = make_members(targets, rank, args.members)
            for variant in args.variants.split(","):
                out.append(bench_engine(name, decoder, targets, rank, members, ids, args.new_tokens, device, variant, tokenizer.pad_token_id, args.peaks))
                report(out[-1])
                if args.profile:
                    profile_engine(decoder, targets, rank, members, ids, device, tokenizer.pad_token_id, args.peaks, variant)
        if memory_check:
            members = make_members(targets, 8, 64)
            out.append(bench_engine(name, decoder, targets, 8, members, ids, args.new_tokens, device, "compile", tokenizer.pad_token_id, args.peaks,
                                    tag="memory-check"))
            report(out[-1])
    if "c" in methods:
        out.append(bench_hf_static(name, model, tokenizer, texts, args.members, args.new_tokens, device))
        report(out[-1])
    if methods & {"a", "b"}:
        rank = ranks[-1]
        members = make_members(targets, rank, args.members)
        with tempfile.TemporaryDirectory() as tmp:
            spec = spec_from_tensors(members[0], lora_alpha=2.0 * rank)
            folders = [save_adapter(m, Path(tmp) / f"m{i:03d}", spec) for i, m in enumerate(members)]
            out += bench_peft(name, model, tokenizer, texts, folders, rank, args, device, methods)
    for r in out:
        r.extra.setdefault("rows_label", f"{args.members}x{args.prompts}" if r.method != "a" else f"{args.prompts} per adapter")
    del model, decoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def make_members(targets, rank: int, n: int):
    """Distinct non-trivial members (B != 0), float32 as ES keeps them."""
    members = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        c = init_centre(targets, rank, seed=i)
        members.append({k: v if ".lora_A." in k else 0.01 * torch.randn(v.shape, generator=g) for k, v in c.items()})
    return members


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


# --- (d) the engine -------------------------------------------------------------------------


VARIANTS = ("compile", "graphs", "eager", "sdpa", "nolora", "bmm", "fused", "triton", "torch-head", "model-dtype-lora")


def variant_engine(variant: str, decoder, targets, rank: int, members: list, prompts: int, pad_id: int, cuda_graphs: bool | None = None):
    """The engine of a --variants name, and the members it runs (nolora: base rows only), all rows in one batch."""
    if variant == "nolora":
        targets, members = [], [None] * len(members)
    engine = PopulationEngine(decoder, targets, rank, pad_id=pad_id, eos_ids=(), max_batch_rows=len(members) * prompts,
                              compile=variant not in ("graphs", "eager"), cuda_graphs=variant != "eager" if cuda_graphs is None else cuda_graphs,
                              attention="sdpa" if variant == "sdpa" else "auto", lora_kernel=variant if variant in ("bmm", "fused", "triton") else "auto",
                              head="torch" if variant == "torch-head" else "auto", lora_dtype="model" if variant == "model-dtype-lora" else "float32")
    return engine, members


def bench_engine(name, decoder, targets, rank, members, ids, new_tokens, device, variant, pad_id, peaks: Peaks, tag="") -> Row:
    _reset_peak(device)
    engine, members = variant_engine(variant, decoder, targets, rank, members, len(ids), pad_id)
    scal = 2.0  # alpha = 2 r
    t0 = time.perf_counter()
    engine.generate(ids, members, new_tokens, scal)
    _sync(device)
    first = time.perf_counter() - t0
    setup = engine.stats.setup_s
    t0 = time.perf_counter()
    engine.generate(ids, members, new_tokens, scal)
    _sync(device)
    seconds = time.perf_counter() - t0
    st = engine.stats
    rows = len(members) * len(ids)
    decode_tok_s = rows * st.decode_steps / st.decode_s if st.decode_s else 0.0
    roof = roofline(decoder, engine, ids, new_tokens, len(members), peaks)
    extra = {
        "variant": variant, "tag": tag, "first_call_s": first, "setup_s": setup, "prefill_s": st.prefill_s, "decode_s": st.decode_s,
        "load_members_s": st.load_s, "decode_tok_s": decode_tok_s, "decode_step_ms": 1e3 * st.decode_s / max(1, st.decode_steps), **roof,
        "roofline_fraction": decode_tok_s / roof["roofline_tok_s"] if roof["roofline_tok_s"] else 0.0,
        "floor_fraction": max(roof["roofline_step_ms"], roof["flop_floor_step_ms"]) / (1e3 * st.decode_s / max(1, st.decode_steps)) if st.decode_s else 0.0,
    }
    row = Row(name, "d" if not tag else f"d:{tag}", rank, rows, new_tokens, seconds, rows * new_tokens / seconds,
              warmup_s=first - seconds, peak_gib=_peak(device), extra=extra)
    engine.close()
    return row


def roofline(decoder: Decoder, engine: PopulationEngine, ids, new_tokens: int, n_members: int, peaks: Peaks) -> dict:
    """Bytes a decode step must read (weights once, the members' A and B, the KV cache of every
    row up to its current length), averaged over the decode steps, over the GPU's memory bandwidth;
    and the FLOP floor beside it, at its dense bf16 rate."""
    cfg = decoder.config
    weights = decoder.num_parameter_bytes()
    # the members' A and B at their own rank, B compact: the bytes any kernel must read (the engine's
    # zero padding of rank 1 to 8 for cuBLAS is its own cost, not the roofline's)
    lora = PopulationLoRA(cfg.fused_out, cfg.fused_in, cfg.n_layers, engine.targets, engine.rank, decoder.dtype, torch.device("meta"),
                          pad_rank_to=1, compact=True)
    lora._allocate(n_members)
    lora_bytes = lora.bytes_per_step()
    kv_per_token = kv_bytes_per_token(decoder)
    steps = max(1, new_tokens - 1)
    real = sum(len(i) for i in ids) * n_members  # prompt tokens over all rows
    rows = n_members * len(ids)
    mean_ctx_tokens = real + rows * (1 + steps) / 2  # cache entries read per step, averaged
    kv_bytes = kv_per_token * mean_ctx_tokens
    step_bytes = weights + lora_bytes + kv_bytes
    t_mem = step_bytes / peaks.bandwidth
    flops = 2 * rows * matmul_params(decoder) + rows * lora.flops_per_row() + 4 * mean_ctx_tokens * cfg.n_layers * cfg.q_out
    t_flop = flops / peaks.bf16_dense
    return {
        "weights_gb": weights / 1e9, "lora_gb": lora_bytes / 1e9, "kv_gb_per_step": kv_bytes / 1e9,
        "roofline_step_ms": 1e3 * t_mem, "roofline_tok_s": rows / t_mem, "flop_floor_step_ms": 1e3 * t_flop,
    }


def kv_bytes_per_token(decoder: Decoder) -> int:
    """K and V of one cache slot over all layers."""
    cfg = decoder.config
    return 2 * cfg.n_layers * cfg.kv_out * decoder.embed.element_size()


def matmul_params(decoder: Decoder) -> int:
    """Weights of the dense matmuls of one token (every layer's Linears and the head)."""
    return sum(w.wqkv.numel() + w.wo.numel() + w.w13.numel() + w.w2.numel() for w in decoder.layers) + decoder.lm_head.numel()


def profile_engine(decoder, targets, rank, members, ids, device, pad_id, peaks: Peaks, variant: str = "compile") -> None:
    """Kernel times of (d)'s decode step (compiled unless the variant is eager or graphs) launched
    without a graph, decode steps only, at the middle of the 256 tokens; the matmuls against their
    FLOP floor and the attention against its KV-read floor, at the GPU's ceilings."""
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    engine, members = variant_engine(variant, decoder, targets, rank, members, len(ids), pad_id, cuda_graphs=False)
    engine.generate(ids, members, 256)  # the cache of a 256-token run
    s = engine._session
    t_pad = engine.stats.padded_prompt_len[0]
    steps = 5
    with torch.inference_mode():
        s.write.fill_(t_pad + 128)
        s.step.fill_(1)
        engine._decode_step(s, s.cache_len)
        torch.cuda.synchronize()
        first_write = int(s.write.item())  # the slot of the first profiled step's new token
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine._decode_step(s, s.cache_len)
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"profile [{variant}] rank {rank}", flush=True)
    print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
    groups: dict[str, float] = {}
    for e in events:
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        n = e.key.lower()
        kind = ("attention" if "decode_kernel" in n or "sdpa" in n or "fmha" in n or "attention" in n else
                "gemm" if any(x in n for x in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "head_argmax")) else
                "LoRA kernel" if "silu_lora" in n else
                "triton (fused)" if n.startswith("triton") else "other")
        groups[kind] = groups.get(kind, 0.0) + t
    print("per decode step (us): " + ", ".join(f"{k} {v / steps:,.0f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])), flush=True)
    # a step writing slot w reads the cache slots start..w-1; w ran from first_write over `steps` steps
    slots = float((first_write + (steps - 1) / 2 - s.start.double()).sum().item())
    gemm_floor = 2 * s.rows * matmul_params(decoder) / peaks.bf16_dense * 1e6
    attn_floor = kv_bytes_per_token(decoder) * slots / peaks.bandwidth * 1e6
    gemm, attn = groups.get("gemm", 0.0) / steps, groups.get("attention", 0.0) / steps
    print(f"floors ({peaks.describe()}): dense matmuls {gemm_floor:,.0f} us (the gemm kernels at {100 * gemm_floor / max(gemm, 1e-9):.0f}% of it), "
          f"attention's KV reads {attn_floor:,.0f} us (attention at {100 * attn_floor / max(attn, 1e-9):.0f}%); "
          f"their sum {gemm_floor + attn_floor:,.0f} us", flush=True)
    engine.close()


# --- (c) HF generate, static cache ----------------------------------------------------------


def bench_hf_static(name, model, tokenizer, texts, members: int, new_tokens: int, device) -> Row:
    _reset_peak(device)
    batch = tokenizer(texts * members, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, cache_implementation="static")
    if device.type != "cuda":
        kw["disable_compile"] = True
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**batch, **kw)
        _sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**batch, **kw)
        _sync(device)
        seconds = time.perf_counter() - t0
    rows = batch["input_ids"].shape[0]
    made = out.shape[1] - batch["input_ids"].shape[1]
    return Row(name, "c", 0, rows, made, seconds, rows * made / seconds, warmup_s=first - seconds, peak_gib=_peak(device))


# --- (a) and (b) PEFT ------------------------------------------------------------------------


def bench_peft(name, model, tokenizer, texts, folders, rank, args, device, methods) -> list[Row]:
    from peft import PeftModel

    out = []
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="m000")
    names = ["m000"]
    for i, f in enumerate(folders[1:], start=1):
        peft_model.load_adapter(str(f), adapter_name=f"m{i:03d}")
        names.append(f"m{i:03d}")
    peft_model.eval()
    load_s = time.perf_counter() - t0
    print(f"PEFT: {len(folders)} adapters loaded in {load_s:.1f} s", flush=True)
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        # warm-up (cuBLAS handles, allocator)
        peft_model.set_adapter(names[0])
        peft_model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if "a" in methods:
            _reset_peak(device)
            k = min(args.peft_adapters, len(names))
            _sync(device)
            t0 = time.perf_counter()
            for n in names[:k]:
                peft_model.set_adapter(n)
                peft_model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            _sync(device)
            seconds = time.perf_counter() - t0
            rows = k * len(texts)
            out.append(Row(name, "a", rank, rows, args.new_tokens, seconds, rows * args.new_tokens / seconds, peak_gib=_peak(device),
                           extra={"adapters_timed": k, "adapters_load_s": load_s}))
            report(out[-1])
        if "b" in methods:
            _reset_peak(device)
            mixed = tokenizer(texts * len(names), add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            adapter_names = [n for n in names for _ in texts]
            nt = args.peft_batch_tokens
            _sync(device)
            t0 = time.perf_counter()
            peft_model.generate(**mixed, adapter_names=adapter_names, max_new_tokens=nt, min_new_tokens=nt, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            _sync(device)
            seconds = time.perf_counter() - t0
            rows = len(adapter_names)
            out.append(Row(name, "b", rank, rows, nt, seconds, rows * nt / seconds, peak_gib=_peak(device)))
            report(out[-1])
    return out


# --- printing ------------------------------------------------------------------------------


def report(r: Row) -> None:
    e = r.extra
    line = f"  ({r.method}) rank {r.rank}: {r.rows} rows x {r.new_tokens} tokens in {r.seconds:.2f} s = {r.tok_s:,.0f} tok/s"
    if r.warmup_s:
        line += f"; warm-up/compile {r.warmup_s:.1f} s"
    if r.peak_gib:
        line += f"; peak {r.peak_gib:.1f} GiB"
    if r.method.startswith("d"):
        line += (f"\n      [{e['variant']}] setup {e['setup_s']:.1f} s, prefill {e['prefill_s']:.2f} s, decode {e['decode_s']:.2f} s "
                 f"({e['decode_step_ms']:.2f} ms/step, {e['decode_tok_s']:,.0f} tok/s); roofline {e['roofline_step_ms']:.2f} ms/step "
                 f"(weights {e['weights_gb']:.2f} GB + LoRA {e['lora_gb']:.2f} GB + KV {e['kv_gb_per_step']:.2f} GB), "
                 f"FLOP floor {e['flop_floor_step_ms']:.2f} ms/step -> {100 * e['roofline_fraction']:.0f}% of roofline, "
                 f"{100 * e['floor_fraction']:.0f}% of max(bytes, FLOP) floor")
    print(line, flush=True)


def print_summary(rows: list[Row], on_cpu: bool) -> None:
    print("\n| model | rank | (a) PEFT loop | (b) PEFT mixed | (c) HF static | (d) engine | d/a | d/c | (d) decode vs roofline | vs max(bytes, FLOP) floor | (d) peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_model: dict[str, list[Row]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    for model, rs in by_model.items():
        c = next((r for r in rs if r.method == "c"), None)
        for d in [r for r in rs if r.method.startswith("d")]:
            a = next((r for r in rs if r.method == "a"), None)
            b = next((r for r in rs if r.method == "b"), None)
            fmt = lambda r: f"{r.tok_s:,.0f}" if r else "-"
            label = d.rank if not d.extra.get("tag") else f"{d.rank} ({d.extra['tag']}, {d.rows} rows)"
            if d.extra.get("variant", "compile") != "compile":
                label = f"{label} [{d.extra['variant']}]"
            def ratio(base, digits, d=d):
                return f"{d.tok_s / base.tok_s:.{digits}f}x" if base else "-"  # "-" where (a) or (c) did not run

            print(f"| {model} | {label} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(d)} | {ratio(a, 1)} | {ratio(c, 2)} | "
                  f"{100 * d.extra['roofline_fraction']:.0f}% ({d.extra['decode_step_ms']:.2f} vs {d.extra['roofline_step_ms']:.2f} ms/step) | "
                  f"{100 * d.extra['floor_fraction']:.0f}% | {d.peak_gib:.1f} |")
    if on_cpu:
        print("(CPU: the roofline uses the H100 SXM's figures and means nothing here)")


if __name__ == "__main__":
    sys.exit(main())
