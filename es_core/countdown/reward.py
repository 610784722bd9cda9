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
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Sequence

_FULL_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")
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
    if _FULL_FORMAT.match(text):
        return 1.0
    return (0.1 if _THINK.search(text) else 0.0) + (0.5 if _ANSWER.search(text) else 0.0)


def last_answer(text: str) -> str | None:
    answers = _ANSWER.findall(text)
    return answers[-1] if answers else None


def evaluate_expression(expression: str) -> Fraction | None:
    """Exact value of an arithmetic expression, or None if it is not allowed or undefined."""
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
    if not answer or not _ALLOWED.match(answer):
        return 0.0
    used = sorted(int(n) for n in re.findall(r"[0-9]+", answer))
    if used != sorted(int(n) for n in numbers):
        return 0.0
    value = evaluate_expression(answer)
    if value is None:
        return 0.0
    return 1.0 if abs(float(value) - float(target)) < 1e-5 else 0.0


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
