"""Bytes a weights-space generation writes to the artifact store: its centre checkpoint and its
members' records, at SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536, 9 heads and
3 kv heads of 64), every projection of every layer, the exact centre (R 576) and rank-1 members.

The centre is generation 1's: generation 0's zero centre moved by one update of `--members`
members (random rewards), so every target holds a change. The members are written by the run's
own code (tasks.members.GenerationMembers.adapter_files, what `write_members` stores); their
records do not depend on N, so a few stand for 512. Bytes are the files' (store.size: the files
and the manifest) and the disk's (du: whole blocks, the folder's own inode block included).
Beside them, the centre's PEFT folder (adapter_files, what artifacts.checkpoints.adapter_folder
writes into a scratch store for a held-out evaluation on a backend that loads files, SGLang; the
embedded engine takes the centre's tensors and writes none): the bytes not written there.

  python -m benchmarks.bench_store_sizes                    # SmolLM2 shapes, R 576, 8 members
  python -m benchmarks.bench_store_sizes --population 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from artifacts.checkpoints import put_checkpoint
from artifacts.store import ArtifactStore
from es_core.es import ESState, ask
from es_core.lora import LoRATarget, adapter_files, spec_from_tensors
from es_core.preflight import ModelShape
from es_core.weights_space import WeightsSpace, tell, zero_centre

SMOLLM2 = ModelShape("llama", 30, 576, 1536, 9, 3, 64, 49152, True, False)


def _rebuild_seconds(store: ArtifactStore, centre_sha256: str, space: WeightsSpace, layout, plan, rewards) -> dict:
    """What rebuilding a thinned centre costs (artifacts/rebuild.py, store.keep_centre_every): the
    kept ancestor read back from the store (every file hashed), then one update per thinned
    generation (its noise drawn, the update of `rewards.__len__()` members, the new centre's files
    hashed as the ledger check does)."""
    from artifacts import checkpoints
    from artifacts.checkpoints import checkpoint_files, load_checkpoint
    from artifacts.store import files_sha256

    checkpoints._RECENT.clear()  # read from disk, as a rebuild in a new process does
    t0 = time.perf_counter()
    state, spec = load_checkpoint(store, centre_sha256)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    drawn = space.draw(plan, space.noise_layout(state.centre))
    new = tell(state.centre, layout, drawn.noise, plan.members, rewards, 0.012).centre
    files_sha256(checkpoint_files(ESState(new, 2), spec))
    return {"load_ancestor_s": round(load_s, 2), "update_s": round(time.perf_counter() - t0, 2)}


def smollm2_targets(shape: ModelShape = SMOLLM2) -> list[LoRATarget]:
    """Every projection of every layer, as find_targets names them on SmolLM2."""
    out = []
    for layer in range(shape.layers):
        for module, (d_in, d_out) in shape.linears().items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append(LoRATarget(f"model.layers.{layer}.{part}.{module}", layer, module, d_in, d_out))
    return out


def disk_bytes(path: Path) -> int:
    """What `du` counts for a path: whole blocks (the file system's allocation, not the files' sizes)."""
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def measure(centre_rank: int, members: int, population: int) -> dict:
    from tasks.members import GenerationMembers

    space = WeightsSpace(1, centre_rank)
    centre0 = zero_centre(smollm2_targets(), centre_rank)
    layout = space.layout(centre0)
    plan = ask(0, 0, members, 0.006, space=space)
    drawn = space.draw(plan, space.noise_layout(centre0))
    rewards = torch.linspace(-1, 1, members, dtype=torch.float64).tolist()
    centre1 = tell(centre0, layout, drawn.noise, plan.members, rewards, 0.012).centre  # every target's change nonzero
    spec = spec_from_tensors(centre1, float(centre_rank))
    peft_folder = {"bytes": sum(map(len, adapter_files(centre1, spec).values()))}
    with tempfile.TemporaryDirectory(prefix="es-store-sizes-") as tmp:
        store = ArtifactStore(Path(tmp) / "artifacts")
        t0 = time.perf_counter()
        ref = put_checkpoint(store, ESState(centre1, 1), spec)
        put_s = time.perf_counter() - t0
        centre = {"bytes": store.size(ref.sha256), "disk_bytes": disk_bytes(ref.path) + disk_bytes(store.manifest_path(ref.sha256)),
                  "files": sorted(p.name for p in ref.path.iterdir()), "put_s": round(put_s, 2)}
        plan1 = ask(0, 1, members, 0.006, space=space)
        rebuild = _rebuild_seconds(store, ref.sha256, space, layout, plan1, rewards)
        refs = GenerationMembers(str(store.root), ref.sha256, plan1).adapter_files()
        member_bytes = [store.size(r.sha256) for r in refs]
        member_disk = [disk_bytes(r.path) + disk_bytes(store.manifest_path(r.sha256)) for r in refs]
    member = {"bytes": max(member_bytes), "disk_bytes": max(member_disk)}
    generation = {k: centre[k] + population * member[k] for k in ("bytes", "disk_bytes")}
    return {"shape": "SmolLM2-135M", "targets": len(layout.targets), "centre_rank": centre_rank, "noise_rank": 1, "population": population,
            "centre": centre, "member": member, "generation": generation, "rebuild": rebuild, "centre_peft_folder": peft_folder,
            "generations_in_64_GB": {k: int(64e9 // generation[k]) for k in generation}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--centre-rank", type=int, default=576)
    p.add_argument("--members", type=int, default=8, help="members written (a record's size does not depend on N)")
    p.add_argument("--population", type=int, default=512, help="N a generation's bytes are given for")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    result = measure(args.centre_rank, args.members, args.population)
    c, m, g = result["centre"], result["member"], result["generation"]
    print(f"centre (R {args.centre_rank}, {result['targets']} targets): {c['bytes']:,} bytes ({c['disk_bytes']:,} on disk), files {c['files']}")
    print(f"member record: {m['bytes']:,} bytes ({m['disk_bytes']:,} on disk)")
    r = result["rebuild"]
    print(f"rebuild of a thinned centre: the kept ancestor read back in {r['load_ancestor_s']} s, then {r['update_s']} s an update "
          f"({args.members} members; CPU)")
    print(f"the centre's PEFT folder (a held-out evaluation's on SGLang; none on the embedded engine): {result['centre_peft_folder']['bytes']:,} bytes")
    print(f"generation at N {args.population}: {g['bytes']:,} bytes ({g['disk_bytes']:,} on disk); "
          f"{result['generations_in_64_GB']['disk_bytes']} generations fit 64 GB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
