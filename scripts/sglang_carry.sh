#!/usr/bin/env bash
# Packs the wheels a GPU machine (Python 3.12, torch 2.11 cu130, triton 3.6, no internet) lacks to
# run `python -m sglang.launch_server` for a Llama model with dynamic LoRA, the triton attention
# and LoRA backends and the pytorch sampler, into numbered chunks of at most 48 MiB under
# .devcarry-sglang/ (1..K plus tools/), one folder per transfer (64 MiB a transfer, tree included).
#
# The list is the evidence of a static scan of module-level imports reachable from launch_server,
# http_server, scheduler, tokenizer/detokenizer managers, model_runner, models/llama, srt/lora and
# the triton attention backend (imports inside functions and under try/except not counted), minus
# what the device image has (pack.sh's on_device list: torch, triton, transformers 5.17, numpy,
# aiohttp, httpx, anyio, psutil, pyyaml, regex, jinja2, einops, pillow, sentencepiece, safetensors,
# huggingface-hub, requests, tqdm, uvloop, torchvision) and what the project's base carry
# (../shared/device/pack.sh) has: fastapi, uvicorn, starlette, pydantic, orjson, jsonschema, gguf,
# sniffio, cffi, typing-extensions. Why each is here (importer -> module):
#   sglang 0.5.16            the server (pure Python; cp312 tag)
#   sglang-kernel 0.4.5      sgl_kernel: imported on CUDA by layers/sampler etc.; REPACKED without
#                            flash_ops (1.1 GB; only sgl_kernel.flash_attn imports it, for the fa3
#                            attention backend), sm100/ (Blackwell), infllm_ops (loaded lazily),
#                            flashmla_ops (try/except in flash_mla.py); keeps sm90/common_ops.
#   flashinfer-python 0.6.14 sgl_kernel.elementwise / sglang utils (try-import; kept so sglang's
#                            is_flashinfer_available() sees the version it pins; never called with
#                            --attention-backend triton --sampling-backend pytorch)
#   apache-tvm-ffi 0.1.11    flashinfer.jit.core, xgrammar
#   transformers 5.12.1      sglang pins it (server process only: its own PYTHONPATH)
#   xgrammar 0.2.1           function_call/inkling_detector <- function_call_parser <- server_args
#   ipython + its deps       sglang/utils.py: from IPython.display import HTML, display (<- sglang)
#   openai 2.6.1, jiter, distro   entrypoints/openai/protocol <- parser/reasoning_parser <- server_args
#   compressed-tensors, loguru    layers/quantization <- configs/model_config
#   partial-json-parser      function_call detectors <- server_args
#   msgspec                  sglang.kernels, utils/msgspec_utils <- io_struct
#   pyzmq                    managers (zmq), debug_utils/dumper <- model_runner
#   pybase64, setproctitle, dill   detokenizer_manager, data_parallel_controller, sampling
#   zstandard                entrypoints/http_request_decompression <- http_server
#   soundfile 0.13.1         entrypoints/openai/realtime/session <- serving_transcription <- http_server
#   nvidia-ml-py             pynvml: flashinfer.utils, flashinfer.comm.mnnvl
# Left out on purpose (imported lazily or under try/except only, for paths our flags avoid):
# flash-attn-4, nvidia-cutlass-dsl, tilelang, torchao, outlines, llguidance, numba, sgl-deep-gemm,
# helion, humming-kernels, quack-kernels, torch_memory_saver, modelscope, datasets, timm,
# tokenspeed_mla, mistral_common, kernels, cuda-python, anthropic, torchaudio, torchcodec.
#
# Usage (from the repo root, here): scripts/sglang_carry.sh   (SGW=dir of already downloaded wheels)
# On the GPU machine, once per chunk, back to back:
#   bash .devcarry-sglang/tools/sglang_unpack.sh K      (K = number of chunks)
# then `source $HOME/sgcarry/env.sh` exports SGLANG_PYTHONPATH (the server's own PYTHONPATH head).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
CHUNK_MB=${CHUNK_MB:-48}
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.devcarry-sglang/' "$exclude" 2>/dev/null || echo '/.devcarry-sglang/' >> "$exclude"
WHEELS=(
  sglang==0.5.16 sglang-kernel==0.4.5 flashinfer-python==0.6.14 apache-tvm-ffi==0.1.11
  transformers==5.12.1 xgrammar==0.2.1
  ipython==9.19.1 ipython-pygments-lexers==1.1.1 jedi==0.19.2 parso==0.8.5 traitlets==5.14.3
  matplotlib-inline==0.2.1 pexpect==4.9.0 ptyprocess==0.7.0 prompt-toolkit==3.0.52 wcwidth==0.2.14
  stack-data==0.6.3 asttokens==3.0.0 executing==2.2.1 pure-eval==0.2.3 decorator==5.2.1
  openai==2.6.1 jiter==0.19.0 distro==1.9.0 compressed-tensors==0.20.1 loguru==0.7.3
  partial-json-parser==0.2.1.1.post7 msgspec==0.23.0 pyzmq==27.3.0 pybase64==1.5.1
  setproctitle==1.3.8 dill==0.4.1 zstandard==0.25.0 soundfile==0.13.1 nvidia-ml-py==13.615.71
)
work=${WORK:-$(mktemp -d)}
trap '[[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT
mkdir -p "$work/dl" "$work/stage/wheels"
[[ -n ${SGW:-} ]] && cp "$SGW"/*.whl "$work/dl/" 2>/dev/null || true
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}
  pat=$(echo "$name" | tr 'A-Z-' 'a-z_')
  ls "$work/dl/" | tr 'A-Z' 'a-z' | grep -q "^${pat}-${ver}-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$work/dl" "$spec"
done
for f in "$work"/dl/*.whl; do
  case $(basename "$f") in
    sglang_kernel-*)
      # Repack without what our path never loads; the RECORD keeps its hashes of the kept files.
      rm -rf "$work/sk" && mkdir -p "$work/sk" && unzip -q "$f" -d "$work/sk"
      rm -f "$work"/sk/sgl_kernel/flash_ops.*.so "$work"/sk/sgl_kernel/infllm_ops*.so "$work"/sk/sgl_kernel/flashmla_ops.*.so
      rm -rf "$work/sk/sgl_kernel/sm100"
      rec=$(ls "$work"/sk/*.dist-info/RECORD)
      grep -v -e 'sgl_kernel/flash_ops\.' -e 'sgl_kernel/infllm_ops' -e 'sgl_kernel/flashmla_ops\.' -e 'sgl_kernel/sm100/' "$rec" > "$rec.new" && mv "$rec.new" "$rec"
      (cd "$work/sk" && zip -q -r -9 "$work/stage/wheels/$(basename "$f")" .) ;;
    *) cp "$f" "$work/stage/wheels/" ;;
  esac
done
# Keep exactly one version of each project (two stop pip's whole install).
dups=$(ls "$work/stage/wheels" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dups ]] || { echo "two versions of: $dups" >&2; exit 1; }
rm -rf .devcarry-sglang && mkdir -p .devcarry-sglang/tools
tar -C "$work/stage" -cf - . | split -b "${CHUNK_MB}M" -d - "$work/sgchunk_"
i=0
for c in "$work"/sgchunk_*; do i=$((i+1)); mkdir -p ".devcarry-sglang/$i"; mv "$c" ".devcarry-sglang/$i/"; done
cp scripts/sglang_unpack.sh .devcarry-sglang/tools/
ls "$work/stage/wheels" > .devcarry-sglang/tools/WHEELS.txt
echo "packed $(du -sh "$work/stage" | cut -f1) ($(ls "$work/stage/wheels" | wc -l) wheels) into $i chunks of <= ${CHUNK_MB} MiB: .devcarry-sglang/1 .. .devcarry-sglang/$i"
