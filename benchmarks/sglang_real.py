"""The SGLang backend against a real server on a GPU machine (issue 28 part 1), step by step.

Run from the repo root after the base carry (`source $HOME/carry/env.sh`) and the sglang carry
(`source $HOME/sgcarry/env.sh`: SGLANG_PYTHONPATH, put first on the *server's* PYTHONPATH only):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.sglang_real --out $OUT [--steps launch,pytest,parity,speed,cli,faults]

Steps (each writes its result into $OUT/sglang_real.json as it finishes; a failing step records
its error and the next runs; `launch` failing stops the rest, with the server log's tail):
  launch  start the server with the project's LaunchSpec/SGLangServer (flags below), time it
  pytest  tests/test_sglang_backend.py -m sglang against it (ES_SGLANG_URL)
  parity  N members (rank R, B random) x P prompts, greedy T tokens: SGLang vs the embedded engine,
          bf16 both: share of identical completions, first differing token index (re-tokenized)
  speed   the population batched: tok/s on SGLang and embedded; load/unload seconds per generation
  cli     `flows.cli run` with backend.kind=sglang attached via ES_SGLANG_URL, killed mid-run, resumed
  faults  server killed mid-generation (a backend that launched its own server must restart it and
          redo the shard), a request naming a never-loaded adapter, more adapters than GPU slots
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
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--cli-kill-after", type=float, default=60.0, help="seconds before the CLI run is killed (cli step)")
    p.add_argument("--python", default="python3")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        p.error(f"unknown step(s) {bad}; choose from {','.join(STEPS)}")
    args.modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    return args


def server_python(python: str) -> str:
    """The interpreter command for the server: SGLANG_PYTHONPATH first on its PYTHONPATH (via env)."""
    sg = os.environ.get("SGLANG_PYTHONPATH")
    if not sg:
        return python
    pp = ":".join(x for x in (sg, os.environ.get("PYTHONPATH", "")) if x)
    return f"env PYTHONPATH={shlex.quote(pp)} {python}"


def launch_extra(args) -> tuple[str, ...]:
    return ("--attention-backend", args.attention_backend, "--sampling-backend", args.sampling_backend, *shlex.split(args.extra))


class Results:
    def __init__(self, out: Path):
        self.path = out / "sglang_real.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, step: str, value) -> None:
        self.data[step] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[{time.strftime('%H:%M:%S')}] {step}: {json.dumps(value, default=str)[:1500]}", flush=True)


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


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
                      max_loras_per_batch=args.members + 1, max_loaded_loras=2 * args.members, python=server_python(args.python),
                      lora_backend=args.lora_backend, dtype="bfloat16", extra_args=launch_extra(args))
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
    return {"rc": r.returncode, "seconds": round(time.perf_counter() - t0, 1), "tail": (r.stdout + r.stderr)[-1500:]}


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
    s = load_settings(None, [f"model.name={a.model}", "model.dtype=bfloat16", f"lora.rank={a.rank}", "lora.layers=all",
                             f"lora.modules={json.dumps(list(a.modules))}", f"lora.alpha={a.rank}"])  # compiled on CUDA, as runs decode
    return EmbeddedBackend.from_settings(s, ctx["base"])


def step_parity(args, ctx) -> dict:
    from es_core.models import load_tokenizer

    tok = load_tokenizer(ctx["base"])
    refs, ps = ctx["refs"], ctx["prompts"]
    with _sglang_backend(ctx) as sg:
        t0 = time.perf_counter(); got_sg = sg.generate(refs, ps, args.max_new_tokens); t_sg = time.perf_counter() - t0
    ctx["parity_sg"] = [[x.text for x in row] for row in got_sg]  # the faults step compares its redone shard with these
    emb = _embedded(ctx)
    t0 = time.perf_counter(); got_emb = emb.generate(refs, ps, args.max_new_tokens); t_emb = time.perf_counter() - t0
    ctx["emb"] = emb
    same, diffs = 0, []
    for m, (ra, rb) in enumerate(zip(got_sg, got_emb)):
        for p, (x, y) in enumerate(zip(ra, rb)):
            if x.text == y.text:
                same += 1
            else:
                diffs.append(first_diff(tok(x.text, add_special_tokens=False)["input_ids"], tok(y.text, add_special_tokens=False)["input_ids"]))
    total = len(refs) * len(ps)
    idx = sorted(d for d in diffs if d is not None)
    return {"identical": same, "total": total, "share": round(same / total, 4), "first_diff_token_min": idx[:1], "first_diff_token_median": idx[len(idx) // 2] if idx else None,
            "first_diff_hist": {str(b): sum(1 for d in idx if b <= d < b * 2 or (b == 0 and d == 0)) for b in (0, 1, 2, 4, 8, 16, 32, 64)},
            "sglang_seconds": round(t_sg, 2), "embedded_seconds": round(t_emb, 2),
            "kernels": {"attention": args.attention_backend, "lora": args.lora_backend, "sampling": args.sampling_backend, "dtype": "bfloat16", "embedded": "es_core PopulationEngine bf16"},
            "example": {"sglang": got_sg[0][0].text[:200], "embedded": got_emb[0][0].text[:200]}}


def step_speed(args, ctx) -> dict:
    from es_core.backends.sglang_client import SGLangClient

    refs, ps = ctx["refs"], ctx["prompts"]
    c = SGLangClient(ctx["url"], request_timeout_s=600)
    t0 = time.perf_counter()
    for r in refs:
        c.load_adapter(r.name, str(r.path))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in refs:
        c.unload_adapter(r.name)
    t_unload = time.perf_counter() - t0
    res = {"load_s_per_generation": round(t_load, 3), "unload_s_per_generation": round(t_unload, 3), "adapters": len(refs)}
    for name, make in (("sglang", lambda: _sglang_backend(ctx)), ("embedded", lambda: ctx.get("emb") or _embedded(ctx))):
        be = make()
        be.generate(refs[:2], ps[:4], 8)  # warm-up
        t0 = time.perf_counter(); out = be.generate(refs, ps, args.max_new_tokens); dt = time.perf_counter() - t0
        toks = sum(x.completion_tokens for row in out for x in row)
        res[name] = {"seconds": round(dt, 2), "tokens": toks, "tok_per_s": round(toks / dt, 1)}
        if name == "sglang":
            be.close()
    return res


def step_cli(args, ctx) -> dict:
    env = {**os.environ, "ES_SGLANG_URL": ctx["url"], "ES_DATA_DIR": str(ctx["work"] / "cli")}
    sets = ["backend.kind=sglang", f"lora.rank={min(args.rank, 8)}", "es.generations=4", "es.population=8", "warm_start.steps=0", "eval.every=0"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", "configs/experiments/smoke.yaml", "--run-id", "sgcli"] + [x for s in sets for x in ("--set", s)]
    log = open(ctx["out"] / "cli.log", "a")
    log.write(f"$ {shlex.join(cmd)}\n"); log.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc1 = p.wait(timeout=args.cli_kill_after); killed = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.wait(); rc1, killed = p.returncode, True
    t_first = time.perf_counter() - t0
    rcmd = [sys.executable, "-m", "flows.cli", "resume", "sgcli"]
    log.write(f"\n$ {shlex.join(rcmd)}  (first run killed={killed} after {t_first:.0f}s)\n"); log.flush()
    t0 = time.perf_counter()
    r = subprocess.run(rcmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400)
    log.close()
    return {"first_rc": rc1, "killed": killed, "first_seconds": round(t_first, 1), "resume_rc": r.returncode, "resume_seconds": round(time.perf_counter() - t0, 1),
            "tail": (ctx["out"] / "cli.log").read_text()[-1200:]}


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
        res["killed_pid"] = server.pid
        os.killpg(server.pid, signal.SIGKILL)
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
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("SGREAL_WORK", "/tmp/sglang_real")); work.mkdir(parents=True, exist_ok=True)
    res = Results(out)
    res.put("config", {"argv": sys.argv[1:], "server_python": server_python(args.python), "extra": launch_extra(args), "steps": args.steps})
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
    res.put("launch", {"ok": True, "seconds": round(t_launch, 1), "url": server.url, "command": shlex.join(server.spec.command())})
    funcs = {"pytest": step_pytest, "parity": step_parity, "speed": step_speed, "cli": step_cli, "faults": step_faults}
    try:
        for step in args.steps:
            if step == "launch":
                continue
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
