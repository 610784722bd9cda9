"""An ES checkpoint as one artifact: the centre and, for Adam, the optimizer moments beside it. Its
sha256 is the centre's id in the ledger.

The centre is a PEFT adapter folder, servable as it is, unless some of its targets are exact
(weights space, es.centre_rank >= min(out, in): the change beside an identity, zero-padded to R):
then `es_centre.safetensors` replaces `adapter_model.safetensors`, holding each exact target's
change alone and every other target's factors (weights_space.stored_centre; 703 MB down to 425 MB
a generation at SmolLM2, R 576, every layer). `load_checkpoint` gives back the same tensors either
way, and `adapter_folder` builds the PEFT folder on demand where a backend loads files (as it builds
a weights-space member whole from its record).

A centre thinned from the store (store.keep_centre_every, artifacts/retention.py) is read like any
other: `load_checkpoint` rebuilds it from its nearest kept ancestor and the ledger
(artifacts/rebuild.py, every step's hash checked), and so do `adapter_folder`, `served_adapter` and a
member whose centre it is. Only a centre the ledger marks thinned is rebuilt; any other missing
artifact is missing."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file

from artifacts.store import ArtifactError, ArtifactStore
from es_core.es import ESState, optimizer_tensors, state_from_tensors
from es_core.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, AdapterSpec, LoRATensors, adapter_config_bytes, adapter_files,
                          checked_spec, load_adapter, read_adapter_config, read_tensors, safetensors_bytes)
from es_core.weights_space import (CHANGE_SUFFIX, MEMBER_FILE, MemberRecord, centre_of_stored, member_adapter, own_factors, record_centre_sha256,
                                   spec_of_rank, stored_centre)

OPTIMIZER_FILE = "es_optimizer.safetensors"
STATE_FILE = "es_state.json"
CENTRE_FILE = "es_centre.safetensors"  # a centre with exact targets, stored without their padding

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


def checkpoint_files(state: ESState, spec: AdapterSpec, compact: bool = True) -> dict[str, bytes]:
    """A checkpoint's files: the centre (without its exact targets' padding where it has any, unless
    `compact` is False: the PEFT folder every checkpoint was before), its generation, Adam's moments."""
    files = {STATE_FILE: (json.dumps({"generation": state.generation}, sort_keys=True) + "\n").encode()}
    moments = optimizer_tensors(state)
    if moments:
        files[OPTIMIZER_FILE] = safetensors_bytes(moments)
    stored = stored_centre(state.centre) if compact else state.centre
    if not any(key.endswith(CHANGE_SUFFIX) for key in stored):
        return {**adapter_files(state.centre, spec), **files}
    return {ADAPTER_CONFIG: adapter_config_bytes(spec), CENTRE_FILE: safetensors_bytes(stored), **files}  # the config of what it rebuilds


def put_checkpoint(store, state: ESState, spec: AdapterSpec):
    ref = store.put_files(checkpoint_files(state, spec))
    _remember(store, ref.sha256, (state, spec))
    return ref


def load_checkpoint(store, sha256: str) -> tuple[ESState, AdapterSpec]:
    cached = _RECENT.get((str(store.root), sha256))
    if cached is not None and (store.path(sha256).is_dir() or (str(store.root), sha256) in _REBUILT):
        return cached
    if not store.path(sha256).is_dir() and (rebuilt := _rebuilt(store, sha256)) is not None:
        return rebuilt[:2]
    folder = store.get(sha256)
    tensors, spec = _load_centre(folder)
    meta = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else {"generation": 0}
    moments = load_file(str(folder / OPTIMIZER_FILE)) if (folder / OPTIMIZER_FILE).is_file() else None
    value = (state_from_tensors(tensors, int(meta["generation"]), moments), spec)
    _remember(store, sha256, value)
    return value


# the centres of this process rebuilt after thinning, by (store, sha256): `_RECENT` may answer for
# them without their folder (a centre deleted by hand, not thinned, is never answered from memory)
_REBUILT: set[tuple[str, str]] = set()


def _rebuilt(store, sha256: str) -> tuple[ESState, AdapterSpec, dict[str, bytes]] | None:
    """A thinned centre rebuilt (artifacts/rebuild.py), remembered; None if the ledger marks it nowhere."""
    from artifacts.rebuild import rebuilt_centre  # it reads checkpoints through this module

    rebuilt = rebuilt_centre(store, sha256)
    if rebuilt is not None:
        _REBUILT.add((str(store.root), sha256))
        _remember(store, sha256, rebuilt[:2])
    return rebuilt


def centre_files(store: ArtifactStore, sha256: str) -> dict[str, bytes] | None:
    """A thinned centre's files as the ledger names them (hash == sha256), rebuilt; None when the
    ledger marks it nowhere (the artifact's own folder is what to read then)."""
    if store.path(sha256).is_dir():
        return None
    rebuilt = _rebuilt(store, sha256)
    return rebuilt[2] if rebuilt is not None else None


def _load_centre(folder: Path) -> tuple[LoRATensors, AdapterSpec]:
    if not (folder / CENTRE_FILE).is_file():
        return load_adapter(folder)
    config_path, centre_path = folder / ADAPTER_CONFIG, folder / CENTRE_FILE
    config = read_adapter_config(config_path)
    try:
        tensors = centre_of_stored(read_tensors(centre_path), int(config["r"]))
    except ValueError as exc:
        raise AdapterError(f"{centre_path}: {exc}") from None
    return tensors, checked_spec(tensors, config, centre_path, config_path)


def adapter_folder(store: ArtifactStore, sha256: str, scratch: ArtifactStore) -> Path:
    """A stored adapter as the PEFT folder a backend loads: the artifact itself, or one built in
    `scratch` for a centre stored without its padding (its PEFT folder, without the ES state) and a
    weights-space member (the whole member, rank R + r: its centre joined to its own factors,
    drawn again from its record, or read from its factor files as members were stored before). A
    thinned centre is rebuilt: its PEFT folder, or where it is one, its files as the ledger names them."""
    thinned = centre_files(store, sha256)
    if thinned is not None:
        if CENTRE_FILE in thinned:
            state, spec = load_checkpoint(store, sha256)
            return put_adapter_folder(scratch, state.centre, spec).path
        return scratch.put_files(thinned).path
    folder = store.get(sha256)
    if (folder / MEMBER_FILE).is_file():
        return put_adapter_folder(scratch, *_whole_member(store, folder)).path
    if (folder / CENTRE_FILE).is_file():
        state, spec = load_checkpoint(store, sha256)
        return put_adapter_folder(scratch, state.centre, spec).path
    return folder


def served_adapter(store: ArtifactStore, sha256: str, scratch: ArtifactStore) -> str:
    """`adapter_folder` of an adapter the ledger names, put into `scratch` whatever it is; its sha256."""
    return scratch.put_dir(adapter_folder(store, sha256, scratch)).sha256


def _whole_member(store: ArtifactStore, folder: Path) -> tuple[LoRATensors, AdapterSpec]:
    where = folder / MEMBER_FILE
    data = where.read_bytes()
    try:
        centre_sha = record_centre_sha256(data, str(where))
        if not store.exists(centre_sha) and centre_files(store, centre_sha) is None:  # a thinned centre is rebuilt
            raise ValueError(f"{where}: the member's centre {centre_sha} is not in {store.root}")
        state, spec = load_checkpoint(store, centre_sha)
        if (folder / ADAPTER_WEIGHTS).is_file():  # a member stored before records: its own factors
            own, own_spec = load_adapter(folder)
            rank = own_spec.rank
        else:
            record = MemberRecord.from_bytes(data, str(where))
            own, rank = own_factors(record, state.centre), record.noise_rank
    except ValueError as exc:  # a malformed record, a missing or corrupt centre: one line, naming the file
        raise ArtifactError(str(exc) if str(where) in str(exc) else f"{where}: {exc}") from None
    return member_adapter(state.centre, own), spec_of_rank(spec, spec.rank + rank)
