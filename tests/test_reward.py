"""The Countdown reward, as the paper's countdown_task.py scores it (without eval)."""

import random
import re
import subprocess
import sys
import time

import pytest

from es_core.countdown.reward import MAX_ANSWER_CHARS, MAX_OPERATORS, evaluate_expression, format_reward, last_answer, score, score_parts

GOOD = "44 + 19 = 63, 63 + 35 = 98</think>\n<answer>(44 + 19) + 35</answer>"


def test_full_format_and_correct_answer_scores_1_1():
    parts = score_parts(GOOD, [44, 19, 35], 98)
    assert parts.format_reward == 1.0 and parts.answer_reward == 1.0
    assert parts.format_ok and parts.correct
    assert score(GOOD, [44, 19, 35], 98) == pytest.approx(1.1)


@pytest.mark.parametrize(
    "completion, expected_format",
    [
        ("just text", 0.0),
        ("reasoning</think> no answer", 0.1),  # think block only ("<think>" comes from the prompt)
        ("no closing think <answer>1+2</answer>", 0.5),  # answer block only
        ("reasoning</think> <answer>1+2</answer>", 0.6),  # both, but not "</think>\n<answer>"
        ("reasoning</think>\n<answer>1+2</answer>", 1.0),
        ("reasoning</think>\n<answer>1+2</answer>\n", 1.0),  # the paper's `$` accepts one trailing newline
        ("reasoning</think>\n<answer>1+2</answer> trailing words", 0.6),
    ],
)
def test_format_levels(completion, expected_format):
    assert format_reward("<think>" + completion) == pytest.approx(expected_format)


@pytest.mark.parametrize(
    "answer, numbers, target, correct",
    [
        ("(44 + 19) + 35", [44, 19, 35], 98, True),
        ("44 + 19 + 34", [44, 19, 35], 97, False),  # wrong number
        ("44 + 19 + 35", [44, 19, 35], 97, False),  # wrong value
        ("44 + 44 + 10", [44, 10, 35], 98, False),  # a number reused
        ("44 + 19", [44, 19, 35], 63, False),  # a number missing
        ("44 + 19 + 35 + 1", [44, 19, 35], 99, False),  # an extra number
        ("(10 - (2 * (3 + 1)))", [10, 2, 3, 1], 2, True),  # nested parentheses
        ("((((6 / 3))) * 7)", [6, 3, 7], 14, True),
        ("6 / (3 - 3) + 7", [6, 3, 3, 7], 7, False),  # division by zero
        ("7 / 2 + 1", [7, 2, 1], 4.5, True),  # true division, fractional target
        ("7 // 2 + 1", [7, 2, 1], 4, False),  # floor division is not allowed
        ("2 ** 3 + 1", [2, 3, 1], 9, False),  # power is not allowed
        ("- 3 - 5", [3, 5], -8, True),  # unary minus, as the paper's eval accepts
        ("44 × 19", [44, 19], 836, False),  # unicode operator
        ("44 − 19", [44, 19], 25, False),  # unicode minus
        ("٤٤ + 19", [44, 19], 63, False),  # non-ASCII digits
        ("", [1], 1, False),
        ("1 + 2)", [1, 2], 3, False),  # unbalanced
    ],
)
def test_answer_correctness(answer, numbers, target, correct):
    completion = f"thinking</think>\n<answer>{answer}</answer>"
    assert score_parts(completion, numbers, target).correct is correct


def test_fractional_target_within_tolerance():
    # 266.6666666666667 is how the paper's file writes 800/3
    assert score_parts("x</think>\n<answer>800 / 3</answer>", [800, 3], 266.6666666666667).correct


@pytest.mark.parametrize(
    "answer",
    ["__import__('os').system('echo hi')", "(1).__class__", "open('/etc/passwd')", "[1, 2]", "lambda: 1"],
)
def test_injection_attempts_score_zero_and_run_nothing(answer):
    parts = score_parts(f"t</think>\n<answer>{answer}</answer>", [1, 2], 3)
    assert parts.answer_reward == 0.0
    assert evaluate_expression(answer) is None


def test_huge_exponent_is_rejected_immediately():
    start = time.perf_counter()
    assert score_parts("t</think>\n<answer>99**99**99</answer>", [99, 99, 99], 1).answer_reward == 0.0
    assert evaluate_expression("99**99**99") is None
    assert time.perf_counter() - start < 1.0  # the paper's eval would hang here


def test_only_the_last_answer_counts():
    wrong_last = "t</think>\n<answer>1 + 2</answer> or <answer>2 - 1</answer>"
    right_last = "t</think>\n<answer>2 - 1</answer> or <answer>1 + 2</answer>"
    assert not score_parts(wrong_last, [1, 2], 3).correct
    assert score_parts(right_last, [1, 2], 3).correct
    # as in the paper, the regex's lazy `.*?` may span from the first <answer> to the last
    # </answer>, so two tags can still be "exact format"; text after the last tag is not
    assert score_parts(right_last, [1, 2], 3).format_reward == 1.0
    assert score_parts(right_last + " done", [1, 2], 3).format_reward == pytest.approx(0.6)


def test_tinyzero_variant():
    assert score_parts(GOOD, [44, 19, 35], 98, kind="tinyzero").reward == 1.0
    assert score_parts("t</think>\n<answer>1 + 1</answer>", [44, 19, 35], 98, kind="tinyzero").reward == 0.1
    assert score_parts("no tags at all", [44, 19, 35], 98, kind="tinyzero").reward == 0.0


def test_population_scores_survive_prefects_result_serializer():
    """A population's scores go through the task result store (columns, one-line base64) intact,
    and scoring each distinct completion once gives what scoring each member alone gives."""
    from es_core.evaluation import Completion
    from es_core.countdown.problems import Problem
    from es_core.evaluation import score_member, score_population
    from tasks.common import OneLinePickleSerializer
    from prefect.serializers import Serializer

    problems = [Problem("p0", (3, 5, 7), 22), Problem("p1", (2, 9, 4), 14)]
    prompts = ["first prompt", "second prompt"]
    texts = ["3*5+7=22</think>\n<answer>3 * 5 + 7</answer>", "no idea", "</think>\n<answer>9 + 4 + 2</answer>"]
    members = [[Completion(texts[(m + p) % 3], 10 + m, "stop", "embedded") for p in range(2)] for m in range(4)]
    scores = score_population(problems, prompts, members)
    assert scores == [score_member(problems, prompts, c) for c in members]
    assert scores[0].samples[0].correct and not scores[1].samples[0].correct
    serializer = OneLinePickleSerializer()
    blob = serializer.dumps({"scores": scores, "generate_seconds": 1.5})
    assert b"\n" not in blob
    back = Serializer(type="es-pickle").loads(blob)
    assert back == {"scores": scores, "generate_seconds": 1.5}


# --- any string gets a score (issue 18) -------------------------------------------------------

# The paper's regexes, the specification of the str.find scan that replaced them.
PAPER_FULL_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
PAPER_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
PAPER_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def paper_format_reward(text):
    if PAPER_FULL_FORMAT.match(text):
        return 1.0
    return (0.1 if PAPER_THINK.search(text) else 0.0) + (0.5 if PAPER_ANSWER.search(text) else 0.0)


def test_tags_are_found_as_the_papers_regexes_find_them():
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", "</think>\n<answer>", "1 + 2", "x", "<", ">"]
    rng = random.Random(18)
    texts = ["", "<think>", "<think></think>\n<answer></answer>", "<think></think>\n<answer></answer>\n\n"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(20_000)]
    for text in texts:
        for candidate in (text, "<think>" + text):
            assert format_reward(candidate) == paper_format_reward(candidate), repr(candidate)
            answers = PAPER_ANSWER.findall(candidate)
            assert last_answer(candidate) == (answers[-1] if answers else None), repr(candidate)


@pytest.mark.parametrize(
    "answer",
    [
        "-" * 1_000 + "1+2+3",  # was RecursionError
        "-" * 10_000 + "1+2+3",  # was MemoryError (the parser's stack)
        "-" * 100_000 + "1+2+3",  # was MemoryError
        "(" * 1_000 + "1+2+3" + ")" * 1_000,
        " " * 5_000 + "1+2+3",
    ],
)
def test_answers_past_the_caps_score_format_only(answer):
    parts = score_parts(f"x</think>\n<answer>{answer}</answer>", [1, 2, 3], 6)
    assert (parts.reward, parts.format_reward, parts.answer_reward) == (pytest.approx(0.1), 1.0, 0.0)
    assert evaluate_expression(answer) is None


def test_answers_at_the_caps_are_still_evaluated():
    # MAX_OPERATORS signs: 198 unary minus (an even count) and the two pluses
    deepest = "-" * (MAX_OPERATORS - 2) + "1+2+3"
    assert score_parts(f"x</think>\n<answer>{deepest}</answer>", [1, 2, 3], 6).correct
    assert not score_parts(f"x</think>\n<answer>-{deepest}</answer>", [1, 2, 3], 6).correct
    longest = "1+2+3".rjust(MAX_ANSWER_CHARS)
    assert score_parts(f"x</think>\n<answer>{longest}</answer>", [1, 2, 3], 6).correct
    assert not score_parts(f"x</think>\n<answer> {longest}</answer>", [1, 2, 3], 6).correct


def test_huge_numbers_are_wrong_numbers_not_errors():
    huge = "9" * 5_000  # int("9" * 5000) raises: past Python's 4,300-digit conversion limit
    assert score_parts(f"x</think>\n<answer>{huge} + 2 + 3</answer>", [1, 2, 3], 6).reward == pytest.approx(0.1)
    assert score_parts(f"x</think>\n<answer>{huge}</answer>", [9, 9], 18).answer_reward == 0.0
    # leading zeros still read as int() reads them (then the parser refuses "007", as eval does)
    assert score_parts("x</think>\n<answer>007 + 2</answer>", [7, 2], 9).answer_reward == 0.0
    # a value past any float is a wrong value
    big = 10**200
    assert score_parts(f"x</think>\n<answer>{big} * {big}</answer>", [big, big], 1).answer_reward == 0.0


TEN_MB_COMPLETIONS = """
import sys
from es_core.countdown.reward import score_parts
n = 10_000_000
for text in ["<think>" * (n // 7), "<answer>" * (n // 8), "</think>\\n<answer>" * (n // 17),
             "x</think>\\n<answer>" + "<answer>" * (n // 8) + "1 + 2</answer>",
             "x" * n + "</think>\\n<answer>1 + 2</answer>", "a" * n]:
    parts = score_parts(text, [1, 2], 3)
    print(parts.reward, parts.answer_reward)
"""


def test_ten_megabyte_completions_get_a_score():
    """Each took minutes with the paper's lazy regexes (quadratic on unclosed tags); a hang guard, not a timing."""
    done = subprocess.run([sys.executable, "-c", TEN_MB_COMPLETIONS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rewards = [tuple(float(x) for x in line.split()) for line in done.stdout.splitlines()]
    assert rewards == [(0.0, 0.0), (0.0, 0.0), (pytest.approx(0.01), 0.0), (pytest.approx(0.1), 0.0), (pytest.approx(1.1), 1.0), (0.0, 0.0)]


def test_each_number_is_used_exactly_as_often_as_it_is_given():
    """The numbers are a multiset: reusing one, or leaving out one of two equal numbers, is wrong
    although the set of numbers used equals the set given (a set comparison would pass both)."""
    assert not score_parts("t</think>\n<answer>44 + 44 + 10</answer>", [44, 10], 98).correct  # 44 reused
    assert not score_parts("t</think>\n<answer>44 + 10</answer>", [44, 10, 10], 54).correct  # one 10 left out
    assert score_parts("t</think>\n<answer>44 + 10 + 10</answer>", [44, 10, 10], 64).correct
