#!/usr/bin/env bash
# On the GPU machine, once per transfer: copies this transfer's chunk to $HOME/sgcarry; once all
# TOTAL chunks are there, joins them, installs the wheels with --no-index --no-deps into
# $HOME/sgsite (outside the repo) and writes $HOME/sgcarry/env.sh, which exports
# SGLANG_PYTHONPATH=$HOME/sgsite. Only the SGLang server process should put it first on its
# PYTHONPATH (it holds transformers 5.12.1, which sglang pins; the project keeps the image's).
# Once installed, it imports the server's entry modules the way the server will (SGLANG_PYTHONPATH
# first, then the base carry's PYTHONPATH from $HOME/carry/env.sh, then the image) and fails with the
# error's last lines if one does not import: what sglang_carry.sh's metadata check cannot see (an
# import no Requires-Dist declares, an image that changed) comes back in seconds, before a launch.
# SGCHECK=0 skips it.
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
if [[ ${SGCHECK:-1} != 0 ]]; then
  basepp=$( [[ -f $HOME/carry/env.sh ]] && (source "$HOME/carry/env.sh"; echo "${PYTHONPATH:-}") || echo "${PYTHONPATH:-}")
  t0=$(date +%s)
  if ! out=$(env PYTHONPATH="$site${basepp:+:$basepp}" timeout 180 python3 -c "import sglang.launch_server, sglang.srt.entrypoints.http_server, \
sglang.srt.managers.scheduler, sglang.srt.managers.tokenizer_manager, sglang.srt.managers.detokenizer_manager, \
sglang.srt.model_executor.model_runner, sglang.srt.lora.lora_manager, sglang.srt.layers.attention.triton_backend, sgl_kernel" 2>&1); then
    echo "sglang import check FAILED (PYTHONPATH=$site:$basepp):"; echo "$out" | tail -8; exit 1
  fi
  echo "sglang import check OK in $(( $(date +%s) - t0 )) s"
fi
echo "sglang ready: source \"$carry/env.sh\" (SGLANG_PYTHONPATH=$site)"
