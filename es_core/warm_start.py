"""A supervised warm start before ES: the base model fine-tuned on generated Countdown problems
whose solutions the generator knows.

Why: SmolLM2-135M never answers a Countdown problem correctly (0% greedy, 0% pass@8), so every ES
member scores the same and ES has no signal beyond the format. Small models are known to need such
a cold start (DeepSeek-R1's cold-start SFT; TinyZero reports that models under 1.5B do not learn
Countdown from RL alone). The completion after the prompt's "<think>" is the paper's format:
    " {solution} = {target} </think>\\n<answer> {solution} </answer>" + EOS
All weights train (float32 master weights, bf16 autocast on CUDA), AdamW, the loss on the
completion's tokens only. Step k's batch is drawn from (seed, k) alone and the learning rate is
constant after a linear warmup, so a longer warm start continues a shorter one exactly: `start`
takes a saved model and its AdamW moments and runs the remaining steps.

No files beyond the folders it is given, no Prefect, no ledger: the task layer stores the results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from es_core.backends.embedded import eos_token_ids
from es_core.countdown.problems import Problem, ProblemShape, format_target, generate_solved
from es_core.countdown.prompt import render_prompt
from es_core.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from es_core.settings import WarmStartSettings

OPTIMIZER_FILE = "adamw.safetensors"  # the AdamW moments, per parameter name
PROGRESS_FILE = "warm_start.json"  # steps done, inside the model folder
SPLIT = "warm-start"


@dataclass(frozen=True)
class WarmStartResult:
    steps: int  # steps done in all, those of `start` included
    losses: list[float]  # one per step, from step 0 (those of `start` first)
    seconds: float  # training time of this call (loading and saving excluded)
    completion_tokens: int  # tokens the loss covered in this call


@dataclass(frozen=True)
class WarmStartCheckpoint:
    """A finished warm start to continue from: its model folder and AdamW moments."""

    model_dir: Path
    optimizer_dir: Path
    steps: int
    losses: list[float]


def completion_text(problem: Problem, solution: str) -> str:
    return f" {solution} = {format_target(problem.target)} </think>\n<answer> {solution} </answer>"


def training_examples(settings: WarmStartSettings, step: int, exclude: Iterable[str] = ()) -> list[tuple[Problem, str]]:
    """Step `step`'s (problem, completion) pairs: fresh problems from the warm start's own stream,
    none of whose ids is in `exclude` (the held-out sets)."""
    shape = ProblemShape(settings.min_numbers, settings.max_numbers, settings.max_number, settings.max_target)
    pairs = generate_solved(settings.batch_size, f"warm-start:{settings.seed}:{step}", SPLIT, exclude, shape, f"warm_start.batch_size {settings.batch_size}",
                            "; raise warm_start.max_number, warm_start.max_numbers or warm_start.max_target, or lower warm_start.batch_size")
    return [(problem, completion_text(problem, solution)) for problem, solution in pairs]


def learning_rate(settings: WarmStartSettings, step: int) -> float:
    """Linear warmup over warmup_steps, then constant (so step k's rate never depends on the total)."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    return settings.learning_rate


def encode(tokenizer, prompts: list[str], completions: list[str], eos_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded; labels are -100 except on the completion
    and its EOS. Prompt and completion are tokenized apart, as the model meets them when it decodes."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = [(p, c + [eos_id]) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(p) + len(c) for p, c in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train(
    base_model_dir: Path,
    out_dir: Path,
    optimizer_out_dir: Path | None,
    settings: WarmStartSettings,
    prompt_style: str,
    exclude: Iterable[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    start: WarmStartCheckpoint | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> WarmStartResult:
    """Fine-tune the model of `base_model_dir` (or continue `start`) to settings.steps steps; write
    the model folder to `out_dir` (float32 weights, the base's tokenizer) and, if given, the AdamW
    moments to `optimizer_out_dir`. `on_step(step, loss)` is called every 50 steps and at the end
    (a loss read syncs the GPU, so not every step)."""
    if start is not None and start.steps > settings.steps:
        raise ValueError(f"cannot continue a warm start of {start.steps} steps to {settings.steps}")
    exclude = frozenset(exclude)
    dev = resolve_device(device)
    compute = resolve_dtype(dtype, dev)
    model = load_causal_lm(start.model_dir if start else base_model_dir, "float32", str(dev))  # float32 master weights
    model.train()
    tokenizer = load_tokenizer(Path(base_model_dir))
    eos_id = eos_token_ids(model, tokenizer)[0]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if start is not None:
        _load_moments(optimizer, named, start.optimizer_dir / OPTIMIZER_FILE)
    first = start.steps if start else 0
    losses: list[torch.Tensor] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(first, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        examples = training_examples(settings, step, exclude)
        prompts = [render_prompt(problem, prompt_style, tokenizer) for problem, _ in examples]
        batch = encode(tokenizer, prompts, [c for _, c in examples], eos_id, dev)
        tokens += int((batch["labels"] != -100).sum())
        with torch.autocast(dev.type, dtype=compute, enabled=compute != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if on_step is not None and ((step + 1) % 50 == 0 or step + 1 == settings.steps):
            on_step(step + 1, float(loss.detach()))
    curve = torch.stack(losses).float().cpu().tolist() if losses else []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - started
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(Path(base_model_dir), out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    (out_dir / PROGRESS_FILE).write_text(json.dumps({"steps": settings.steps}, sort_keys=True) + "\n")
    if optimizer_out_dir is not None:
        Path(optimizer_out_dir).mkdir(parents=True, exist_ok=True)
        _save_moments(optimizer, named, Path(optimizer_out_dir) / OPTIMIZER_FILE)
    return WarmStartResult(settings.steps, (start.losses if start else []) + curve, seconds, tokens)


def _save_tokenizer(base_model_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(base_model_dir)).save_pretrained(str(out_dir))


def _save_moments(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], path: Path) -> None:
    tensors = {}
    for name, p in named:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in ("step", "exp_avg", "exp_avg_sq"):
            tensors[f"{key}.{name}"] = state[key].detach().reshape(state[key].shape).contiguous().cpu()
    save_file(tensors, str(path))


def _load_moments(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"warm start optimizer state missing: {path}")
    saved = load_file(str(path))
    for name, p in named:
        if f"exp_avg.{name}" not in saved:
            continue
        optimizer.state[p] = {
            "step": saved[f"step.{name}"].clone(),  # AdamW keeps it on the CPU unless capturable
            "exp_avg": saved[f"exp_avg.{name}"].to(p.device),
            "exp_avg_sq": saved[f"exp_avg_sq.{name}"].to(p.device),
        }
