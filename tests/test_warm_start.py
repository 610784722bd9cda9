"""The supervised warm start: its data, its training (loss falls, a longer warm start continues a
shorter one exactly), and the pipeline around it (cache, ledger, lineage, ES on the warm base)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from artifacts.ledger import Ledger
from es_core.countdown.reward import score_parts
from es_core.models import resolve_base_model
from es_core.settings import ModelSettings, WarmStartSettings
from es_core.warm_start import WarmStartCheckpoint, completion_text, encode, learning_rate, train, training_examples


def test_each_step_trains_on_fresh_solved_problems_never_held_out():
    settings = WarmStartSettings(steps=3, batch_size=16, seed=4)
    first = training_examples(settings, 0)
    assert first == training_examples(settings, 0) and {p.id for p, _ in first}.isdisjoint({p.id for p, _ in training_examples(settings, 1)})
    for problem, completion in first:
        parts = score_parts(completion, problem.numbers, problem.target)  # the paper's reward of the text it learns
        assert parts.format_ok and parts.correct
    held_out = {first[0][0].id, first[5][0].id}
    assert held_out.isdisjoint(p.id for p, _ in training_examples(settings, 0, held_out))
    shape = WarmStartSettings(batch_size=30, min_numbers=2, max_numbers=2, max_number=9, max_target=20)
    assert all(len(p.numbers) == 2 and max(p.numbers) <= 9 and p.target <= 20 for p, _ in training_examples(shape, 0))


def test_learning_rate_warms_up_then_stays_constant():
    s = WarmStartSettings(learning_rate=1e-3, warmup_steps=4)
    assert [learning_rate(s, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_loss_covers_the_completion_and_its_eos_only(smollm2_tokenizer):
    (problem, completion), = training_examples(WarmStartSettings(batch_size=1), 0)
    batch = encode(smollm2_tokenizer, ["prompt text<think>", "a longer prompt than that<think>"], [completion, " 1 </think>"], 2, torch.device("cpu"))
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    learned = labels[0][labels[0] != -100].tolist()
    assert learned == smollm2_tokenizer(completion, add_special_tokens=False)["input_ids"] + [2]
    assert smollm2_tokenizer.decode(ids[0][labels[0] != -100]) .startswith(completion)
    assert (labels[mask == 0] == -100).all() and mask[1].sum() > 0 and ids.shape == labels.shape == mask.shape


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return resolve_base_model(ModelSettings(name="tiny-llama"), tmp_path_factory.mktemp("models"))


def test_loss_falls_and_a_longer_warm_start_continues_a_shorter_one_exactly(tmp_path, tiny_base):
    full_settings = WarmStartSettings(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=1)
    full = train(tiny_base.path, tmp_path / "full", tmp_path / "full-adamw", full_settings, "raw")
    assert len(full.losses) == 4 and full.losses[-1] < full.losses[0] and full.completion_tokens > 0
    half = train(tiny_base.path, tmp_path / "half", tmp_path / "half-adamw", full_settings.model_copy(update={"steps": 2}), "raw")
    continued = train(tiny_base.path, tmp_path / "cont", None, full_settings, "raw",
                      start=WarmStartCheckpoint(tmp_path / "half", tmp_path / "half-adamw", 2, half.losses))
    assert continued.losses == full.losses
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cont" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_base.path / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it did train
    with pytest.raises(ValueError, match="cannot continue"):
        train(tiny_base.path, tmp_path / "x", None, full_settings.model_copy(update={"steps": 1}), "raw",
              start=WarmStartCheckpoint(tmp_path / "half", tmp_path / "half-adamw", 2, half.losses))


WARM = """
run_name: warm
model: {{name: tiny-llama}}
lora: {{rank: 2, layers: [0, 1]}}
es: {{population: 4, sigma: 0.05, learning_rate: 0.05, generations: {generations}, seed: 3, perturb: A}}
data: {{train_size: 6, heldout_size: 4, prompts_per_generation: 3}}
prompt: {{style: raw}}
generation: {{max_new_tokens: 6, compile: false}}
eval: {{every: 0, base_model: true}}
warm_start: {{steps: {steps}, batch_size: 2, learning_rate: 0.01, warmup_steps: 1}}
"""


@pytest.mark.slow
def test_es_runs_on_the_warm_start_which_is_cached_recorded_and_continued(tmp_path, prefect_harness, model_cache, monkeypatch):
    import tasks.warm_start
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.countdown.problems import experiment_problems, training_batch
    from es_core.countdown.prompt import render_prompts
    from es_core.models import load_tokenizer
    from es_core.settings import load_settings
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data_dir = tmp_path / "data"

    def config(name: str, steps: int, generations: int) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(WARM.format(steps=steps, generations=generations))
        return str(path)

    es_countdown(config_path=config("w", 3, 1), run_id="w1", data_dir=str(data_dir))
    ledger = Ledger(data_dir)
    run = ledger.run_row("w1")
    warm = ledger.warm_start_row(run["warm_start_sha256"])
    assert warm["steps"] == 3 and len(warm["loss_curve"]) == 3 and warm["base_model_sha256"] == run["base_model_sha256"]
    assert warm["parent_warm_start_sha256"] is None and warm["seconds"] > 0
    _, evals = ledger.query("SELECT model, generation FROM evals WHERE run_id = 'w1' AND split = 'heldout' ORDER BY model")
    assert evals == [("base", 0), ("centre", 1), ("warm_start", 0)]

    # generation 0 of a perturb-A population (B = 0) decodes exactly as its base model: the warm start's
    settings = load_settings(config("w", 3, 1), [f"data_dir={data_dir}"])
    train_split, _, held_out = experiment_problems(settings.data, settings.eval)
    batch = training_batch(settings.data, train_split, 0, held_out)
    prompts = render_prompts(batch, "raw", load_tokenizer(Path(run["base_model"])))
    completions = {}
    for name, folder in (("warm", data_dir / "artifacts" / warm["warm_start_sha256"][:2] / warm["warm_start_sha256"]), ("base", Path(run["base_model"]))):
        backend = EmbeddedBackend.from_settings(settings, folder)
        try:
            completions[name] = [c.text for c in backend.generate([_base_ref()], prompts, 6)[0]]
        finally:
            backend.close()
    assert completions["warm"] != completions["base"], "the warm start should change greedy outputs"
    _, rows = ledger.query("SELECT problem_id, completion FROM samples WHERE run_id = 'w1' AND generation = 0 AND member = 0")
    recorded = dict(rows)
    assert [recorded[p.id] for p in batch] == completions["warm"]

    # lineage: final centre -> initial centre -> warm start -> base
    centre = ledger.generation_row("w1", 0)["center_sha256"]
    kinds = [step["kind"] for step in ledger.lineage(centre)]
    assert kinds == ["update", "init", "warm_start", "base"]

    # the same settings again: the warm start is a cache hit (its trainer is never called)
    def no_training(*args, **kwargs):
        raise AssertionError("the warm start should have been a cache hit")

    monkeypatch.setattr(tasks.warm_start, "train", no_training)
    es_countdown(config_path=config("w", 3, 1), run_id="w2", data_dir=str(data_dir))
    assert ledger.run_row("w2")["warm_start_sha256"] == warm["warm_start_sha256"]
    monkeypatch.undo()
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))

    # a longer warm start continues the shorter one; with no ES generations the run is the
    # supervised baseline: the base and the warm start evaluated, nothing else
    starts = []
    real_train = tasks.warm_start.train
    monkeypatch.setattr(tasks.warm_start, "train", lambda *a, **k: starts.append(k["start"]) or real_train(*a, **k))
    es_countdown(config_path=config("w5", 5, 0), run_id="sft", data_dir=str(data_dir))
    longer = ledger.warm_start_row(ledger.run_row("sft")["warm_start_sha256"])
    assert [s.steps for s in starts] == [3]
    assert longer["steps"] == 5 and longer["parent_warm_start_sha256"] == warm["warm_start_sha256"]
    assert longer["loss_curve"][:3] == warm["loss_curve"] and longer["seconds"] > warm["seconds"]
    assert ledger.last_generation("sft") is None and ledger.run_row("sft")["status"] == "completed"
    _, evals = ledger.query("SELECT model FROM evals WHERE run_id = 'sft' ORDER BY model")
    assert evals == [("base",), ("warm_start",)]
    assert [s["kind"] for s in ledger.lineage(longer["warm_start_sha256"])] == ["warm_start", "warm_start", "base"]
    exported = {p.name: p for p in ledger.export_parquet("sft", tmp_path / "export")}
    import duckdb

    chain = duckdb.connect().execute(f"SELECT warm_start_sha256 FROM '{exported['warm_starts.parquet']}' ORDER BY steps").fetchall()
    assert chain == [(warm["warm_start_sha256"],), (longer["warm_start_sha256"],)]


def _base_ref():
    from es_core.backends.base import AdapterRef

    return AdapterRef("base", None)
