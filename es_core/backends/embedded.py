"""The embedded backend: the population engine in this process, behind the InferenceBackend interface.

Text and files live here, not in the engine: prompts are tokenized with add_special_tokens=False
(chat-template text already carries its special tokens, and SGLang gets the same ids), adapter
folders are read with `load_adapter` and checked against the base model's targets, completions
are decoded with skip_special_tokens=True. completion_tokens counts the EOS when one ended it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Sequence

from es_core.backends.base import Adapter, InMemoryAdapter, Members
from es_core.engine.generate import GenerationOutput, PopulationEngine
from es_core.engine.model import Decoder
from es_core.evaluation import Completion
from es_core.lora import AdapterError, LoRATensors, StackedLoRA, check_adapter_matches, find_targets, load_adapter
from es_core.models import load_causal_lm, load_tokenizer
from es_core.settings import Settings

SERVER = "embedded"


class EmbeddedBackend:
    def __init__(self, engine: PopulationEngine, tokenizer, scaling: float):
        self.engine, self.tokenizer, self.scaling = engine, tokenizer, float(scaling)
        self._lock = threading.Lock()  # one batch at a time: the engine's buffers are shared

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path, log_dir: Path | None = None, name_prefix: str = "") -> "EmbeddedBackend":
        """Load the base model from a local HF folder and build the engine for settings.lora's
        targets. (`log_dir`, `name_prefix`: as SGLangBackend's; an engine in this process writes no
        log and names no adapter.)"""
        model = load_causal_lm(Path(model_path), settings.model.dtype, settings.model.device)
        targets = find_targets(model, settings.lora.layers, settings.lora.modules)
        tokenizer = load_tokenizer(Path(model_path))
        weights_space = settings.es.space == "weights"
        engine = PopulationEngine(
            Decoder.from_hf(model), targets, settings.member_rank,
            pad_id=tokenizer.pad_token_id, eos_ids=eos_token_ids(model, tokenizer),
            max_batch_rows=settings.generation.max_batch_rows, compile=settings.generation.compile, lora_dtype=settings.generation.lora_dtype,
            centre_rank=settings.es.centre_rank if weights_space else 0,
        )
        # weights space folds every scale into B (lora_alpha = rank: PEFT's scaling 1)
        return cls(engine, tokenizer, 1.0 if weights_space else settings.lora.scaling)

    @staticmethod
    def decode_key(settings: Settings) -> dict:
        """What, beyond the settings every backend shares, decides how this one decodes: the
        device (a GPU by its name) and the dtype as they resolve on this machine, and the dtype of
        the members' LoRA slots."""
        from es_core.models import resolve_device, resolve_dtype

        device = resolve_device(settings.model.device)
        return {"device": _device_name(device), "dtype": str(resolve_dtype(settings.model.dtype, device)).removeprefix("torch."),
                "lora_dtype": settings.generation.lora_dtype}

    def generate(self, adapters: Sequence[Adapter], prompts: Sequence[str], max_new_tokens: int,
                 prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Greedy completion of every prompt under every adapter (path None: the base model): result[a][p]
        (with `prompt_groups`, of adapter a's own prompts: result[a][j] is prompt_groups[a][j]'s).
        An adapter in memory is taken as it is, never written to a folder. An engine with a centre
        slot (weights space) takes an adapter of the centre's rank R in that slot, and one of rank
        R + r (a member: the centre's factors, then its own) split between the two; adapters that
        share a centre are decoded together."""
        loaded = [_tensors_and_scaling(ref) for ref in adapters]
        if not self.engine.centre_rank:
            members = []
            for tensors, _ in loaded:
                if tensors is not None:
                    check_adapter_matches(tensors, self.engine.targets, self.engine.rank)
                members.append(tensors)
            return self._complete(members, [s for _, s in loaded], prompts, max_new_tokens, prompt_groups=prompt_groups)
        parts = [self._centre_and_own(tensors, scaling, ref) for (tensors, scaling), ref in zip(loaded, adapters)]
        result: list[list[Completion]] = [None] * len(adapters)  # type: ignore[list-item]
        for indices in _groups_by_centre([centre for centre, _ in parts]):
            out = self._complete([parts[i][1] for i in indices], [1.0] * len(indices), prompts, max_new_tokens, centre=parts[indices[0]][0],
                                 prompt_groups=None if prompt_groups is None else [prompt_groups[i] for i in indices])
            for i, completions in zip(indices, out):
                result[i] = completions
        return result

    def _centre_and_own(self, tensors: LoRATensors | None, scaling: float, ref: Adapter) -> tuple[LoRATensors | None, LoRATensors | None]:
        """An adapter as (the centre slot's part, the member slot's part), scaling folded into B."""
        if tensors is None:
            return None, None
        from es_core.weights_space import split_member_adapter

        big, small = self.engine.centre_rank, self.engine.rank
        rank = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight"))
        tensors = {k: v * scaling if k.endswith("lora_B.weight") else v for k, v in tensors.items()}
        if rank == big + small:
            centre, own = split_member_adapter(tensors, big)
        elif rank <= big:  # a centre, or any adapter that fits its slot (zero-padded)
            centre, own = _padded(tensors, big), None
        else:
            raise AdapterError(f"{_where(ref)}: rank {rank} fits neither the centre slot (rank {big}) nor a member (rank {big} + {small})")
        check_adapter_matches(centre, self.engine.targets, big)
        if own is not None:
            check_adapter_matches(own, self.engine.targets, small)
        return centre, own

    def generate_population(self, members: Members, prompts: Sequence[str], max_new_tokens: int,
                            on_decode: Callable[[], None] | None = None,
                            prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Every member x every prompt (or its `prompt_groups` ones) in one batched pass, the members
        built in memory (their adapter files are not needed). `on_decode`: see PopulationEngine.generate."""
        return self._complete(members.stacked(), [members.scaling] * len(members), prompts, max_new_tokens, on_decode, members.centre(),
                              prompt_groups)

    def generate_tensors(self, members: Sequence[LoRATensors | None] | StackedLoRA, prompts: Sequence[str], max_new_tokens: int,
                         scaling: float | None = None, on_decode: Callable[[], None] | None = None,
                         centre: LoRATensors | None = None, prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """As generate, from LoRA tensors in memory (no file I/O): a list of members, or a population
        stacked per key (a search space's `members`); scaling defaults to settings.lora's. `on_decode`:
        see PopulationEngine.generate. `centre`: what every member shares, in the centre slot.
        `prompt_groups`: each member's own prompts (generate_population)."""
        s = self.scaling if scaling is None else float(scaling)
        # the engine checks every member against its targets when it fills the slots
        population = members if isinstance(members, StackedLoRA) else list(members)
        return self._complete(population, [s] * len(members), prompts, max_new_tokens, on_decode, centre, prompt_groups)

    def close(self) -> None:
        self.engine.close()

    def _complete(self, members, scalings, prompts: Sequence[str], max_new_tokens: int, on_decode=None,
                  centre: LoRATensors | None = None, prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        with self._lock:
            out: GenerationOutput = self.engine.generate(ids, members, max_new_tokens, scalings, on_decode=on_decode, centre=centre,
                                                         prompt_groups=prompt_groups)
        texts = self.tokenizer.batch_decode([t for row in out.tokens for t in row], skip_special_tokens=True)
        result, k = [], 0
        for row, stops in zip(out.tokens, out.stopped):
            completions = []
            for tokens, stopped in zip(row, stops):
                completions.append(Completion(texts[k], len(tokens), "stop" if stopped else "length", SERVER))
                k += 1
            result.append(completions)
        return result


def _tensors_and_scaling(ref: Adapter) -> tuple[LoRATensors | None, float]:
    """An adapter's tensors and lora_alpha / rank: as they are in memory, or read from its folder
    (the base model: None)."""
    if isinstance(ref, InMemoryAdapter):
        return ref.tensors, ref.scaling
    if ref.path is None:
        return None, 1.0
    tensors, spec = load_adapter(ref.path)
    return tensors, spec.lora_alpha / spec.rank


def _where(ref: Adapter) -> str:
    """An adapter in an error: its folder, or its name when it is in memory (asking for the path
    would write the folder)."""
    return f"adapter {ref.name} (in memory)" if isinstance(ref, InMemoryAdapter) else str(ref.path)


def _padded(tensors: LoRATensors, rank: int) -> LoRATensors:
    """An adapter zero-padded to `rank` (zero rows of A, zero columns of B: the same B A)."""
    import torch

    out = {}
    for k, v in tensors.items():
        if k.endswith("lora_A.weight"):
            out[k] = torch.cat([v, v.new_zeros(rank - v.shape[0], v.shape[1])], 0)
        else:
            out[k] = torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], 1)
    return out


def _groups_by_centre(centres: list[LoRATensors | None]) -> list[list[int]]:
    """Indices of adapters with equal centre parts, in first-seen order (a generation's members share one)."""
    import torch

    groups: list[tuple[LoRATensors | None, list[int]]] = []
    for i, c in enumerate(centres):
        for centre, members in groups:
            if (c is None and centre is None) or (c is not None and centre is not None and c.keys() == centre.keys()
                                                   and all(torch.equal(c[k], centre[k]) for k in c)):
                members.append(i)
                break
        else:
            groups.append((c, [i]))
    return [members for _, members in groups]


def _device_name(device) -> str:
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def eos_token_ids(model, tokenizer) -> list[int]:
    """What HF generate stops at: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
