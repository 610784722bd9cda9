#!/usr/bin/env bash
# On the GPU machine, once per transfer: copies this transfer's chunk to $HOME/sgcarry; once all
# TOTAL chunks are there, joins them, installs the wheels with --no-index --no-deps into
# $HOME/sgsite (outside the repo) and writes $HOME/sgcarry/env.sh, which exports
# SGLANG_PYTHONPATH=$HOME/sgsite. Only the SGLang server process should put it first on its
# PYTHONPATH (it holds transformers 5.12.1, which sglang pins; the project keeps the image's).
# Usage each time: bash .devcarry-sglang/tools/sglang_unpack.sh TOTAL
set -euo pipefail
total=${1:?total number of chunks}
carry=${SGCARRY:-$HOME/sgcarry} site=${SGSITE:-$HOME/sgsite}
mkdir -p "$carry"
cp .devcarry-sglang/*/sgchunk_* "$carry"/ 2>/dev/null || true
have=$(ls "$carry"/sgchunk_* 2>/dev/null | wc -l)
echo "GPU machine has $have of $total sglang chunks"
[[ $have -lt $total ]] && exit 0
if [[ ! -f $carry/.done ]]; then
  cat "$carry"/sgchunk_* | tar -C "$carry" -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$carry"/wheels/*.whl
  rm -rf "$carry"/wheels "$carry"/sgchunk_*
  touch "$carry/.done"
fi
cat > "$carry/env.sh" <<ENV
export SGLANG_PYTHONPATH=$site
ENV
echo "sglang ready: source \"$carry/env.sh\" (SGLANG_PYTHONPATH=$site)"
