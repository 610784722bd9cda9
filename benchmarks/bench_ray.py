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

Each row also says where its best call's time went: the local engine's phases (EngineStats: setup,
load, prefill, decode); for a Ray engine, per shard, the driver's send (arguments pickled and put in
the object store), the way to the engine (scheduled, arguments fetched and unpickled), the same
phases inside it, the rest of the engine's call (tokenize, detokenize) and the way back. And each
engine's decode path and threads (compiled, CUDA graphs, attention, head, torch threads,
OMP_NUM_THREADS), the local one's and every Ray engine's: an actor's environment is Ray's, not the
driver's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import make_members
from es_core.backends.embedded import EmbeddedBackend
from es_core.backends.ray_engines import ENGINE_PHASES, RayBackend, engine_info
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
    p.add_argument("--old-transfer", action="store_true",
                   help="also time the Ray engines with the members sent as before (a list: one pickled tensor per member and key)")
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
    local_info = engine_info(local.engine)
    print(f"  local engine: {_info_line(local_info)}", flush=True)
    reference, row = timed("local (baseline): 1 engine in this process", lambda: local.generate_tensors(members, prompts, args.max_new_tokens),
                           args.repeats, gpus=1 if cuda else 0, phases=lambda: local_phases(local))
    row["engine_info"] = [local_info]
    rows.append(row)
    local.close()
    del local
    if cuda:
        torch.cuda.empty_cache()

    runs = [(int(e), False) for e in args.engines.split(",")]
    if args.old_transfer:
        runs = [(e, True) for e, _ in runs[:1]] + runs
    for engines, old_transfer in runs:
        ray_backend = RayBackend.from_settings(settings(engines), model_path)
        ray_backend.stack_member_lists = not old_transfer  # the driver alone decides how members travel
        try:
            started = time.perf_counter()
            infos = ray_backend.start_engines()
            start_s = time.perf_counter() - started
            for info in infos:
                print(f"  ray engine {info['name']} (pid {info['pid']}, {info['device']}): {_info_line(info)}", flush=True)
            label = f"ray: {engines} engines x {gpus_per_engine:g} GPU" + (", members sent as a list (before the fix)" if old_transfer else "")
            result, row = timed(label, lambda: ray_backend.generate_tensors(members, prompts, args.max_new_tokens),
                                args.repeats, gpus=engines * gpus_per_engine, phases=ray_backend.call_timings)
            row |= {"engines_start_s": round(start_s, 1), "same_completions": [[c.text for c in r] for r in result] == [[c.text for c in r] for r in reference],
                    "engine_info": infos}
            rows.append(row)
        finally:
            ray_backend.close()

    print_table(rows)
    print_ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def timed(label: str, call, repeats: int, gpus: float, phases):
    """The warm-up call's result (compile, first allocations), then `repeats` timed calls; `phases()`
    after a call says where its time went (the warm-up's and the best call's are kept and printed)."""
    started = time.perf_counter()
    result = call()
    warmup_s = time.perf_counter() - started
    warmup_phases = phases()
    seconds, kept = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
        if seconds[-1] == min(seconds):
            kept = phases()
    tokens = sum(c.completion_tokens for row in result for c in row)
    best = min(seconds)
    row = {"runner": label, "gpus": gpus, "tokens": tokens, "warmup_s": round(warmup_s, 2), "seconds": [round(s, 3) for s in seconds],
           "tok_s": tokens / best, "phases": kept, "warmup_phases": warmup_phases}
    print(f"  {label}: {tokens} tokens, best of {repeats} {best:.2f} s = {row['tok_s']:,.0f} tok/s (warm-up {warmup_s:.1f} s)", flush=True)
    print(f"    warm-up call: {_phases_line(warmup_phases, warmup_s)}", flush=True)
    print(f"    best call:    {_phases_line(kept, best)}", flush=True)
    return result, row


def local_phases(local: EmbeddedBackend) -> list[dict]:
    """The local engine's last call, in call_timings' shape (one shard, no transfers)."""
    return [{"shard": 0, "engine": "local", "phases": dataclasses.asdict(local.engine.stats)}]


def _phases_line(shards: list[dict] | None, call_s: float) -> str:
    if not shards:
        return "-"
    out = []
    for sh in shards:
        st = sh.get("phases", {})
        engine = (f"setup {st.get('setup_s', 0):.2f} + load {st.get('load_s', 0):.2f} + prefill {st.get('prefill_s', 0):.2f} + "
                  f"decode {st.get('decode_s', 0):.2f} s ({st.get('chunks', 0)} chunks, {st.get('rows', 0)} rows, {st.get('decode_steps', 0)} steps)")
        if "send_s" in sh:
            out.append(f"shard {sh['shard']} on {sh['engine']}: send {sh['send_s']:.2f} + to engine {sh['to_engine_s']:.2f} + in engine "
                       f"{sh['in_engine_s']:.2f} [{engine}; the rest {sh['outside_engine_s']:.2f}] + back {sh['back_s']:.2f} = {sh['total_s']:.2f} s")
        else:  # local: the rest of the call is tokenize, detokenize and the completions
            out.append(f"{sh['engine']}: {engine}; the rest of the call {call_s - sum(st.get(k, 0.0) for k in ENGINE_PHASES):.2f} s")
    return "; ".join(out)


def _info_line(info: dict) -> str:
    keys = ("dtype", "compiled", "cuda_graphs", "attention", "lora_kernel", "head", "max_batch_rows", "torch_threads", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    return ", ".join(f"{k} {info.get(k)}" for k in keys)


def print_ratios(rows: list[dict]) -> None:
    """Each Ray row against the baseline, named."""
    base = rows[0]
    best = min(base["seconds"])
    print(f"\nbaseline: {base['runner']}: {base['tok_s']:,.0f} tok/s, best {best:.2f} s a generation")
    for r in rows[1:]:
        print(f"{r['runner']}: {r['tok_s']:,.0f} tok/s = {r['tok_s'] / base['tok_s']:.2f}x the baseline "
              f"({min(r['seconds']) - best:+.2f} s a generation), same completions: {'yes' if r.get('same_completions') else 'NO'}")


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
