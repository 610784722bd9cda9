#!/usr/bin/env bash
# Packs the wheels a GPU machine (Python 3.12, torch 2.11 cu130, triton 3.6, no internet) lacks to
# run `python -m sglang.launch_server` for a Llama model with dynamic LoRA, the triton attention
# and LoRA backends and the pytorch sampler, into numbered chunks of at most 40 MiB (CHUNK_MB) under
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
#   tokenizers 0.22.2        transformers 5.12.1 requires tokenizers>=0.22.0,<=0.23.0 and raises an
#                            ImportError on the image's 0.23.2 (seen on the H100, 2026-12-07); the
#                            image's transformers 5.17 cannot stand in (sglang registers 'qwen3_asr',
#                            which 5.17 already has: ValueError)
#   python-multipart 0.0.34  sglang requires it; fastapi needs it for the Form routes http_server
#                            declares (RuntimeError at import, seen on the H100, 2026-12-07). The
#                            scan above missed both: it read imports, not versions, and this
#                            machine's venv has python-multipart.
# Left out on purpose (imported lazily or under try/except only, for paths our flags avoid):
# flash-attn-4, nvidia-cutlass-dsl, tilelang, torchao, outlines, llguidance, numba, sgl-deep-gemm,
# helion, humming-kernels, quack-kernels, torch_memory_saver, modelscope, datasets, timm,
# tokenspeed_mla, mistral_common, kernels, cuda-python, anthropic, torchaudio, torchcodec.
#
# The check (run before packing; CHECK=0 skips it; alone: scripts/sglang_carry.sh --check WHEEL_DIR
# [BASE_LIST]): every Requires-Dist of every carried wheel (its markers evaluated for CPython 3.12 on
# x86_64 Linux, the extras it is asked for included) must be met by what the server's PYTHONPATH
# finds first: the carry, then the base carry (.devcarry/, from scripts/device/pack.sh: run that
# first, or give BASE_LIST, a file of wheel names), then the image (IMAGE below: KINDS.md's package
# list of 2026-11-17, with the versions its pip-list row gives; a package whose version is not
# recorded there is taken as it is and listed). A requirement met by none of them must be in WAIVED
# with its reason; anything else fails the pack, naming the package, who requires it and why it is
# not met. What this cannot see: imports that no Requires-Dist declares, and an image that changed
# since KINDS.md was read; sglang_unpack.sh imports the server's entry modules on the GPU machine
# for those.
# Usage (from the repo root, here): scripts/sglang_carry.sh   (SGW=dir of already downloaded wheels)
# On the GPU machine, once per chunk, back to back:
#   bash .devcarry-sglang/tools/sglang_unpack.sh K      (K = number of chunks)
# then `source $HOME/sgcarry/env.sh` exports SGLANG_PYTHONPATH (the server's own PYTHONPATH head).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
CHUNK_MB=${CHUNK_MB:-40}
# The device image, as KINDS.md lists it (2026-11-17); ==VERSION where its pip-list row gives one.
IMAGE="absl-py accelerate==1.15.0 aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
 certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
 cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
 formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub==1.33.0 humanize hypothesis idna
 imageio iniconfig interface-meta jax==0.11.2 jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
 lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
 mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
 numba-cuda numpy==2.5.2 numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
 opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
 propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
 pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
 rich sacrebleu safetensors==0.8.0 scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece==0.2.2
 sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
 tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken==0.14.0 timm tokenizers==0.23.2 toolz torch==2.11.0
 torchaudio==2.11.0 torchdiffeq torch-geometric torchmetrics torchvision==0.26.0 tqdm transformers==5.17.0 treescope
 triton==3.6.0 typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Required by a carried wheel, met by nothing on the server's path, and left out on purpose. The
# server ran without every one of them on the H100 (2026-12-07) with our flags; the reason each is
# never imported on that path is the scan's (module-level imports) unless said otherwise.
WAIVED="
anthropic          sglang: the Anthropic-compatible API only (lazy import)
blobfile           sglang: remote weight loading only
cuda-python        sglang: the image has cuda-bindings/cuda-core; cuda-python is imported only by sm100/PD paths
cuda-tile          flashinfer: cuTile kernels, JIT only
datasets           sglang: benchmarks and tests
easydict           sglang: multimodal processors only
flash-attn-4       sglang: the fa4 attention backend (we run triton)
helion             sglang: models/inkling (its import error is logged and ignored)
humming-kernels    sglang: quantized MoE kernels
interegular        sglang: the outlines grammar backend (we run --grammar-backend none)
kernels            sglang: hub kernels, lazy
llguidance         sglang: the llguidance grammar backend
mistral-common     sglang: Mistral tokenizers
modelscope         sglang: SGLANG_USE_MODELSCOPE only
nvidia-cudnn-frontend  flashinfer: cuDNN attention, never selected with triton attention
nvidia-cutlass-dsl sglang, flashinfer: CuTe DSL kernels (fa4, Blackwell)
nvidia-mathdx      sglang: cuBLASDx JIT kernels
openai-harmony     sglang: the /v1/responses API, which logs 'disabled' without it (seen 2026-12-07)
outlines           sglang: the outlines grammar backend
py-spy             sglang: the stack-dump debug endpoint
quack-kernels      sglang: CuTe DSL norms for Blackwell
sgl-deep-gemm      sglang: FP8 DeepGEMM
smg-grpc-servicer  sglang: the gRPC server mode
tilelang           sglang: tilelang kernels (NSA/quantization)
tokenspeed-mla     sglang: MLA attention (DeepSeek)
torch-memory-saver sglang: --enable-memory-saver only
torchao            sglang: --torchao-config only
torchcodec         sglang: video inputs
watchfiles         sglang: uvicorn --reload (never passed)
"
carry_check() {  # $1: folder of the carried wheels; $2: a file of base-carry wheel names, or empty
  IMAGE="$IMAGE" WAIVED="$WAIVED" python3 - "$1" "${2:-}" <<'PY'
import email.parser, os, re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.version import Version

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
def wheel_name(f):  # NAME-VERSION-...whl
    parts = Path(f).name.split("-")
    return norm(parts[0]), parts[1]

carry, meta = {}, {}
for f in sorted(Path(sys.argv[1]).glob("*.whl")):
    n, v = wheel_name(f)
    carry[n] = v
    with zipfile.ZipFile(f) as z:
        m = next(x for x in z.namelist() if x.endswith(".dist-info/METADATA"))
        meta[n] = email.parser.Parser().parsestr(z.read(m).decode()).get_all("Requires-Dist") or []
base = {}
if sys.argv[2]:
    for line in Path(sys.argv[2]).read_text().split():
        if line.endswith(".whl"):
            n, v = wheel_name(line); base[n] = v
image = {}
for item in os.environ["IMAGE"].split():
    n, _, v = item.partition("==")
    image[norm(n)] = v or None
waived = {norm(l.split()[0]): l.split(None, 1)[1] for l in os.environ["WAIVED"].strip().splitlines()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
bad, assumed, used_waivers = [], set(), set()
todo, seen = [(n, "") for n in carry], set()
while todo:
    owner, extra = todo.pop()
    if (owner, extra) in seen:
        continue
    seen.add((owner, extra))
    for line in meta[owner]:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({**env, "extra": extra}):
            continue
        if extra and (r.marker is None or "extra" not in str(r.marker)):
            continue  # the base requirements were checked with extra ""
        n = norm(r.name)
        where, v = next(((w, d[n]) for w, d in (("carry", carry), ("base carry", base), ("image", image)) if n in d), (None, None))
        who = f"{owner}{'[' + extra + ']' if extra else ''} requires {line.split(';')[0].strip()}"
        if where is None:
            if n in waived:
                used_waivers.add(n)
            else:
                bad.append(f"MISSING {n}: {who}; not in the carry, the base carry or the image")
            continue
        if v is None:
            if r.specifier:
                assumed.add(f"{n} ({where}, version not recorded; {who})")
        elif r.specifier and not r.specifier.contains(Version(v), prereleases=True):
            bad.append(f"VERSION {n}: the server would import {where}'s {v}; {who}")
        if where == "carry":
            todo += [(n, e) for e in r.extras]
print(f"carry check: {len(carry)} carried wheels, {len(base)} base-carry wheels, {len(image)} image packages; "
      f"{len(used_waivers)} requirements waived ({', '.join(sorted(used_waivers))})")
for a in sorted(assumed):
    print(f"  taken as met: {a}")
for b in bad:
    print(f"  {b}")
sys.exit(1 if bad else 0)
PY
}
if [[ ${1:-} == --check ]]; then carry_check "${2:?folder of wheels}" "${3:-}"; exit; fi
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.devcarry-sglang/' "$exclude" 2>/dev/null || echo '/.devcarry-sglang/' >> "$exclude"
WHEELS=(
  sglang==0.5.16 sglang-kernel==0.4.5 flashinfer-python==0.6.14 apache-tvm-ffi==0.1.11
  transformers==5.12.1 tokenizers==0.22.2 xgrammar==0.2.1 python-multipart==0.0.34
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
if [[ ${CHECK:-1} != 0 ]]; then
  base_list=${BASE_LIST:-}
  if [[ -z $base_list ]]; then
    ls .devcarry/[0-9]*/chunk_* >/dev/null 2>&1 || { echo "no base carry in .devcarry/: run scripts/device/pack.sh first (its wheels are on the server's path too), or give BASE_LIST" >&2; exit 1; }
    base_list=$work/base_wheels.txt
    cat .devcarry/[0-9]*/chunk_* | tar -tf - | grep '\.whl$' | xargs -n1 basename > "$base_list"
  fi
  carry_check "$work/stage/wheels" "$base_list" || { echo "carry check failed: add the wheel (or a WAIVED line with its reason)" >&2; exit 1; }
fi
rm -rf .devcarry-sglang && mkdir -p .devcarry-sglang/tools
tar -C "$work/stage" -cf - . | split -b "${CHUNK_MB}M" -d - "$work/sgchunk_"
i=0
for c in "$work"/sgchunk_*; do i=$((i+1)); mkdir -p ".devcarry-sglang/$i"; mv "$c" ".devcarry-sglang/$i/"; done
cp scripts/sglang_unpack.sh .devcarry-sglang/tools/
ls "$work/stage/wheels" > .devcarry-sglang/tools/WHEELS.txt
echo "packed $(du -sh "$work/stage" | cut -f1) ($(ls "$work/stage/wheels" | wc -l) wheels) into $i chunks of <= ${CHUNK_MB} MiB: .devcarry-sglang/1 .. .devcarry-sglang/$i"
