"""Problems of an experiment beyond the splits: the fresh training stream, further held-out sets,
solutions the generator knows (the warm start's), and that nothing held out is ever trained on."""

import json
import random

import pytest

from es_core.countdown.problems import (
    DataError,
    content_ids,
    experiment_problems,
    generate_problems,
    generate_solved,
    load_eval_set,
    problem_id,
    random_expression,
    training_batch,
)
from es_core.countdown.reward import evaluate_expression, score_parts
from es_core.settings import DataSettings, EvalSetSettings, EvalSettings


def test_random_expression_uses_every_number_once_and_has_its_value():
    rng = random.Random(5)
    for _ in range(3000):
        numbers = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
        drawn = random_expression(numbers, rng)
        if drawn is None:
            continue
        value, text = drawn
        assert evaluate_expression(text) == value, text  # brackets where precedence needs them
        assert sorted(int(t) for t in text.replace("(", " ").replace(")", " ").split() if t.isdigit()) == sorted(numbers)


def test_generated_solutions_are_correct_answers():
    for problem, solution in generate_solved(40, "test-stream"):
        assert score_parts(f"x</think>\n<answer>{solution}</answer>", problem.numbers, problem.target).correct


def test_generated_splits_are_those_of_earlier_runs():
    # the first ids of the default streams, as generated before the generator carried solutions:
    # a recorded run's held-out and training problems must not change under it
    assert [p.id for p in generate_problems(3, 1234, "heldout")] == ["cd-f660c4c10ff9", "cd-c54a07d5f74d", "cd-5a08f3099b77"]
    assert [p.id for p in generate_problems(2, 1234, "train")] == ["cd-0d4fb3d01d74", "cd-7a924a054674"]


def test_fresh_stream_gives_new_problems_each_generation_and_never_a_held_out_one():
    data = DataSettings(train_size=20, heldout_size=50, prompts_per_generation=16, train_problems="fresh")
    train, sets, held_out = experiment_problems(data, EvalSettings())
    g0, g1 = training_batch(data, train, 0, held_out), training_batch(data, train, 1, held_out)
    assert len(g0) == len(g1) == 16 and not {p.id for p in g0} & {p.id for p in g1}
    assert g0 == training_batch(data, train, 0, held_out)  # regenerated, not stored
    assert not {p.id for p in g0} & {p.id for p in train}  # not the fixed split either
    # an id that the stream would draw, once held out, is skipped
    assert g0[0].id not in {p.id for p in training_batch(data, train, 0, held_out | {g0[0].id})}
    fixed = DataSettings(train_size=20, heldout_size=50, prompts_per_generation=16)
    assert training_batch(fixed, train, 0, held_out) == train[:16]


def test_paper_test_set_is_the_last_problems_and_named_by_its_set(paper_data_path):
    spec = EvalSetSettings(name="paper-test", source="paper", path=paper_data_path, size=2000)
    problems = load_eval_set(spec)
    items = json.loads(paper_data_path.read_text())
    assert len(problems) == 2000 and {p.split for p in problems} == {"paper-test"}
    assert problems[0].id == f"paper-{items[-2000]['id']}" and problems[-1].id == f"paper-{items[-1]['id']}"
    train, sets, held_out = experiment_problems(DataSettings(train_size=200, heldout_size=100), EvalSettings(sets=[spec]))
    assert list(sets) == ["heldout", "paper-test"] and content_ids(problems) <= held_out


def test_a_training_problem_that_is_held_out_elsewhere_is_refused(tmp_path):
    data = DataSettings(train_size=10, heldout_size=5)
    train, _, _ = experiment_problems(data, EvalSettings())
    leak = tmp_path / "leak.jsonl"
    # the same problem under another id, as a paper file would name it
    leak.write_text(json.dumps({"id": "other-name", "numbers": list(train[3].numbers), "target": train[3].target}) + "\n")
    assert problem_id(train[3].numbers, train[3].target) in content_ids(load_eval_set(EvalSetSettings(name="mine", source="jsonl", path=leak)))
    with pytest.raises(DataError, match="also in a held-out set"):
        experiment_problems(data, EvalSettings(sets=[EvalSetSettings(name="mine", source="jsonl", path=leak)]))


def test_eval_set_names_are_checked():
    with pytest.raises(ValueError):
        EvalSetSettings(name="heldout", source="paper", path="x.json")
    with pytest.raises(ValueError):
        EvalSettings(sets=[EvalSetSettings(name="a", source="jsonl", path="x"), EvalSetSettings(name="a", source="jsonl", path="y")])
