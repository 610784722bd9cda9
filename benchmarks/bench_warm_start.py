"""Where a warm-start (supervised) step's time goes, and what two changes would save: the step of
es_core/warm_start.py `train` (named baseline: full-vocabulary float32 logits on every position,
AdamW foreach) against the same step with logits on the completion's positions only (the loss
covers nothing else: about 20% of a padded batch's tokens) and against fused AdamW. Random weights
of SmolLM2-135M's shape and batches of the warm start's shape (128 rows; prompts of about 150
tokens, completions of about 39, right-padded), so it needs only torch and transformers: it runs on
a bare GPU machine with no carry.

    python benchmarks/bench_warm_start.py [--steps 20] [--json OUT.json]    # GPU: bf16 autocast
    python benchmarks/bench_warm_start.py --tiny --steps 3                   # CPU: a smoke of the code

Timings only: the completion-only loss is the same loss up to rounding (printed), but not bit for
bit, so adopting it would change the warm start's recorded hashes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
TINY = dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def batch(rows: int, prompt: tuple[int, int], completion: tuple[int, int], vocab: int, device, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels as es_core.warm_start.encode makes them."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(prompt[0], prompt[1] + 1, (rows,), generator=g)
    c = torch.randint(completion[0], completion[1] + 1, (rows,), generator=g)
    width = int((p + c).max())
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = torch.full((rows, width), -100)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i in range(rows):
        n = int(p[i] + c[i])
        labels[i, int(p[i]):n] = ids[i, int(p[i]):n]
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def full_loss(model, b) -> torch.Tensor:
    return model(**b).loss  # the baseline: logits [rows, width, vocab], then float32 cross-entropy


def completion_loss(model, b) -> torch.Tensor:
    """The same loss from the positions whose next token is labelled only (HF shifts the labels
    the same way: position t predicts token t + 1)."""
    hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    targets = b["labels"][:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def step_time(model, optimizer, loss_fn, batches, device, dtype, steps: int) -> tuple[float, float, float]:
    """(median seconds a step, peak GiB, the first step's loss) over `steps` steps after 2 warm-up ones."""
    times, first = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(steps + 2):
        b = batches[k % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 2:
            times.append(time.perf_counter() - t0)
        if first is None:
            first = float(loss.detach())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=128, help="problems a step (warm_start.batch_size)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.tiny else SMOLLM2
    rows = 4 if args.tiny else args.rows
    batches = [batch(rows, (140, 160), (30, 48), shape["vocab_size"], device, seed) for seed in range(4)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    padded = sum(b["input_ids"].numel() for b in batches) / len(batches)
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}; {rows} rows, "
          f"{padded:.0f} padded tokens a step ({tokens:.0f} real, {labelled:.0f} labelled: {100 * labelled / padded:.0f}%)", flush=True)
    results = []
    for name, loss_fn, fused in (("baseline: full logits, AdamW foreach", full_loss, False),
                                 ("completion-only logits", completion_loss, False),
                                 ("full logits, fused AdamW", full_loss, True),
                                 ("completion-only logits, fused AdamW", completion_loss, True)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(device)  # float32 master weights, as train() loads them
        model.train()
        kwargs = {"fused": True} if fused and device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **kwargs)
        seconds, peak, loss = step_time(model, optimizer, loss_fn, batches, device, dtype, args.steps)
        results.append({"variant": name, "seconds_per_step": seconds, "peak_gib": peak, "first_loss": loss})
        base = results[0]["seconds_per_step"]
        print(f"  {name:40s} {1000 * seconds:8.1f} ms a step  {base / seconds:5.2f}x the baseline  peak {peak:5.1f} GiB  first loss {loss:.5f}", flush=True)
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__, "rows": rows, "padded_tokens": padded, "labelled_tokens": labelled, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
