"""Countdown problems: generator, the paper's layout, JSONL, splits."""

import json
import re
import time

import pytest

from es_core.countdown.problems import (
    HELDOUT,
    TRAIN,
    DataError,
    Problem,
    ProblemShape,
    ShapeExhausted,
    batch_for_generation,
    generate_problems,
    generate_solved,
    generated_splits,
    jsonl_splits,
    load_jsonl,
    load_paper_file,
    load_problems,
    problem_id,
    save_jsonl,
    solve,
)
from es_core.countdown.reward import score_parts
from es_core.settings import DataSettings


def test_generated_problems_are_solvable_and_in_range():
    problems = generate_problems(50, seed=3)
    for p in problems:
        assert 3 <= len(p.numbers) <= 4 and all(1 <= n <= 99 for n in p.numbers)
        assert p.target.is_integer() and 1 <= p.target <= 100
        solution = solve(p.numbers, p.target)
        # the solver's expression is a correct answer by the reward's own judgement
        assert score_parts(f"x</think>\n<answer>{solution}</answer>", p.numbers, p.target).correct


def test_generator_is_seeded_and_ids_are_stable():
    a, b, c = generate_problems(20, seed=7), generate_problems(20, seed=7), generate_problems(20, seed=8)
    assert a == b and a != c
    assert all(p.id == problem_id(p.numbers, p.target) for p in a)
    assert len({p.id for p in a}) == 20


def test_splits_never_overlap_and_heldout_does_not_depend_on_train_size():
    train, heldout = generated_splits(100, 60, seed=1)
    assert not {p.id for p in train} & {p.id for p in heldout}
    assert {p.split for p in train} == {TRAIN} and {p.split for p in heldout} == {HELDOUT}
    _, heldout_again = generated_splits(30, 60, seed=1)
    assert heldout_again == heldout


def test_solver_finds_and_refuses():
    assert solve([44, 19, 35], 98) is not None
    assert solve([2, 3], 5) is not None
    assert solve([1, 1], 7) is None
    assert solve([7, 2, 1], 4.5) is not None  # fractional targets


def test_paper_file_layout_and_split(paper_data_path):
    train, heldout = load_paper_file(paper_data_path, 200, 2000)
    assert len(train) == 200 and len(heldout) == 2000
    raw = json.loads(paper_data_path.read_text())
    assert train[0].numbers == tuple(raw[0]["numbers"]) and train[0].target == float(raw[0]["target"])
    assert heldout[-1].id == f"paper-{raw[-1]['id']}"
    assert sum(not p.target.is_integer() for p in train + heldout) == 43  # the file's fractional targets
    assert sum(p.target < 0 for p in train + heldout) == 19
    # the paper's own solutions score as correct under our reward
    for item, p in list(zip(raw[:200], train))[:50]:
        assert score_parts(f"x</think>\n<answer>{item['solution']}</answer>", p.numbers, p.target).correct


def test_paper_layout_fixture_of_our_own(tmp_path):
    items = [{"id": i, "context": "...", "numbers": [i + 1, 2], "target": str(i + 3), "solution": f"{i + 1} + 2"} for i in range(5)]
    items.append({"id": 5, "context": "...", "numbers": [7, 2], "target": "3.5", "solution": "7 / 2"})
    path = tmp_path / "countdown.json"
    path.write_text(json.dumps(items))
    train, heldout = load_paper_file(path, 2, 3)
    assert [p.id for p in train] == ["paper-0", "paper-1"]
    assert [p.id for p in heldout] == ["paper-3", "paper-4", "paper-5"] and heldout[-1].target == 3.5
    with pytest.raises(DataError, match="fewer than"):
        load_paper_file(path, 4, 3)


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ('[{"numbers": [1]}]', "record 0")])
def test_broken_paper_file_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_paper_file(path, 1, 0)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_jsonl_round_trip_and_splits(tmp_path):
    train, heldout = generated_splits(10, 5, seed=2)
    path = save_jsonl(train + heldout, tmp_path / "problems.jsonl")
    assert load_jsonl(path) == train + heldout
    assert jsonl_splits(path, 10, 5) == (train, heldout)
    (tmp_path / "broken.jsonl").write_text('{"numbers": [1, 2], "target": 3}\n{"numbers": oops}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        load_jsonl(tmp_path / "broken.jsonl")


def test_load_problems_from_settings(tmp_path, paper_data_path):
    train, heldout = load_problems(DataSettings(train_size=20, heldout_size=10))
    assert len(train) == 20 and len(heldout) == 10
    train, heldout = load_problems(DataSettings(source="paper", path=paper_data_path, train_size=200, heldout_size=500))
    assert train[0].id == "paper-0" and heldout[0].id == "paper-1700"
    with pytest.raises(DataError, match="not found"):
        load_problems(DataSettings(source="jsonl", path=tmp_path / "missing.jsonl"))


def test_rotating_batches_cover_the_training_set():
    train = [Problem(str(i), (1, 2), 3.0) for i in range(10)]
    assert batch_for_generation(train, 5, 20) == train
    seen = [p.id for g in range(5) for p in batch_for_generation(train, g, 4)]
    assert set(seen) == {str(i) for i in range(10)}
    assert batch_for_generation(train, 0, 4) == batch_for_generation(train, 0, 4)


# --- every record is checked at load (issue 18) ------------------------------------------------

BAD_RECORDS = [
    ({"numbers": "123"}, "numbers must be a list of integers, not '123'"),  # was read as (1, 2, 3)
    ({"numbers": [1.7, 2]}, r"numbers\[0\] must be a non-negative integer, not 1.7"),  # was cut to 1
    ({"numbers": [2, True]}, r"numbers\[1\] must be a non-negative integer, not True"),  # was read as 1
    ({"numbers": [-4, 2]}, r"numbers\[0\] must be a non-negative integer, not -4"),  # no answer could use it
    ({"numbers": []}, r"numbers must hold at least two integers, not \[\]"),
    ({"numbers": [7]}, r"numbers must hold at least two integers, not \[7\]"),
    ({"target": "1/0"}, "target must be a finite number, not '1/0'"),  # was a bare Fraction(1, 0)
    ({"target": "nan"}, "target must be a finite number, not 'nan'"),
    ({"target": "1e400"}, "target must be a finite number, not '1e400'"),
    ({"target": "9" * 5000}, r"target must be a finite number, not '9999.*\.\.\.$"),
    ({"target": True}, "target must be a number, not True"),
    ({"target": None}, "target must be a number, not None"),
    ({"numbers": [1, 2], "id": 10**4_100}, "id must be a string or a shorter integer, not an integer of 4,101 digits"),
    # passed the check, then failed the ledger's INTEGER[] column at the run's first write
    ({"numbers": [2**31, 2]}, r"numbers\[0\] is 2147483648, above 2,147,483,647 \(the ledger stores numbers as 32-bit integers\)"),
    # a 10,000-number record: its prompt's KV cache took all memory (exit 137); no answer the reward reads can use them all
    ({"numbers": [1] * 10_000}, r"10,000 numbers: a right answer needs at least 19,999 characters and 9,999 operators, "
                                r"more than the reward reads \(1,000 characters, 200 operators\)"),
    ({"numbers": [1] * 202}, r"202 numbers: a right answer needs at least 403 characters and 201 operators"),
]


def write_paper_file(path, items):
    path.write_text(json.dumps(items))
    return path


def paper_items(count=4):
    return [{"id": i, "numbers": [i + 1, 2], "target": str(i + 3)} for i in range(count)]


@pytest.mark.parametrize("patch, message", BAD_RECORDS)
def test_paper_file_records_are_checked_at_load(tmp_path, patch, message):
    items = paper_items()
    items[2].update(patch)  # a record neither split uses is checked too
    path = write_paper_file(tmp_path / "countdown.json", items)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: record 2 is not a problem: {message}") as err:
        load_paper_file(path, 1, 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("patch, message", BAD_RECORDS)
def test_jsonl_records_are_checked_at_load(tmp_path, patch, message):
    records = [{"numbers": [1, 2], "target": 3, "split": "train"}, {"numbers": [4, 2], "target": 8, "split": "heldout"}]
    records[1].update(patch)
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: not a problem record: {message}") as err:
        load_jsonl(path)
    assert "\n" not in str(err.value)


def test_a_target_past_the_int_limit_names_file_and_record(tmp_path):
    # json.loads itself raised Python's int-conversion error here, naming no file
    path = tmp_path / "countdown.json"
    path.write_text('[{"id": 0, "numbers": [1, 2], "target": 3}, {"id": 1, "numbers": [1, 2], "target": ' + "9" * 5000 + "}]")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: record 1 is not a problem: target must be a finite number, not an integer of 5,000 digits$"):
        load_paper_file(path, 1, 1)
    jsonl = tmp_path / "problems.jsonl"
    jsonl.write_text('{"numbers": [1, 2], "target": 3}\n{"numbers": [' + "9" * 5000 + ", 2], \"target\": 3}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(jsonl))}:2: not a problem record: numbers\[0\] must be a non-negative integer, not an integer of 5,000 digits$"):
        load_jsonl(jsonl)


def test_duplicate_ids_are_refused_at_load(tmp_path):
    # they passed the loader, then failed the run on the ledger's primary key after generation 0
    items = paper_items()
    items[3]["id"] = 1
    path = write_paper_file(tmp_path / "countdown.json", items)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: record 3: id 'paper-1' is already used by record 1$"):
        load_paper_file(path, 1, 1)
    jsonl = tmp_path / "problems.jsonl"
    # without an id, the id is a hash of numbers and target: the same problem twice is a duplicate
    jsonl.write_text('{"numbers": [1, 2], "target": 3}\n\n{"numbers": [5, 2], "target": 7}\n{"numbers": [2, 1], "target": 3.0}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(jsonl))}:4: id 'cd-[0-9a-f]+' is already used by line 1$"):
        load_jsonl(jsonl)


def test_other_malformed_files_are_one_line_errors(tmp_path):
    jsonl = tmp_path / "problems.jsonl"
    jsonl.write_text('{"numbers": [1, 2], "target": 3, "split": "test"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(jsonl))}:1: not a problem record: split must be 'train' or 'heldout', not 'test'$"):
        load_jsonl(jsonl)
    jsonl.write_text('[1, 2, 3]\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(jsonl))}:1: not a problem record: expected a JSON object, not \\[1, 2, 3\\]$"):
        load_jsonl(jsonl)
    jsonl.write_bytes(b'{"numbers": [1, 2], "target": 3}\n\xff\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(jsonl))}: not UTF-8 text"):
        load_jsonl(jsonl)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(DataError, match=f"^{re.escape(str(deep))}: not valid JSON"):
        load_paper_file(deep, 1, 1)


# --- shapes the generator cannot fill ---------------------------------------------------------------


@pytest.mark.parametrize("shape, count", [
    (ProblemShape(3, 3, 1, 100), 128),  # 1 1 1 makes 1, 2, 3: the loop drew for ever (warm_start.max_number=1)
    (ProblemShape(3, 4, 1, 100), 128),  # seven problems in all, more than the count's bound allows
    (ProblemShape(2, 2, 2, 1), 5),  # fewer than the count even by the bound: refused before any draw
])
def test_a_shape_with_too_few_problems_is_refused_in_seconds(shape, count):
    started = time.perf_counter()
    with pytest.raises(ShapeExhausted, match=r"^warm_start.batch_size \d+: .* has (too few|at most \d+).*; raise it$") as err:
        generate_solved(count, "stream", shape=shape, settings=f"warm_start.batch_size {count}", remedy="; raise it")
    assert time.perf_counter() - started < 30  # about 1 s; generous for a loaded machine
    assert "\n" not in str(err.value)


def test_a_shape_with_just_enough_problems_still_supplies_them():
    # every distinct problem of a small shape, drawn to the last one: no false refusal near the limit
    shape = ProblemShape(2, 2, 3, 9)
    every = {problem_id([n, m], t) for n in range(1, 4) for m in range(n, 4) for t in range(1, 10) if solve([n, m], t)}
    assert len(generate_solved(len(every), "stream", shape=shape)) == len(every)
    with pytest.raises(ShapeExhausted):
        generate_solved(len(every) + 1, "stream", shape=shape)


def test_warm_start_names_its_settings_when_its_shape_is_too_small():
    from es_core.settings import WarmStartSettings
    from es_core.warm_start import training_examples

    with pytest.raises(ShapeExhausted, match=r"^warm_start.batch_size 128: .*raise warm_start.max_number, warm_start.max_numbers or warm_start.max_target, or lower warm_start.batch_size$"):
        training_examples(WarmStartSettings(steps=1, max_number=1), 0)
