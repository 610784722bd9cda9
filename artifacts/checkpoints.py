"""An ES checkpoint as one artifact: the centre as a PEFT adapter folder (servable as it is) plus,
for Adam, the optimizer moments beside it. Its sha256 is the centre's id in the ledger."""

from __future__ import annotations

import json
from collections import OrderedDict

from safetensors.torch import load_file

from es_core.es import ESState, optimizer_tensors, state_from_tensors
from es_core.lora import AdapterSpec, LoRATensors, adapter_files, load_adapter, safetensors_bytes

OPTIMIZER_FILE = "es_optimizer.safetensors"
STATE_FILE = "es_state.json"

# The last few checkpoints of this process, by (store, sha256): a generation's centre is written by
# `aggregate` and read right back by the next generation's tasks. Content-addressed, so an entry
# can never go stale; callers never modify tensors in place.
_RECENT: "OrderedDict[tuple[str, str], tuple[ESState, AdapterSpec]]" = OrderedDict()
_RECENT_SIZE = 4


def _remember(store, sha256: str, value: tuple[ESState, AdapterSpec]) -> None:
    _RECENT[str(store.root), sha256] = value
    _RECENT.move_to_end((str(store.root), sha256))
    while len(_RECENT) > _RECENT_SIZE:
        _RECENT.popitem(last=False)


def put_adapter_folder(store, tensors: LoRATensors, spec: AdapterSpec, extra: dict[str, bytes] | None = None):
    """Store a PEFT folder (and extra files) by content, straight from memory."""
    return store.put_files({**adapter_files(tensors, spec), **(extra or {})})


def put_checkpoint(store, state: ESState, spec: AdapterSpec):
    extra = {STATE_FILE: (json.dumps({"generation": state.generation}, sort_keys=True) + "\n").encode()}
    moments = optimizer_tensors(state)
    if moments:
        extra[OPTIMIZER_FILE] = safetensors_bytes(moments)
    ref = put_adapter_folder(store, state.centre, spec, extra)
    _remember(store, ref.sha256, (state, spec))
    return ref


def load_checkpoint(store, sha256: str) -> tuple[ESState, AdapterSpec]:
    cached = _RECENT.get((str(store.root), sha256))
    if cached is not None and store.path(sha256).is_dir():
        return cached
    folder = store.get(sha256)
    tensors, spec = load_adapter(folder)
    meta = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else {"generation": 0}
    moments = load_file(str(folder / OPTIMIZER_FILE)) if (folder / OPTIMIZER_FILE).is_file() else None
    value = (state_from_tensors(tensors, int(meta["generation"]), moments), spec)
    _remember(store, sha256, value)
    return value
