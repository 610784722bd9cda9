"""Countdown reward, as the paper's `countdown/countdown_task.py` (VsonicV/es-fine-tuning-paper).

reward = 0.1 * format + answer, in [0, 1.1]:
- format, checked on "<think>" + completion (the prompt ends with "<think>"): 1.0 if the text
  matches `^<think>.*?</think>\\n<answer>.*?</answer>$` (re.match, DOTALL: like the paper, `$`
  also accepts one trailing newline); else 0.1 for a think block + 0.5 for an answer block.
- answer: 1.0 if the LAST <answer>...</answer> holds only digits, + - * / ( ) and spaces, uses
  every given number exactly once and equals the target within 1e-5.

Where we depart from the paper: it `eval`s model text, and `99**99**99` hangs it. We parse with
`ast` and evaluate an allow-listed tree (integer literals; binary + - * / with true division;
unary + and -, which the paper's eval also accepts) with exact fractions. `**`, `//` and anything
else get answer 0; so does division by zero.

The reward is total: any string gets a score, in time linear in its length and without deep
recursion. The tags are found with `str.find` (the paper's lazy regexes take quadratic time on
text with many unclosed tags: a 10 MB completion of `<think>` ran for minutes), with the same
result as the regexes (tests/test_reward.py checks that against them). An answer longer than
MAX_ANSWER_CHARS or with more than MAX_OPERATORS operator signs gets answer 0 before it is
parsed: a chain of 1,000 unary minus signs overflowed the recursion limit and 10,000 the parser's
stack, and the paper's eval fails on them too. The numbers used are compared as digit strings, so
a 5,000-digit number is a wrong number rather than an int-conversion error.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Sequence

_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
_FORMAT_JOIN = _THINK_CLOSE + "\n" + _ANSWER_OPEN
_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")
_OPERATOR = re.compile(r"[+\-*/]")
# Far above any ordinary answer (a correct answer to 4 numbers has 3 binary and a few unary signs,
# under 40 characters), far below what breaks the parser: the expression tree is at most
# MAX_OPERATORS + 1 deep (parentheses add no node), which Python's recursion limit of 1,000 allows.
MAX_ANSWER_CHARS = 1_000
MAX_OPERATORS = 200
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_UNARY = {ast.UAdd: lambda a: a, ast.USub: lambda a: -a}

RewardKind = Literal["paper", "tinyzero"]


@dataclass(frozen=True)
class RewardParts:
    reward: float
    format_reward: float  # the paper's format score (0, 0.1, 0.5, 0.6 or 1.0)
    answer_reward: float  # 1.0 correct, else 0.0
    answer: str | None  # content of the last answer tag, if any

    @property
    def format_ok(self) -> bool:
        return self.format_reward == 1.0

    @property
    def correct(self) -> bool:
        return self.answer_reward == 1.0


def format_reward(text: str) -> float:
    """The paper's format score of the full text (which starts with the prompt's "<think>")."""
    if _full_format(text):
        return 1.0
    return (0.1 if _has_block(text, _THINK_OPEN, _THINK_CLOSE) else 0.0) + (0.5 if _has_block(text, _ANSWER_OPEN, _ANSWER_CLOSE) else 0.0)


def _full_format(text: str) -> bool:
    """re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", text, re.DOTALL), in linear time."""
    if not text.startswith(_THINK_OPEN):
        return False
    # `$` matches at the end or before one final newline; the first "</think>\n<answer>" leaves
    # the most room before the closing tag
    if text.endswith(_ANSWER_CLOSE):
        close = len(text) - len(_ANSWER_CLOSE)
    elif text.endswith(_ANSWER_CLOSE + "\n"):
        close = len(text) - len(_ANSWER_CLOSE) - 1
    else:
        return False
    join = text.find(_FORMAT_JOIN, len(_THINK_OPEN))
    return join != -1 and join + len(_FORMAT_JOIN) <= close


def _has_block(text: str, open_tag: str, close_tag: str) -> bool:
    """re.search(open_tag + ".*?" + close_tag, text, re.DOTALL): the first opening tag has a closing one after it."""
    start = text.find(open_tag)
    return start != -1 and text.find(close_tag, start + len(open_tag)) != -1


def last_answer(text: str) -> str | None:
    """The last of re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL), in linear time."""
    answer, position = None, 0
    while (start := text.find(_ANSWER_OPEN, position)) != -1:
        end = text.find(_ANSWER_CLOSE, start + len(_ANSWER_OPEN))
        if end == -1:
            break
        answer, position = text[start + len(_ANSWER_OPEN) : end], end + len(_ANSWER_CLOSE)
    return answer


def evaluate_expression(expression: str) -> Fraction | None:
    """Exact value of an arithmetic expression, or None if it is not allowed, undefined or too long."""
    if len(expression) > MAX_ANSWER_CHARS or len(_OPERATOR.findall(expression)) > MAX_OPERATORS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
            return None
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _evaluate(node.operand)
        return None if operand is None else _UNARY[type(node.op)](operand)
    return None


def answer_reward(completion: str, numbers: Sequence[int], target: float) -> float:
    answer = last_answer(completion)
    if not answer or len(answer) > MAX_ANSWER_CHARS or not _ALLOWED.match(answer):
        return 0.0
    # as int(n) would read them ("007" is 7), without converting model text to int
    used = Counter(n.lstrip("0") or "0" for n in re.findall(r"[0-9]+", answer))
    if used != Counter(str(int(n)) for n in numbers):
        return 0.0
    value = evaluate_expression(answer)
    if value is None:
        return 0.0
    try:
        return 1.0 if abs(float(value) - float(target)) < 1e-5 else 0.0
    except OverflowError:  # a value beyond any float: no target is that far out
        return 0.0


def score_parts(completion: str, numbers: Sequence[int], target: float, kind: RewardKind = "paper") -> RewardParts:
    """The reward and its parts, for the ledger."""
    fmt = format_reward("<think>" + completion)
    ans = answer_reward(completion, numbers, target)
    if kind == "paper":
        reward = 0.1 * fmt + ans
    elif kind == "tinyzero":
        # TinyZero's countdown score: 1.0 correct, 0.1 for any answer tag (well-formed), else 0.
        reward = 1.0 if ans == 1.0 else (0.1 if last_answer(completion) is not None else 0.0)
    else:
        raise ValueError(f"unknown reward kind {kind!r}")
    return RewardParts(reward, fmt, ans, last_answer(completion))


def score(completion: str, numbers: Sequence[int], target: float) -> float:
    """The paper's reward of a completion (the text generated after the prompt's "<think>").

    >>> score("2+3=5</think>\\n<answer>2 + 3</answer>", [2, 3], 5)
    1.1
    """
    return score_parts(completion, numbers, target).reward
