"""Everything but decoding, on any machine: the `es-countdown` flow with the embedded backend's
decoding replaced by a sleep of the GPU's measured decode time, returning completions as long as
the real ones. Prints the per-generation split (as bench_pipeline does) so the overhead can be cut
and checked without a GPU.

    python -m benchmarks.bench_overhead --config configs/experiments/smollm2_gpu.yaml --decode-seconds 1.9 --generations 12
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from es_core.evaluation import Completion
from es_core.backends.embedded import SERVER

TEXT = ("First, 45 + 23 = 68. Then 68 - 12 = 56, and 56 * 2 = 112 which is too big, so try 56 + 7 = 63. " * 8)[:900]
ANSWER = "</think>\n<answer>(45 + 23) - 12</answer>"


class SleepingBackend:
    """Stands in for the engine: sleeps (the GIL released, as a GPU wait is) and returns fixed text."""

    def __init__(self, seconds: float, tokens: int):
        self.seconds, self.tokens = seconds, tokens

    def generate_population(self, members, prompts, max_new_tokens, on_decode=None, prompt_groups=None):
        members.stacked()  # what the engine does before it decodes
        if on_decode is not None:
            on_decode()
        return self.generate([None] * len(members), prompts, max_new_tokens, prompt_groups)

    def generate(self, adapters, prompts, max_new_tokens, prompt_groups=None):
        time.sleep(self.seconds)
        own = prompt_groups or [range(len(prompts))] * len(adapters)
        return [[Completion(f"{TEXT}{m}{p}{ANSWER}", self.tokens, "length", SERVER) for p in own[m]] for m in range(len(adapters))]

    def close(self):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/experiments/smollm2_gpu.yaml")
    p.add_argument("--decode-seconds", type=float, default=1.9, help="H100, SmolLM2, 32 x 32 rows, 256 tokens: 1.9 s")
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args()
    import es_core.backends.embedded as embedded
    from flows.es_countdown import es_countdown

    embedded.EmbeddedBackend.from_settings = classmethod(lambda cls, settings, path, **_: SleepingBackend(args.decode_seconds, settings.generation.max_new_tokens))
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="es-overhead-")
    overrides = [f"es.generations={args.generations}", "eval.every=0", "eval.base_model=false", "data.heldout_size=32", *args.overrides]
    out = es_countdown(config_path=args.config, overrides=overrides, run_id="overhead", data_dir=data_dir)
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_pipeline.py")), out["run_id"], "--data-dir", data_dir], check=True)


if __name__ == "__main__":
    main()
