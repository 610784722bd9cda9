"""Weights-space ES (es_core/weights_space.py): members are W + sigma * s_W * sign * b a / sqrt(r), the
update the paper's in the same units, the centre its exact top-R factorisation; the engine's shared
centre slot decodes what a rank R + r adapter does."""

import json
import math
from dataclasses import replace
from pathlib import Path

from artifacts.ledger import Ledger

import pytest
import torch

from es_core.es import ask, draw_population_noise
from es_core.lora import LoRATarget, StackedLoRA
from es_core.weights_space import member_adapter, member_factors, split_member_adapter, tell, truncate, weights_layout

TARGETS = [
    LoRATarget("model.layers.0.self_attn.q_proj", 0, "q_proj", 12, 12),
    LoRATarget("model.layers.0.mlp.down_proj", 0, "down_proj", 20, 12),
    LoRATarget("model.layers.1.mlp.gate_proj", 1, "gate_proj", 12, 20),
]


def dense(factors, target):
    """B @ A of one target (float64)."""
    return factors[target.key_b].double() @ factors[target.key_a].double()


def generation(layout, population=8, g=0, sigma=0.1):
    plan = ask(7, g, population, sigma)
    return plan, draw_population_noise(layout.noise, plan.members)


def test_each_member_is_the_centre_plus_its_own_signed_rank_r_product():
    layout = weights_layout(TARGETS, noise_rank=2, centre_rank=4, scales=[0.5, 1.0, 2.0])
    plan, noise = generation(layout, sigma=0.1)
    own = member_factors(layout, noise, plan.members, plan.sigma)
    assert isinstance(own, StackedLoRA) and len(own) == 8
    m0, m1 = own.member(0), own.member(1)  # antithetic partners
    for t, s_w in zip(layout.targets, layout.scales):
        e = dense(m0, t) / (0.1 * s_w)
        # b a / sqrt(r) with standard normal entries: unit variance per entry, whatever r
        assert 0.3 < float(e.pow(2).mean()) < 3.0
        assert torch.allclose(dense(m1, t), -dense(m0, t))
    centre = {k: torch.randn(v.shape, dtype=torch.float32) for k, v in layout.template(4).items()}
    adapter = member_adapter(centre, m0)
    t = layout.targets[0]
    assert adapter[t.key_a].shape == (6, t.in_features)
    assert torch.allclose(dense(adapter, t), dense(centre, t) + dense(m0, t), atol=1e-5)
    back_centre, back_own = split_member_adapter(adapter, 4)
    assert all(torch.equal(back_centre[k], centre[k]) and torch.equal(back_own[k], m0[k]) for k in centre)


def test_the_update_is_the_papers_sum_and_full_rank_centres_keep_all_of_it():
    layout = weights_layout(TARGETS, noise_rank=1, centre_rank=12, scales=[0.5, 1.0, 2.0])
    plan, noise = generation(layout)
    weights = torch.linspace(-1.5, 1.5, 8).tolist()
    own = member_factors(layout, noise, plan.members, sigma=1.0)  # sigma 1: B a is s_W * sign * E
    result = tell(layout.template(12), layout, noise, plan.members, weights, learning_rate=0.01)
    for t, s_w in zip(layout.targets, layout.scales):
        want = sum(0.01 / 8 * w * dense(own.member(i), t) for i, w in enumerate(weights))  # own carries s_W and sign
        assert torch.allclose(dense(result.centre, t), want, atol=1e-6), t.path
    assert result.truncation_kept == pytest.approx(1.0, abs=1e-6)
    total = math.sqrt(sum(float(sum(0.01 / 8 * w * dense(own.member(i), t) for i, w in enumerate(weights)).pow(2).sum()) for t in layout.targets))
    assert result.update_norm == pytest.approx(total, rel=1e-6)


def test_a_small_centre_rank_keeps_the_top_directions_and_says_what_it_dropped():
    layout = weights_layout(TARGETS, noise_rank=1, centre_rank=2)
    plan, noise = generation(layout, population=16)
    weights = torch.linspace(-1, 1, 16).tolist()
    result = tell(layout.template(2), layout, noise, plan.members, weights, learning_rate=1.0)
    full = tell(weights_layout(TARGETS, 1, 16).template(16), weights_layout(TARGETS, 1, 16), noise, plan.members, weights, 1.0)
    error_sq = 0.0
    for t in layout.targets:
        d = dense(full.centre, t)
        best = torch.linalg.svdvals(d)
        # Eckart-Young: the kept part is the best rank-2 approximation
        error = float((d - dense(result.centre, t)).pow(2).sum())
        assert error == pytest.approx(float(best[2:].pow(2).sum()), rel=1e-4)
        error_sq += error
        a = result.centre[t.key_a].double()
        assert torch.allclose(a @ a.T, torch.eye(2, dtype=torch.float64), atol=1e-5)  # orthonormal rows
        assert bool((a.gather(1, a.abs().argmax(1, keepdim=True)) > 0).all())  # signs fixed
    assert result.truncation_error == pytest.approx(math.sqrt(error_sq), rel=1e-3)
    assert 0 < result.truncation_kept < 1


def test_a_centre_rank_covering_a_target_accumulates_its_change_exactly_in_float32():
    # k_proj's min(out, in) is 4: at R 4 it keeps every update whole, the 12 x 12+ targets are truncated
    k_proj = LoRATarget("model.layers.1.self_attn.k_proj", 1, "k_proj", 12, 4)
    layout = weights_layout(TARGETS + [k_proj], noise_rank=1, centre_rank=4, scales=[0.5, 1.0, 2.0, 3.0])
    wide = weights_layout(TARGETS + [k_proj], noise_rank=1, centre_rank=12, scales=[0.5, 1.0, 2.0, 3.0])
    centre, centre_wide = layout.template(4), wide.template(12)
    sums = {t.key_a: torch.zeros(t.out_features, t.in_features, dtype=torch.float64) for t in wide.targets}
    for g in range(3):
        plan, noise = generation(layout, population=8, g=g)
        weights = torch.linspace(-1, 1, 8).roll(g).tolist()
        own = member_factors(layout, noise, plan.members, sigma=1.0)
        for t in wide.targets:
            sums[t.key_a] += sum(0.01 / 8 * w * dense(own.member(i), t) for i, w in enumerate(weights))
        result = tell(centre, layout, noise, plan.members, weights, 0.01)
        result_wide = tell(centre_wide, wide, noise, plan.members, weights, 0.01)
        centre, centre_wide = result.centre, result_wide.centre
        assert result_wide.truncation_kept == 1.0 and (g == 0 or 0 < result.truncation_kept < 1)  # 4 seeds fit rank 4 once
    for t in wide.targets:  # the accumulated change, to float32's precision, whatever the step
        assert torch.allclose(dense(centre_wide, t), sums[t.key_a], rtol=1e-5, atol=1e-9), t.path
    assert torch.allclose(dense(centre, k_proj), sums[k_proj.key_a], rtol=1e-5, atol=1e-9)
    # stored as the change beside an identity: the wider side carries it, bit for bit in float32
    assert torch.equal(centre_wide[k_proj.key_b][:, :4], torch.eye(4))
    assert torch.equal(centre_wide[k_proj.key_a][:4], sums[k_proj.key_a].float()) or torch.allclose(
        centre_wide[k_proj.key_a][:4].double(), sums[k_proj.key_a], rtol=1e-6)
    q = TARGETS[0]
    assert torch.equal(centre_wide[q.key_a][:12], torch.eye(12)) and not centre_wide[q.key_a][12:].any()


def test_the_refactorisation_is_reproducible_and_continues_from_the_last_centre():
    layout = weights_layout(TARGETS, noise_rank=1, centre_rank=3)
    centre = layout.template(3)
    for g in range(3):
        plan, noise = generation(layout, population=6, g=g)
        weights = [1.0, -1.0, 0.5, 0.2, -0.3, 0.0]
        a = tell(centre, layout, noise, plan.members, weights, 0.1)
        b = tell(centre, layout, noise, plan.members, weights, 0.1)
        assert all(torch.equal(a.centre[k], b.centre[k]) for k in a.centre)
        centre = a.centre
    assert any(float(v.abs().sum()) > 0 for v in centre.values())


def test_equal_weights_move_nothing_and_an_empty_core_stays_zero():
    layout = weights_layout(TARGETS, noise_rank=1, centre_rank=4)
    plan, noise = generation(layout)
    result = tell(layout.template(4), layout, noise, plan.members, [0.0] * 8, 0.1)
    assert all(float(v.abs().sum()) == 0 for v in result.centre.values())
    assert result.update_norm == 0 and result.truncation_kept == 1.0
    b, a, dropped = truncate(torch.zeros(5, 0, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64), 2)
    assert b.shape == (5, 2) and a.shape == (2, 3) and float(dropped) == 0.0


# --- the centre as it is stored: exact targets without their padding ------------------------------


def test_an_exact_centre_is_stored_as_its_change_and_loads_back_bit_for_bit(tmp_path):
    """Where R covers a target, its centre is the change beside an identity, zero-padded to R: the
    checkpoint keeps the change alone (k_proj here; at R 12 every target) and gives back the same
    tensors, and the PEFT folder a backend loads is built from it, as the checkpoint was before."""
    from artifacts import checkpoints
    from artifacts.checkpoints import adapter_folder, checkpoint_files, load_checkpoint, put_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.es import ESState
    from es_core.lora import adapter_files, load_adapter, spec_from_tensors
    from safetensors.torch import load_file

    k_proj = LoRATarget("model.layers.1.self_attn.k_proj", 1, "k_proj", 12, 4)
    store, scratch = ArtifactStore(tmp_path / "artifacts"), ArtifactStore(tmp_path / "scratch")
    for rank, exact_keys in ((4, [k_proj.path]), (12, sorted(t.path for t in TARGETS + [k_proj]))):
        layout = weights_layout(TARGETS + [k_proj], noise_rank=1, centre_rank=rank)
        centre = layout.template(rank)
        for g in range(2):
            plan, noise = generation(layout, population=8, g=g)
            centre = tell(centre, layout, noise, plan.members, torch.linspace(-1, 1, 8).tolist(), 0.1).centre
        state, spec = ESState(centre, 2), spec_from_tensors(centre, float(rank))
        files = checkpoint_files(state, spec)
        before = checkpoint_files(state, spec, compact=False)  # the PEFT folder every checkpoint was
        assert sorted(files) == ["adapter_config.json", "es_centre.safetensors", "es_state.json"] and "adapter_model.safetensors" in before
        assert sum(map(len, files.values())) < sum(map(len, before.values()))
        ref = put_checkpoint(store, state, spec)
        checkpoints._RECENT.clear()  # read back from the files, not this process's memory
        loaded, loaded_spec = load_checkpoint(store, ref.sha256)
        assert loaded_spec == spec and loaded.generation == 2 and loaded.centre.keys() == centre.keys()
        assert all(torch.equal(loaded.centre[k].view(torch.int32), centre[k].view(torch.int32)) for k in centre), rank  # the bits
        stored = load_file(str(ref.path / "es_centre.safetensors"))
        assert sorted(k.removeprefix("base_model.model.").removesuffix(".change") for k in stored if k.endswith(".change")) == exact_keys
        served = adapter_folder(store, ref.sha256, scratch)
        assert {p.name: p.read_bytes() for p in served.iterdir()} == adapter_files(centre, spec)
        assert all(torch.equal(load_adapter(served)[0][k], centre[k]) for k in centre)
    zero = weights_layout(TARGETS, 1, 12).template(12)  # generation 0 (A = 0, not an identity) and LoRA centres: as before
    assert checkpoint_files(ESState(zero), spec_from_tensors(zero, 12.0)) == checkpoint_files(ESState(zero), spec_from_tensors(zero, 12.0), compact=False)


def test_a_stored_centre_that_does_not_fit_its_rank_is_one_line_naming_its_file(tmp_path):
    from artifacts.checkpoints import CENTRE_FILE, load_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.lora import AdapterError, AdapterSpec, adapter_config_bytes, safetensors_bytes

    store = ArtifactStore(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.k_proj.change"
    change = safetensors_bytes({key: torch.ones(4, 12)})  # min(out, in) 4: a centre of rank 3 cannot hold it exactly
    ref = store.put_files({"adapter_config.json": adapter_config_bytes(AdapterSpec(3, 3.0, ("k_proj",), (1,))), CENTRE_FILE: change})
    with pytest.raises(AdapterError) as caught:
        load_checkpoint(store, ref.sha256)
    assert str(caught.value) == f"{ref.path / CENTRE_FILE}: {key}: a change of shape (4, 12) (torch.float32) is not an exact target of a rank-3 centre"
    ref = store.put_files({CENTRE_FILE: change})
    with pytest.raises(AdapterError, match="^adapter file missing: .*adapter_config.json$"):
        load_checkpoint(store, ref.sha256)


# --- a member's record: a few hundred bytes, the member drawn again from it ------------------------


def stored_generation(tmp_path, scales=None, population=4):
    """A weights-space centre checkpoint (rank 4, random) in a store, and generation 1's members of it."""
    from artifacts.checkpoints import put_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.es import ESState
    from es_core.lora import spec_from_tensors
    from es_core.weights_space import WeightsSpace
    from tasks.members import GenerationMembers

    space = WeightsSpace(1, 4, () if scales is None else tuple(zip((t.key_a for t in TARGETS), scales)))
    g = torch.Generator().manual_seed(2)
    centre = {k: torch.randn(v.shape, generator=g) for k, v in weights_layout(TARGETS, 1, 4).template(4).items()}
    store = ArtifactStore(tmp_path / "artifacts")
    sha = put_checkpoint(store, ESState(centre, 1), spec_from_tensors(centre, 4.0)).sha256
    return store, GenerationMembers(str(store.root), sha, ask(7, 1, population, 0.05, space=space))


@pytest.mark.parametrize("scales", [None, [0.5, 1.0, 2.0]], ids=["absolute", "weight_rms"])
def test_a_members_record_is_a_few_hundred_bytes_and_serves_the_member_its_factor_files_did(tmp_path, scales):
    """The artifact the ledger names for a weights-space member holds no tensors: its centre's id,
    seed, sign, sigma, r and the sigma scales. Served, it is bit for bit the member its generation
    decoded, and the member its factor files (how members were stored before) serve."""
    from artifacts.store import ArtifactStore
    from es_core.lora import load_adapter
    from es_core.weights_space import MemberRecord, factor_record_files
    from artifacts.checkpoints import served_adapter

    store, members = stored_generation(tmp_path, scales)
    stacked, decoded = members.stacked(), []
    scratch = ArtifactStore(tmp_path / "scratch")
    for i, ref in enumerate(members.adapter_files()):
        files = sorted(p.name for p in ref.path.iterdir())
        record = MemberRecord.from_bytes((ref.path / "es_member.json").read_bytes(), "record")
        assert files == ["es_member.json"] and store.size(ref.sha256) < (600 if scales is None else 900)
        assert (record.centre_sha256, record.seed, record.sign, record.sigma) == (members.center_sha256, members.plan.members[i].seed, members.plan.members[i].sign, 0.05)
        old = store.put_files(factor_record_files(stacked.member(i), members.spec, 1, members.center_sha256))
        assert members.factor_record_sha256s()[i] == old.sha256
        joined, spec = members.space.adapter(members.state.centre, members.spec, stacked, i)  # what the run served
        for sha in (ref.sha256, old.sha256):
            served, served_spec = load_adapter(scratch.get(served_adapter(store, sha, scratch)))
            assert served_spec == spec and served.keys() == joined.keys() and all(torch.equal(served[k], joined[k]) for k in joined)
        decoded.append(served)
    assert not torch.equal(decoded[0][TARGETS[0].key_b], decoded[1][TARGETS[0].key_b])  # partners differ: the sign is kept


def test_a_member_record_that_cannot_be_served_is_one_line_naming_it(tmp_path):
    from artifacts.store import ArtifactError, ArtifactStore
    from es_core.weights_space import MemberRecord
    from artifacts.checkpoints import served_adapter

    store, members = stored_generation(tmp_path)
    scratch = ArtifactStore(tmp_path / "scratch")
    record = MemberRecord.from_bytes((members.adapter_files()[0].path / "es_member.json").read_bytes(), "record")
    cases = {
        "missing centre": (replace(record, centre_sha256="ab" * 32).to_bytes(), f"the member's centre {'ab' * 32} is not in {store.root}"),
        "other noise scheme": (replace(record, noise_scheme="torch-randn").to_bytes(), "draws its noise by torch-randn"),
        "scales of other targets": (replace(record, sigma_scales=(1.0, 2.0)).to_bytes(), "has 2 sigma scales, its centre 3 targets"),
        "no seed": (b'{"centre_sha256": "%s", "space": "weights"}' % record.centre_sha256.encode(), "a weights-space member record needs 'seed'"),
        "not JSON": (b"{", "not valid JSON"),
    }
    for what, (data, message) in cases.items():
        ref = store.put_files({"es_member.json": data})
        with pytest.raises(ArtifactError) as caught:
            served_adapter(store, ref.sha256, scratch)
        error = str(caught.value)
        assert "\n" not in error and error.startswith(f"{ref.path / 'es_member.json'}: ") and message in error, (what, error)


def test_sglang_decodes_weights_space_members_from_a_scratch_store_deleted_after_the_evaluation(tmp_path):
    """A backend that loads files (SGLang) gets each weights-space member as its centre joined to its
    own factors, one adapter of rank R + r (~700 MB at R 576 on every layer of SmolLM2): written for
    the generation's evaluation into a scratch store under the store's tmp dir, never into the store,
    and deleted once the evaluation ends, decoded or failed (a server that keeps answering 500).
    What was decoded is the member its record serves; outside an evaluation they are not written."""
    from pathlib import Path

    from artifacts.checkpoints import served_adapter
    from artifacts.store import ArtifactStore
    from es_core.backends.base import BackendError
    from es_core.backends.sglang import SGLangBackend
    from es_core.backends.sglang_client import SGLangClient
    from es_core.countdown.problems import generate_problems
    from tasks.evaluate import evaluate_population
    from tests.fake_sglang import FakeSGLang, adapter_digest, fake_completion

    store, members = stored_generation(tmp_path)
    records = members.adapter_files()  # what write_members stores beside the decode: the ledger's
    stored = {sha for sha, _ in store.iter_artifacts()}
    problems = generate_problems(2, seed=1)
    prompts = [f"Using the numbers {p.numbers}, create an equation that equals {p.target}." for p in problems]

    def evaluate(backend):
        return evaluate_population.fn(backend, str(store.root), members.center_sha256, members.plan, problems, prompts, 16, "paper", "fake",
                                      members=members)

    with FakeSGLang(max_lora_rank=5) as fake, SGLangBackend([SGLangClient(fake.url, retries=1, backoff_s=0.01, max_backoff_s=0.05)]) as sglang:
        scores = evaluate(sglang)["scores"]
        decoded = dict(fake.state.ever)  # name -> the folder the server loaded
        fake.fault("/generate", "status", status=500, times=1000)
        with pytest.raises(BackendError):
            evaluate(sglang)
        failed = dict(fake.state.ever)
    scratch = ArtifactStore(tmp_path / "replay")  # the member as replay serves it from its record
    for record, score, (name, folder) in zip(records, scores, sorted(decoded.items())):
        digest, rank = adapter_digest(scratch.get(served_adapter(store, record.sha256, scratch)))
        assert rank == 5 and [s.completion for s in score.samples] == [fake_completion(digest, p, 16)[0] for p in prompts], name
    for loaded in (decoded, failed):
        assert len(loaded) == len(members) and all(Path(folder).parent.parent.parent == store.tmp for folder in loaded.values())
        assert not any(Path(folder).exists() for folder in loaded.values())  # deleted with their scratch
    assert set(decoded.values()).isdisjoint(failed.values())  # the failed evaluation joined its own
    assert {sha for sha, _ in store.iter_artifacts()} == stored and list(store.tmp.iterdir()) == []
    with pytest.raises(RuntimeError, match="only inside GenerationMembers.serving"):
        members.adapters()
    with members.serving(), pytest.raises(RuntimeError, match="served already"):  # one owner deletes the scratch
        with members.serving():
            pass


# --- the engine: the centre in one shared slot ------------------------------------------------


def test_the_engines_shared_centre_decodes_what_rank_r_plus_R_adapters_decode(model_cache):
    from tests.test_engine import ALL_MODULES, build_engine
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    shared, targets, ids, _ = build_engine(path, [0, 1], ALL_MODULES, 1, centre_rank=4)
    layout = weights_layout(targets, noise_rank=1, centre_rank=4)
    plan, noise = generation(layout, population=4, sigma=0.5)
    own = member_factors(layout, noise, plan.members, plan.sigma)
    g = torch.Generator().manual_seed(0)
    centre = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in layout.template(4).items()}
    got = shared.generate(ids, own, 6, centre=centre).tokens
    concatenated, *_ = build_engine(path, [0, 1], ALL_MODULES, 5)
    want = concatenated.generate(ids, [member_adapter(centre, own.member(i)) for i in range(4)], 6).tokens
    assert got == want
    without = shared.generate(ids, own, 6).tokens  # the same slots, no centre: another model
    assert without != got
    with pytest.raises(ValueError, match="no centre slot"):
        concatenated.generate(ids, own, 2, centre=centre)


def test_the_embedded_backend_decodes_stored_centres_and_members_as_the_population_path_does(model_cache, tmp_path):
    from es_core.backends.base import AdapterRef
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.lora import AdapterError, save_adapter, spec_from_tensors
    from es_core.weights_space import spec_of_rank
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings, settings_from_dict

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    settings = settings_from_dict({"model": {"name": "tiny-llama", "device": "cpu"}, "lora": {"layers": [0, 2]},
                                   "es": {"space": "weights", "centre_rank": 3, "population": 4}})
    backend = EmbeddedBackend.from_settings(settings, path)
    layout = weights_layout(backend.engine.targets, 1, 3)
    plan, noise = generation(layout, population=4, sigma=0.5)
    own = member_factors(layout, noise, plan.members, plan.sigma)
    g = torch.Generator().manual_seed(1)
    centre = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in layout.template(3).items()}
    prompts = ["Hello", "Using the numbers [3 5 7], make 22."]
    want = backend.generate_tensors(own, prompts, 5, centre=centre)
    centre_spec = spec_from_tensors(centre, 3.0)
    folders = [save_adapter(member_adapter(centre, own.member(i)), tmp_path / f"m{i}", spec_of_rank(centre_spec, 4)) for i in range(4)]
    centre_folder = save_adapter(centre, tmp_path / "centre", centre_spec)
    got = backend.generate([AdapterRef(f"m{i}", f) for i, f in enumerate(folders)] + [AdapterRef("centre", centre_folder), AdapterRef("base", None)],
                           prompts, 5)
    assert [[c.text for c in row] for row in got[:4]] == [[c.text for c in row] for row in want]
    assert [c.text for c in got[4]] == [c.text for c in backend.generate_tensors([None], prompts, 5, centre=centre)[0]]
    assert [c.text for c in got[5]] == [c.text for c in backend.generate_tensors([None], prompts, 5)[0]]
    wrong = save_adapter({k: torch.cat([v, v]) if "lora_A" in k else torch.cat([v, v], 1) for k, v in centre.items()}, tmp_path / "r6",
                         spec_of_rank(centre_spec, 6))
    with pytest.raises(AdapterError, match="rank 6 fits neither"):
        backend.generate([AdapterRef("r6", wrong)], prompts, 2)


# --- a held-out evaluation of an exact centre: its tensors to the embedded engine, no folder ------

EXACT_RANK = 64  # tiny-llama's hidden size: every target's min(out, in) is at most 64, so every target is exact


def stored_exact_centre(store, targets):
    """Generation 1's centre of a weights-space run at R 64 on tiny-llama (every target exact, every
    target moved by one update), stored as the run stores it: es_centre.safetensors."""
    from artifacts.checkpoints import CENTRE_FILE, put_checkpoint
    from es_core.es import ESState
    from es_core.lora import spec_from_tensors

    layout = weights_layout(targets, 1, EXACT_RANK)
    plan, noise = generation(layout, population=8, sigma=0.5)
    centre = tell(layout.template(EXACT_RANK), layout, noise, plan.members, torch.linspace(-1, 1, 8).tolist(), 0.5).centre
    spec = spec_from_tensors(centre, float(EXACT_RANK))
    ref = put_checkpoint(store, ESState(centre, 1), spec)
    assert sorted(p.name for p in ref.path.iterdir()) == ["adapter_config.json", CENTRE_FILE, "es_state.json"]
    return ref.sha256, centre, spec


def heldout_problems():
    from es_core.countdown.problems import generate_problems

    problems = generate_problems(3, seed=4)
    return problems, [f"Using the numbers {p.numbers}, create an equation that equals {p.target}." for p in problems]


def test_an_exact_centre_is_evaluated_on_the_embedded_engine_from_memory_as_its_peft_folder_was(model_cache, tmp_path, monkeypatch):
    """A held-out evaluation of a centre stored without its padding (es_centre.safetensors) hands the
    embedded engine the centre's tensors: no PEFT folder is written (703 MB at SmolLM2, R 576, every
    layer; here what the tiny model's would be), and the completions and rewards, so the samples
    artifact, are those of the folder it decoded before."""
    from artifacts.checkpoints import adapter_folder
    from artifacts.store import ArtifactStore
    from es_core.backends.base import AdapterRef, InMemoryAdapter
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.evaluation import score_population
    from es_core.lora import adapter_files
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings, settings_from_dict
    from tasks.evaluate import evaluate_heldout

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    settings = settings_from_dict({"model": {"name": "tiny-llama", "device": "cpu"}, "lora": {"layers": [0, 1]},
                                   "es": {"space": "weights", "centre_rank": EXACT_RANK, "population": 4}})
    backend = EmbeddedBackend.from_settings(settings, path)
    store = ArtifactStore(tmp_path / "artifacts")
    sha, centre, spec = stored_exact_centre(store, backend.engine.targets)
    problems, prompts = heldout_problems()

    taken, written = [], []  # what the engine was given; what was under the store's tmp dir while it decoded
    generate = backend.generate

    def watched(adapters, *args, **kwargs):
        taken.extend(adapters)
        written.extend(p for p in store.tmp.rglob("*") if p.is_file()) if store.tmp.exists() else None
        return generate(adapters, *args, **kwargs)

    monkeypatch.setattr(backend, "generate", watched)
    summary = evaluate_heldout.fn(backend, str(store.root), ("centre_g1", sha), "heldout", problems, prompts, 24, "paper", "embedded")
    assert [type(a) for a in taken] == [InMemoryAdapter] and written == [] and taken[0]._path is None  # never written
    assert list(store.tmp.iterdir()) == []
    monkeypatch.undo()

    folder = adapter_folder(store, sha, ArtifactStore(tmp_path / "scratch"))  # the PEFT folder it was evaluated from before
    (before,) = score_population(problems, prompts, backend.generate([AdapterRef("centre_g1", folder)], prompts, 24), "paper")
    lines = "".join(json.dumps(vars(s)) + "\n" for s in before.samples)
    assert store.get_file(summary["samples_sha256"]).read_text() == lines  # every completion, reward and token count
    base = backend.generate([AdapterRef("base", None)], prompts, 24)[0]
    assert [s.completion for s in before.samples] != [c.text for c in base]  # the centre decodes another model than the base
    not_written = sum(p.stat().st_size for p in folder.iterdir())
    assert not_written == sum(map(len, adapter_files(centre, spec).values()))
    print(f"an exact centre's held-out evaluation on the embedded engine no longer writes its PEFT folder: {not_written:,} bytes "
          f"(tiny-llama, R {EXACT_RANK}, {len(backend.engine.targets)} targets)")


def test_sglang_still_loads_an_exact_centre_from_its_peft_folder_in_a_scratch_store_deleted_after_it(model_cache, tmp_path):
    """The same held-out evaluation on a backend that loads files: the server gets the centre's PEFT
    folder, built in a scratch store under the store's tmp dir and gone when the evaluation ends."""
    from artifacts.checkpoints import adapter_folder
    from artifacts.store import ArtifactStore
    from es_core.backends.sglang import SGLangBackend
    from es_core.backends.sglang_client import SGLangClient
    from es_core.lora import find_targets_in_folder
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings
    from tasks.evaluate import evaluate_heldout
    from tests.fake_sglang import FakeSGLang, adapter_digest, fake_completion

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    store = ArtifactStore(tmp_path / "artifacts")
    sha, _, _ = stored_exact_centre(store, find_targets_in_folder(path, [0, 1], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    problems, prompts = heldout_problems()
    with FakeSGLang(max_lora_rank=EXACT_RANK) as fake, SGLangBackend([SGLangClient(fake.url, retries=1, backoff_s=0.01)]) as sglang:
        summary = evaluate_heldout.fn(sglang, str(store.root), ("centre_g1", sha), "heldout", problems, prompts, 16, "paper", "fake")
        (loaded,) = fake.state.ever.values()
    assert Path(loaded).parents[2] == store.tmp and not Path(loaded).exists() and list(store.tmp.iterdir()) == []
    digest, rank = adapter_digest(adapter_folder(store, sha, ArtifactStore(tmp_path / "scratch")))
    samples = [json.loads(line) for line in store.get_file(summary["samples_sha256"]).read_text().splitlines()]
    assert rank == EXACT_RANK and [s["completion"] for s in samples] == [fake_completion(digest, p, 16)[0] for p in prompts]


# --- the flow: a weights-space run, recorded, replayed, resumed ------------------------------------

WEIGHTS_RUN = """
run_name: weights
model: {{name: tiny-llama}}
lora: {{layers: [0, 1]}}
es: {{space: weights, noise_rank: 1, centre_rank: 3, population: 4, sigma: 0.05, learning_rate: 0.05, generations: {generations}, seed: 3}}
data: {{train_size: 6, heldout_size: 4, prompts_per_generation: 3}}
prompt: {{style: raw}}
generation: {{max_new_tokens: 24, compile: false}}
backend: {{kind: sglang}}
eval: {{every: 2, base_model: false}}
"""


def test_a_weights_space_run_moves_its_centre_and_replays_and_resumes_bit_identically(tmp_path, prefect_harness, model_cache, monkeypatch,
                                                                                       smollm2_tokenizer):
    """Against the strict fake SGLang server (completions depend on each adapter's weights, so the
    rewards vary and the centre moves): every generation's centre is a rank-3 adapter, members are
    rank 3 + 1 files the server loads, the ledger records what the truncation kept, replay rebuilds
    members and centre, and a run stopped after 2 generations and resumed ends where a clean one does."""
    from artifacts.checkpoints import load_checkpoint
    from artifacts.store import ArtifactStore
    from flows.es_countdown import es_countdown
    from flows.replay import replay
    from es_core.lora import load_adapter
    from es_core.weights_space import MemberRecord, own_factors
    from tests.fake_sglang import FakeSGLang
    from artifacts.checkpoints import served_adapter
    from tests.test_pipeline import generation_hashes

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "weights.yaml"
    config.write_text(WEIGHTS_RUN.format(generations=4))
    short = tmp_path / "short.yaml"
    short.write_text(WEIGHTS_RUN.format(generations=2))
    with FakeSGLang(max_lora_rank=4, decode=smollm2_tokenizer.decode) as fake:
        monkeypatch.setenv("ES_SGLANG_URL", fake.url)
        es_countdown(config_path=str(config), run_id="w", data_dir=str(tmp_path / "clean"))
        es_countdown(config_path=str(short), run_id="w", data_dir=str(tmp_path / "resumed"))
        es_countdown(overrides=["es.generations=4"], run_id="w", data_dir=str(tmp_path / "resumed"))  # resume, extended to 4 generations
        result = replay("w", 2, str(tmp_path / "clean"), reevaluate=True)
    assert result["ok"], result["lines"]
    clean = generation_hashes(tmp_path / "clean", "w")
    assert len(clean) == 4 and generation_hashes(tmp_path / "resumed", "w") == clean
    assert len({row[2] for row in clean}) == 4  # the centre moved every generation
    ledger = Ledger(tmp_path / "clean")
    _, rows = ledger.query("SELECT truncation_kept, update_norm FROM generations WHERE run_id = 'w' ORDER BY generation")
    assert all(0 < kept <= 1 and norm > 0 for kept, norm in rows), rows
    state, spec = load_checkpoint(ArtifactStore(tmp_path / "clean" / "artifacts"), clean[-1][2])
    assert spec.rank == 3 and spec.lora_alpha == 3.0 and len(state.centre) == 2 * 2 * 7  # 2 layers x 7 projections
    # a member's file is its record: the centre it perturbs (generation 3's parent) and its seed; the
    # server got the two joined (rank 3 + 1), whose first 3 factors are that centre's
    store = ArtifactStore(tmp_path / "clean" / "artifacts")
    member = ledger.member_rows("w", 3)[0]
    folder = store.get(member["adapter_sha256"])
    record = MemberRecord.from_bytes((folder / "es_member.json").read_bytes(), str(folder))
    assert [p.name for p in folder.iterdir()] == ["es_member.json"] and record.noise_rank == 1 and record.centre_sha256 == clean[3][1]
    assert (record.seed, record.sign) == (member["seed"], member["sign"])
    parent, _ = load_checkpoint(store, clean[3][1])
    own = own_factors(record, parent.centre)
    joined, joined_spec = load_adapter(ArtifactStore(tmp_path / "scratch").get(served_adapter(store, member["adapter_sha256"], ArtifactStore(tmp_path / "scratch"))))
    assert joined_spec.rank == 4
    assert all(torch.equal(joined[k][:3] if "lora_A" in k else joined[k][:, :3], parent.centre[k]) for k in parent.centre)
    assert all(torch.equal(joined[k][3:] if "lora_A" in k else joined[k][:, 3:], own[k]) for k in own)


def stored_as_before(data_dir) -> None:
    """Rewrite a weights-space data dir as it was stored before member records and compact centres:
    every centre a PEFT folder (checkpoint_files(compact=False)), every member its own rank-r
    factors beside es_member.json naming its centre (weights_space.factor_record_files), the
    ledger naming those; what is stored now is gone."""
    import duckdb

    from artifacts.checkpoints import CENTRE_FILE, checkpoint_files, load_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.weights_space import MemberRecord, factor_record_files, own_factors

    store = ArtifactStore(data_dir / "artifacts")
    con = duckdb.connect(str(data_dir / "ledger.duckdb"))
    try:
        centres = {sha for row in con.execute("SELECT center_sha256, parent_center_sha256 FROM generations").fetchall() for sha in row}
        old_centre = {}
        for sha in sorted(centres):
            if (store.get(sha) / CENTRE_FILE).is_file():
                old_centre[sha] = store.put_files(checkpoint_files(*load_checkpoint(store, sha), compact=False)).sha256
        for run_id, generation, member, sha in con.execute("SELECT run_id, generation, member, adapter_sha256 FROM members").fetchall():
            folder = store.get(sha)
            record = MemberRecord.from_bytes((folder / "es_member.json").read_bytes(), str(folder))
            state, spec = load_checkpoint(store, record.centre_sha256)
            centre = old_centre.get(record.centre_sha256, record.centre_sha256)
            old = store.put_files(factor_record_files(own_factors(record, state.centre), spec, record.noise_rank, centre))
            con.execute("UPDATE members SET adapter_sha256 = ?, adapter_path = ? WHERE run_id = ? AND generation = ? AND member = ?",
                        [old.sha256, str(old.path), run_id, generation, member])
            store.remove(sha)
        for new, old in old_centre.items():
            con.execute("UPDATE generations SET center_sha256 = ?, center_path = ? WHERE center_sha256 = ?", [old, str(store.path(old)), new])
            con.execute("UPDATE generations SET parent_center_sha256 = ? WHERE parent_center_sha256 = ?", [old, new])
            con.execute("UPDATE evals SET adapter_sha256 = ? WHERE adapter_sha256 = ?", [old, new])
            store.remove(new)
    finally:
        con.close()


EXACT_RUN = """
run_name: exact
model: {name: tiny-llama, device: cpu}
lora: {layers: [0, 1]}
es: {space: weights, noise_rank: 1, centre_rank: 32, population: 4, sigma: 0.05, learning_rate: 0.05, generations: 2, seed: 3}
data: {train_size: 6, heldout_size: 4, prompts_per_generation: 3}
prompt: {style: raw}
generation: {max_new_tokens: 16, compile: false}
eval: {every: 1, base_model: false}
"""


def test_exact_centres_are_stored_compact_and_runs_replay_from_records_and_from_data_dirs_stored_before(tmp_path, prefect_harness, model_cache,
                                                                                                        monkeypatch):
    """At R 32 tiny-llama's k_proj and v_proj (32 x 64) are exact: each centre is stored as their
    change beside the other targets' factors, the held-out evaluation decodes the PEFT folder built
    from it, and replay rebuilds members (records) and centres. A copy stored as before (centres
    as PEFT folders, members as their own factors) verifies, keeps its artifacts through gc, and
    replays, members decoded again, in that form."""
    import shutil

    from artifacts.checkpoints import CENTRE_FILE
    from artifacts.commands import gc, verify
    from artifacts.store import ArtifactStore
    from flows.es_countdown import es_countdown
    from flows.replay import replay

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "exact.yaml"
    config.write_text(EXACT_RUN)
    data, before = tmp_path / "data", tmp_path / "before"
    es_countdown(config_path=str(config), run_id="x", data_dir=str(data))
    store, ledger = ArtifactStore(data / "artifacts"), Ledger(data)
    _, rows = ledger.query("SELECT generation, adapter_sha256, accuracy FROM evals WHERE run_id = 'x' AND model = 'centre' ORDER BY generation")
    assert [g for g, *_ in rows] == [1, 2] and all((store.get(sha) / CENTRE_FILE).is_file() for _, sha, _ in rows)
    result = replay("x", 1, str(data), reevaluate=True)
    assert result["ok"], result["lines"]

    shutil.copytree(data, before)
    stored_as_before(before)
    result = replay("x", 1, str(before), reevaluate=True)
    assert result["ok"], result["lines"]
    old = ArtifactStore(before / "artifacts")
    member, generation = Ledger(before).member_rows("x", 1)[0], Ledger(before).generation_row("x", 1)
    assert sorted(p.name for p in old.get(member["adapter_sha256"]).iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "es_member.json"]
    assert sorted(p.name for p in old.get(generation["center_sha256"]).iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "es_state.json"]
    text, ok = verify(before)
    assert ok and text.endswith(" 0 missing, 0 corrupt\n"), text
    gc(before, yes=True, min_age_s=0)  # the PEFT folders served for evaluations, which nothing names, go; nothing named does
    assert verify(before) == (text, True)


def test_sigma_relative_to_the_weights_rms_scales_each_matrix_by_its_own(model_cache):
    """es.sigma_scale weight_rms: each target's s_W is the RMS of its base weight, read from the
    model folder, and a member's perturbation of it is s_W times the absolute one."""
    from es_core.models import load_causal_lm, resolve_base_model
    from es_core.settings import ModelSettings, settings_from_dict
    from es_core.plan import run_space

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    relative = run_space(settings_from_dict({"es": {"space": "weights", "sigma_scale": "weight_rms", "centre_rank": 2}, "lora": {"layers": [1]}}), path)
    absolute = run_space(settings_from_dict({"es": {"space": "weights", "centre_rank": 2}, "lora": {"layers": [1]}}), path)
    weights = dict(load_causal_lm(path, "float32", "cpu").named_parameters())
    scales = dict(relative.scales)
    assert len(scales) == 7 and absolute.scales == ()
    for key, s_w in scales.items():
        weight = weights[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"].detach().double()
        assert s_w == pytest.approx(float(weight.pow(2).mean().sqrt()), rel=1e-6)
    centre = relative.layout(zero_centre_of(path)).template(2)
    plan = ask(5, 0, 2, 0.1, space=relative)
    own_rel = relative.members(centre, relative.draw(plan, relative.noise_layout(centre)))
    plan_abs = ask(5, 0, 2, 0.1, space=absolute)
    own_abs = absolute.members(centre, absolute.draw(plan_abs, absolute.noise_layout(centre)))
    for key, s_w in scales.items():
        b = key.replace("lora_A", "lora_B")
        assert torch.allclose(own_rel.tensors[b], s_w * own_abs.tensors[b], rtol=1e-5)


def zero_centre_of(path):
    from es_core.lora import find_targets_in_folder
    from es_core.weights_space import zero_centre

    return zero_centre(find_targets_in_folder(path, [1], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), 2)


def test_a_run_says_which_matrices_its_es_moves(model_cache):
    """The log line at a run's start: a config that names lora.layers for LoRA space keeps them in
    weights space (the learning runs of 2026-12-07 moved 77 of SmolLM2's 210 matrices that way)."""
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings, settings_from_dict
    from tasks.population import search_description

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    given = search_description(settings_from_dict({"es": {"space": "weights", "centre_rank": 8}, "lora": {"layers": [0, 1]}}), path)
    every = search_description(settings_from_dict({"es": {"space": "weights", "centre_rank": 8}}), path)
    lora = search_description(settings_from_dict({"lora": {"layers": [1, 3], "rank": 2}}), path)
    assert given.startswith("the weights of 14 matrices (layers 0-1): members rank 1, centre rank 8;")
    assert every.startswith("the weights of 84 matrices (layers 0-11)")
    assert lora.startswith("LoRA factors of rank 2 on 14 matrices (layers [1, 3]);")
