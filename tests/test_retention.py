"""Centres kept as keyframes (store.keep_centre_every, artifacts/retention.py) and rebuilt on demand
(artifacts/rebuild.py): a weights-space run on the tiny model with K 2 deletes the centres it has
moved past that are no keyframe, records which, and every reader (load_checkpoint, adapter_folder,
replay, `centre`, verify) gets them back bit for bit from the ledger, or a one-line error."""

import shutil
from pathlib import Path

import duckdb
import pytest

from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore, files_sha256, hash_dir
from tests.test_pipeline import generation_hashes

KEYFRAMES_RUN = """
run_name: keyframes
model: {{name: tiny-llama, device: cpu}}
lora: {{layers: [0, 1]}}
es: {{space: weights, noise_rank: 1, centre_rank: 32, population: 4, sigma: 0.05, learning_rate: 0.05, generations: {generations}, seed: 3}}
data: {{train_size: 6, heldout_size: 4, prompts_per_generation: 3}}
prompt: {{style: raw}}
generation: {{max_new_tokens: 16, compile: false}}
eval: {{every: 0, base_model: false}}
store: {{keep_centre_every: {keep}}}
"""


def forget_rebuilt_centres():
    """What this process remembers of checkpoints: a test of a rebuild must rebuild."""
    from artifacts import checkpoints

    checkpoints._RECENT.clear()
    checkpoints._REBUILT.clear()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness, model_cache):
    """Three data dirs of run `t` (5 generations, the tiny model, weights space, R 32: k_proj and
    v_proj exact): `kept` keeps every centre (the default), `thinned` keeps every 2nd, `resumed` keeps
    every 2nd and was stopped after 3 generations, then resumed to 5."""
    from flows.es_countdown import es_countdown

    root = tmp_path_factory.mktemp("retention")
    mp = pytest.MonkeyPatch()
    mp.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    try:
        for name, generations, keep in (("kept", 5, 0), ("thinned", 5, 2), ("resumed", 3, 2)):
            config = root / f"{name}.yaml"
            config.write_text(KEYFRAMES_RUN.format(generations=generations, keep=keep))
            es_countdown(config_path=str(config), run_id="t", data_dir=str(root / name))
        es_countdown(overrides=["es.generations=5"], run_id="t", data_dir=str(root / "resumed"))
    finally:
        mp.undo()
    return root


def centres(data_dir) -> list[str]:
    """theta_0 .. theta_5 of run t."""
    rows = generation_hashes(data_dir, "t")
    return [rows[0][1]] + [row[2] for row in rows]


def tampered_copy(source, dest, generation: int):
    """A copy of a data dir whose ledger records another reward for member 0 of `generation`: the
    update replayed from it moves the centre elsewhere."""
    shutil.copytree(source, dest)
    con = duckdb.connect(str(dest / "ledger.duckdb"))
    try:
        con.execute("UPDATE members SET reward_mean = reward_mean + 0.5 WHERE run_id = 't' AND generation = ? AND member = 0", [generation])
    finally:
        con.close()
    return dest


def test_a_run_keeping_every_second_centre_deletes_the_others_and_says_so_in_the_ledger(runs):
    """The run's results are those of a run that keeps every centre, hash for hash; on disk are the
    first centre, the keyframes (2, 4) and the latest (5, also the evaluated one); 1 and 3 are gone,
    marked in generations.center_thinned_at (the new centres of generations 0 and 2)."""
    kept, thinned = runs / "kept", runs / "thinned"
    assert generation_hashes(thinned, "t") == generation_hashes(kept, "t")
    theta = centres(thinned)
    assert len(set(theta)) == 6
    store = ArtifactStore(thinned / "artifacts")
    assert [store.exists(sha) for sha in theta] == [True, False, True, False, True, True]
    assert all(ArtifactStore(kept / "artifacts").exists(sha) for sha in theta)  # the default keeps every centre, as before
    _, rows = Ledger(thinned).query("SELECT generation, center_thinned_at IS NOT NULL AS thinned FROM generations WHERE run_id = 't' ORDER BY generation")
    assert rows == [(0, True), (1, False), (2, True), (3, False), (4, False)]
    _, rows = Ledger(kept).query("SELECT count(*) FROM generations WHERE center_thinned_at IS NOT NULL")
    assert rows == [(0,)]


def test_a_run_resumed_with_the_policy_ends_with_the_same_hashes_and_keeps_its_evaluated_centre(runs):
    """Stopped after 3 generations (centre 3 its latest, and evaluated as its final centre) and
    resumed to 5: the hashes of a run never stopped; centre 1 thinned as there, centre 3 kept since
    a held-out evaluation names it."""
    resumed, thinned = runs / "resumed", runs / "thinned"
    assert generation_hashes(resumed, "t") == generation_hashes(thinned, "t")
    store = ArtifactStore(resumed / "artifacts")
    assert [store.exists(sha) for sha in centres(resumed)] == [True, False, True, True, True, True]
    _, rows = Ledger(resumed).query("SELECT generation, adapter_sha256 FROM evals WHERE run_id = 't' AND model = 'centre' ORDER BY generation")
    assert [g for g, _ in rows] == [3, 5] and rows[0][1] == centres(resumed)[3]


def test_verify_names_thinned_centres_rebuildable_and_fails_for_a_keyframe_deleted_by_hand(runs, tmp_path):
    from artifacts.commands import verify

    text, ok = verify(runs / "thinned")
    theta = centres(runs / "thinned")
    assert ok, text
    assert f"THINNED {theta[3]}: rebuildable from generation 2's centre {theta[2][:12]} of run t (1 update)" in text
    assert f"THINNED {theta[1]}: rebuildable from generation 0's centre" in text
    assert "MISSING" not in text and text.endswith(" 2 thinned (rebuildable), 0 missing, 0 corrupt\n"), text

    broken = tmp_path / "broken"
    shutil.copytree(runs / "thinned", broken)
    store = ArtifactStore(broken / "artifacts")
    store.remove(theta[2])  # a keyframe deleted by hand: missing, and centre 3 no longer rebuildable
    store.remove(theta[5])  # the latest
    text, ok = verify(broken)
    assert not ok
    missing = [line for line in text.splitlines() if line.startswith("MISSING")]
    assert len(missing) == 3 and any(theta[2] in line and "is missing" in line for line in missing)
    assert any(line.startswith(f"MISSING centre {theta[3]}") and "was not thinned" in line for line in missing)
    assert any(theta[5] in line for line in missing) and f"THINNED {theta[1]}" in text


def test_replay_rebuilds_a_thinned_parent_and_reevaluates_members_whose_centre_was_thinned(runs, monkeypatch):
    """Generation 3 starts from centre 3 (thinned): replay rebuilds it from centre 2 and checks the
    generation; generation 1's members name centre 1 (thinned): re-decoded from their records. The
    scratch stores are under the store's tmp, not the system's."""
    import tempfile

    import flows.replay
    from flows.replay import replay

    made = []
    real = tempfile.TemporaryDirectory

    def recorded(*args, **kwargs):
        made.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(flows.replay.tempfile, "TemporaryDirectory", recorded)
    forget_rebuilt_centres()
    data = runs / "thinned"
    result = replay("t", 3, str(data))
    assert result["ok"], result["lines"]
    assert any("parent centre" in line and "was thinned: rebuilt from the ledger, rebuildable from generation 2's centre" in line for line in result["lines"])
    forget_rebuilt_centres()
    result = replay("t", 1, str(data), reevaluate=True)
    assert result["ok"], result["lines"]
    store = ArtifactStore(data / "artifacts")
    assert made and all(d is not None and Path(d).is_relative_to(store.tmp) for d in made), made  # the served members' too, inside replay's
    assert not list(store.tmp.iterdir())  # gone after it


def test_a_thinned_centre_reads_back_bit_identical_everywhere(runs, tmp_path):
    """load_checkpoint, adapter_folder (what a backend loads) and `es-countdown centre` give a thinned
    centre's files back with the ledger's hash, the PEFT folder the same as where it was kept."""
    from artifacts.checkpoints import adapter_folder, checkpoint_files, load_checkpoint
    from artifacts.cli import main

    theta = centres(runs / "thinned")
    store, kept = ArtifactStore(runs / "thinned" / "artifacts"), ArtifactStore(runs / "kept" / "artifacts")
    forget_rebuilt_centres()
    state, spec = load_checkpoint(store, theta[3])
    assert state.generation == 3 and files_sha256(checkpoint_files(state, spec)) == theta[3]
    assert not store.exists(theta[3])  # rebuilt in memory, not put back
    forget_rebuilt_centres()
    built = adapter_folder(store, theta[3], ArtifactStore(tmp_path / "scratch"))
    assert hash_dir(built) == hash_dir(adapter_folder(kept, theta[3], ArtifactStore(tmp_path / "scratch-kept")))
    forget_rebuilt_centres()
    assert main(["centre", theta[1][:10], "--out", str(tmp_path / "out"), "--data-dir", str(runs / "thinned")]) == 0
    assert hash_dir(tmp_path / "out") == theta[1]
    forget_rebuilt_centres()
    assert main(["centre", theta[3][:10], "--peft", "--out", str(tmp_path / "peft"), "--data-dir", str(runs / "thinned")]) == 0
    assert hash_dir(tmp_path / "peft") == hash_dir(built)


def test_a_tampered_reward_stops_the_rebuild_with_one_line_naming_run_generation_and_hashes(runs, tmp_path):
    from artifacts.checkpoints import load_checkpoint
    from artifacts.rebuild import CentreRebuildError

    data = tampered_copy(runs / "thinned", tmp_path / "tampered", generation=2)
    theta = centres(data)
    forget_rebuilt_centres()
    with pytest.raises(CentreRebuildError) as failed:
        load_checkpoint(ArtifactStore(data / "artifacts"), theta[3])
    message = str(failed.value)
    assert "\n" not in message and message.startswith("run t generation 2: the new centre rebuilt from the ledger hashes to ")
    assert f"the ledger records {theta[3]}" in message and message.split()[12] != theta[3]


def test_verify_rebuild_rebuilds_every_thinned_centre_and_fails_where_a_step_hashes_otherwise(runs, tmp_path, capsys):
    """`verify --rebuild` proves this machine can rebuild the thinned centres (before the keyframes
    are the only copy): every one rebuilt to the ledger's hash, or exit 1 naming the one that is not."""
    from flows.cli import main

    forget_rebuilt_centres()
    assert main(["verify", "t", "--rebuild", "--data-dir", str(runs / "thinned")]) == 0
    out = capsys.readouterr().out
    assert out.count("THINNED ") == 2 and out.count("rebuilt: the hash the ledger records") == 2 and "2 thinned (rebuilt)" in out
    data = tampered_copy(runs / "thinned", tmp_path / "tampered", generation=2)
    theta = centres(data)
    forget_rebuilt_centres()
    assert main(["verify", "t", "--data-dir", str(data)]) == 0  # without --rebuild the chain is only read: nothing to see
    capsys.readouterr()
    forget_rebuilt_centres()
    assert main(["verify", "t", "--rebuild", "--data-dir", str(data)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("UNREBUILDABLE ")]
    assert len(failed) == 1 and failed[0].startswith(f"UNREBUILDABLE {theta[3]}: run t generation 2: ")
    assert "1 thinned (rebuilt), 1 thinned but not rebuildable here" in out


def test_verify_rebuild_replays_each_keyframe_span_once_and_names_each_centre_it_cannot_rebuild(runs, tmp_path, monkeypatch):
    """Keyframes every 4 (thinned by gc): centres 1, 2 and 3 all rebuild from centre 0. verify
    --rebuild replays the span once (3 updates, each step's hash checked), not once per centre
    (1 + 2 + 3); with generation 1's rewards changed, centre 1 still rebuilds and 2 and 3 are
    named unrebuildable, each on its own line."""
    from artifacts import rebuild
    from artifacts.commands import gc, verify

    data = tmp_path / "span"
    shutil.copytree(runs / "kept", data)
    theta = centres(data)
    gc(data, yes=True, min_age_s=0, thin_centres_every=4)
    assert [ArtifactStore(data / "artifacts").exists(sha) for sha in theta] == [True, False, False, False, True, True]
    updates = []
    real_next_state = rebuild.next_state
    monkeypatch.setattr(rebuild, "next_state", lambda *args: updates.append(1) or real_next_state(*args))
    forget_rebuilt_centres()
    text, ok = verify(data, "t", rebuild=True)
    assert ok and text.count("rebuilt: the hash the ledger records") == 3 and len(updates) == 3, text
    data = tampered_copy(data, tmp_path / "tampered", generation=1)
    forget_rebuilt_centres()
    text, ok = verify(data, "t", rebuild=True)
    failed = sorted(line.split(":")[0] for line in text.splitlines() if line.startswith("UNREBUILDABLE "))
    assert not ok and failed == sorted(f"UNREBUILDABLE {sha}" for sha in theta[2:4]), text
    assert f"THINNED {theta[1]}" in text and "1 thinned (rebuilt), 2 thinned but not rebuildable here" in text


def test_gc_thins_runs_recorded_without_the_setting_never_beside_a_live_run_nor_an_evaluated_centre(runs, tmp_path):
    from artifacts.commands import gc, verify
    from artifacts.runs import DataDirBusyError, DataDirWriter

    data = tmp_path / "kept"
    shutil.copytree(runs / "kept", data)
    theta = centres(data)
    Ledger(data).record_eval({"run_id": "t", "generation": 3, "split": "heldout", "model": "centre", "adapter_sha256": theta[3], "n": 4})
    store = ArtifactStore(data / "artifacts")
    dry = gc(data, min_age_s=0, thin_centres_every=2)
    assert f"would thin centre {theta[1]}" in dry and "would thin 1 centre(s) to keyframes every 2 generations" in dry
    assert theta[3] not in dry and theta[5] not in dry and theta[0] not in dry  # evaluated, latest, first
    with DataDirWriter(data):  # a live run: gc removes nothing
        with pytest.raises(DataDirBusyError):
            gc(data, yes=True, min_age_s=0, thin_centres_every=2)
    assert all(store.exists(sha) for sha in theta)
    gc(data, yes=True, min_age_s=0, thin_centres_every=2)
    assert [store.exists(sha) for sha in theta] == [True, False, True, True, True, True]
    text, ok = verify(data)
    assert ok and f"THINNED {theta[1]}" in text, text


def test_the_policy_is_outside_the_runs_fingerprint_and_the_preflight_counts_only_kept_centres():
    from es_core.preflight import ModelShape, centres_kept, estimate_run_disk
    from es_core.settings import load_settings

    assert load_settings(None, ["store.keep_centre_every=10"]).fingerprint() == load_settings(None, []).fingerprint()
    assert centres_kept(100, 0, 10) is None and centres_kept(100, 1, 10) is None
    assert centres_kept(100, 10, 10) == 13 and centres_kept(100, 10, 0) == 13 and centres_kept(100, 4, 10) == 25 + 10 - 5 + 3
    shape = ModelShape.from_config({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "vocab_size": 49152}, "smollm2")
    every = ["es.space=weights", "es.centre_rank=576", "es.population=512", "lora.layers=all", "eval.every=100"]
    kept, thinned = (estimate_run_disk(load_settings(None, [*every, f"store.keep_centre_every={k}"]), shape, 1000) for k in (0, 10))
    assert kept.total - thinned.total == (1000 - 103) * kept.centre


def carried_ledger(source: Path, dest: Path, generations: int) -> Path:
    """A fresh data dir holding nothing but the slim ledger of `source` (artifacts/slim.py: what a
    lent GPU machine gives back; its disk goes with it), cut after `generations` generations as if
    run t had been stopped there."""
    from artifacts.slim import slim_copy

    dest.mkdir()
    slim_copy(source, dest / "ledger.duckdb")
    con = duckdb.connect(str(dest / "ledger.duckdb"))
    try:
        for table in ("generations", "members", "samples"):
            con.execute(f"DELETE FROM {table} WHERE run_id = 't' AND generation >= ?", [generations])
        con.execute("DELETE FROM evals WHERE run_id = 't' AND generation > ?", [generations])
        con.execute("UPDATE runs SET status = 'running' WHERE run_id = 't'")
    finally:
        con.close()
    return dest


def test_a_run_whose_data_dir_kept_only_its_slim_ledger_resumes_to_the_hashes_of_a_run_never_stopped(runs, tmp_path, monkeypatch, model_cache):
    """Resume in a data dir with the run's slim ledger and no artifact: the run makes its first centre
    again from its settings and replays every recorded update (each hash-checked). On disk then is
    what the retention rule keeps (K 2, given on resume: the first centre, keyframe 2, the latest 3),
    centre 1 marked thinned; verify --rebuild rebuilds it. Then it goes on (3 is evaluated as the
    end of the first resume, so kept) to the hashes of the run never stopped."""
    from artifacts.commands import verify
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data = carried_ledger(runs / "kept", tmp_path / "carried", generations=3)
    store, theta = ArtifactStore(data / "artifacts"), centres(runs / "kept")
    text, ok = verify(data, "t")  # before: missing, and what rebuilds them
    assert not ok and "RESTORABLE run t: its centres after its first centre (which the run makes again) are missing, but the ledger records " \
        "the 3 update(s) that made them: `es-countdown resume t` rebuilds them" in text, text
    forget_rebuilt_centres()
    es_countdown(overrides=["es.generations=3", "store.keep_centre_every=2"], run_id="t", data_dir=str(data))  # the restore alone
    assert [store.exists(sha) for sha in theta[:4]] == [True, False, True, True]
    _, rows = Ledger(data).query("SELECT generation, center_thinned_at IS NOT NULL FROM generations WHERE run_id = 't' ORDER BY generation")
    assert rows == [(0, True), (1, False), (2, False)]
    forget_rebuilt_centres()
    text, _ = verify(data, "t", rebuild=True)  # the carried generations' member records stay missing (their seeds rebuild them)
    assert text.count("rebuilt: the hash the ledger records") == 1 and not any(line.startswith("MISSING centre") for line in text.splitlines()), text
    assert "RESTORABLE" not in text
    from flows.replay import replay

    result = replay("t", 1, str(data), reevaluate=True)  # the slim ledger kept no completion of generation 1: rewards compared
    assert result["ok"] and any("the ledger holds no text for 12 of these completions" in line for line in result["lines"]), result["lines"]

    es_countdown(overrides=["es.generations=5", "store.keep_centre_every=2"], run_id="t", data_dir=str(data))
    assert generation_hashes(data, "t") == generation_hashes(runs / "kept", "t")
    assert [store.exists(sha) for sha in theta] == [True, False, True, True, True, True]


def test_a_carried_ledger_that_rebuilds_another_centre_stops_the_resume_with_one_line_and_commits_nothing(runs, tmp_path, monkeypatch, model_cache):
    from artifacts.rebuild import CentreRebuildError
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data = carried_ledger(runs / "kept", tmp_path / "carried", generations=3)
    con = duckdb.connect(str(data / "ledger.duckdb"))
    try:
        con.execute("UPDATE members SET reward_mean = reward_mean + 0.5 WHERE run_id = 't' AND generation = 1 AND member = 0")
    finally:
        con.close()
    forget_rebuilt_centres()
    with pytest.raises(CentreRebuildError) as failure:
        es_countdown(overrides=["es.generations=5"], run_id="t", data_dir=str(data))
    message = str(failure.value)
    assert "\n" not in message and message.startswith("run t generation 1: the new centre rebuilt from the ledger hashes to "), message
    ledger = Ledger(data)
    assert ledger.last_generation("t") == 2 and ledger.run_row("t")["status"] == "failed"
    assert not ArtifactStore(data / "artifacts").exists(centres(runs / "kept")[3])


def test_a_carried_ledger_whose_first_centre_these_settings_do_not_make_is_refused_in_one_line(runs, tmp_path, monkeypatch, model_cache):
    """Other code or another model makes another first centre: nothing can be replayed from it."""
    from artifacts.rebuild import CentreRebuildError
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data = carried_ledger(runs / "kept", tmp_path / "carried", generations=3)
    con = duckdb.connect(str(data / "ledger.duckdb"))
    try:
        con.execute("UPDATE generations SET parent_center_sha256 = ? WHERE run_id = 't' AND generation = 0", ["f" * 64])
    finally:
        con.close()
    with pytest.raises(CentreRebuildError) as failure:
        es_countdown(overrides=["es.generations=5"], run_id="t", data_dir=str(data))
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"run t: its first centre is recorded as {'f' * 64}, its settings make {centres(runs / 'kept')[0]} here")
    assert Ledger(data).last_generation("t") == 2
