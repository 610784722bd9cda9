"""What a run's settings ask of the ledger, the model and the machine, checked from the settings and
the model's config alone (no weights loaded, no CUDA touched): the CLI calls these before any work
(flows/preflight.py gathers the facts: the config, the memory the machine has).

- Integers the ledger stores must fit its columns (INTEGER: 32-bit, BIGINT: 64-bit).
- lora.layers and lora.modules must exist in the model.
- The estimated peak memory of the run must fit what the device has free.
- What its generations write (centres, members, completions) must fit the data dir's free disk
  (an exact weights-space centre of SmolLM2 is 425 MB a generation, its 512 members' records 6 MB;
  on SGLang, beside them, the members joined to the centre while one generation decodes: ~360 GB).

The estimate follows the engine's own allocations (es_core/engine/generate.py `_Session`,
population_lora.py, model.py `Decoder.from_hf`) and the warm start's (es_core/warm_start.py); it
is an upper bound on each part, checked against measured peaks (README, "Bad input").
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from es_core.keyframes import keeps_every_centre
from es_core.settings import ConfigError, Settings

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


# (setting, its value, the largest the ledger stores, where): generation, member and token counts
# are INTEGER columns, seeds BIGINT (artifacts/ledger.py).
def _ledger_integers(settings: Settings) -> list[tuple[str, int, int, str]]:
    return [
        ("es.seed", settings.es.seed, INT64_MAX, "runs.seed BIGINT"),
        ("es.generations", settings.es.generations, INT32_MAX, "generations.generation INTEGER"),
        ("es.population", settings.es.population, INT32_MAX, "members.member INTEGER"),
        ("warm_start.steps", settings.warm_start.steps, INT32_MAX, "warm_starts.steps INTEGER"),
        ("generation.max_new_tokens", settings.generation.max_new_tokens, INT32_MAX, "samples.completion_tokens INTEGER"),
        ("data.heldout_size", settings.data.heldout_size, INT32_MAX, "evals.n INTEGER"),
    ]


def check_ledger_integers(settings: Settings) -> None:
    """A setting the ledger could not store stops here, not at the run's first write."""
    for key, value, largest, column in _ledger_integers(settings):
        if value > largest:
            raise ConfigError(f"{key} {value} is above {largest:,}, the largest the ledger stores ({column})")


# --- the model's shape, from its config ----------------------------------------------------------

# The Linear modules of a decoder layer, by model_type, as transformers names them (what
# es_core.lora.find_targets finds on a built model).
LAYER_LINEARS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict, where: str) -> "ModelShape":
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                model_type=str(config.get("model_type", "")), layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                intermediate=int(config["intermediate_size"]), heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads), vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=config.get("model_type") == "qwen2",
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: the model's config has no {exc.args[0]}") from None
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ConfigError(f"{where}: the model's config is not a decoder's ({exc})") from None

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of a layer, by module name."""
        d, i, hd = self.hidden, self.intermediate, self.head_dim
        return {"q_proj": (d, self.heads * hd), "k_proj": (d, self.kv_heads * hd), "v_proj": (d, self.kv_heads * hd),
                "o_proj": (self.heads * hd, d), "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden + (self.qkv_out if self.qkv_bias else 0)
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def check_lora_targets(shape: ModelShape, layers: list[int], modules: list[str], where: str) -> None:
    """lora.layers within the model's layers, lora.modules among its layers' Linears."""
    layers = range(shape.layers) if layers == "all" else layers
    bad_layers = sorted(i for i in set(layers) if not 0 <= i < shape.layers)
    if bad_layers:
        raise ConfigError(f"lora.layers {bad_layers} are not layers of {where}: it has {shape.layers} (0..{shape.layers - 1})")
    known = LAYER_LINEARS.get(shape.model_type)
    if known is None:
        return  # another architecture: find_targets checks it on the built model
    unknown = sorted(set(modules) - set(known))
    if unknown:
        raise ConfigError(f"lora.modules {unknown} are not Linears of {where}'s layers ({', '.join(known)})")


def read_gguf_config(path: Path) -> dict:
    """A transformers-style config of a GGUF file, from its header alone (gguf's own reader maps
    the whole file and took 16 s on SmolLM2's 100 MB). Keys: GGUF spec, `<arch>.block_count` etc."""
    with open(path, "rb") as f:
        reader = _GGUFHeader(f)
        meta = reader.metadata()
        tensors = reader.tensor_names(meta["_tensor_count"])
    arch = meta.get("general.architecture", "")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = a("attention.head_count")
    vocab = a("vocab_size") or meta.get("_tokens")
    return {
        "model_type": arch, "num_hidden_layers": a("block_count"), "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"), "num_attention_heads": heads, "num_key_value_heads": a("attention.head_count_kv", heads),
        "head_dim": a("attention.key_length") or a("rope.dimension_count"), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors, "max_position_embeddings": a("context_length"),
    }


class _GGUFHeader:
    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def __init__(self, f):
        self.f = f
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        self.version = self._u(4)

    def _u(self, size: int) -> int:
        return int.from_bytes(self.f.read(size), "little")

    def _string(self) -> str:
        return self.f.read(self._u(8)).decode("utf-8", "replace")

    def _value(self, kind: int):
        if kind == 8:
            return self._string()
        if kind == 9:
            item, count = self._u(4), self._u(8)
            if item == 8:  # a string array (the vocabulary): skipped, its length kept
                for _ in range(count):
                    self.f.seek(self._u(8), 1)
                return count
            fmt = self._SCALARS[item]
            self.f.seek(struct.calcsize(fmt) * count, 1)
            return count
        fmt = self._SCALARS[kind]
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def metadata(self) -> dict:
        tensor_count, kv_count = self._u(8), self._u(8)
        meta = {"_tensor_count": tensor_count}
        for _ in range(kv_count):
            key = self._string()
            meta[key] = self._value(self._u(4))
        meta["_tokens"] = meta.get("tokenizer.ggml.tokens")
        return meta

    def tensor_names(self, count: int) -> set[str]:
        names = set()
        for _ in range(count):
            names.add(self._string())
            dims = self._u(4)
            self.f.seek(8 * dims + 4 + 8, 1)  # dims, type, offset
        return names


# --- peak memory -----------------------------------------------------------------------------------

GiB = 2**30
# Measured once (README, "Bad input"): the RSS of the CLI process with torch, transformers and
# Prefect's client imported, at the flow's first task (0.9 GB on CPU), and Prefect's temporary
# server, a child process (0.25 GB).
PROCESS_BYTES = int(1.0 * GiB)
PREFECT_SERVER_BYTES = int(0.3 * GiB)
# The prompt's tokens: the fixed text of the paper's prompt, in SmolLM2's tokenizer 118 (raw) and
# 132 (chat) tokens for a problem of two one-digit numbers, with a margin for other templates;
# every further character of the numbers and target adds at most one token (digits, spaces).
PROMPT_TOKENS = {"raw": 128, "chat": 160}
WARM_START_COMPLETION_TOKENS = 48  # " (a + b) * c - d = t </think>\n<answer> ... </answer>" + EOS: 30-40 tokens
PROBLEM_BYTES = 1024  # a Problem in memory, with its id in the generator's seen set: 461 bytes measured (50,000 generated)
PREFILL_TOKENS = 32768  # PopulationEngine's prefill_tokens default
CACHE_BUCKET = 64  # PopulationEngine's bucket default


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes, by what takes them
    settings: dict[str, str]  # the settings that size each part, by part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self) -> str:
        return max(self.parts, key=self.parts.__getitem__)

    def describe(self) -> str:
        return ", ".join(f"{name} {size / GiB:.1f}" for name, size in sorted(self.parts.items(), key=lambda kv: -kv[1]) if size >= 0.05 * GiB)


def _layers(settings: Settings, shape: ModelShape):
    """The layers lora.layers names in a model of this shape."""
    return range(shape.layers) if settings.lora.layers == "all" else set(settings.lora.layers)


def factor_bytes_per_rank(settings: Settings, shape: ModelShape) -> int:
    """Bytes of one rank of LoRA factors over the run's targets, float32: A [r, in] + B [out, r] of
    every lora.modules Linear of every lora.layers layer (a member's or a centre's file, on the host)."""
    lora, linears = settings.lora, shape.linears()
    layers = len(_layers(settings, shape))
    return layers * sum(sum(linears[m]) * 4 for m in lora.modules if m in linears)


def chunk_layout(members: int, prompts: int, max_rows: int) -> tuple[int, int]:
    """(rows, member groups) of the largest chunk es_core.engine.generate.plan_chunks makes."""
    if members * prompts <= max_rows:
        return members * prompts, members
    if prompts <= max_rows:
        per = max_rows // prompts
        return per * prompts, per
    return max_rows, 1


def estimate_peak_memory(settings: Settings, shape: ModelShape, model_bytes: int, longest_problem_chars: int,
                         prefect_server: bool, on_cuda: bool) -> MemoryEstimate:
    """An upper bound of the run's peak memory on its device (bytes, by part). `model_bytes`: bytes
    per weight in the model's dtype; `longest_problem_chars`: the most characters the numbers and
    target of one problem print as beyond two one-digit numbers (see PROMPT_TOKENS)."""
    g, lora = settings.generation, settings.lora
    engines = 2 if settings.warm_start.steps and settings.eval.base_model else 1  # the base model's, opened beside the warm start's
    params = shape.parameters()
    # Decoder.from_hf concatenates q/k/v and gate/up: copies, held beside the HF model while it is built
    fused_copies = shape.layers * shape.hidden * (shape.qkv_out + 2 * shape.intermediate)
    weights = engines * params * model_bytes + fused_copies * model_bytes

    prompt = PROMPT_TOKENS[settings.prompt.style] + longest_problem_chars
    cache_len = -(-(prompt + g.max_new_tokens - 1) // CACHE_BUCKET) * CACHE_BUCKET
    batches = [(settings.es.population, settings.problems_per_member), (1, settings.data.heldout_size)]
    batches += [(1, s.size) for s in settings.eval.sets]
    rows = max(chunk_layout(m, p, g.max_batch_rows)[0] for m, p in batches)
    groups = max(chunk_layout(m, p, g.max_batch_rows)[1] for m, p in batches)
    kv = rows * 2 * shape.layers * shape.kv_heads * cache_len * shape.head_dim * model_bytes
    kv += rows * cache_len + rows * g.max_new_tokens * 8  # the valid-slot mask, the output tokens

    # LoRA slots, float32, per member group and fused Linear: A [k*r, in], B block-diagonal [out, k*r]
    linears = shape.linears()
    fused = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
    # (weights space: each member's own rank es.noise_rank, and one slot of the centre's rank for all rows)
    rank, layers = settings.member_rank, len(_layers(settings, shape))
    per_rank = 0
    for parts in fused.values():
        k = sum(1 for m in parts if m in lora.modules)
        if k:
            d_in, d_out = linears[parts[0]][0], sum(linears[m][1] for m in parts)
            per_rank += k * (d_in + d_out) * 4
    slots = groups * layers * rank * per_rank
    # the population on the host: members, their noise and the centre, twice (the look-ahead prepares the next)
    member = rank * factor_bytes_per_rank(settings, shape)
    population = 2 * (2 * settings.es.population + 1) * member
    if settings.es.space == "weights":
        centre = settings.es.centre_rank * factor_bytes_per_rank(settings, shape)
        slots += layers * settings.es.centre_rank * per_rank
        population += 4 * centre  # the centre, its float64 re-factorisation, the next one

    # activations: the prefill of up to PREFILL_TOKENS tokens a layer at a time (attention scores
    # in float32 as SDPA's math path holds them), and the decode step's logits over the vocabulary
    per_prompt_rows = max(1, rows // max(groups, 1))
    prefill_rows = min(rows, max(1, PREFILL_TOKENS // (per_prompt_rows * prompt)) * per_prompt_rows)
    tokens = prefill_rows * prompt
    prefill = tokens * (6 * shape.hidden + 2 * shape.qkv_out + 3 * shape.intermediate) * model_bytes
    prefill += prefill_rows * shape.heads * prompt * prompt * (4 * 2 + 1)
    decode = rows * (shape.vocab * 4 + shape.heads * cache_len * 4 + (3 * shape.intermediate + 6 * shape.hidden) * model_bytes)
    activations = max(prefill, decode)

    # the problems held for the whole run (ledger rows and prompts of them come and go)
    problems = PROBLEM_BYTES * (settings.data.train_size + settings.data.heldout_size + sum(s.size for s in settings.eval.sets))
    parts = {"model weights": weights, "KV cache": kv, "LoRA slots": slots, "population": population, "activations": activations,
             "problems": problems}
    sized = {
        "model weights": "model.name or model.dtype",
        "KV cache": f"generation.max_batch_rows ({g.max_batch_rows}) or generation.max_new_tokens ({g.max_new_tokens})",
        "LoRA slots": f"lora.rank ({lora.rank}), es.population ({settings.es.population}) or generation.max_batch_rows ({g.max_batch_rows})",
        "population": f"es.population ({settings.es.population}) or lora.rank ({lora.rank})",
        "activations": f"generation.max_batch_rows ({g.max_batch_rows})",
        "problems": f"data.train_size ({settings.data.train_size}) or data.heldout_size ({settings.data.heldout_size})",
    }
    if settings.warm_start.steps:
        # AdamW on every weight in float32: weights, gradients and two moments; the batch's
        # activations kept for the backward pass, and the logits three times (logits, the loss's
        # log-softmax, its gradient)
        w = settings.warm_start
        wtokens = w.batch_size * (prompt + WARM_START_COMPLETION_TOKENS)
        saved = wtokens * shape.layers * (10 * shape.hidden + 2 * shape.qkv_out + 4 * shape.intermediate) * 4
        saved += w.batch_size * shape.layers * shape.heads * (prompt + WARM_START_COMPLETION_TOKENS) ** 2 * 4
        warm = 16 * params + saved + 3 * wtokens * shape.vocab * 4
        if warm > sum(parts.values()) - problems:  # the warm start ends before ES starts: the larger phase is the peak
            parts = {"warm start": warm, "problems": problems}
            sized = {"warm start": f"warm_start.batch_size ({w.batch_size})", "problems": sized["problems"]}
    if not on_cuda:
        parts["process"] = PROCESS_BYTES + (PREFECT_SERVER_BYTES if prefect_server else 0)
        sized["process"] = "nothing: python, torch and Prefect themselves"
    return MemoryEstimate(parts, sized)


@dataclass(frozen=True)
class DiskEstimate:
    """What a run writes to its data dir, in bytes on disk: per generation (its centre, its members'
    files, their completions in the ledger) and once (the base and warm-start models, and the PEFT
    folder a held-out evaluation builds of a centre stored without its padding, while it lasts, for
    a backend that loads files), and
    `served`, the scratch store of one generation's members as a backend that loads files gets them
    in weights space (tasks/members.py `GenerationMembers.serving`: deleted after each generation)."""

    centre: int
    members: int
    completions: int
    once: int
    generations: int
    served: int = 0
    centres_kept: int | None = None  # with store.keep_centre_every: how many of the generations' centres stay on disk at most

    @property
    def per_generation(self) -> int:
        return self.centre + self.members + self.completions

    @property
    def total(self) -> int:
        # the scratch stores come and go, one at a time: their peak, once, beside everything kept
        kept = self.generations if self.centres_kept is None else self.centres_kept
        return self.once + self.served + self.generations * (self.members + self.completions) + kept * self.centre


def centres_kept(generations: int, keep_every: int, eval_every: int) -> int | None:
    """At most how many of `generations` new centres stay on disk with store.keep_centre_every K
    (artifacts/retention.py; None: every one): the keyframes, every K-th, and the evaluated
    centres, every eval.every-th (the union: their common multiples once), plus 3 for a run
    resumed off the grid of both, its latest and the next one written before the commit that
    thins the one before it."""
    if keeps_every_centre(keep_every):
        return None
    keyframes = generations // keep_every
    if eval_every > 0:
        keyframes += generations // eval_every - generations // math.lcm(keep_every, eval_every)
    return min(generations, keyframes + 3)


BLOCK = 4096  # the file system's allocation unit (ext4's): a small file, a folder, a manifest each take one
SAFETENSORS_ENTRY_BYTES = 256  # a tensor's entry in a safetensors header: its key (~70 characters at SmolLM2), dtype, shape, offsets
CONFIG_BYTES = 1024  # adapter_config.json (~550 bytes), es_state.json (~20)
# a weights-space member's record (weights_space.MemberRecord): ~220 bytes of ids, seed, sign and
# sigma, and with es.sigma_scale weight_rms a float of at most 24 characters per target
RECORD_BYTES, RECORD_BYTES_PER_SCALE = 320, 25


def artifact_disk_bytes(*file_bytes: int) -> int:
    """What an artifact of files of these sizes takes on disk: each file in whole blocks, its folder
    and its manifest (a line a file) a block each."""
    return sum(-(-n // BLOCK) * BLOCK for n in file_bytes) + 2 * BLOCK


def safetensors_file_bytes(data: int, tensors: int) -> int:
    """A safetensors file of `tensors` tensors holding `data` bytes: the data and its header."""
    return data + (tensors + 1) * SAFETENSORS_ENTRY_BYTES


def centre_tensor_bytes(settings: Settings, shape: ModelShape, rank: int, exact: bool) -> tuple[int, int]:
    """(bytes, tensors) of a centre at `rank` over the run's targets, float32: a target whose
    min(out, in) is at most `rank` as its change alone [out, in] when `exact` (a weights-space centre
    as artifacts/checkpoints.py stores it), else its factors A [r, in] and B [out, r]."""
    lora, linears, layers = settings.lora, shape.linears(), len(_layers(settings, shape))
    size = tensors = 0
    for module in lora.modules:
        if module in linears:
            d_in, d_out = linears[module]
            whole = exact and min(d_in, d_out) <= rank
            size += layers * 4 * (d_in * d_out if whole else rank * (d_in + d_out))
            tensors += layers * (1 if whole else 2)
    return size, tensors


def estimate_run_disk(settings: Settings, shape: ModelShape, generations: int) -> DiskEstimate:
    """An upper bound of what `generations` more generations of the run write, on disk (artifacts are
    float32 safetensors; weights space: the centre at es.centre_rank, its exact targets as their
    change alone, each member a record, and with a backend that loads files (SGLang) the peak of the
    scratch store it decodes a generation's members from, each joined to the centre at rank R + r;
    LoRA space: centre and members adapters at lora.rank, the centre with Adam's two moments)."""
    from es_core.backends import LOADS_ADAPTER_FILES, backend_kind

    lora, es = settings.lora, settings.es
    served = 0
    once = shape.parameters() * 2 * (2 if settings.warm_start.steps else 1)  # the converted base model, the warm start's
    completions = settings.rows_per_generation * (4 * settings.generation.max_new_tokens + 200)
    if es.space == "weights":
        stored, tensors = centre_tensor_bytes(settings, shape, es.centre_rank, exact=True)
        centre = artifact_disk_bytes(safetensors_file_bytes(stored, tensors), CONFIG_BYTES, CONFIG_BYTES)
        scales = len(_layers(settings, shape)) * sum(1 for m in lora.modules if m in shape.linears())  # one a target
        record = RECORD_BYTES + (RECORD_BYTES_PER_SCALE * scales if es.sigma_scale != "absolute" else 0)
        members = es.population * artifact_disk_bytes(record)
        peft, peft_tensors = centre_tensor_bytes(settings, shape, es.centre_rank, exact=False)
        # a held-out evaluation's PEFT folder of the centre, while it decodes, for a backend that loads
        # files (the embedded engine takes the centre's tensors: tasks/evaluate.py)
        if backend_kind(settings) != "embedded" and (peft, peft_tensors) != (stored, tensors):
            once += artifact_disk_bytes(safetensors_file_bytes(peft, peft_tensors), CONFIG_BYTES)
        if backend_kind(settings) in LOADS_ADAPTER_FILES and generations > 0:
            # every member as one PEFT folder at R + r, every target as factors (the centre's exact
            # targets padded to R as it decodes them); the scratch store's root, tmp and shard folders
            joined, joined_tensors = centre_tensor_bytes(settings, shape, settings.adapter_rank, exact=False)
            served = es.population * artifact_disk_bytes(safetensors_file_bytes(joined, joined_tensors), CONFIG_BYTES)
            served += (2 + min(es.population, 256)) * BLOCK
    else:
        data, tensors = centre_tensor_bytes(settings, shape, lora.rank, exact=False)
        adapter = safetensors_file_bytes(data, tensors)
        moments = [safetensors_file_bytes(2 * data + 8, 2 * tensors + 1)] if es.optimizer == "adam" else []
        centre = artifact_disk_bytes(adapter, CONFIG_BYTES, CONFIG_BYTES, *moments)
        members = es.population * artifact_disk_bytes(adapter, CONFIG_BYTES)
    kept = centres_kept(max(0, generations), settings.store.keep_centre_every, settings.eval.every)
    return DiskEstimate(centre, members, completions, once, max(0, generations), served, kept)


def check_disk(estimate: DiskEstimate, free: int, where: str) -> None:
    if estimate.total <= free:
        return
    MiB = 2**20
    served = (f"; and {estimate.served / GiB:.1f} GiB while a generation decodes: its members joined to their centre for SGLang, "
              f"deleted after it") if estimate.served else ""
    lower = "es.centre_rank, lora.rank or es.population" if estimate.served else "es.centre_rank or lora.rank"
    kept = f"; {estimate.centres_kept} of the {estimate.generations} centres kept (store.keep_centre_every)" if estimate.centres_kept is not None else ""
    fewer = "" if estimate.centres_kept is not None else ", keep fewer centres (store.keep_centre_every K)"
    raise ConfigError(f"the run writes about {estimate.total / GiB:.1f} GiB ({estimate.generations} generations of {estimate.per_generation / MiB:,.0f} MiB: "
                      f"centre {estimate.centre / MiB:,.0f}, members {estimate.members / MiB:,.0f}, completions {estimate.completions / MiB:,.0f}{served}{kept}), "
                      f"{where} has {free / GiB:.1f} GiB free: lower es.generations (resume continues a run), {lower}{fewer}, "
                      f"or free space (es-countdown gc)")


def check_memory(estimate: MemoryEstimate, available: int, where: str) -> None:
    if estimate.total <= available:
        return
    largest = estimate.largest()
    raise ConfigError(f"the run needs about {estimate.total / GiB:.1f} GiB of memory, {where} has {available / GiB:.1f} GiB free "
                      f"(GiB: {estimate.describe()}): lower {estimate.settings[largest]}")
