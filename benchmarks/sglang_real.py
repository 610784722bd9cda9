"""The SGLang backend against a real server on a GPU machine (issue 28 part 1), step by step.

Run from the repo root after the base carry (`source $HOME/carry/env.sh`) and the sglang carry
(`source $HOME/sgcarry/env.sh`: SGLANG_PYTHONPATH, put first on the *server's* PYTHONPATH only):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.sglang_real --out $OUT [--steps launch,pytest,parity,speed,cli,faults]

Steps (each writes its result into $OUT/sglang_real.json as it finishes; a failing step records
its error and the next runs; `launch` failing stops the rest, with the server log's tail). They run
in the order `--steps` gives (launch always first); each line printed says the seconds since start,
and a step that would start after `--deadline` seconds is recorded as skipped:
  launch  start the server with the project's LaunchSpec/SGLangServer (flags below), time it; the
          server's own view of dtype and deterministic inference (GET /server_info) is recorded
  pytest  tests/test_sglang_backend.py -m sglang against it (ES_SGLANG_URL)
  parity  N members (rank R, B random) x P prompts, greedy T tokens: SGLang vs the embedded engine
          in --dtype both: share of identical completions, first differing token (re-tokenized);
          the same for the base model alone (the control: kernels without adapters); for each
          differing row, a float32 reference forward (HF, the adapter merged) at the first
          differing token: the top-2 margin and the gap between the two engines' tokens
  speed   the population batched: tok/s on SGLang and embedded; load/unload seconds per generation
  cli     `flows.cli run` with backend.kind=sglang attached via ES_SGLANG_URL, killed once the ledger
          holds a committed generation, then resumed; checks that every generation is committed
  faults  server killed mid-generation (a backend that launched its own server must restart it and
          redo the shard), a request naming a never-loaded adapter, more adapters than GPU slots;
          the main server is stopped for it and started again if steps follow
Server modes: --deterministic (default; SGLang's --enable-deterministic-inference: batch-invariant
kernels, so a request's text does not depend on what it was batched with) or --no-deterministic;
--dtype bfloat16 (default) or float32, for the server and the embedded engine alike. In float32,
SGLang's Triton kernels (attention, LoRA) call tl.dot without a precision, which Triton runs in TF32
(10-bit mantissa inputs) unless TRITON_F32_DEFAULT says otherwise; --triton-f32 sets it on the
server (default: ieee in float32, the embedded engine's and the reference's precision; tf32 was the
H100 run of 2026-12-07: 93.0% identical, the float32 reference siding with the embedded engine in
33 of 34 differing rows). cuBLAS matmuls stay IEEE float32 (SGLang's --enable-tf32-matmul is off).
Files in $OUT: sglang_real.json, server.log (+ server-faults.log), pytest.log, cli.log (<= 8).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

SMOKE = "configs/experiments/smoke.yaml"
SMOKE_POPULATION = 8  # the cli step shrinks the smoke config's population to fit the parity step's slots
STEPS = ("launch", "pytest", "parity", "speed", "cli", "faults")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "sglang_real_out"))
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", default=",".join(MODULES))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lora-backend", default="triton", choices=["triton", "csgmv", "torch_native", "triton_v2"])
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--sampling-backend", default="pytorch")
    p.add_argument("--extra", default="--grammar-backend none --mem-fraction-static 0.6 --log-level info",
                   help="more launch_server flags (shell words), e.g. add --disable-cuda-graph")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the server's and the embedded engine's")
    p.add_argument("--triton-f32", choices=["ieee", "tf32", "tf32x3"], default=None,
                   help="the server's TRITON_F32_DEFAULT: float32 tl.dot precision (default: ieee in float32, Triton's own in bfloat16)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="launch with --enable-deterministic-inference (batch-invariant kernels; triton attention supports it in 0.5.16)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=0, help="pass --cuda-graph-max-bs N (0: SGLang's default, up to 256 here)")
    p.add_argument("--speed-members", type=int, default=0, help="members in the speed step (0: --members); the server's slots cover both")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--deadline", type=float, default=0.0, help="seconds since start after which no further step starts (0: none)")
    p.add_argument("--cli-generations", type=int, default=12)
    p.add_argument("--cli-config", default=SMOKE, help="the config the cli step runs (the smoke one, shrunk to the server's slots and rank, or e.g. "
                   "configs/experiments/smollm2_gpu.yaml as it is, its generations and evaluations cut)")
    p.add_argument("--cli-timeout", type=float, default=240.0, help="seconds the CLI run may take to commit its first generation (cli step)")
    p.add_argument("--python", default="python3")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        p.error(f"unknown step(s) {bad}; choose from {','.join(STEPS)}")
    args.modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    return args


def server_python(python: str, env: dict[str, str] | None = None) -> str:
    """The interpreter command for the server: SGLANG_PYTHONPATH first on its PYTHONPATH and `env`
    set (via env)."""
    sg = os.environ.get("SGLANG_PYTHONPATH")
    assigned = dict(env or {})
    if sg:
        assigned = {"PYTHONPATH": ":".join(x for x in (sg, os.environ.get("PYTHONPATH", "")) if x), **assigned}
    if not assigned:
        return python
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in assigned.items()) + f" {python}"


def server_env(args) -> dict[str, str]:
    """What the server's environment adds: Triton's float32 dot precision (module docstring)."""
    precision = args.triton_f32 or ("ieee" if args.dtype == "float32" else None)
    return {"TRITON_F32_DEFAULT": precision} if precision else {}


def launch_extra(args) -> tuple[str, ...]:
    extra = ["--attention-backend", args.attention_backend, "--sampling-backend", args.sampling_backend]
    if args.deterministic:
        extra.append("--enable-deterministic-inference")
    if args.cuda_graph_max_bs:
        extra += ["--cuda-graph-max-bs", str(args.cuda_graph_max_bs)]
    return (*extra, *shlex.split(args.extra))


def slots(args) -> int:
    """Adapters the server batches at once: the largest population of the parity, speed and cli steps."""
    return max(args.members, args.speed_members, cli_population(args) if "cli" in args.steps else 0)


def cli_population(args) -> int:
    """The cli step's population: the smoke config's as the step shrinks it, else its config's."""
    if args.cli_config == SMOKE:
        return SMOKE_POPULATION
    from es_core.settings import load_settings

    return load_settings(args.cli_config).es.population


T0 = time.perf_counter()


def elapsed() -> float:
    return round(time.perf_counter() - T0, 1)


class Results:
    def __init__(self, out: Path):
        self.path = out / "sglang_real.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, step: str, value) -> None:
        self.data[step] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[{time.strftime('%H:%M:%S')} +{elapsed():.0f}s] {step}: {json.dumps(value, default=str)[:1500]}", flush=True)


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


BINS = (0, 1, 2, 4, 8, 16, 32, 64)


def compare(got_a, got_b, tokenize) -> tuple[dict, list]:
    """Share of identical texts, and for each differing row (m, p, first differing token index of
    the re-tokenized texts, a's ids, b's ids)."""
    same, rows = 0, []
    for m, (ra, rb) in enumerate(zip(got_a, got_b)):
        for p, (x, y) in enumerate(zip(ra, rb)):
            if x.text == y.text:
                same += 1
                continue
            ia, ib = tokenize(x.text), tokenize(y.text)
            rows.append((m, p, first_diff(ia, ib), ia, ib))
    total = sum(len(r) for r in got_a)
    idx = sorted(d for _, _, d, _, _ in rows if d is not None)
    return {"identical": same, "total": total, "share": round(same / total, 4) if total else None,
            "first_diff_token_min": idx[:1], "first_diff_token_median": idx[len(idx) // 2] if idx else None,
            "first_diff_hist": {str(b): sum(1 for d in idx if b <= d and (d < max(1, 2 * b) or b == BINS[-1])) for b in BINS},
            "first_diff_texts_equal_tokens": sum(1 for _, _, d, _, _ in rows if d is None)}, rows


def gap_summary(items: list[dict]) -> dict:
    """How close the two engines' tokens were, at the first difference, by the float32 reference."""
    gaps = sorted(abs(x["gap"]) for x in items if x.get("gap") is not None)
    margins = sorted(x["margin"] for x in items if x.get("margin") is not None)
    edges = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, float("inf"))
    return {"rows": len(items), "abs_gap_median": gaps[len(gaps) // 2] if gaps else None,
            "abs_gap_hist": {f"{lo}-{hi}": sum(1 for g in gaps if lo <= g < hi) for lo, hi in zip(edges, edges[1:])},
            "top2_margin_median": margins[len(margins) // 2] if margins else None,
            "reference_picks": {k: sum(1 for x in items if x.get("reference_picks") == k) for k in ("embedded", "sglang", "other")}}


# --- the pieces the steps share ---------------------------------------------------------------


def base_model(args, work: Path) -> Path:
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings

    return Path(resolve_base_model(ModelSettings(name=args.model), work / "models").path)


def make_members(base: Path, args, folder: Path, seed: int = 0):
    import torch

    from es_core.backends.base import AdapterRef
    from es_core.lora import find_targets_in_folder, init_centre, save_adapter, spec_from_tensors

    targets = find_targets_in_folder(base, "all", list(args.modules))
    centre = init_centre(targets, args.rank, seed=seed)
    refs = []
    for m in range(args.members):
        g = torch.Generator().manual_seed(seed * 1000 + m + 1)
        member = {k: (v + 0.02 * torch.randn(v.shape, generator=g)) if ".lora_B." in k else v for k, v in centre.items()}
        path = save_adapter(member, folder / f"m{m:03d}", spec_from_tensors(member, float(args.rank)))
        refs.append(AdapterRef(f"{folder.name}_m{m:03d}", path))
    return refs


def prompts(base: Path, n: int) -> list[str]:
    from es_core.countdown.problems import generated_splits
    from es_core.countdown.prompt import render_prompts
    from es_core.models import load_tokenizer

    train, _ = generated_splits(n, 8, 0)
    return render_prompts(train[:n], "chat", load_tokenizer(base))


def launch(args, base: Path, log: Path, port: int):
    from es_core.backends.sglang_server import LaunchSpec, SGLangServer

    spec = LaunchSpec(model_path=str(base), port=port, max_lora_rank=args.rank, lora_target_modules=args.modules,
                      max_loras_per_batch=slots(args) + 1, max_loaded_loras=2 * slots(args), python=server_python(args.python, server_env(args)),
                      lora_backend=args.lora_backend, dtype=args.dtype, extra_args=launch_extra(args))
    server = SGLangServer(spec, log, startup_timeout_s=args.startup_timeout)
    t0 = time.perf_counter()
    server.start()
    return server, time.perf_counter() - t0


# --- steps -------------------------------------------------------------------------------------


def step_pytest(args, ctx) -> dict:
    env = {**os.environ, "ES_SGLANG_URL": ctx["url"], "ES_SGLANG_BASE_MODEL": str(ctx["base"]), "OMP_NUM_THREADS": "4"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "sglang", "-k", "real_server", "tests/test_sglang_backend.py", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    (ctx["out"] / "pytest.log").write_text(r.stdout + r.stderr)
    return {"rc": r.returncode, "seconds": round(time.perf_counter() - t0, 1), "server_deterministic": ctx.get("deterministic"),
            "tail": (r.stdout + r.stderr)[-1500:]}


def _sglang_backend(ctx):
    from es_core.backends.sglang import SGLangBackend
    from es_core.backends.sglang_client import AdapterChecker, SGLangClient
    from es_core.models import load_tokenizer

    a = ctx["args"]
    return SGLangBackend([SGLangClient(ctx["url"], request_timeout_s=600)], tokenizer=load_tokenizer(ctx["base"]),
                         checker=AdapterChecker(ctx["base"], max_rank=a.rank, target_modules=list(a.modules)), requests_per_server=a.members)


def _embedded(ctx):
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.settings import load_settings

    a = ctx["args"]
    s = load_settings(None, [f"model.name={a.model}", f"model.dtype={a.dtype}", f"lora.rank={a.rank}", "lora.layers=all",
                             f"lora.modules={json.dumps(list(a.modules))}", f"lora.alpha={a.rank}"])  # compiled on CUDA, as runs decode
    return EmbeddedBackend.from_settings(s, ctx["base"])


def reference_gaps(ctx, refs, rows, dtype: str = "float32") -> list[dict]:
    """At each differing row's first differing token: the reference model's (HF, `dtype`, the
    member's LoRA merged into its weights) logits after the prompt and the common prefix. `margin`:
    its top-1 minus top-2 logit; `gap`: its logit for the embedded engine's token minus SGLang's.
    A gap near 0 is a near-tie that kernel numerics may tip either way; a large one is not."""
    import torch

    from es_core.lora import PEFT_PREFIX, load_adapter
    from es_core.models import load_causal_lm

    if not rows:
        return []
    model = load_causal_lm(ctx["base"], dtype, "auto")
    dev = next(model.parameters()).device
    modules = dict(model.named_modules())
    prompt_ids = [ctx["tok"](p, add_special_tokens=False)["input_ids"] for p in ctx["prompts"]]
    out = []
    for m in sorted({r[0] for r in rows}):
        saved = {}
        if refs[m].path is not None:
            tensors, spec = load_adapter(refs[m].path)
            for k, a in tensors.items():
                if k.endswith(".lora_A.weight"):
                    w = modules[k[len(PEFT_PREFIX):-len(".lora_A.weight")]].weight
                    b = tensors[k.replace(".lora_A.", ".lora_B.")]
                    saved[k] = w.detach().clone()
                    with torch.no_grad():  # W + (alpha / r) B A, as PEFT merges it
                        w += (spec.lora_alpha / spec.rank * (b.double() @ a.double())).to(w.dtype).to(dev)
        for _, p, d, ids_sg, ids_emb in (r for r in rows if r[0] == m):
            row = {"member": m, "prompt": p, "first_diff": d}
            if d is None or d >= min(len(ids_sg), len(ids_emb)):
                out.append({**row, "note": "one completion ends where the other goes on"})
                continue
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids[p] + ids_emb[:d]], device=dev)).logits[0, -1].float()
            top = logits.topk(2)
            e, g = ids_emb[d], ids_sg[d]
            pick = int(top.indices[0])
            out.append({**row, "margin": round(float(top.values[0] - top.values[1]), 4), "gap": round(float(logits[e] - logits[g]), 4),
                        "reference_picks": "embedded" if pick == e else "sglang" if pick == g else "other"})
        for k, w0 in saved.items():
            with torch.no_grad():
                modules[k[len(PEFT_PREFIX):-len(".lora_A.weight")]].weight.copy_(w0)
    del model
    return out


def step_parity(args, ctx) -> dict:
    from es_core.backends.base import AdapterRef
    from es_core.models import load_tokenizer

    tok = ctx["tok"] = load_tokenizer(ctx["base"])
    tokenize = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    refs, ps = ctx["refs"], ctx["prompts"]
    base = [AdapterRef("parity_base", None)]
    with _sglang_backend(ctx) as sg:
        t0 = time.perf_counter(); got_sg = sg.generate(refs, ps, args.max_new_tokens); t_sg = time.perf_counter() - t0
        base_sg = sg.generate(base, ps, args.max_new_tokens)
    ctx["parity_sg"] = [[x.text for x in row] for row in got_sg]  # the faults step compares its redone shard with these
    emb = _embedded(ctx)
    t0 = time.perf_counter(); got_emb = emb.generate(refs, ps, args.max_new_tokens); t_emb = time.perf_counter() - t0
    base_emb = emb.generate(base, ps, args.max_new_tokens)
    ctx["emb"] = emb
    adapters, rows = compare(got_sg, got_emb, tokenize)
    control, base_rows = compare(base_sg, base_emb, tokenize)
    res = {"adapters": adapters, "base_model": control, "sglang_seconds": round(t_sg, 2), "embedded_seconds": round(t_emb, 2),
           "kernels": {"attention": args.attention_backend, "lora": args.lora_backend, "sampling": args.sampling_backend, "dtype": args.dtype,
                       "deterministic": ctx.get("deterministic"), "embedded": f"es_core PopulationEngine {args.dtype}"},
           "example": {"sglang": got_sg[0][0].text[:200], "embedded": got_emb[0][0].text[:200]}}
    try:
        gaps = reference_gaps(ctx, refs, rows)
        base_gaps = reference_gaps(ctx, base, base_rows)
        res["near_ties"] = {"reference": "HF forward in float32, the adapter merged, at the first differing token",
                            "adapters_first_diff_lt8": gap_summary([g for g in gaps if (g["first_diff"] or 0) < 8]),
                            "adapters_first_diff_ge8": gap_summary([g for g in gaps if (g["first_diff"] or 0) >= 8]),
                            "base_model": gap_summary(base_gaps), "rows": (gaps + [{**g, "member": "base"} for g in base_gaps])[:600]}
    except Exception as exc:  # noqa: BLE001  (the shares above stand without it)
        res["near_ties"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    return res


def step_speed(args, ctx) -> dict:
    from es_core.backends.sglang_client import SGLangClient

    refs, ps = ctx["refs"], ctx["prompts"]
    if args.speed_members and args.speed_members != len(refs):
        refs = make_members(ctx["base"], argparse.Namespace(**{**vars(args), "members": args.speed_members}), ctx["work"] / "speed", seed=3)
    c = SGLangClient(ctx["url"], request_timeout_s=600)
    t0 = time.perf_counter()
    for r in refs:
        c.load_adapter(r.name, str(r.path))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in refs:
        c.unload_adapter(r.name)
    t_unload = time.perf_counter() - t0
    res = {"load_s_per_generation": round(t_load, 3), "unload_s_per_generation": round(t_unload, 3), "adapters": len(refs), "prompts": len(ps),
           "dtype": args.dtype, "deterministic": ctx.get("deterministic")}
    for name, make in (("sglang", lambda: _sglang_backend(ctx)), ("embedded", lambda: ctx.get("emb") or _embedded(ctx))):
        be = make()
        be.generate(refs[:2], ps[:4], 8)  # warm-up
        t0 = time.perf_counter(); out = be.generate(refs, ps, args.max_new_tokens); dt = time.perf_counter() - t0
        toks = sum(x.completion_tokens for row in out for x in row)
        res[name] = {"seconds": round(dt, 2), "tokens": toks, "tok_per_s": round(toks / dt, 1)}
        if name == "sglang":
            be.close()
    return res


def committed(data_dir: Path, run_id: str) -> int | None:
    """The last generation the run has committed, read as `es-countdown runs` reads it (a short
    read-only connection; None while there is no ledger, no run row or no generation)."""
    from artifacts.ledger import Ledger

    try:
        return Ledger(data_dir, read_timeout_s=5).last_generation(run_id)
    except Exception:  # noqa: BLE001  (a lock held by the writer, a file being created: ask again)
        return None


def cli_run_id(config: str) -> str:
    """The cli step's run id: one per config, so two configs share the step's data dir."""
    return "sgcli" if config == SMOKE else f"sgcli-{Path(config).stem.replace('_', '-')}"


def step_cli(args, ctx) -> dict:
    """The CLI attached to our server (ES_SGLANG_URL), on the converted model the other steps use
    (ES_MODEL__CACHE_DIR: no second GGUF conversion); killed once the ledger holds a committed
    generation (not at a fixed time: Prefect's start and the model's preparation come first), then
    resumed; the resume must commit every generation."""
    data = ctx["work"] / "cli"
    env = {**os.environ, "ES_SGLANG_URL": ctx["url"], "ES_DATA_DIR": str(data), "ES_MODEL__CACHE_DIR": str(ctx["work"] / "models")}
    n, run_id = args.cli_generations, cli_run_id(args.cli_config)
    sets = [f"model.name={args.model}", "backend.kind=sglang", f"es.generations={n}", "warm_start.steps=0", "eval.every=0"]
    if args.cli_config == SMOKE:
        sets += [f"lora.rank={min(args.rank, 8)}", f"es.population={SMOKE_POPULATION}"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", args.cli_config, "--run-id", run_id] + [x for s in sets for x in ("--set", s)]
    log = open(ctx["out"] / "cli.log", "a")
    log.write(f"$ {shlex.join(cmd)}\n"); log.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    res: dict = {"config": args.cli_config, "run_id": run_id, "generations": n}
    seen = None
    while p.poll() is None and time.perf_counter() - t0 < args.cli_timeout:
        seen = committed(data, run_id)
        if seen is not None:
            res["first_commit_seconds"] = round(time.perf_counter() - t0, 1)
            break
        time.sleep(0.5)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        res["killed"] = True
    else:
        res["killed"] = False
    res.update(first_rc=p.returncode, first_seconds=round(time.perf_counter() - t0, 1), committed_at_kill=committed(data, run_id))
    if seen is None:
        res["error"] = f"no generation committed within {args.cli_timeout:.0f} s" if res["killed"] else "the run ended before committing a generation"
    rcmd = [sys.executable, "-m", "flows.cli", "resume", run_id]
    log.write(f"\n$ {shlex.join(rcmd)}  (first run killed={res['killed']} after {res['first_seconds']:.0f}s, last committed generation {res['committed_at_kill']})\n"); log.flush()
    t0 = time.perf_counter()
    r = subprocess.run(rcmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    log.close()
    last = committed(data, run_id)
    res.update(resume_rc=r.returncode, resume_seconds=round(time.perf_counter() - t0, 1), committed_after_resume=last,
               all_committed=last == n - 1, tail=(ctx["out"] / "cli.log").read_text()[-1200:])
    return res


def step_faults(args, ctx) -> dict:
    """Our own launched server (so the backend may restart it): kill it mid-generation."""
    from es_core.backends.sglang import SGLangBackend
    from es_core.backends.sglang_client import AdapterChecker, SGLangClient
    from es_core.backends.sglang_server import free_port
    from es_core.models import load_tokenizer

    res = {}
    c = SGLangClient(ctx["url"], retries=0)
    try:  # a never-loaded adapter
        c.generate(["hello"], ["never_loaded_xyz"], 4); res["unloaded_adapter"] = "accepted?!"
    except Exception as exc:  # noqa: BLE001
        res["unloaded_adapter"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    # more distinct adapters than GPU slots (members + 1): SGLang should queue, not fail
    many = make_members(ctx["base"], argparse.Namespace(**{**vars(args), "members": args.members * 2}), ctx["work"] / "pool", seed=7)
    try:
        with _sglang_backend(ctx) as sg:
            t0 = time.perf_counter(); out = sg.generate(many, ctx["prompts"][:8], 16)
            res["pool_over_slots"] = {"ok": True, "adapters": len(many), "slots": args.members + 1, "seconds": round(time.perf_counter() - t0, 2), "rows": sum(len(r) for r in out)}
    except Exception as exc:  # noqa: BLE001
        res["pool_over_slots"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    # kill a server we launched mid-generation
    ctx["server"].stop()
    server, t_launch = launch(args, ctx["base"], ctx["out"] / "server-faults.log", free_port())
    be = SGLangBackend([SGLangClient(server.url, request_timeout_s=600)], [server], tokenizer=load_tokenizer(ctx["base"]),
                       checker=AdapterChecker(ctx["base"], max_rank=args.rank, target_modules=list(args.modules)), requests_per_server=args.members)
    def killer():
        time.sleep(3.0)
        pid = res["killed_pid"] = server.pid
        if pid is None or not server.alive():
            res["killed_pid"] = "none: the generation had ended"
            return
        os.killpg(pid, signal.SIGKILL)
    threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    try:
        out = be.generate(ctx["refs"], ctx["prompts"], args.max_new_tokens)
        res["kill_mid_generation"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "server_starts": server.starts, "rows": sum(len(r) for r in out),
                                      "same_as_before": None if "parity_sg" not in ctx else [[x.text for x in r] for r in out] == ctx["parity_sg"]}
    except Exception as exc:  # noqa: BLE001
        res["kill_mid_generation"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}", "server_starts": server.starts}
    finally:
        be.close(); server.stop()
    if ctx.get("steps_left"):  # the main server was stopped for this step: bring it back for the rest
        t0 = time.perf_counter()
        ctx["server"].start()
        ctx["url"] = ctx["server"].url
        res["main_server_restart_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def server_view(url: str) -> dict:
    """What the server says it runs with (GET /server_info), the fields these steps depend on."""
    from es_core.backends.sglang_client import SGLangClient

    try:
        info = SGLangClient(url).server_info()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    keys = ("dtype", "enable_deterministic_inference", "attention_backend", "sampling_backend", "lora_backend", "max_loras_per_batch",
            "disable_radix_cache", "cuda_graph_max_bs", "cuda_graph_max_bs_decode", "version")
    return {k: info.get(k) for k in keys if k in info}


def launch_phases(log: Path) -> dict:
    """Seconds between the server log's landmarks: imports and setup until the model loads, the
    decode CUDA-graph capture (its first batch size includes the Triton kernels' JIT compile)."""
    import re

    stamps = {}
    marks = {"server_args": "server_args=", "load_weight": "Load weight begin", "capture_begin": "Capture target decode CUDA graph begin",
             "capture_end": "Capture target decode CUDA graph end", "ready": "Uvicorn running on"}
    try:
        text = log.read_text(errors="replace").split("=== ")[-1]  # the last launch in the file
    except OSError:
        return {}
    for line in text.splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]", line)
        for key, mark in marks.items():
            if m and mark in line and key not in stamps:
                stamps[key] = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    order = [k for k in marks if k in stamps]
    return {f"{a}->{b}": stamps[b] - stamps[a] for a, b in zip(order, order[1:])}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("SGREAL_WORK", "/tmp/sglang_real")); work.mkdir(parents=True, exist_ok=True)
    res = Results(out)
    res.put("config", {"argv": sys.argv[1:], "server_python": server_python(args.python, server_env(args)), "extra": launch_extra(args), "steps": args.steps})
    t0 = time.perf_counter()
    base = base_model(args, work)
    ctx = {"args": args, "out": out, "work": work, "base": base}
    ctx["refs"] = make_members(base, args, work / "parity")
    ctx["prompts"] = prompts(base, args.prompts)
    res.put("setup", {"base": str(base), "seconds": round(time.perf_counter() - t0, 1), "members": len(ctx["refs"]), "prompts": len(ctx["prompts"])})
    try:
        server, t_launch = launch(args, base, out / "server.log", args.port)
    except Exception as exc:  # noqa: BLE001
        tail = (out / "server.log").read_text(errors="replace")[-4000:] if (out / "server.log").exists() else ""
        res.put("launch", {"ok": False, "error": str(exc)[:2000]})
        print("---- server log tail ----\n" + tail, flush=True)
        return 1
    ctx["server"], ctx["url"] = server, server.url
    info = server_view(server.url)
    ctx["deterministic"] = info.get("enable_deterministic_inference")
    res.put("launch", {"ok": True, "seconds": round(t_launch, 1), "url": server.url, "command": shlex.join(server.spec.command()), "server_info": info,
                       "phases": launch_phases(out / "server.log")})
    funcs = {"pytest": step_pytest, "parity": step_parity, "speed": step_speed, "cli": step_cli, "faults": step_faults}
    todo = [s for s in args.steps if s != "launch"]
    try:
        for k, step in enumerate(todo):
            ctx["steps_left"] = todo[k + 1:]
            if args.deadline and elapsed() > args.deadline:
                res.put(step, {"skipped": f"--deadline {args.deadline:.0f} s passed (+{elapsed():.0f} s)"})
                continue
            print(f"[{time.strftime('%H:%M:%S')} +{elapsed():.0f}s] {step}: starting", flush=True)
            t0 = time.perf_counter()
            try:
                value = funcs[step](args, ctx)
            except Exception as exc:  # noqa: BLE001
                value = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}", "trace": traceback.format_exc()[-2500:]}
                if not ctx["server"].alive():
                    value["server_log_tail"] = ctx["server"].log_tail(40)
            if isinstance(value, dict):
                value.setdefault("step_seconds", round(time.perf_counter() - t0, 1))
            res.put(step, value)
    finally:
        ctx["server"].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
