"""Prompts in the paper's words: raw equals the paper's context; chat uses the tokenizer's template."""

import json

import pytest

from es_core.countdown.problems import Problem, load_paper_file
from es_core.countdown.prompt import ASSISTANT_PREFIX, SYSTEM, render_prompt, user_message


def test_raw_prompt_is_the_papers_context_for_every_item(paper_data_path):
    raw = json.loads(paper_data_path.read_text())
    train, heldout = load_paper_file(paper_data_path, 200, 2000)
    for item, problem in zip(raw, train + heldout):
        assert render_prompt(problem, "raw") == item["context"]


def test_chat_prompt_uses_the_template_and_ends_with_think(smollm2_tokenizer):
    problem = Problem("x", (44, 19, 35), 98.0)
    text = render_prompt(problem, "chat", smollm2_tokenizer)
    assert text.endswith(ASSISTANT_PREFIX) and text.endswith("<think>")
    assert SYSTEM in text and user_message(problem) in text
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>assistant\n" + ASSISTANT_PREFIX in text


def test_chat_prompt_without_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt.style"):
        render_prompt(Problem("x", (1, 2), 3.0), "chat", None)


def test_fractional_and_negative_targets_print_as_the_paper_does():
    assert "equals 266.6666666666667." in user_message(Problem("x", (800, 3), 800 / 3))
    assert "equals -15." in user_message(Problem("x", (1, 16), -15.0))
