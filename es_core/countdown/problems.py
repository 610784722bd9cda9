"""Countdown problems: our seeded generator, the paper's file layout, and JSONL.

The paper's data (countdown.json: id, context, numbers, target as a string, solution) is
academic-only: we read it from a path the user gives and never ship it. The default data is our
own generator of new problems: 3 or 4 numbers in 1..99 and an integer target in 1..100 (as TinyZero and most of the paper's items) reachable with
+ - * / using each number once, verified by search. Ids are stable: a generated problem's id is a
hash of its numbers and target; a paper problem keeps the paper's id.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

from es_core.countdown.reward import MAX_ANSWER_CHARS, MAX_OPERATORS

TRAIN, HELDOUT = "train", "heldout"


class DataError(ValueError):
    """A missing or malformed problem file: one line naming the file and the record."""


@dataclass(frozen=True)
class Problem:
    id: str
    numbers: tuple[int, ...]
    target: float
    split: str = TRAIN

    def as_record(self) -> dict:
        return {"id": self.id, "numbers": list(self.numbers), "target": self.target, "split": self.split}


def format_target(target: float) -> str:
    """Integers print without a decimal point; fractions as Python's shortest repr (the paper's text)."""
    return str(int(target)) if float(target).is_integer() else repr(float(target))


def problem_id(numbers: Sequence[int], target: float) -> str:
    key = json.dumps([sorted(int(n) for n in numbers), format_target(target)])
    return "cd-" + hashlib.sha256(key.encode()).hexdigest()[:12]


# --- search --------------------------------------------------------------------------------


def solve(numbers: Sequence[int], target: float) -> str | None:
    """An expression using every number once that equals target (exactly), or None."""
    goal = Fraction(target).limit_denominator(10**6) if not float(target).is_integer() else Fraction(int(target))
    return _solve([(Fraction(n), str(n)) for n in numbers], goal)


def _solve(items: list[tuple[Fraction, str]], goal: Fraction) -> str | None:
    if len(items) == 1:
        return items[0][1] if abs(float(items[0][0] - goal)) < 1e-9 else None
    for i, j in combinations(range(len(items)), 2):
        (a, ea), (b, eb) = items[i], items[j]
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        candidates = [(a + b, f"({ea} + {eb})"), (a * b, f"({ea} * {eb})"), (a - b, f"({ea} - {eb})"), (b - a, f"({eb} - {ea})")]
        if b != 0:
            candidates.append((a / b, f"({ea} / {eb})"))
        if a != 0:
            candidates.append((b / a, f"({eb} / {ea})"))
        for value, expr in candidates:
            found = _solve(rest + [(value, expr)], goal)
            if found is not None:
                return found
    return None


# --- generator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemShape:
    """What generated problems look like: how many numbers, how large, which targets."""

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 99
    max_target: int = 100

    def __str__(self) -> str:
        return f"{self.min_numbers}-{self.max_numbers} numbers in 1..{self.max_number}, targets 1..{self.max_target}"

    def most_problems(self) -> int:
        """An upper bound on the distinct problems of this shape: every multiset of numbers with
        every target (fewer are reachable)."""
        return sum(math.comb(self.max_number + k - 1, k) for k in range(self.min_numbers, self.max_numbers + 1)) * self.max_target


# A shape can allow fewer distinct problems than are asked for (warm_start.max_number=1 allows
# three: 1 1 1 makes 1, 2 and 3), and the draw loop then ran for ever. At about 48,000 draws a
# second on one core, 9% of them a new problem at the default shape, this many draws in a row
# without a new problem take about 1 s (2.5 s on a loaded 2-core machine); while half of a shape's problems are still undrawn, the
# chance of such a streak is below 1e-900 (0.955^50,000), so a shape that can supply the count is never refused.
MAX_DRAWS_WITHOUT_NEW = 50_000


class ShapeExhausted(DataError):
    """A problem shape that cannot supply the distinct problems asked of it: one line naming the settings."""


def generate_problems(
    count: int,
    seed: int,
    split: str = TRAIN,
    exclude: Iterable[str] = (),
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 99,
    max_target: int = 100,
    stream: str | None = None,
    settings: str = "the problem generator",
    remedy: str = "",
) -> list[Problem]:
    """`count` distinct problems from `seed`; ids in `exclude` are skipped (keeps splits apart).
    `stream` names the random stream (default: the split), so that e.g. each generation of a fresh
    training stream draws its own problems. `settings`, `remedy`: as generate_solved's."""
    shape = ProblemShape(min_numbers, max_numbers, max_number, max_target)
    return [p for p, _ in generate_solved(count, f"countdown:{seed}:{stream or split}", split, exclude, shape, settings, remedy)]


def generate_solved(count: int, stream: str, split: str = TRAIN, exclude: Iterable[str] = (),
                    shape: ProblemShape = ProblemShape(), settings: str = "the problem generator",
                    remedy: str = "") -> list[tuple[Problem, str]]:
    """`count` distinct (problem, solution) pairs from the random stream named `stream`: numbers are
    drawn, then a random expression over all of them; its value, when an integer in 1..max_target,
    is the target and the expression a solution (every number used once). A shape that cannot
    supply `count` new problems is refused (ShapeExhausted: `settings`, the settings that asked for
    them, then why, then `remedy`, what to change): at once when it has fewer problems in all, else after
    MAX_DRAWS_WITHOUT_NEW draws in a row without a new one (seconds)."""
    if shape.most_problems() < count:
        raise ShapeExhausted(f"{settings}: {count} distinct problems asked of a shape that has at most {shape.most_problems()} "
                             f"({shape}){remedy}")
    rng = random.Random(stream)
    seen = set(exclude)
    out: list[tuple[Problem, str]] = []
    misses = 0
    while len(out) < count:
        misses += 1
        if misses > MAX_DRAWS_WITHOUT_NEW:
            raise ShapeExhausted(f"{settings}: {count} distinct problems asked, {len(out)} found before {MAX_DRAWS_WITHOUT_NEW:,} draws "
                                 f"in a row gave no new one: the shape ({shape}) has too few" + (" besides the held-out ones" if exclude else "") + remedy)
        numbers = [rng.randint(1, shape.max_number) for _ in range(rng.randint(shape.min_numbers, shape.max_numbers))]
        drawn = random_expression(numbers, rng)
        if drawn is None:
            continue
        value, expression = drawn
        if value.denominator != 1 or not 1 <= value <= shape.max_target:
            continue
        target = int(value)
        pid = problem_id(numbers, target)
        if pid in seen:
            continue
        seen.add(pid)
        out.append((Problem(pid, tuple(numbers), float(target), split), expression))
        misses = 0
    return out


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def random_expression(numbers: Sequence[int], rng: random.Random) -> tuple[Fraction, str] | None:
    """A random expression using every number once: (exact value, text with the fewest brackets),
    or None when it divides by zero. Two random operands are combined by a random operator until one
    is left."""
    items = [(Fraction(n), str(n), _ATOM) for n in numbers]  # (value, text, precedence of its top operator)
    rng.shuffle(items)
    while len(items) > 1:
        a, b = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*/")
        if op == "/" and b[0] == 0:
            return None
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] / b[0] if b[0] else a[0]}[op]
        p = _PRECEDENCE[op]
        left = a[1] if a[2] >= p else f"({a[1]})"
        # a - (b - c), a / (b * c): the right operand needs brackets at equal precedence too
        right = b[1] if b[2] > p or (b[2] == p and op in "+*") else f"({b[1]})"
        items.append((value, f"{left} {op} {right}", p))
    return items[0][0], items[0][1]


def generated_splits(train_size: int, heldout_size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Held-out first, from its own stream, so changing train_size never changes the held-out set."""
    remedy = "; lower data.heldout_size and data.train_size"
    heldout = generate_problems(heldout_size, seed, HELDOUT, settings=f"data.heldout_size {heldout_size}", remedy=remedy)
    train = generate_problems(train_size, seed, TRAIN, exclude={p.id for p in heldout}, settings=f"data.train_size {train_size}", remedy=remedy)
    return train, heldout


# --- files ---------------------------------------------------------------------------------


def load_paper_file(path: str | Path, train_size: int = 200, heldout_size: int = 2000) -> tuple[list[Problem], list[Problem]]:
    """The paper's countdown.json layout: the first `train_size` items train, the last `heldout_size` are held out."""
    path = Path(path)
    try:
        items = json.loads(_read_text(path), parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of problems")
    problems = [_paper_problem(path, i, item) for i, item in enumerate(items)]
    _check_unique_ids(problems, [(f"{path}: record {i}", f"record {i}") for i in range(len(problems))])
    if train_size + heldout_size > len(items):
        raise DataError(f"{path}: {len(items)} problems, fewer than train_size {train_size} + heldout_size {heldout_size}")
    train = [Problem(p.id, p.numbers, p.target, TRAIN) for p in problems[:train_size]]
    heldout = [Problem(p.id, p.numbers, p.target, HELDOUT) for p in problems[len(problems) - heldout_size :]]
    return train, heldout


def _paper_problem(path: Path, index: int, item: object) -> Problem:
    try:
        numbers, target = _checked_fields(item)
    except _BadRecord as exc:
        raise DataError(f"{path}: record {index} is not a problem: {exc}") from None
    return Problem(f"paper-{item.get('id', index)}", numbers, target)


def save_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.as_record()) + "\n" for p in problems))
    return path


def load_jsonl(path: str | Path) -> list[Problem]:
    path = Path(path)
    problems, lines = [], []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_int=_parse_int)
            numbers, target = _checked_fields(record)
            split = record.get("split", TRAIN)
            if split not in (TRAIN, HELDOUT):
                raise _BadRecord(f"split must be {TRAIN!r} or {HELDOUT!r}, not {_shown(split)}")
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not a problem record (not valid JSON: {exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: not a problem record (not valid JSON: nested too deeply)") from None
        except _BadRecord as exc:
            raise DataError(f"{path}:{lineno}: not a problem record: {exc}") from None
        problems.append(Problem(str(record.get("id") or problem_id(numbers, target)), numbers, target, split))
        lines.append(lineno)
    _check_unique_ids(problems, [(f"{path}:{lineno}", f"line {lineno}") for lineno in lines])
    return problems


# --- validation of file records ------------------------------------------------------------
# Every record is checked when the file is read, so that a bad one stops the run before any
# work with one line naming the file and the record (a duplicate id used to surface as a DuckDB
# key error after generation 0; "numbers": "123" was read as (1, 2, 3)).

_MAX_INT_DIGITS = 4_000  # below Python's int-conversion limit (4,300), which json.loads would hit
# The ledger's problems.numbers is INTEGER[]: 2**31 and up failed the run's first write after the
# file check had passed them. A record with more numbers than a scorable answer can hold (10,000
# numbers) made a prompt of tens of thousands of tokens whose KV cache took all memory.
MAX_NUMBER = 2**31 - 1


class _BadRecord(Exception):
    """Why one record is not a problem (the loader adds file and record)."""


class _TooManyDigits:
    """What json.loads gives for an integer literal of more than _MAX_INT_DIGITS digits."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _parse_int(text: str) -> int | _TooManyDigits:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _TooManyDigits(text)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"problem file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def _shown(value: object) -> str:
    if isinstance(value, _TooManyDigits):
        return f"an integer of {value.digits:,} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked_fields(record: object) -> tuple[tuple[int, ...], float]:
    """(numbers, target) of one record: at least two non-negative integers and a finite target."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, not {_shown(record)}")
    for key in ("numbers", "target"):
        if key not in record:
            raise _BadRecord(f"no {key!r}")
    if isinstance(record.get("id"), _TooManyDigits):
        raise _BadRecord(f"id must be a string or a shorter integer, not {_shown(record['id'])}")
    numbers = record["numbers"]
    if not isinstance(numbers, list):
        raise _BadRecord(f"numbers must be a list of integers, not {_shown(numbers)}")
    if len(numbers) < 2:
        raise _BadRecord(f"numbers must hold at least two integers, not {_shown(numbers)}")
    for i, n in enumerate(numbers):
        # bool is an int in Python, and a float such as 1.7 would be cut to 1
        if type(n) is not int or n < 0:
            raise _BadRecord(f"numbers[{i}] must be a non-negative integer, not {_shown(n)}")
        if n > MAX_NUMBER:
            raise _BadRecord(f"numbers[{i}] is {_shown(n)}, above {MAX_NUMBER:,} (the ledger stores numbers as 32-bit integers)")
    shortest = sum(len(str(n)) for n in numbers) + len(numbers) - 1  # every number once, an operator between each two
    if shortest > MAX_ANSWER_CHARS or len(numbers) - 1 > MAX_OPERATORS:
        raise _BadRecord(f"{len(numbers):,} numbers: a right answer needs at least {shortest:,} characters and {len(numbers) - 1:,} operators, "
                         f"more than the reward reads ({MAX_ANSWER_CHARS:,} characters, {MAX_OPERATORS} operators)")
    return tuple(numbers), _checked_target(record["target"])


def _checked_target(value: object) -> float:
    """A JSON number or a numeric string ("98", "266.66", "800/3", as the paper writes them), finite."""
    if isinstance(value, _TooManyDigits):
        raise _BadRecord(f"target must be a finite number, not {_shown(value)}")
    try:
        if type(value) in (int, float):
            target = float(value)
        elif isinstance(value, str):
            text = value.strip()
            target = float(Fraction(text)) if "/" in text else float(text)
        else:
            raise _BadRecord(f"target must be a number, not {_shown(value)}")
    except (ValueError, ZeroDivisionError, OverflowError):
        raise _BadRecord(f"target must be a finite number, not {_shown(value)}") from None
    if not math.isfinite(target):
        raise _BadRecord(f"target must be a finite number, not {_shown(value)}")
    return target


def _check_unique_ids(problems: Sequence[Problem], places: Sequence[tuple[str, str]]) -> None:
    """Ids are the ledger's key: a duplicate would fail the run's first commit, after generation 0.
    `places` holds each problem's (error prefix, short name)."""
    first: dict[str, str] = {}
    for problem, (prefix, name) in zip(problems, places):
        if problem.id in first:
            raise DataError(f"{prefix}: id {problem.id!r} is already used by {first[problem.id]}")
        first[problem.id] = name


def jsonl_splits(path: str | Path, train_size: int, heldout_size: int) -> tuple[list[Problem], list[Problem]]:
    """Records with split 'heldout' are held out; the rest train. Sizes cap each split."""
    problems = load_jsonl(path)
    train = [p for p in problems if p.split != HELDOUT][:train_size]
    heldout = [p for p in problems if p.split == HELDOUT][:heldout_size]
    if not train or not heldout:
        raise DataError(f"{path}: needs records of both splits (train: {len(train)}, heldout: {len(heldout)})")
    return train, heldout


def check_disjoint(train: Sequence[Problem], heldout: Sequence[Problem]) -> None:
    overlap = {p.id for p in train} & {p.id for p in heldout}
    if overlap:
        raise DataError(f"{len(overlap)} problems are in both train and held-out splits (e.g. {sorted(overlap)[0]})")


def content_ids(problems: Iterable[Problem]) -> set[str]:
    """Ids by content (numbers and target), whatever a file named them: what keeps generated
    training problems away from every held-out set."""
    return {problem_id(p.numbers, p.target) for p in problems}


def load_eval_set(spec) -> list[Problem]:
    """A further held-out set (`EvalSetSettings`), its problems' split set to its name."""
    if spec.source == "paper":
        _, problems = load_paper_file(spec.path, 0, spec.size)
    elif spec.source == "jsonl":
        problems = load_jsonl(spec.path)[: spec.size]
    else:
        raise DataError(f"unknown evaluation set source {spec.source!r}")
    if not problems:
        raise DataError(f"{spec.path}: evaluation set {spec.name} has no problems")
    return [Problem(p.id, p.numbers, p.target, spec.name) for p in problems]


def experiment_problems(data, evaluation) -> tuple[list[Problem], dict[str, list[Problem]], set[str]]:
    """(train split, held-out sets by name, the held-out problems' content ids) of an experiment's
    `DataSettings` and `EvalSettings`: the held-out split, then each further set."""
    train, heldout = load_problems(data)
    sets = {HELDOUT: heldout, **{spec.name: load_eval_set(spec) for spec in evaluation.sets}}
    held_out = content_ids(p for problems in sets.values() for p in problems)
    leaked = [p.id for p in train if content_ids([p]) & held_out]
    if leaked:
        raise DataError(f"{len(leaked)} training problems are also in a held-out set (e.g. {leaked[0]})")
    return train, sets, held_out


def training_batch(data, train: Sequence[Problem], generation: int, exclude: Iterable[str] = ()) -> list[Problem]:
    """One generation's training problems (`DataSettings`): from the train split, or, with
    train_problems 'fresh', newly generated ones (ids in `exclude`, the held-out sets', never)."""
    if data.train_problems == "fresh":
        return generate_problems(data.prompts_per_generation, data.generator_seed, TRAIN, exclude, stream=f"fresh-g{generation}",
                                 settings=f"data.prompts_per_generation {data.prompts_per_generation}", remedy="; lower it")
    return batch_for_generation(train, generation, data.prompts_per_generation)


def batch_for_generation(train: Sequence[Problem], generation: int, size: int) -> list[Problem]:
    """The training prompts of one generation: all of them, or a rotating window of `size`."""
    if size >= len(train):
        return list(train)
    start = (generation * size) % len(train)
    return [train[(start + k) % len(train)] for k in range(size)]


def load_problems(data) -> tuple[list[Problem], list[Problem]]:
    """(train, heldout) for `DataSettings`; the splits never overlap."""
    if data.source == "generated":
        train, heldout = generated_splits(data.train_size, data.heldout_size, data.generator_seed)
    elif data.source == "paper":
        train, heldout = load_paper_file(data.path, data.train_size, data.heldout_size)
    elif data.source == "jsonl":
        train, heldout = jsonl_splits(data.path, data.train_size, data.heldout_size)
    else:
        raise DataError(f"unknown data.source {data.source!r}")
    check_disjoint(train, heldout)
    return train, heldout
