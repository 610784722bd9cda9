"""The one settings object of an experiment: YAML file + `ES_` environment variables + `--set`.

Precedence, highest first: `--set key=value` overrides, `ES_*` environment variables (nested with
`__`, e.g. `ES_ES__SIGMA=0.01`), the YAML file, the defaults below. Structure (population size,
rank, layers, modules) and tunables (sigma, alpha) both live here; what changes per generation is
`es_core.es.ESState`, never settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

_ENV_PREFIX, _ENV_NESTING = "ES_", "__"  # as Settings.model_config reads the environment
DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A broken config: the message is one line naming the key and the file."""


# allow_inf_nan=False: every float setting is finite. An infinite learning rate or sigma ran to
# "completed" with a NaN centre, and JSON stored the value as null, so the run could never resume.
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(_Section):
    name: str = Field("smollm2-135m", description="Preset name (smollm2-135m, tiny-llama, qwen2.5-0.5b-random, ...), a local HF folder, or a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    allow_download: bool = Field(False, description="Let transformers reach the hub (off: HF_HUB_OFFLINE=1).")
    cache_dir: Path | None = Field(None, description="Where converted base models are kept (ES_MODEL__CACHE_DIR); None: <data_dir>/models.")


class LoRASettings(_Section):
    rank: int = Field(1, ge=1, description="LoRA rank r of every target module.")
    alpha: float | None = Field(None, gt=0, description="lora_alpha; scaling is alpha / rank. None means 2 * rank.")
    layers: list[int] | Literal["all"] = Field(default_factory=lambda: list(range(11)), description="Decoder layer indices that carry LoRA, or all (the default in weights space: every layer).")
    modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_MODULES), description="Linear module names that carry LoRA.")
    init_std: float | None = Field(None, gt=0, description="Std of A at generation 0; None: kaiming-uniform as PEFT does.")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_or_all(cls, value):
        if isinstance(value, str) and value != "all":
            raise ValueError("a list of layer indices, or all")
        return value

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


class ESSettings(_Section):
    population: int = Field(30, ge=2, description="Members N per generation.")
    sigma: float = Field(0.001, gt=0, description="Perturbation scale: member = theta + sigma * eps.")
    learning_rate: float = Field(0.0005, gt=0, description="alpha in theta += alpha * (1/N) * sum z_i eps_i.")
    antithetic: bool = Field(True, description="Members come in (+eps, -eps) pairs; N must be even.")
    fitness: Literal["mean_reward", "prompt_normalized"] = Field("mean_reward", description="A member's fitness: its mean reward over the prompts (the paper), or the mean over prompts of its reward z-scored against the other members' on that prompt (EGGROLL's per-prompt groups), so that prompt difficulty drops out.")
    shaping: Literal["zscore", "centered_rank"] = Field("zscore", description="Fitness shaping of the members' fitness into weights.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd: the paper's plain step; adam: Adam on the same gradient estimate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    perturb: Literal["both", "A", "B"] = Field("both", description="Which LoRA factors the noise moves (LoRA space).")
    space: Literal["lora", "weights"] = Field("lora", description="What ES searches. lora: the LoRA factors A and B (theta += alpha/N sum z_i eps_i over them). weights: the weights of every target Linear, each member a rank-noise_rank perturbation sigma * b_i a_i / sqrt(r) of them, the centre the accumulated change kept as a rank-centre_rank adapter (EGGROLL; README 'Weights-space ES').")
    noise_rank: int = Field(1, ge=1, le=64, description="Weights space: rank r of each member's perturbation.")
    centre_rank: int = Field(64, ge=1, le=1024, description="Weights space: rank R of the centre, the accumulated change of the weights kept as its top-R singular directions; a target whose min(out, in) <= R keeps all of it, exactly, in float32 (R = 576 at SmolLM2-135M: ES over the full weights).")
    sigma_scale: Literal["absolute", "weight_rms"] = Field("absolute", description="Weights space: sigma (and the step) in absolute units, or relative to each matrix's RMS (the base weights').")
    generations: int = Field(500, ge=0, description="ES iterations (0: only the warm start and the evaluations, a supervised baseline).")
    seed: int = Field(0, ge=0, description="Run seed: noise of member i in generation g comes from (seed, g, i).")
    members_per_prompt: int = Field(0, ge=0, description="0: every member on every problem of the generation (the paper). G > 0: EGGROLL's groups: consecutive members in groups of G (antithetic partners together), each group on its own share of the generation's problems (data.prompts_per_generation x G / population each), so a generation covers more problems for the same rows; prompt_normalized fitness then z-scores each problem within its group.")

    @model_validator(mode="after")
    def _even_population(self) -> "ESSettings":
        if self.antithetic and self.population % 2:
            raise ValueError(f"population must be even with antithetic pairs (got {self.population})")
        return self

    @model_validator(mode="after")
    def _whole_groups(self) -> "ESSettings":
        g = self.members_per_prompt
        if g and (g < 2 or self.population % g):
            raise ValueError(f"es.members_per_prompt {g} must be at least 2 and divide es.population {self.population}")
        if g and self.antithetic and g % 2:
            raise ValueError(f"es.members_per_prompt {g} must be even with antithetic pairs (partners see the same problems)")
        return self

    @model_validator(mode="after")
    def _space_settings(self) -> "ESSettings":
        if self.space == "weights":
            if self.optimizer != "sgd":
                raise ValueError("es.optimizer adam is LoRA space only: in weights space the step is the paper's (sgd), kept low-rank")
            if self.perturb != "both":
                raise ValueError("es.perturb picks LoRA factors: weights space perturbs the weights (leave it at both)")
        return self


class DataSettings(_Section):
    source: Literal["generated", "paper", "jsonl"] = Field("generated", description="generated: our seeded generator; paper: the paper's countdown.json at `path`; jsonl: our JSONL at `path`.")
    path: Path | None = Field(None, description="File for source paper/jsonl.")
    train_size: int = Field(200, ge=1, description="Training problems (the paper: the first 200).")
    heldout_size: int = Field(500, ge=1, description="Held-out problems, never trained on (the paper: the last 2,000).")
    generator_seed: int = Field(1234, description="Seed of the problem generator.")
    prompts_per_generation: int = Field(200, ge=1, description="Training prompts each member is scored on per generation (a rotating batch when < train_size).")
    train_problems: Literal["fixed", "fresh"] = Field("fixed", description="fixed: the train split (all, or a rotating window); fresh: prompts_per_generation newly generated problems every generation (never a held-out one), so the population cannot fit a fixed set.")

    @model_validator(mode="after")
    def _path_for_file_sources(self) -> "DataSettings":
        if self.source != "generated" and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class WarmStartSettings(_Section):
    """A supervised warm start: the base model fine-tuned (all weights) on generated problems with
    their known solutions, before ES. A small model that never answers right gives ES no signal."""

    steps: int = Field(0, ge=0, description="Optimizer steps (0: off, the paper's setting). A longer warm start with otherwise equal settings continues a shorter one.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate, constant after warmup_steps.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup of the learning rate.")
    batch_size: int = Field(128, ge=1, description="Problems per step (a fresh batch every step).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    seed: int = Field(0, ge=0, description="Seed of the warm start's own problem stream (never a held-out problem).")
    min_numbers: int = Field(3, ge=2, description="Numbers per problem, at least.")
    max_numbers: int = Field(4, ge=2, description="Numbers per problem, at most.")
    max_number: int = Field(99, ge=1, description="Largest number drawn.")
    max_target: int = Field(100, ge=1, description="Largest target.")
    keep_optimizer_state: bool = Field(True, description="Store the AdamW moments beside the model, so a longer warm start continues this one exactly.")

    @model_validator(mode="after")
    def _numbers_range(self) -> "WarmStartSettings":
        if self.max_numbers < self.min_numbers:
            raise ValueError(f"max_numbers {self.max_numbers} < min_numbers {self.min_numbers}")
        return self


class PromptSettings(_Section):
    style: Literal["chat", "raw"] = Field("chat", description="chat: the paper's messages through the tokenizer's chat template; raw: the paper's context string.")


class RewardSettings(_Section):
    kind: Literal["paper", "tinyzero"] = Field("paper", description="paper: 0.1*format + answer; tinyzero: 1.0 correct, 0.1 well-formed, else 0.")


class GenerationSettings(_Section):
    max_new_tokens: int = Field(1024, ge=1, description="Greedy decoding budget per completion.")
    max_batch_rows: int = Field(1024, ge=1, description="Most rows (member x prompt) decoded together; bounds KV-cache memory.")
    compile: bool = Field(True, description="Embedded engine on CUDA: static cache + torch.compile of the decode step.")
    lora_dtype: Literal["float32", "model"] = Field("float32", description="Embedded engine: the members' LoRA in float32 (exactly the member the update credits) or in the model's dtype (bf16 on CUDA: faster at rank > 2, 2.4x at rank 8 on the 0.5B shape, but the perturbation rounds, 5.7% off at sigma 0.001).")


class SGLangSettings(_Section):
    urls: list[str] = Field(default_factory=list, description="Running servers to attach to (also ES_SGLANG_URL, comma-separated). Empty: launch one.")
    python: str = Field("python", description="Interpreter that has sglang installed, used to launch the server.")
    host: str = "127.0.0.1"
    port: int = Field(30000, ge=1, le=65535)
    max_loras_per_batch: int | None = Field(None, ge=1, description="None: population + 1 (the base-model slot).")
    max_loaded_loras: int | None = Field(None, ge=1, description="None: 2 * population.")
    lora_backend: str = "csgmv"
    extra_args: list[str] = Field(default_factory=list, description="Passed through to sglang.launch_server.")
    startup_timeout_s: float = Field(900.0, gt=0)
    request_timeout_s: float = Field(1800.0, gt=0)
    unload_timeout_s: float = Field(60.0, gt=0)
    reload_mode: Literal["auto", "dynamic", "restart"] = Field("auto", description="dynamic: /load_lora_adapter; restart: relaunch with --lora-paths; auto: dynamic, falling back to restart.")
    requests_per_server: int = Field(32, ge=1, description="Concurrent /generate requests per server (one per member in flight): about population / servers lets SGLang batch the whole population.")


class BackendSettings(_Section):
    kind: Literal["embedded", "sglang"] = "embedded"
    sglang: SGLangSettings = Field(default_factory=SGLangSettings)


class RunnerSettings(_Section):
    """Where the embedded engines run: in this process (local), or one per GPU of a Ray cluster
    (es_core/backends/ray_engines.py). Where, not what: outside the run's fingerprint, so a run
    started locally can be resumed on a cluster."""

    kind: Literal["local", "ray"] = Field("local", description="local: one embedded engine in this process; ray: one per GPU (or per gpus_per_engine) of a Ray cluster, the population sharded over them.")
    address: str | None = Field(None, description="An existing Ray cluster: host:port of its head (this machine a node of it: `ray start --address`), auto (the one `ray start` made here), or ray://host:10001 (Ray Client, needs ray[client]); None: a new local one of this machine, for the run.")
    gpus_per_engine: float = Field(1.0, ge=0, le=1, description="GPUs each engine reserves: 1, one engine per GPU; 0.5, two share a GPU; 0, CPU engines (tests; then give engines).")
    engines: int | None = Field(None, ge=1, description="Engines to start; None: as many as the cluster's GPUs hold at gpus_per_engine.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to reach runner.address before failing with one line.")
    startup_timeout_s: float = Field(900.0, gt=0, description="Seconds for the engines to start and load the model (at the first call, and again when Ray restarts a lost one).")
    shard_timeout_s: float = Field(1800.0, gt=0, description="Seconds one engine's shard of a generation may take; then the engine is killed (Ray restarts it) and the shard sent to another.")
    shard_attempts: int = Field(3, ge=1, description="Tries of one shard (an engine died or timed out) before the generation fails.")


class EvalSetSettings(_Section):
    """A further held-out set, e.g. the paper's 2,000 test problems (read at run time, never copied)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="The `split` of its rows in the evals table (not 'train' or 'heldout').")
    source: Literal["paper", "jsonl"] = Field(description="paper: the last `size` items of the paper's countdown.json; jsonl: the records of our JSONL (their split ignored).")
    path: Path = Field(description="The file, read at run time.")
    size: int = Field(2000, ge=1, description="How many problems (the paper's test split: the last 2,000).")

    @model_validator(mode="after")
    def _free_name(self) -> "EvalSetSettings":
        if self.name in ("train", "heldout"):
            raise ValueError(f"an evaluation set cannot be named {self.name!r}")
        return self


class EvalSettings(_Section):
    every: int = Field(10, ge=0, description="Evaluate the centre on the held-out split every K generations (0: only at the end).")
    base_model: bool = Field(True, description="Evaluate the base model on the held-out split at generation 0.")
    warm_start: bool = Field(True, description="Evaluate the warm-started model (when warm_start.steps > 0) at generation 0.")
    sets: list[EvalSetSettings] = Field(default_factory=list, description="Further held-out sets, evaluated beside the held-out split whenever it is.")

    @model_validator(mode="after")
    def _unique_names(self) -> "EvalSettings":
        names = [s.name for s in self.sets]
        if len(names) != len(set(names)):
            raise ValueError(f"evaluation set names repeat: {names}")
        return self


class StoreSettings(_Section):
    """How the artifact store keeps a run's centres. Storage, not results: outside the run's
    fingerprint, so a running run can be resumed with another policy (artifacts/retention.py)."""

    keep_centre_every: int = Field(0, ge=0, description="Keep every K-th centre on disk (the keyframes: generations that are multiples of K) and delete the others once the run has moved past them, each rebuilt exactly on demand from its nearest kept ancestor and the ledger (one update per generation, every hash checked); the run's latest and first centre and every centre a held-out evaluation names are always kept. 0 or 1: keep every centre.")


class Settings(BaseSettings):
    """A whole experiment. Every field has a default; a YAML file overrides a subset."""

    model_config = SettingsConfigDict(env_prefix=_ENV_PREFIX, env_nested_delimiter=_ENV_NESTING, extra="forbid", validate_assignment=True,
                                      allow_inf_nan=False)

    run_name: str = Field("countdown-es", description="Human label stored on the run row.")
    data_dir: Path | None = Field(None, description="Ledger + artifacts root (ES_DATA_DIR); None: ./runs.")
    sglang_url: str | None = Field(None, description="ES_SGLANG_URL: running SGLang server(s), comma-separated; attach instead of launching.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoRASettings = Field(default_factory=LoRASettings)
    es: ESSettings = Field(default_factory=ESSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    warm_start: WarmStartSettings = Field(default_factory=WarmStartSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # The values given, alone: `settings_from_dict` layers the file, the ES_* variables and the
        # overrides itself, in that order, so that nothing but its arguments says what a load reads.
        return (init_settings,)

    @model_validator(mode="after")
    def _ray_runs_embedded_engines(self) -> "Settings":
        if self.runner.kind == "ray" and self.backend.kind != "embedded":
            raise ValueError(f"runner.kind ray runs embedded engines; backend.kind {self.backend.kind} has its own servers (list them in ES_SGLANG_URL)")
        return self

    @model_validator(mode="after")
    def _weights_space_targets_every_layer(self) -> "Settings":
        # the paper perturbs every weight: in weights space lora.layers, unless given, is every layer
        if self.es.space == "weights" and "layers" not in self.lora.model_fields_set:
            self.lora = self.lora.model_copy(update={"layers": "all"})
        return self

    @model_validator(mode="after")
    def _problems_split_into_groups(self) -> "Settings":
        groups = self.member_groups
        if groups > 1 and self.data.prompts_per_generation % groups:
            raise ValueError(f"data.prompts_per_generation {self.data.prompts_per_generation} must split evenly over the "
                             f"{groups} groups of es.members_per_prompt {self.es.members_per_prompt} (population {self.es.population})")
        return self

    @property
    def member_groups(self) -> int:
        """How many groups of members share out a generation's problems (1: all see all)."""
        return self.es.population // self.es.members_per_prompt if self.es.members_per_prompt else 1

    @property
    def problems_per_member(self) -> int:
        return self.data.prompts_per_generation // self.member_groups

    @property
    def rows_per_generation(self) -> int:
        """Completions a generation decodes: every member on its problems."""
        return self.es.population * self.problems_per_member

    @property
    def member_rank(self) -> int:
        """The rank of a member's own slot in the engine: lora.rank, or es.noise_rank in weights space."""
        return self.es.noise_rank if self.es.space == "weights" else self.lora.rank

    @property
    def adapter_rank(self) -> int:
        """The rank of a member's adapter file: lora.rank, or centre_rank + noise_rank in weights space."""
        return self.es.centre_rank + self.es.noise_rank if self.es.space == "weights" else self.lora.rank

    @property
    def sglang_urls(self) -> list[str]:
        from_env = [u.strip().rstrip("/") for u in (self.sglang_url or "").split(",") if u.strip()]
        return from_env or [u.rstrip("/") for u in self.backend.sglang.urls]

    def fingerprint(self) -> str:
        """sha256 of everything that changes results (not where they are written)."""
        return settings_hash(self)


def settings_hash(settings: Settings) -> str:
    """Identity of a run's results: not where they are written or decoded (runner), how long the
    run goes on, how often it is evaluated, or which centres its store keeps (so a finished run can be extended with `resume --set es.generations=N`).
    The evaluation sets count: fresh training problems and the warm start avoid their problems.
    Values at their defaults are left out, so a setting added later with a default that keeps the
    old behaviour leaves the hash of a recorded run (and its resume) as it was."""
    data = settings.model_dump(mode="json", exclude_defaults=True, exclude={
        "data_dir": True, "run_name": True, "sglang_url": True, "eval": {"every", "base_model", "warm_start"},
        "es": {"generations"}, "model": {"cache_dir"}, "runner": True, "store": True,
    })
    for evaluation_set in data.get("eval", {}).get("sets", []):
        evaluation_set.pop("path", None)  # where a machine keeps the file is no part of a run's identity
    data = {k: v for k, v in data.items() if v != {}}  # a section left empty by the exclusions
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ES_ variables of es-countdown's own that are not settings (tests, tools, the model wheel's path).
NOT_SETTINGS = frozenset({"ES_DEBUG", "ES_SMOLLM2_GGUF", "ES_SHARED_DIR", "ES_PROJECT_DIR", "ES_SKIP_CHROMIUM", "ES_CHROMIUM",
                          "ES_RECORD_GOLDEN", "ES_SGLANG_BASE_MODEL", "ES_SGLANG_MODEL", "ES_DATA_HOST_DIR", "ES_MODEL_CACHE"})


def environment_values() -> dict[str, Any]:
    """The settings the ES_* variables give, nested, as pydantic-settings reads them; a variable
    that looks like a mistyped setting is a one-line ConfigError (pydantic-settings ignores it)."""
    check_environment_names()
    return EnvSettingsSource(Settings)()


def _setting_names(model: type[BaseModel] = None, prefix: str = "") -> dict[str, str]:
    """{name without '_' and '.': dotted key} of every section and setting."""
    out = {}
    for name, field in (model or Settings).model_fields.items():
        key = f"{prefix}{name}"
        out[key.replace(".", "").replace("_", "")] = key
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(_setting_names(annotation, f"{key}."))
    return out


def check_environment_names(environ: dict[str, str] | None = None) -> None:
    """pydantic-settings reads ES_<FIELD> and ES_<SECTION>__<KEY> and silently ignores any other
    ES_ name: ES_ES_SIGMA=0.5 (one underscore) changed nothing, without a word. A name whose
    first part is no setting, but which spells one (ignoring underscores) or starts with a section's
    name, is refused naming the variable and what it should be. Other ES_ names (ES_JAVA_OPTS of
    Elasticsearch, our own NOT_SETTINGS) are left alone."""
    environ = os.environ if environ is None else environ
    names = _setting_names()
    top = set(Settings.model_fields)
    sections = sorted((n for n, f in Settings.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)),
                      key=len, reverse=True)
    for variable in sorted(environ):
        if not variable.upper().startswith(_ENV_PREFIX) or variable.upper() in NOT_SETTINGS:
            continue
        rest = variable[len(_ENV_PREFIX):].lower()
        if rest.split(_ENV_NESTING)[0] in top:
            continue  # a setting or a section (a wrong key inside a section is pydantic's error, naming it)
        meant = names.get(rest.replace("_", ""))
        if meant is not None:
            spelled = _ENV_PREFIX + meant.replace(".", _ENV_NESTING).upper()
            raise ConfigError(f"environment variable {variable} is not a setting: did you mean {spelled} (a section and its key "
                              f"are joined by two underscores)?")
        section = next((s for s in sections if rest.replace("_", "").startswith(s.replace("_", ""))), None)
        if section is not None:
            raise ConfigError(f"environment variable {variable} is not a setting: a key of section {section} is set as "
                              f"{_ENV_PREFIX}{section.upper()}{_ENV_NESTING}KEY (two underscores)")


def merged(base: dict[str, Any], *updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with each update laid over it, section by section (later ones win)."""
    out = dict(base)
    for update in updates:
        for key, value in update.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`a.b=v` strings into a nested dict; values are parsed as YAML (numbers, lists, bools)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def load_settings(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Read a YAML experiment, apply env vars and `--set` overrides; one-line ConfigError if broken."""
    where = str(path) if path is not None else "<defaults>"
    yaml_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            yaml_data = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(yaml_data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return settings_from_dict(yaml_data, overrides, where)


def settings_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), where: str = "<settings>") -> Settings:
    """Settings from a mapping (a YAML file's, or a run's stored config) under env and overrides."""
    try:
        settings = Settings(**merged(data, environment_values(), parse_overrides(overrides)))
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, overrides, data, where)) from None
    if settings.data_dir is None:
        settings.data_dir = Path("runs").resolve()
    return settings


def _first_error(exc: ValidationError, overrides=(), data: dict[str, Any] | None = None, where: str = "<settings>") -> str:
    """One line: where the value came from, the key, what is wrong with it."""
    errors = exc.errors()
    first = errors[0]
    path = _field_path(first["loc"])
    loc = ".".join(path) or "<root>"
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and first["type"] != "missing" else ""
    here = tuple(path)
    # a union's branches fail at one place (lora.layers: as a list at index 1, as "all" at the list)
    others = len({p for e in errors if (p := tuple(_field_path(e["loc"])))[:len(here)] != here and here[:len(p)] != p})
    more = f" [+{others} more]" if others > 0 else ""
    return f"{_origin(path, overrides, data or {}, where)}: {loc}: {first['msg']}{shown}{more}"


def _field_path(loc) -> list[str]:
    """An error's location as keys and indices, without pydantic's union branch tags (`list[int]`,
    `literal['all']`: lora.layers is a list or "all")."""
    return [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or "'" in p))]


def _origin(loc: list[str], overrides, data: dict[str, Any], where: str) -> str:
    """Which source gave the value at `loc`: the first, by precedence (--set, ES_ variable, file),
    that sets it or a section holding it; for an error about a whole section (a model validator's,
    such as an odd population), every source that sets something inside it; else `where`."""
    sources: list[tuple[str, list[str]]] = []  # (name, key path), highest precedence first
    for item in reversed(list(overrides)):  # a later --set of a key wins
        key = item.split("=", 1)[0].strip()
        sources.append((f"--set {item}", key.split(".")))
    for name in sorted(os.environ):
        if name.upper().startswith(_ENV_PREFIX):  # pydantic-settings reads them case-insensitively
            sources.append((f"environment variable {name}", name[len(_ENV_PREFIX):].lower().split(_ENV_NESTING)))
    sources += [(where, path) for path in _key_paths(data)]
    target = [part.lower() for part in loc]
    for name, path in sources:
        if path == target[: len(path)]:  # the key itself, or a section holding it
            return name
    inside = list(dict.fromkeys(name for name, path in sources if path[: len(target)] == target))
    return " and ".join(inside) if inside else where


def _key_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """The key path of every value a mapping sets (not its sections): {"es": {"sigma": 1}} -> [es, sigma]."""
    paths = []
    for key, value in data.items():
        path = (*prefix, str(key).lower())
        paths += _key_paths(value, path) if isinstance(value, dict) and value else [list(path)]
    return paths
