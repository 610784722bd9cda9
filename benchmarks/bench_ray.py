"""Tokens/s of one generation's decoding: the local runner (one embedded engine in this process, the
baseline) against the Ray runner (N engine actors, the members sharded over them), on the same
members and prompts, each timed after a warm-up call; the completions are compared.

    python -m benchmarks.bench_ray                                   # CPU: tiny-llama, 2 CPU engines
    python -m benchmarks.bench_ray --model smollm2-135m --population 64 --prompts 32 --max-new-tokens 256 \\
        --gpus-per-engine 0.5 --engines 2                            # 2 actors sharing one GPU
    python -m benchmarks.bench_ray --model qwen2.5-1.5b-random --population 64 --prompts 32 --engines 2,4  # 1 GPU each

On GPUs, `per GPU` divides by the GPUs the engines hold, and `efficiency` is that against the
baseline's (issue 21's goal: >= 90% on 2 and 4 GPUs). On a CPU both runners share the same cores
(the local engine's torch threads, one thread per Ray engine), so the ratio says what sharding and
Ray cost there, not how it scales.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import make_members
from es_core.backends.embedded import EmbeddedBackend
from es_core.backends.ray_engines import RayBackend
from es_core.countdown.problems import generated_splits
from es_core.countdown.prompt import render_prompts
from es_core.models import load_tokenizer, resolve_base_model
from es_core.settings import ModelSettings, settings_from_dict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--engines", default="2", help="comma-separated engine counts to time, e.g. 2,4")
    p.add_argument("--gpus-per-engine", type=float, default=None, help="default: 1 with CUDA, 0 (CPU engines) without")
    p.add_argument("--address", default=None, help="an existing Ray cluster; default: a local one")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up, each runner")
    p.add_argument("--compile", action="store_true", help="the engine's torch.compile (CUDA graphs on GPU); off by default on CPU")
    p.add_argument("--cache-dir", default=os.environ.get("ES_MODEL__CACHE_DIR", str(Path.home() / ".cache" / "es-countdown" / "models")))
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    gpus_per_engine = args.gpus_per_engine if args.gpus_per_engine is not None else (1.0 if cuda else 0.0)
    compile_ = args.compile or cuda

    model_path = resolve_base_model(ModelSettings(name=args.model), Path(args.cache_dir)).path
    tokenizer = load_tokenizer(model_path)
    problems, _ = generated_splits(args.prompts, 1, seed=7)
    prompts = render_prompts(problems[: args.prompts], "chat", tokenizer)

    def settings(engines: int):
        return settings_from_dict({
            "model": {"name": args.model}, "lora": {"rank": args.rank, "layers": list(range(_layers(model_path)))},
            "generation": {"compile": compile_, "max_new_tokens": args.max_new_tokens},
            "runner": {"kind": "ray", "address": args.address, "gpus_per_engine": gpus_per_engine, "engines": engines},
        })

    print(f"{args.model}: {args.population} members x {len(prompts)} prompts, {args.max_new_tokens} new tokens, rank {args.rank}, "
          f"{'CUDA' if cuda else f'CPU ({os.cpu_count()} cores)'}", flush=True)
    rows = []
    base = settings(1)
    local = EmbeddedBackend.from_settings(base.model_copy(update={"runner": base.runner.model_copy(update={"kind": "local"})}), model_path)
    members = make_members(local.engine.targets, args.rank, args.population)
    reference, row = timed("local (baseline): 1 engine in this process", lambda: local.generate_tensors(members, prompts, args.max_new_tokens),
                           args.repeats, gpus=1 if cuda else 0)
    rows.append(row)
    local.close()
    del local
    if cuda:
        torch.cuda.empty_cache()

    for engines in [int(e) for e in args.engines.split(",")]:
        ray_backend = RayBackend.from_settings(settings(engines), model_path)
        try:
            started = time.perf_counter()
            ray_backend.start_engines()
            start_s = time.perf_counter() - started
            result, row = timed(f"ray: {engines} engines x {gpus_per_engine:g} GPU", lambda: ray_backend.generate_tensors(members, prompts, args.max_new_tokens),
                                args.repeats, gpus=engines * gpus_per_engine)
            row |= {"engines_start_s": round(start_s, 1), "same_completions": [[c.text for c in r] for r in result] == [[c.text for c in r] for r in reference]}
            rows.append(row)
        finally:
            ray_backend.close()

    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def timed(label: str, call, repeats: int, gpus: float):
    """The warm-up call's result (compile, first allocations), then `repeats` timed calls."""
    started = time.perf_counter()
    result = call()
    warmup_s = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    tokens = sum(c.completion_tokens for row in result for c in row)
    best = min(seconds)
    row = {"runner": label, "gpus": gpus, "tokens": tokens, "warmup_s": round(warmup_s, 2), "seconds": [round(s, 3) for s in seconds],
           "tok_s": tokens / best}
    print(f"  {label}: {tokens} tokens, best of {repeats} {best:.2f} s = {row['tok_s']:,.0f} tok/s (warm-up {warmup_s:.1f} s)", flush=True)
    return result, row


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    per_gpu_base = base["tok_s"] / base["gpus"] if base["gpus"] else None
    print("\n| runner | tok/s | vs local | per GPU | efficiency | engines start s | same completions |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_gpu = r["tok_s"] / r["gpus"] if r["gpus"] else None
        efficiency = f"{per_gpu / per_gpu_base:.0%}" if per_gpu and per_gpu_base else "-"
        print(f"| {r['runner']} | {r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {f'{per_gpu:,.0f}' if per_gpu else '-'} | {efficiency} | "
              f"{r.get('engines_start_s', '-')} | {'yes' if r.get('same_completions', True) else 'NO'} |")


def _layers(model_path: Path) -> int:
    return json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":
    raise SystemExit(main())
