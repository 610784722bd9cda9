"""ES math: seeded noise, fitness shaping, the update (Qiu et al. 2025) on LoRA tensors."""

import hashlib
import math

import pytest
import torch

from es_core.es import (
    ESState,
    Member,
    PopulationPlan,
    UpdateRule,
    ask,
    centered_rank,
    draw_population,
    draw_population_noise,
    es_update,
    member_plan,
    noise_seed,
    optimizer_tensors,
    state_from_tensors,
    zscore,
)
from es_core.optimisers import SGD, optimiser_named, split
from es_core.search_space import LORA_SPACE

A, B = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def centre():
    return {A: torch.linspace(-1, 1, 2 * 8).reshape(2, 8), B: torch.zeros(6, 2)}


# --- the method written out member by member, as the paper's code does it: what the vectorised
# --- search space must equal bit for bit


def member_noise(centre, seed, perturb="both"):
    """eps of one member for every tensor the noise moves, cut from its seed's stream in key order."""
    noise = draw_population_noise(LORA_SPACE.noise_layout(centre, perturb), [Member(0, seed, 1)])
    return split(noise.eps[0], centre, noise.keys)


def perturb_centre(centre, member, sigma, perturb="both"):
    """The member's LoRA tensors: theta + sigma * sign * eps."""
    out = dict(centre)
    for key, eps in member_noise(centre, member.seed, perturb).items():
        out[key] = centre[key] + (sigma * member.sign) * eps
    return out


def tensors_sha256(tensors) -> str:
    """A content hash of tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def drawn(c, members, sigma=0.05, perturb="both"):
    return draw_population(PopulationPlan(0, tuple(members), sigma, perturb), LORA_SPACE.noise_layout(c, perturb))


def stacked(c, members, sigma, perturb="both"):
    return LORA_SPACE.members(c, drawn(c, members, sigma, perturb))


def update(state, members, rewards, learning_rate, shaping="zscore", optimizer="sgd", perturb="both", fitness=None):
    """es_update of these members, as the aggregate task calls it."""
    rule = UpdateRule(optimiser_named(optimizer, learning_rate), shaping=shaping)
    return es_update(state, drawn(state.centre, members, perturb=perturb), rewards, rule, LORA_SPACE, fitness)


def test_noise_is_regenerated_bit_for_bit_from_the_seed():
    c = centre()
    a, b = member_noise(c, 12345), member_noise(c, 12345)
    assert a.keys() == c.keys() and all(torch.equal(a[k], b[k]) and a[k].shape == c[k].shape for k in c)
    assert a[A].dtype == torch.float32 and not torch.equal(a[A], member_noise(c, 12346)[A])
    assert member_noise(c, 12345, "B").keys() == {B}


def test_noise_streams_are_independent_per_tensor_member_and_generation():
    # the paper's code reseeded every tensor alike; here tensors of one shape get different noise
    big = {"x.lora_A.weight": torch.zeros(4096), "y.lora_A.weight": torch.zeros(4096)}
    eps = member_noise(big, 1)
    corr = torch.corrcoef(torch.stack(list(eps.values())))[0, 1]
    assert abs(float(corr)) < 0.06
    # every (run seed, generation, pair) its own seed: leaving any of the three out of the seed collides here
    seeds = {(r, g, p): noise_seed(r, g, p) for r in range(3) for g in range(3) for p in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    eps = member_noise({A: torch.zeros(100_000)}, noise_seed(0, 3, 1))[A]
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02


def test_antithetic_plan_pairs_share_a_seed_with_opposite_signs():
    plan = member_plan(run_seed=5, generation=2, population=6, antithetic=True)
    assert [m.sign for m in plan] == [1, -1, 1, -1, 1, -1]
    assert plan[0].seed == plan[1].seed != plan[2].seed
    assert len({m.seed for m in member_plan(5, 2, 6, antithetic=False)}) == 6
    with pytest.raises(ValueError):
        member_plan(5, 2, 5, antithetic=True)


def test_a_member_is_the_centre_plus_sigma_times_signed_noise():
    c = centre()
    plus, minus = perturb_centre(c, Member(0, 99, 1), 0.01), perturb_centre(c, Member(1, 99, -1), 0.01)
    eps_a = member_noise(c, 99)[A]
    torch.testing.assert_close(plus[A], c[A] + 0.01 * eps_a, rtol=0, atol=0)
    torch.testing.assert_close((plus[A] + minus[A]) / 2, c[A])
    only_b = perturb_centre(c, Member(0, 99, 1), 0.01, perturb="B")
    assert torch.equal(only_b[A], c[A]) and not torch.equal(only_b[B], c[B])


def test_the_lora_spaces_members_are_each_member_built_alone_bit_for_bit():
    c = centre()
    plan = member_plan(5, 2, 6, antithetic=True) + member_plan(5, 3, 2, antithetic=False)
    for perturb in ("both", "A"):
        members = stacked(c, plan, 0.03, perturb)
        population = [members.member(i) for i in range(len(members))]
        assert len(members) == len(plan) and members.take([2, 0]).member(1)[A].equal(population[0][A])
        for member, tensors in zip(plan, population):
            expected = perturb_centre(c, member, 0.03, perturb)
            assert tensors.keys() == expected.keys()
            assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert not torch.equal(population[0][A], population[1][A])  # partners differ (+eps, -eps)


def test_zscore_and_centered_rank():
    r = [1.0, 2.0, 3.0, 4.0]
    z = zscore(r)
    assert float(z.sum()) == pytest.approx(0, abs=1e-9)
    expected = torch.tensor([-1.3416407865, -0.4472135955, 0.4472135955, 1.3416407865], dtype=torch.float64)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(centered_rank([10.0, -3.0, 7.0]), torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(centered_rank([1.0, 1.0, 2.0]), torch.tensor([-0.25, -0.25, 0.5], dtype=torch.float64))
    # a failed evaluation (NaN) ranks last
    assert float(centered_rank([1.0, float("nan"), 2.0])[1]) == -0.25
    assert float(zscore([float("nan"), 1.0, 2.0])[0]) == float(zscore([float("nan"), 1.0, 2.0])[1])


def test_update_matches_a_hand_computation():
    c = centre()
    members = member_plan(run_seed=1, generation=0, population=4, antithetic=False)
    rewards = [0.0, 1.0, 0.5, 0.2]
    alpha = 0.1
    new, metrics = update(ESState(c), members, rewards, learning_rate=alpha)
    r = torch.tensor(rewards, dtype=torch.float64)
    z = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    for key in c:
        by_hand = c[key].double() + alpha / 4 * sum(float(z[i]) * member_noise(c, m.seed)[key].double() for i, m in enumerate(members))
        torch.testing.assert_close(new.centre[key].double(), by_hand, rtol=1e-5, atol=1e-7)
    assert new.generation == 1 and metrics["reward_max"] == 1.0
    assert metrics["update_norm"] > 0


def test_all_equal_rewards_leave_theta_unchanged_without_nan():
    c = centre()
    for shaping in ("zscore", "centered_rank"):
        new, metrics = update(ESState(c), member_plan(0, 0, 4), [0.3] * 4, 0.5, shaping=shaping)
        for key in c:
            assert torch.equal(new.centre[key], c[key])
        assert metrics["update_norm"] == 0.0 and not math.isnan(metrics["reward_std"])


def test_antithetic_pairs_with_equal_rewards_cancel():
    c = centre()
    plan = member_plan(0, 0, 4, antithetic=True)
    # pair 0 scores (1, 1), pair 1 scores (0, 0): +eps and -eps cancel inside each pair
    population = drawn(c, plan)
    new, metrics = LORA_SPACE.tell(ESState(c), population, zscore([1.0, 1.0, 0.0, 0.0]), SGD(1.0))
    assert all(torch.equal(new.centre[k], c[k]) for k in c) and metrics["grad_norm"] == 0.0
    # an unequal pair moves along its own noise only (B starts at zero: its step is the gradient itself)
    new, _ = LORA_SPACE.tell(ESState(c), population, torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64), SGD(1.0))
    torch.testing.assert_close(new.centre[B], 2 / 4 * member_noise(c, plan[0].seed)[B])


def test_update_is_deterministic_and_noise_is_never_stored():
    c = centre()
    plan = member_plan(3, 4, 6)
    rewards = [0.1, 0.4, 0.0, 1.1, 0.6, 0.2]
    a, _ = update(ESState(c), plan, rewards, 0.01)
    b, _ = update(ESState(c), plan, rewards, 0.01)
    assert tensors_sha256(a.centre) == tensors_sha256(b.centre)
    assert set(vars(a)) == {"centre", "generation", "adam_m", "adam_v", "adam_step"}


@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ask_tell_climbs_a_simple_objective(shaping, optimizer):
    """A few generations on reward = -|theta - goal|^2 must move theta towards the goal."""
    goal = {k: torch.full_like(v, 0.5) for k, v in centre().items()}
    state = ESState(centre())

    def distance(s):
        return sum(float(((s.centre[k] - goal[k]) ** 2).sum()) for k in goal)

    start = distance(state)
    for g in range(30):
        plan = member_plan(0, g, 16)
        rewards = [-distance(ESState(perturb_centre(state.centre, m, 0.05))) for m in plan]
        state, _ = update(state, plan, rewards, 0.05 if shaping == "zscore" else 0.15, shaping=shaping, optimizer=optimizer)
    assert distance(state) < 0.7 * start


def test_adam_state_round_trips_through_tensors():
    c = centre()
    state, _ = update(ESState(c), member_plan(0, 0, 4), [0.0, 1.0, 0.2, 0.3], 0.01, optimizer="adam")
    back = state_from_tensors(state.centre, state.generation, optimizer_tensors(state))
    assert back.adam_step == 1 and tensors_sha256(back.adam_m) == tensors_sha256(state.adam_m)
    assert optimizer_tensors(ESState(c)) == {}


def test_a_population_drawn_ahead_gives_the_same_members_and_update(tmp_path):
    """The flow draws each generation's noise ahead, in another thread (flows/pipeline.py): that
    must not change a run by a bit (members, update, centre hash); noise drawn for another plan,
    or members of another centre or plan, are refused."""
    from concurrent.futures import ThreadPoolExecutor

    from artifacts.checkpoints import put_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.lora import spec_from_tensors
    from tasks.members import GenerationMembers

    c = {A: torch.randn(2, 8, generator=torch.Generator().manual_seed(3)), B: torch.randn(6, 2, generator=torch.Generator().manual_seed(4))}
    sha = put_checkpoint(ArtifactStore(tmp_path), ESState(c), spec_from_tensors(c, 2.0)).sha256
    rule = UpdateRule(SGD(0.1))
    rewards = [0.1, 0.5, 0.2, 0.9, 0.0, 0.3]
    with ThreadPoolExecutor(1) as ahead:
        for g, perturb in [(0, "both"), (1, "B")]:
            plan = ask(7, g, 6, 0.05, perturb)
            population = ahead.submit(LORA_SPACE.draw, plan, LORA_SPACE.noise_layout(c, perturb)).result()
            fresh, pooled = GenerationMembers(str(tmp_path), sha, plan), GenerationMembers(str(tmp_path), sha, plan, population)
            assert all(torch.equal(fresh.stacked().tensors[k], pooled.stacked().tensors[k]) for k in c)
            plain, m1 = es_update(fresh.state, fresh.population, rewards, rule, LORA_SPACE)
            ahead_drawn, m2 = es_update(pooled.state, pooled.population, rewards, rule, LORA_SPACE)
            assert tensors_sha256(plain.centre) == tensors_sha256(ahead_drawn.centre)
            assert m1["update_norm"] == m2["update_norm"]
    first = LORA_SPACE.draw(ask(7, 0, 6, 0.05), LORA_SPACE.noise_layout(c))
    with pytest.raises(ValueError, match="generation 0's, not generation 5's"):
        GenerationMembers(str(tmp_path), sha, ask(7, 5, 6, 0.05), first)
    with pytest.raises(ValueError, match="not generation 5's of centre"):
        GenerationMembers(str(tmp_path), sha, ask(7, 0, 6, 0.05)).check(sha, ask(7, 5, 6, 0.05))
    with pytest.raises(ValueError, match="another LoRA layout"):
        LORA_SPACE.members({A: c[A]}, first)


def test_a_generations_members_are_built_once_for_every_task(tmp_path, monkeypatch):
    """The evaluation (stacked), the member files and the update share one build of each form: the
    search space builds the stack once however often and in whatever order the tasks ask, and the
    files are the bytes a task writes without the shared members (a replay)."""
    from artifacts.checkpoints import put_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.lora import spec_from_tensors
    from tasks.members import GenerationMembers
    from tasks.population import write_members

    c = centre()
    sha = put_checkpoint(ArtifactStore(tmp_path), ESState(c), spec_from_tensors(c, 2.0)).sha256
    plan = ask(3, 1, 4, 0.05)
    builds = []
    build = LORA_SPACE.members
    monkeypatch.setattr(type(LORA_SPACE), "members", lambda self, *a: builds.append(1) or build(*a))  # a frozen value: patch its class
    members = GenerationMembers(str(tmp_path), sha, plan)
    assert members.stacked() is members.stacked()
    shared = write_members.fn(str(tmp_path), sha, plan, members=members)
    assert [str(r.path) for r in members.adapters()] == [p for _, p in shared] and len(builds) == 1
    assert write_members.fn(str(tmp_path), sha, plan) == shared and len(builds) == 2  # alone: its own build, the same files


# --- the noise is the same bytes on every machine ------------------------------------------------

_DRAW = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from es_core.es import draw_population_noise, member_plan
from es_core.lora import LoRATarget, init_centre
h = hashlib.sha256()
layout = (("a.lora_A.weight", 100_000), ("b.lora_B.weight", 100_003))
for member in member_plan(11, 4, 4):
    h.update(draw_population_noise(layout, [member]).eps.numpy().tobytes())
targets = [LoRATarget("model.layers.0.mlp.up_proj", 0, "up_proj", 4096, 64)]
for init_std in (None, 0.02):
    for value in init_centre(targets, 2, 5, init_std).values():
        h.update(value.numpy().tobytes())
torch_randn = torch.randn(100_003, generator=torch.Generator().manual_seed(12345)).numpy().tobytes()
print(json.dumps({"ours": h.hexdigest(), "torch": hashlib.sha256(torch_randn).hexdigest(),
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _numpy_dispatch_targets() -> str:
    """numpy's SIMD targets found on this CPU beyond its baseline (NPY_DISABLE_CPU_FEATURES takes these names)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    return " ".join(f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f))


def test_noise_and_initial_centre_are_the_same_bytes_whatever_the_cpus_vector_unit():
    """Member noise and the initial centre (both drawn as seeding.NOISE_SCHEME) under torch's default
    and avx2 kernels, with numpy's SIMD dispatch off, and with glibc's FMA/AVX2 libm variants off:
    identical bytes. torch's own randn, drawn alongside, shows the settings took effect."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    variants = {
        "torch default": {"ATEN_CPU_CAPABILITY": "default"},
        "torch avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
        "numpy baseline": {"NPY_DISABLE_CPU_FEATURES": _numpy_dispatch_targets()},
        "glibc without FMA/AVX2": {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX,-AVX512F"},
    }
    out = {}
    for name, env in variants.items():
        run = subprocess.run([sys.executable, "-c", _DRAW, root], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print({name: (o["capability"], o["ours"][:12], o["torch"][:12]) for name, o in out.items()})
    assert len({o["ours"] for o in out.values()}) == 1, out
    if out["torch avx2"]["capability"] == "AVX2":  # the CPU has AVX2: torch's randn really differs there
        assert out["torch default"]["torch"] != out["torch avx2"]["torch"]


def test_a_numpy_that_draws_other_normals_is_refused_in_one_line(monkeypatch):
    from es_core import seeding

    seeding.check_noise_scheme()  # this machine draws the scheme's known answer
    monkeypatch.setattr(seeding, "_checked", False)
    monkeypatch.setattr(seeding, "_CHECK_SHA256", "0" * 64)
    with pytest.raises(seeding.NoiseSchemeError, match=f"noise scheme {seeding.NOISE_SCHEME}") as err:
        member_noise(centre(), 1)
    assert "\n" not in str(err.value)
