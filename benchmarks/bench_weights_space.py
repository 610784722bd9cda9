"""Seconds per ES generation: weights space (rank-r members over a shared rank-R centre, every
projection of every layer) against the named baseline, LoRA space at rank 8 on layers 0-10 (the
best LoRA-space recipe of the README's learning section), on the same prompts and device.

A generation here is what the ES loop does per generation apart from scoring and the ledger: the
members built from their seeds (ask), every member on every prompt decoded greedily, the update
(tell; weights space: the re-factorisation of centre + update to rank R). EOS is ignored so both
decode the same number of tokens. Decoding is timed after a warm-up call (compile, CUDA graphs).

  python -m benchmarks.bench_weights_space                       # GPU: 64 members x 64 prompts x 128 tokens
  python -m benchmarks.bench_weights_space --smoke               # CPU: 4 x 4 x 8, tiny-llama
  python -m benchmarks.bench_weights_space --centre-ranks 32 64 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from es_core.countdown.problems import generated_splits
from es_core.countdown.prompt import render_prompts
from es_core.engine.generate import PopulationEngine
from es_core.engine.model import Decoder
from es_core.es import ESState, UpdateRule, ask, draw_population_noise, es_update, zscore
from es_core.optimisers import SGD
from es_core.search_space import LORA_SPACE
from es_core.lora import find_targets, init_centre
from es_core.models import load_causal_lm, load_tokenizer, resolve_base_model
from es_core.settings import DEFAULT_LORA_MODULES, ModelSettings
from es_core.weights_space import member_factors, tell, weight_rms, weights_layout


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _decode_seconds(engine: PopulationEngine, ids, members, new_tokens: int, device, centre=None) -> tuple[float, float, list]:
    t0 = time.perf_counter()
    engine.generate(ids, members, new_tokens, 1.0, centre=centre)
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.generate(ids, members, new_tokens, 1.0, centre=centre)
    _sync(device)
    return time.perf_counter() - t0, first, out.tokens


def lora_generation(model, decoder, ids, args, device, pad_id) -> dict:
    """The baseline: LoRA-space ES at rank 8 on layers 0-10 (float32 slots)."""
    targets = find_targets(model, list(range(min(11, decoder.config.n_layers))), DEFAULT_LORA_MODULES)
    centre = init_centre(targets, args.lora_rank, seed=0)
    t0 = time.perf_counter()
    plan = ask(0, 0, args.members, 0.05)
    drawn = LORA_SPACE.draw(plan, LORA_SPACE.noise_layout(centre))
    members = LORA_SPACE.members(centre, drawn)
    ask_s = time.perf_counter() - t0
    engine = PopulationEngine(decoder, targets, args.lora_rank, pad_id=pad_id, eos_ids=(), max_batch_rows=args.members * len(ids),
                              compile=args.compile)
    decode_s, first_s, _ = _decode_seconds(engine, ids, members, args.new_tokens, device)
    engine.close()
    rewards = torch.rand(args.members, generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    es_update(ESState(centre), drawn, rewards, UpdateRule(SGD(0.025)), LORA_SPACE)
    tell_s = time.perf_counter() - t0
    return {"space": "lora", "rank": args.lora_rank, "layers": len({t.layer for t in targets}), "targets": len(targets), "ask_s": ask_s,
            "decode_s": decode_s, "first_call_s": first_s, "tell_s": tell_s, "generation_s": ask_s + decode_s + tell_s}


def weights_generation(model, decoder, ids, args, device, pad_id, centre_rank: int) -> dict:
    """Weights space: rank-1 members on every projection of every layer over a rank-R centre."""
    targets = find_targets(model, list(range(decoder.config.n_layers)), DEFAULT_LORA_MODULES)
    layout = weights_layout(targets, args.noise_rank, centre_rank, weight_rms(dict(model.named_parameters()), targets))
    g = torch.Generator().manual_seed(0)
    # a centre of full rank R (after some generations every direction is in use)
    centre = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in layout.template(centre_rank).items()}
    t0 = time.perf_counter()
    plan = ask(0, 0, args.members, 0.001)
    noise = draw_population_noise(layout.noise, plan.members)
    members = member_factors(layout, noise, plan.members, plan.sigma)
    ask_s = time.perf_counter() - t0
    engine = PopulationEngine(decoder, targets, args.noise_rank, pad_id=pad_id, eos_ids=(), max_batch_rows=args.members * len(ids),
                              compile=args.compile, centre_rank=centre_rank)
    decode_s, first_s, _ = _decode_seconds(engine, ids, members, args.new_tokens, device, centre=centre)
    engine.close()
    weights = zscore(torch.rand(args.members, generator=g).tolist()).tolist()
    t0 = time.perf_counter()
    result = tell(centre, layout, noise, plan.members, weights, 5e-4)
    tell_s = time.perf_counter() - t0
    return {"space": "weights", "rank": args.noise_rank, "centre_rank": centre_rank, "layers": decoder.config.n_layers, "targets": len(targets),
            "ask_s": ask_s, "decode_s": decode_s, "first_call_s": first_s, "tell_s": tell_s, "generation_s": ask_s + decode_s + tell_s,
            "truncation_kept": result.truncation_kept}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--noise-rank", type=int, default=1)
    p.add_argument("--centre-ranks", type=int, nargs="+", default=[64])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny-llama, 4 members x 4 prompts x 8 tokens, centre rank 8")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "es-bench-models")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.members, args.prompts, args.new_tokens, args.centre_ranks, args.device = "tiny-llama", 4, 4, 8, [8], "cpu"
    device = torch.device(args.device)
    args.compile = device.type == "cuda"
    path = resolve_base_model(ModelSettings(name=args.model), args.cache).path
    model = load_causal_lm(path, "auto", str(device))
    tokenizer = load_tokenizer(path)
    decoder = Decoder.from_hf(model)
    _, heldout = generated_splits(1, args.prompts, seed=0)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(heldout, "chat", tokenizer)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} on {name}: {args.members} members x {len(ids)} prompts x {args.new_tokens} tokens (EOS ignored)", flush=True)
    rows = [lora_generation(model, decoder, ids, args, device, tokenizer.pad_token_id)]
    rows += [weights_generation(model, decoder, ids, args, device, tokenizer.pad_token_id, r) for r in args.centre_ranks]
    base = rows[0]["generation_s"]
    print(f"{'space':8} {'rank':>5} {'R':>4} {'targets':>7} {'ask s':>7} {'decode s':>9} {'tell s':>7} {'gen s':>7} {'vs baseline':>11}")
    for r in rows:
        print(f"{r['space']:8} {r['rank']:>5} {r.get('centre_rank', ''):>4} {r['targets']:>7} {r['ask_s']:7.3f} {r['decode_s']:9.3f} "
              f"{r['tell_s']:7.3f} {r['generation_s']:7.3f} {r['generation_s'] / base:10.2f}x")
    print("baseline: LoRA space, rank 8, layers 0-10 (the README's best LoRA-space recipe); goal: weights space within 1.25x")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "model": args.model, "members": args.members, "prompts": len(ids),
                                         "new_tokens": args.new_tokens, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
