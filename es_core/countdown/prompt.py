"""Countdown prompts, in the paper's words.

`raw` is the paper's `context` string exactly (no template). `chat` sends the same system and user
messages through the tokenizer's own chat template, then the assistant prefix. Both end with
"<think>", so the reward's format check ("<think>" + completion) lines up.
"""

from __future__ import annotations

from typing import Literal, Sequence

from es_core.countdown.problems import Problem, format_target

SYSTEM = "You are a helpful assistant. You first think about the reasoning process in your mind and then provide the user with the answer."
USER = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"

PromptStyle = Literal["chat", "raw"]


def user_message(problem: Problem) -> str:
    # The paper prints numbers as a numpy array: "[44 19 35]", right-aligned: "[83 78  1 39]".
    width = max(len(str(n)) for n in problem.numbers)
    numbers = "[" + " ".join(str(n).rjust(width) for n in problem.numbers) + "]"
    return USER.format(numbers=numbers, target=format_target(problem.target))


def render_prompt(problem: Problem, style: PromptStyle, tokenizer=None) -> str:
    """The exact text sent to the model for one problem."""
    if style == "raw":
        return SYSTEM + user_message(problem) + ASSISTANT_PREFIX
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt.style chat needs a tokenizer with a chat template (use prompt.style=raw otherwise)")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(problem)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ASSISTANT_PREFIX
    raise ValueError(f"unknown prompt style {style!r}")


def render_prompts(problems: Sequence[Problem], style: PromptStyle, tokenizer=None) -> list[str]:
    return [render_prompt(p, style, tokenizer) for p in problems]
