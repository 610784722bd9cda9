"""LoRA tensors of a population member and their PEFT-format files.

The ES search space theta is the set of LoRA factors (A and B of each target Linear). A member's
effective weight change is delta_W = (lora_alpha / r) * B @ A. Perturbing A and B separately is
the ES search space (both factors move; the change of the model is B·A, which is bilinear in the
noise); `es.perturb` can restrict the noise to A or B alone. At generation 0, B = 0, so the centre
equals the base model and a perturbation first acts through sigma * eps_B @ A.

Tensors are keyed by PEFT's own names, e.g.
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]), so a folder written here loads unchanged with `PeftModel.from_pretrained` and SGLang's
`/load_lora_adapter`. The centre is kept in float32: ES steps of 1e-4 vanish in bfloat16.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.numpy import save as save_arrays

from es_core.seeding import standard_normal_f32, uniform_f32

LoRATensors = dict[str, torch.Tensor]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+\.layers\.(?P<layer>\d+)\..*\.(?P<module>[A-Za-z0-9_]+))\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class StackedLoRA:
    """The LoRA tensors of `size` members stacked per key ([size, *shape]), as a population is
    built from one centre: one tensor op per key instead of one per member and key."""

    tensors: dict[str, torch.Tensor]
    size: int

    def __len__(self) -> int:
        return self.size

    def member(self, i: int) -> LoRATensors:
        return {k: v[i] for k, v in self.tensors.items()}

    def take(self, indices) -> "StackedLoRA":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return StackedLoRA({k: v.index_select(0, idx) for k, v in self.tensors.items()}, len(idx))


class AdapterError(ValueError):
    """A missing, corrupt or mismatched adapter folder: one line naming the file."""


@dataclass(frozen=True)
class LoRATarget:
    """One Linear of the base model that carries LoRA."""

    path: str  # module path in the HF model, e.g. "model.layers.0.self_attn.q_proj"
    layer: int
    module: str
    in_features: int
    out_features: int

    @property
    def key_a(self) -> str:
        return f"{PEFT_PREFIX}{self.path}.lora_A.weight"

    @property
    def key_b(self) -> str:
        return f"{PEFT_PREFIX}{self.path}.lora_B.weight"


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter_config.json says, in the subset PEFT and SGLang both honour.

    It names no base model: an adapter is a content-addressed artifact, and a path in it (PEFT
    writes the base model's) would give the same adapter another sha256 in a data dir that was
    copied or moved. Both loaders take the base model separately: PeftModel.from_pretrained(base,
    folder) and SGLang (`--model-path`; its LoRAConfig reads r, lora_alpha and target_modules).
    The ledger names each run's base model (runs.base_model_sha256)."""

    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]

    def peft_config(self) -> dict:
        # Plain scaling only: SGLang ignores use_rslora, rank_pattern and alpha_pattern.
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None,
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": sorted(self.target_modules),
            "layers_to_transform": sorted(self.layers),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }


def find_targets(model: torch.nn.Module, layers: list[int] | tuple[int, ...] | str, modules: list[str] | tuple[str, ...]) -> list[LoRATarget]:
    """Every Linear named in `modules` inside the decoder layers `layers`, in model order.

    Works on a model built on the meta device (no weights needed). `layers` "all": every decoder layer."""
    if layers == "all":
        layers = sorted({int(m.group(1)) for path, _ in model.named_modules() if (m := re.search(r"\.layers\.(\d+)\.", path))})
    wanted_layers, wanted_modules = set(layers), set(modules)
    targets, model_layers = [], set()
    for path, module in model.named_modules():
        m = re.search(r"\.layers\.(\d+)\.", path)
        leaf = path.rsplit(".", 1)[-1]
        if m:
            model_layers.add(int(m.group(1)))
        if m and leaf in wanted_modules and int(m.group(1)) in wanted_layers and isinstance(module, torch.nn.Linear):
            targets.append(LoRATarget(path, int(m.group(1)), leaf, module.in_features, module.out_features))
    missing = sorted(wanted_layers - model_layers)
    if missing:
        has = f"{len(model_layers)} decoder layers, 0-{max(model_layers)}" if model_layers else "no decoder layers"
        raise AdapterError(f"lora.layers {missing} do not exist in {type(model).__name__}: it has {has}")
    if not targets:
        raise AdapterError(f"no Linear named {sorted(wanted_modules)} in layers {sorted(wanted_layers)} of {type(model).__name__}")
    found_layers = {t.layer for t in targets}
    missing = sorted(wanted_layers - found_layers)
    if missing:
        raise AdapterError(f"lora.layers {missing} of {type(model).__name__} hold no Linear named {sorted(wanted_modules)}")
    found_modules = {t.module for t in targets}
    if wanted_modules - found_modules:
        raise AdapterError(f"lora.modules {sorted(wanted_modules - found_modules)} not found in {type(model).__name__}")
    return targets


def init_centre(targets: list[LoRATarget], rank: int, seed: int, init_std: float | None = None) -> LoRATensors:
    """Generation 0's centre: A from a seeded init, B = 0 (so the centre equals the base model).

    A follows PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
    unless `init_std` asks for a Gaussian of that std. Drawn by the run's noise scheme
    (es_core/seeding.py), one stream per A, so the centre is bit-identical on every machine."""
    centre: LoRATensors = {}
    for t in targets:
        key, size = f"lora-init:{int(seed)}:{t.key_a}", rank * t.in_features
        if init_std is None:
            bound = 1.0 / math.sqrt(t.in_features)
            a = (torch.from_numpy(uniform_f32(key, size)) * 2 - 1) * bound
        else:
            a = torch.from_numpy(standard_normal_f32(key, size)) * init_std
        centre[t.key_a] = a.view(rank, t.in_features)
        centre[t.key_b] = torch.zeros(t.out_features, rank, dtype=torch.float32)
    return dict(sorted(centre.items()))


def spec_from_tensors(tensors: LoRATensors, lora_alpha: float) -> AdapterSpec:
    layers, modules, ranks = set(), set(), set()
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterError(f"tensor {key!r} is not a PEFT LoRA key")
        layers.add(int(m.group("layer")))
        modules.add(m.group("module"))
        ranks.add(value.shape[0] if m.group("factor") == "A" else value.shape[1])
    if len(ranks) != 1:
        raise AdapterError(f"mixed LoRA ranks {sorted(ranks)}: SGLang needs one rank per adapter")
    return AdapterSpec(ranks.pop(), float(lora_alpha), tuple(sorted(modules)), tuple(sorted(layers)))


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes `safetensors.torch.save(tensors, metadata={"format": "pt"})` writes (the same
    serializer, so the same artifact ids), through its numpy entry: 3x faster on the 420 small
    tensors of a rank-1 SmolLM2 adapter (9 vs 30 ms), the torch one converting each tensor in Python."""
    arrays = {k: v.detach().to("cpu").contiguous().numpy() for k, v in sorted(tensors.items())}
    return save_arrays(arrays, metadata={"format": "pt"})


def adapter_files(tensors: LoRATensors, spec: AdapterSpec) -> dict[str, bytes]:
    """A PEFT adapter folder's files (adapter_config.json, adapter_model.safetensors) as bytes."""
    return {
        ADAPTER_WEIGHTS: safetensors_bytes({k: v.to(torch.float32) for k, v in tensors.items()}),
        ADAPTER_CONFIG: adapter_config_bytes(spec),
    }


def adapter_config_bytes(spec: AdapterSpec) -> bytes:
    """adapter_config.json's bytes."""
    return (json.dumps(spec.peft_config(), indent=2, sort_keys=True) + "\n").encode()


def save_adapter(tensors: LoRATensors, folder: str | Path, spec: AdapterSpec) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(tensors, spec).items():
        (folder / name).write_bytes(data)
    return folder


def load_adapter(folder: str | Path) -> tuple[LoRATensors, AdapterSpec]:
    """Read a PEFT adapter folder; a missing or corrupt file is one AdapterError naming it."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise AdapterError(f"adapter file missing: {p}")
    config = read_adapter_config(config_path)
    tensors = read_tensors(weights_path)
    return tensors, checked_spec(tensors, config, weights_path, config_path)


def read_adapter_config(config_path: Path) -> dict:
    """An adapter_config.json that names a LoRA adapter (peft_type, r, lora_alpha), or one AdapterError."""
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter file missing: {config_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{config_path}: not a LoRA adapter config (needs peft_type LORA, r, lora_alpha)")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, by sorted key, or one AdapterError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in sorted(f.keys())}
    except Exception as exc:  # safetensors raises several types for a missing, truncated or garbled file
        raise AdapterError(f"{path}: unreadable safetensors ({exc})") from None


def checked_spec(tensors: LoRATensors, config: dict, weights_path: Path, config_path: Path) -> AdapterSpec:
    """The spec of an adapter's tensors, at its config's lora_alpha; its rank must be the config's r."""
    spec = spec_from_tensors(tensors, config["lora_alpha"])
    if spec.rank != int(config["r"]):
        raise AdapterError(f"{weights_path}: tensors have rank {spec.rank}, {config_path} says r={config['r']}")
    return spec


def check_adapter_matches(tensors: LoRATensors, targets: list[LoRATarget], rank: int) -> None:
    """Every key is a known target with the right shape (SGLang only warns on a mismatch)."""
    expected = {}
    for t in targets:
        expected[t.key_a] = (rank, t.in_features)
        expected[t.key_b] = (t.out_features, rank)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise AdapterError(f"adapter key {unknown[0]!r} matches no target module of the base model ({len(unknown)} such keys)")
    for key, value in tensors.items():
        if tuple(value.shape) != expected[key]:
            raise AdapterError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, the base model needs {expected[key]}")



def find_targets_in_folder(model_dir: str | Path, layers: list[int] | tuple[int, ...] | str, modules: list[str] | tuple[str, ...]) -> list[LoRATarget]:
    """Targets of a local HF model folder, from its config alone (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return find_targets(skeleton, layers, modules)
