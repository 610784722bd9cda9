"""es.members_per_prompt: EGGROLL's groups of members, each group decoding its own share of a
generation's problems (es_core.es.problem_groups), its fitness normalised within the group."""

import pytest
import torch

from artifacts.ledger import Ledger
from es_core.es import FITNESS, group_fitness, problem_groups
from es_core.settings import ConfigError, load_settings, settings_from_dict


def test_groups_are_consecutive_members_on_consecutive_shares_of_the_problems():
    assert problem_groups(8, 12, 0) is None and problem_groups(8, 12, 8) is None  # every member on every problem
    groups = problem_groups(8, 12, 2)
    assert [list(g) for g in groups[::2]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert groups[0] == groups[1] and groups[6] == groups[7]  # antithetic partners (2k, 2k+1) share their problems
    with pytest.raises(ValueError, match="do not split evenly"):
        problem_groups(8, 10, 2)


def test_group_fitness_normalises_each_problem_among_the_members_that_decoded_it():
    rewards = [[1.0, 0.1], [0.1, 0.1], [0.1, 1.0], [0.1, 0.1]]  # members 0-1 on problems a, b; members 2-3 on c, d
    grouped = group_fitness("prompt_normalized", rewards, 2)
    assert grouped == FITNESS["prompt_normalized"](rewards[:2]) + FITNESS["prompt_normalized"](rewards[2:])
    assert grouped == pytest.approx([0.5, -0.5, 0.5, -0.5])
    # one group of all: the fitness as before (here the columns mix two groups' problems)
    assert group_fitness("prompt_normalized", rewards, 0) == FITNESS["prompt_normalized"](rewards) != grouped
    assert group_fitness("mean_reward", rewards, 2) == FITNESS["mean_reward"](rewards)


@pytest.mark.parametrize("overrides,message", [
    (["es.population=8", "es.members_per_prompt=3"], "must be at least 2 and divide es.population 8"),
    (["es.population=6", "es.members_per_prompt=3"], "must be even with antithetic pairs"),
    (["es.population=8", "es.members_per_prompt=2", "data.prompts_per_generation=6"], "must split evenly over the 4 groups"),
])
def test_groups_that_do_not_divide_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(None, overrides)
    assert "\n" not in str(err.value)


def test_the_engine_decodes_each_member_on_its_own_prompts_as_it_decodes_them_among_all(model_cache):
    """A member's row is the same whichever other prompts share the batch (float32 on CPU)."""
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.lora import find_targets_in_folder, init_centre
    from es_core.models import resolve_base_model
    from es_core.settings import ModelSettings

    path = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    settings = settings_from_dict({"model": {"name": "tiny-llama", "device": "cpu"}, "lora": {"layers": [0, 1], "rank": 2},
                                   "generation": {"compile": False}})
    backend = EmbeddedBackend.from_settings(settings, path)
    targets = find_targets_in_folder(path, [0, 1], settings.lora.modules)
    members = []
    for seed in range(4):
        centre = init_centre(targets, 2, seed, None)
        g = torch.Generator().manual_seed(seed)
        members.append({k: (v if "lora_A" in k else torch.randn(v.shape, generator=g) * 0.5) for k, v in centre.items()})
    prompts = ["Using the numbers [1 2 3]", "The capital of France is", "12 + 30 =", "Once upon a time", "def f(x):", "Countdown:"]
    groups = problem_groups(4, 6, 2)
    everything = backend.generate_tensors(members, prompts, 6)
    grouped = backend.generate_tensors(members, prompts, 6, prompt_groups=groups)
    assert [len(row) for row in grouped] == [3, 3, 3, 3]
    assert [[c.text for c in row] for row in grouped] == [[everything[m][p].text for p in groups[m]] for m in range(4)]
    assert len({c.text for row in grouped for c in row}) > 3  # the members and prompts really differ
    with pytest.raises(ValueError, match="as many prompts"):
        backend.generate_tensors(members, prompts, 2, prompt_groups=[[0], [1, 2], [3], [4]])


GROUPED_RUN = """
run_name: groups
model: {name: tiny-llama}
lora: {layers: [0, 1]}
es: {space: weights, noise_rank: 1, centre_rank: 3, population: 4, members_per_prompt: 2, sigma: 0.05, learning_rate: 0.05,
     fitness: prompt_normalized, generations: 2, seed: 3}
data: {train_size: 8, heldout_size: 4, prompts_per_generation: 4, train_problems: fresh}
prompt: {style: raw}
generation: {max_new_tokens: 24, compile: false}
backend: {kind: sglang}
eval: {every: 2, base_model: false}
"""


def test_a_grouped_run_decodes_each_group_on_its_share_records_it_and_replays(tmp_path, prefect_harness, model_cache, monkeypatch,
                                                                              smollm2_tokenizer):
    """Against the strict fake SGLang server: 4 members in groups of 2 on 4 fresh problems a
    generation, so each member decodes 2; the ledger holds each member's own 2, partners share
    theirs, the groups' are disjoint; replay re-decodes them the same way and rebuilds the centre."""
    from flows.es_countdown import es_countdown
    from flows.replay import replay
    from tests.fake_sglang import FakeSGLang

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "groups.yaml"
    config.write_text(GROUPED_RUN)
    with FakeSGLang(max_lora_rank=4, decode=smollm2_tokenizer.decode) as fake:
        monkeypatch.setenv("ES_SGLANG_URL", fake.url)
        es_countdown(config_path=str(config), run_id="g", data_dir=str(tmp_path / "data"))
        result = replay("g", 1, str(tmp_path / "data"), reevaluate=True)
    assert result["ok"], result["lines"]
    assert any("re-evaluated 4 members, 8 completions" in line for line in result["lines"]), result["lines"]
    _, rows = Ledger(tmp_path / "data").query("SELECT generation, member, list(problem_id ORDER BY problem_id) FROM samples WHERE run_id = 'g' "
                                              "GROUP BY 1, 2 ORDER BY 1, 2")
    assert len(rows) == 8
    for g in (0, 1):
        own = [set(r[2]) for r in rows if r[0] == g]
        assert [len(s) for s in own] == [2, 2, 2, 2]
        assert own[0] == own[1] and own[2] == own[3] and not own[0] & own[2]
    # the recorded fitness is each problem's reward z-scored within its group (a problem's column
    # mixed with another group's would give other values)
    _, fitness = Ledger(tmp_path / "data").query("SELECT generation, member, fitness FROM members WHERE run_id = 'g' ORDER BY 1, 2")
    _, samples = Ledger(tmp_path / "data").query("SELECT generation, member, list(reward ORDER BY problem_id) FROM samples WHERE run_id = 'g' "
                                                 "GROUP BY 1, 2 ORDER BY 1, 2")
    spread = False
    for g in (0, 1):
        rewards = [r[2] for r in samples if r[0] == g]
        assert [f[2] for f in fitness if f[0] == g] == pytest.approx(group_fitness("prompt_normalized", rewards, 2))
        spread |= group_fitness("prompt_normalized", rewards, 2) != pytest.approx(group_fitness("prompt_normalized", rewards, 0))
    assert spread, "the test's rewards cannot tell grouped from ungrouped fitness"
