"""The artifact store: content addressing, one copy per content, verified reads, atomic writes."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.store import ArtifactError, ArtifactStore, hash_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def flip_byte(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_put_dir_stores_a_byte_identical_copy_under_the_folder_hash(store, tmp_path):
    src = make_folder(tmp_path / "src", {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10})
    ref = store.put_dir(src)
    assert ref.sha256 == hash_dir(src)
    assert ref.path == store.get(ref.sha256) == store.path(ref.sha256)
    assert (ref.path / "a.txt").read_bytes() == b"alpha"
    assert (ref.path / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 10
    assert hash_dir(ref.path) == ref.sha256


def test_the_id_is_the_documented_coreutils_pipeline(store, tmp_path):
    src = make_folder(tmp_path / "src", {"adapter_config.json": b"{}\n", "adapter_model.safetensors": b"\x00" * 99, "z/y": b"y"})
    ref = store.put_dir(src)
    out = subprocess.run(
        "find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
        shell=True, cwd=src, capture_output=True, text=True, check=True,
    ).stdout.split()[0]
    assert out == ref.sha256


def test_the_id_depends_on_names_and_bytes(tmp_path):
    a = hash_dir(make_folder(tmp_path / "a", {"x": b"1", "y": b"2"}))
    assert hash_dir(make_folder(tmp_path / "b", {"x": b"1", "y": b"2"})) == a
    assert hash_dir(make_folder(tmp_path / "c", {"x": b"2", "y": b"1"})) != a
    assert hash_dir(make_folder(tmp_path / "d", {"x": b"1", "z": b"2"})) != a
    assert hash_dir(make_folder(tmp_path / "e", {"x": b"1", "y": b"2", "w": b""})) != a


def test_the_same_content_is_stored_once(store, tmp_path):
    first = store.put_dir(make_folder(tmp_path / "one", {"f": b"same"}))
    second = store.put_dir(make_folder(tmp_path / "two", {"f": b"same"}))
    again = store.put_dir(first.path)  # a stored folder put again
    assert first == second == again
    assert [sha for sha, _ in store.iter_artifacts()] == [first.sha256]
    assert not any(store.tmp.iterdir())  # no work left behind


def test_put_bytes_and_put_file_are_one_file_artifacts(store, tmp_path):
    data = b'{"problem_id": "cd-1", "reward": 1.1}\n'
    ref = store.put_bytes(data, "samples.jsonl")
    assert store.get_file(ref.sha256).read_bytes() == data
    assert store.get_file(ref.sha256).name == "samples.jsonl"
    (tmp_path / "samples.jsonl").write_bytes(data)
    assert store.put_file(tmp_path / "samples.jsonl") == ref
    assert store.put_bytes(data, "other.jsonl").sha256 != ref.sha256  # the name is part of the id
    with pytest.raises(ArtifactError, match="plain file name"):
        store.put_bytes(b"x", "a/b")


def test_a_flipped_byte_is_a_one_line_error_naming_the_file(store, tmp_path):
    ref = store.put_dir(make_folder(tmp_path / "src", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x01" * 64}))
    flip_byte(ref.path / "adapter_model.safetensors", 17)
    with pytest.raises(ArtifactError) as err:
        store.get(ref.sha256)
    message = str(err.value)
    assert "\n" not in message
    assert str(ref.path / "adapter_model.safetensors") in message and ref.sha256 in message
    assert store.verify_all() == [message]
    assert store.get(ref.sha256, verify=False) == ref.path  # an explicit opt-out still finds it


def test_missing_extra_and_unknown_artifacts_are_one_line_errors(store, tmp_path):
    ref = store.put_dir(make_folder(tmp_path / "src", {"a": b"1", "b": b"2"}))
    os.chmod(ref.path / "b", 0o644)
    (ref.path / "b").unlink()
    with pytest.raises(ArtifactError, match=r"file missing: .*/b$"):
        store.get(ref.sha256)
    (ref.path / "b").write_bytes(b"2")
    (ref.path / "extra").write_bytes(b"?")
    with pytest.raises(ArtifactError, match=r"unexpected file: .*/extra$"):
        store.get(ref.sha256)
    with pytest.raises(ArtifactError, match="is missing"):
        store.get("0" * 64)
    with pytest.raises(ArtifactError, match="not an artifact id"):
        store.get("abc")
    assert not store.exists("0" * 64) and store.exists(ref.sha256)


def test_a_corrupt_file_is_named_even_without_the_manifest(store, tmp_path):
    ref = store.put_dir(make_folder(tmp_path / "src", {"a": b"1"}))
    store.manifest_path(ref.sha256).unlink()
    assert store.get(ref.sha256) == ref.path  # the manifest is not needed to verify
    flip_byte(ref.path / "a")
    with pytest.raises(ArtifactError, match="content hashes to"):
        store.get(ref.sha256)


def test_resolve_a_prefix(store, tmp_path):
    ref = store.put_bytes(b"x", "x")
    assert store.resolve(ref.sha256[:8]) == ref.sha256
    with pytest.raises(ArtifactError, match="no artifact"):
        store.resolve("ffff" if not ref.sha256.startswith("ffff") else "0000")


def test_remove_and_leftovers(store, tmp_path):
    ref = store.put_bytes(b"x", "x")
    (store.tmp / "put-123-dead").mkdir(parents=True)
    (store.tmp / "put-123-dead" / "half").write_bytes(b"12345")
    orphan = store.root / "ab" / ("ab" + "0" * 62 + ".manifest")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_text("manifest without a folder\n")
    assert {p.name for p, _ in store.leftovers()} == {"put-123-dead", orphan.name}
    assert store.leftovers(min_age_s=3600) == []
    store.remove(ref.sha256)
    assert not store.exists(ref.sha256) and not store.manifest_path(ref.sha256).exists()


def test_identical_adapters_get_one_artifact_that_loads_back(store):
    torch = pytest.importorskip("torch")
    from artifacts.checkpoints import put_adapter_folder
    from es_core.lora import AdapterSpec, load_adapter

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    tensors = {key.format("A"): torch.arange(8, dtype=torch.float32).reshape(1, 8), key.format("B"): torch.zeros(8, 1)}
    spec = AdapterSpec(rank=1, lora_alpha=2.0, target_modules=("q_proj",), layers=(0,))
    a = put_adapter_folder(store, tensors, spec)
    b = put_adapter_folder(store, {k: v.clone() for k, v in tensors.items()}, spec)
    assert a == b and len(list(store.iter_artifacts())) == 1
    loaded, loaded_spec = load_adapter(store.get(a.sha256))
    assert loaded_spec.rank == 1 and torch.equal(loaded[key.format("A")], tensors[key.format("A")])
    changed = dict(tensors)
    changed[key.format("B")] = torch.ones(8, 1)
    assert put_adapter_folder(store, changed, spec).sha256 != a.sha256


_WRITER = r"""
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from artifacts.store import ArtifactStore
store = ArtifactStore(Path({store!r}))
src = Path({src!r})
i = 0
while True:
    folder = src / f"f{{os.getpid()}}-{{i}}"
    folder.mkdir()
    for j in range(4):
        (folder / f"part{{j}}.bin").write_bytes(os.urandom(1 << 19))
    ref = store.put_dir(folder)
    print(ref.sha256, flush=True)
    i += 1
"""


def test_a_process_killed_mid_write_leaves_no_partial_artifact(store, tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    code = _WRITER.format(root=str(PROJECT_ROOT), store=str(store.root), src=str(src))
    rng = random.Random(5)
    completed: list[str] = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        completed.append(proc.stdout.readline().strip())  # at least one put done: the loop is running
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        completed += out.split()
        shutil.rmtree(src)
        src.mkdir()
    stored = {sha for sha, _ in store.iter_artifacts()}
    assert set(completed) <= stored  # every put that returned is there
    assert store.verify_all() == []  # and nothing under an id is partial
    for shard in store.root.iterdir():
        if shard.name != "tmp":
            for p in shard.iterdir():
                assert p.name.endswith(".manifest") or p.is_dir()
    # what a kill leaves (work under tmp/, a manifest whose folder never landed) is not an artifact
    for path, _ in store.leftovers():
        assert path.parent == store.tmp or path.name.endswith(".manifest")


def test_a_full_disk_names_the_file_being_written_and_leaves_nothing(store, tmp_path, monkeypatch):
    # "[Errno 28] No space left on device" named no path: fsync is where a full disk shows
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ArtifactError) as err:
        store.put_bytes(b"a centre", "adapter_model.safetensors")
    message = str(err.value)
    assert message.startswith(f"cannot write {store.tmp}/put-") and "/adapter_model.safetensors: No space left on device;" in message, message
    monkeypatch.undo()
    assert list(store.iter_artifacts()) == [] and list(store.tmp.iterdir()) == []


# --- scratch stores: files written for one piece of work, kept by no one after it ------------------


def test_a_scratch_store_lives_under_tmp_is_made_by_its_first_put_and_goes_when_its_block_ends(store):
    with store.scratch("served") as scratch:
        assert scratch.root.parent == store.tmp and scratch.root.name.startswith(f"served-{os.getpid()}-")
        assert not scratch.root.exists()  # nothing written: nothing made (the embedded engine writes no file)
    with store.scratch("served") as scratch:
        ref = scratch.put_bytes(b"a joined member", "adapter_model.safetensors")
        assert ref.path.parents[1] == scratch.root and os.stat(ref.path).st_dev == os.stat(store.root).st_dev
        assert scratch.get_file(ref.sha256).read_bytes() == b"a joined member" and not store.exists(ref.sha256)
    assert not scratch.root.exists() and list(store.tmp.iterdir()) == []
    with pytest.raises(RuntimeError, match="the decode failed"), store.scratch() as failed:
        failed.put_bytes(b"half a generation", "x")
        raise RuntimeError("the decode failed")
    assert not failed.root.exists() and list(store.tmp.iterdir()) == []


_SCRATCH_KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
from artifacts.store import ArtifactStore
with ArtifactStore({store!r}).scratch("served-g3") as scratch:
    scratch.put_bytes(os.urandom(1 << 16), "adapter_model.safetensors")
    print(scratch.root, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs
"""


def test_a_scratch_store_a_kill_left_is_removed_by_gc_once_older_than_its_minimum_age(tmp_path):
    from artifacts.commands import gc
    from artifacts.ledger import Ledger

    data = tmp_path / "data"
    Ledger(data).record_problems([])  # a data dir with its ledger, no run
    store = ArtifactStore(data / "artifacts")
    kept = store.put_bytes(b"an artifact a run wrote", "x")
    proc = subprocess.run([sys.executable, "-c", _SCRATCH_KILLED.format(root=str(PROJECT_ROOT), store=str(store.root))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = Path(proc.stdout.strip())
    assert left.parent == store.tmp and any(left.rglob("adapter_model.safetensors"))
    out = gc(data, yes=True, min_age_s=3600)
    assert left.exists() and "0 leftover(s)" in out  # young: it may be a live run's (gc --yes also refuses while one writes)
    hour_ago = time.time() - 3601
    os.utime(left, (hour_ago, hour_ago))
    out = gc(data, yes=True, min_age_s=3600)
    assert f"removed {left}" in out and "1 leftover(s)" in out and not left.exists()
    assert list(store.tmp.iterdir()) == [] and store.exists(kept.sha256)  # the store itself untouched (unreferenced, but young)
