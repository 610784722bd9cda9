"""The benchmark scripts' own arithmetic: the GPU ceilings a roofline divides by, and the table
rebuilt from rows two GPU commands saved (the committed H200 run)."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import bench_engine
from benchmarks.gpu_peaks import peaks_of

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "h200-2026-12-01"


@pytest.mark.parametrize("name,bandwidth,flops", [
    ("NVIDIA H200", 4.8e12, 989e12),
    ("NVIDIA H100 80GB HBM3", 3.35e12, 989e12),
    ("NVIDIA H100 PCIe", 2.0e12, 756e12),
    ("NVIDIA H100 NVL", 3.9e12, 835e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12, 312e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12, 312e12),
])
def test_each_gpu_gets_its_own_datasheet_ceilings(name, bandwidth, flops):
    peaks = peaks_of(name)
    assert (peaks.bandwidth, peaks.bf16_dense) == (bandwidth, flops)
    assert "datasheet" in peaks.name and "given" not in peaks.name


def test_an_unknown_gpu_says_whose_figures_it_got_and_given_values_win():
    unknown = peaks_of("NVIDIA RTX 9090")
    assert unknown.bandwidth == 3.35e12 and "NVIDIA RTX 9090 not in the table" in unknown.name
    given = peaks_of("NVIDIA H200", bandwidth=4.3e12)
    assert (given.bandwidth, given.bf16_dense) == (4.3e12, 989e12)
    assert given.name.endswith("given: bandwidth")
    both = peaks_of("NVIDIA H200", bandwidth=4.3e12, bf16_flops=7e14)
    assert both.bf16_dense == 7e14 and both.name.endswith("given: bandwidth and bf16 rate")


def test_summarize_joins_the_engine_rows_of_one_command_with_peft_and_hf_rows_of_another(capsys):
    assert bench_engine.main(["--summarize", str(RESULTS / "engine-d.json"), str(RESULTS / "engine-ac.json")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen2.5-0.5b-random | 1 |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    # (a) 401 tok/s and (c) 35,308 tok/s from the second file, (d) 150,320 tok/s from the first
    assert cells[2:8] == ["401", "-", "35,308", "150,320", "375.2x", "4.26x"]
    assert cells[8].startswith("23% (4.02 vs 0.91 ms/step)")


@pytest.mark.parametrize("content", [None, "not json", '[{"model": "x"}]'])
def test_summarize_refuses_a_missing_or_foreign_file_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "rows.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        bench_engine.main(["--summarize", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse prints its usage, then the error on one line
    assert f": error: --summarize {path}: not a file of --json rows (" in err[-1]
    assert sum(": error:" in line for line in err) == 1


def test_member_signal_tells_members_that_differ_in_quality_from_members_that_differ_in_luck(tmp_path):
    """benchmarks/member_signal.py on a real DuckDB file with the ledger's samples columns: members
    whose quality differs are reliable across prompt halves; rewards that are coin flips are not."""
    import duckdb
    import numpy as np

    from benchmarks.member_signal import main, summarise

    rng = np.random.default_rng(1)
    path = tmp_path / "ledger.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE samples (run_id VARCHAR, generation INTEGER, member INTEGER, problem_id VARCHAR, reward DOUBLE)")
    quality = np.repeat(rng.normal(0, 1, 32), 2) * np.tile([1, -1], 32)  # antithetic partners: +eps, -eps
    for run_id, skill in (("skill", 1.0), ("luck", 0.0)):
        for m in range(64):
            for p in range(64):
                correct = rng.random() < 1 / (1 + np.exp(-(skill * quality[m] + rng.normal(0, 0.3))))
                con.execute("INSERT INTO samples VALUES (?, 3, ?, ?, ?)", [run_id, m, f"p{p:03d}", 1.1 if correct else 0.1])
    con.close()
    out = tmp_path / "signal.json"
    assert main([str(path), "--json", str(out)]) == 0
    rows = {r["run_id"]: r for r in json.loads(out.read_text())}
    skill, luck = rows["skill"], rows["luck"]
    assert skill["split_half_r"] > skill["split_half_null"][1] and skill["reliability"] > 0.5
    assert skill["partners_r"] < skill["partners_null"][0]  # partners move the reward in opposite directions
    # coin flips: r is chance's (its sd is about 1/sqrt(members) = 0.125), the null band straddles 0
    assert abs(luck["split_half_r"]) < 0.4 and luck["split_half_null"][0] < 0 < luck["split_half_null"][1]
    assert duckdb.connect(str(path), read_only=True).execute("SELECT count(*) FROM samples").fetchone()[0] == 2 * 64 * 64
    # the pooled summary, from the saved rows: skill's generation lies above its split-half band and
    # below its partners' band; luck's lies inside both
    summary = {s["run_id"]: s for s in summarise(json.loads(out.read_text()))}
    assert summary["skill"]["split_half"]["above"] == 1 and summary["skill"]["partners"]["below"] == 1
    assert summary["skill"]["partners"]["mean"] == skill["partners_r"] and summary["skill"]["generations"] == 1
    assert (summary["luck"]["split_half"]["above"], summary["luck"]["split_half"]["below"]) == (0, 0)
    assert main(["--from-json", str(out)]) == 0


@pytest.mark.parametrize("recipe_set", sorted(__import__("benchmarks.learning_runs", fromlist=["RECIPE_SETS"]).RECIPE_SETS))
def test_every_learning_recipe_is_a_valid_run_of_the_learning_config(recipe_set):
    """A recipe with a misspelt key or an impossible value would only fail on the GPU, minutes into a
    lease: each one loads here as the run the sweep starts (the config plus its overrides)."""
    from benchmarks.learning_runs import CONFIG, RECIPE_SETS, eval_sets
    from es_core.settings import load_settings

    root = Path(__file__).resolve().parents[1]
    for run_id, overrides in RECIPE_SETS[recipe_set].items():
        settings = load_settings(root / CONFIG, [eval_sets("../shared/data/countdown.json"), "es.generations=30", *overrides])
        for kv in overrides:
            key, value = kv.split("=", 1)
            section, name = key.split(".")
            assert str(getattr(getattr(settings, section), name)) == value, (run_id, kv)


def test_the_learning_report_leaves_the_ledgers_it_reads_as_recorded(tmp_path, capsys):
    """The committed ledgers are of older schemas, which opening with Ledger migrates in place: the
    report reads its own copies, so docs/results keeps what the GPU recorded, byte for byte."""
    import hashlib


    from benchmarks import learning_report

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    for name in ("learning-2026-12-03", "h100-2026-12-07-exact"):
        shutil.copytree(results / name, tmp_path / name, ignore=shutil.ignore_patterns("*.log", "*.json", "*.md"))
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.glob("*/ledger.duckdb")}
    learning_report.main([str(tmp_path / "h100-2026-12-07-exact"), "--recipes", "exact", "--alone",
                          "--baseline", str(tmp_path / "learning-2026-12-03"), "--png", str(tmp_path / "exact.png")])
    out = capsys.readouterr().out
    assert "| ES `wsx-s6e-3` | 500 | 50 |" in out and "57.2% [54.9, 59.6]" in out and "`sft-matched`" in out
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest


def test_the_slim_ledger_keeps_every_samples_reward_and_the_text_of_each_runs_last_generation_only(tmp_path):
    """The slim copy carried off a GPU machine: every other table whole; of samples every row with
    its reward (member_signal reads them here, a rebuild replays them), the prompt and completion only
    in each run's last generation."""
    import duckdb

    from artifacts.ledger import Ledger
    from artifacts.slim import slim_copy
    from benchmarks.member_signal import main
    from tests.test_ledger import fake_generation

    data = tmp_path / "data"
    ledger = Ledger(data)
    for run_id, generations in (("a", 3), ("b", 2)):
        ledger.record_run(run_id, run_id, "{}", "f" * 64, "/models/base", "b" * 64, 1)
        for g in range(generations):
            ledger.commit_generation(*fake_generation(run_id, g, population=4, problems=5))
    slim = slim_copy(data, tmp_path / "slim.duckdb")
    con = duckdb.connect(str(slim), read_only=True)
    try:
        kept = con.execute("SELECT run_id, generation, count(*), count(completion), count(prompt), sum(reward) FROM samples GROUP BY ALL ORDER BY ALL").fetchall()
        full = duckdb.connect(str(data / "ledger.duckdb"), read_only=True)
        try:
            sums = full.execute("SELECT run_id, generation, count(*), sum(reward) FROM samples GROUP BY ALL ORDER BY ALL").fetchall()
            assert con.execute("SELECT count(*) FROM members").fetchone() == full.execute("SELECT count(*) FROM members").fetchone() == (20,)
        finally:
            full.close()
    finally:
        con.close()
    assert [(r, g, n, s) for r, g, n, _, _, s in kept] == sums and len(kept) == 5
    assert [(r, g, c, p) for r, g, _, c, p, _ in kept] == [("a", 0, 0, 0), ("a", 1, 0, 0), ("a", 2, 20, 20), ("b", 0, 0, 0), ("b", 1, 20, 20)]
    assert main([str(slim), "--json", str(tmp_path / "signal.json")]) == 0
    assert len(json.loads((tmp_path / "signal.json").read_text())) == 5  # every generation, not the last alone
    # a ledger like any other, keys included: a resumed run goes on writing it (each write replaces its row)
    carried = tmp_path / "carried"
    carried.mkdir()
    shutil.copyfile(slim, carried / "ledger.duckdb")
    again = Ledger(carried)
    for g in (2, 3):  # the last generation committed again (a kill between commit and the run's end), then the next
        again.commit_generation(*fake_generation("a", g, population=4, problems=5))
    for accuracy in (0.25, 0.5):
        again.record_eval({"run_id": "a", "generation": 3, "split": "heldout", "model": "centre", "accuracy": accuracy})
    assert again.query("SELECT count(*) FROM samples WHERE run_id = 'a'")[1] == [(80,)]
    assert again.query("SELECT count(*), max(accuracy) FROM evals")[1] == [(1, 0.5)]


def test_a_slim_ledger_committed_before_the_copy_had_keys_becomes_a_live_ledger_and_stays_as_recorded(tmp_path):
    """docs/results' slim ledgers (schema v6, no keys): `python -m artifacts.slim` makes a ledger a
    resumed run can write, the committed file left byte for byte as it was."""
    import hashlib

    from artifacts.ledger import CURRENT_VERSION, Ledger
    from artifacts.slim import main

    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / "h100-2026-12-07-exact"
    shutil.copytree(committed, tmp_path / "old", ignore=shutil.ignore_patterns("*.log", "*.json", "*.md", "*.txt", "*.tgz"))
    before = hashlib.sha256((tmp_path / "old" / "ledger.duckdb").read_bytes()).hexdigest()
    assert Ledger(tmp_path / "old").schema_version() < CURRENT_VERSION
    (tmp_path / "new").mkdir()
    assert main([str(tmp_path / "old"), str(tmp_path / "new" / "ledger.duckdb")]) == 0
    assert hashlib.sha256((tmp_path / "old" / "ledger.duckdb").read_bytes()).hexdigest() == before
    live = Ledger(tmp_path / "new")
    assert live.schema_version() == CURRENT_VERSION and live.last_generation("wsx-s6e-3") == 51
    for accuracy in (0.25, 0.5):
        live.record_eval({"run_id": "wsx-s6e-3", "generation": 60, "split": "heldout", "model": "centre", "accuracy": accuracy})
    assert live.query("SELECT count(*), max(accuracy) FROM evals WHERE generation = 60")[1] == [(1, 0.5)]


def test_a_snapshot_replaces_each_file_whole_and_keeps_the_last_one_while_a_writer_holds_the_ledger(tmp_path):
    """benchmarks/snapshot.py, what sweep.sh leaves under $OUT every minute: the slim ledger, the
    learning json and the logs; while another process holds the ledger read-write (a run's commit)
    it takes nothing and the previous snapshot stays as it was, no partial file beside it."""
    import subprocess
    import sys
    import tarfile

    import duckdb

    from artifacts.ledger import Ledger
    from benchmarks.snapshot import main, snapshot
    from tests.test_ledger import fake_generation

    data, out = tmp_path / "data", tmp_path / "out"
    assert not snapshot(data, out)  # no ledger yet: nothing to take
    ledger = Ledger(data)
    ledger.record_run("a", "a", "{}", "f" * 64, "/models/base", "b" * 64, 1)
    ledger.commit_generation(*fake_generation("a", 0))
    (data / "learning-plateau.json").write_text('{"plateau_steps": 1000}\n')
    (data / "a.log").write_text("generation 0 committed\n")
    assert snapshot(data, out)
    assert sorted(p.name for p in out.iterdir()) == ["learning-plateau.json", "ledger.duckdb", "logs.tgz"]
    with tarfile.open(out / "logs.tgz") as tar:
        assert tar.extractfile("a.log").read() == b"generation 0 committed\n"
    first = (out / "ledger.duckdb").read_bytes()
    ledger.commit_generation(*fake_generation("a", 1))
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(data / "ledger.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not snapshot(data, out)
        assert main([str(data), str(out), "--tries", "2"]) == 1
        assert (out / "ledger.duckdb").read_bytes() == first and not list(out.glob("*.partial"))
    finally:
        holder.kill()
        holder.wait()
    assert main([str(data), str(out)]) == 0
    con = duckdb.connect(str(out / "ledger.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM generations").fetchone() == (2,)
    finally:
        con.close()


def test_member_signal_reads_a_grouped_generation_where_each_member_decoded_its_own_problems(tmp_path):
    """es.members_per_prompt: each group of members decoded its own problems, so the ledger's
    (member, problem) grid is mostly empty: each problem is normalised among those who decoded it,
    and members that differ in quality still show it."""
    import duckdb
    import numpy as np

    from benchmarks.member_signal import main
    from es_core.es import problem_groups

    rng = np.random.default_rng(2)
    path = tmp_path / "ledger.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE samples (run_id VARCHAR, generation INTEGER, member INTEGER, problem_id VARCHAR, reward DOUBLE)")
    quality = np.repeat(rng.normal(0, 1, 32), 2) * np.tile([1, -1], 32)
    for m, own in enumerate(problem_groups(64, 64, 16)):
        for p in own:
            correct = rng.random() < 1 / (1 + np.exp(-(1.5 * quality[m] + rng.normal(0, 0.3))))
            con.execute("INSERT INTO samples VALUES ('grouped', 0, ?, ?, ?)", [m, f"p{p:03d}", 1.1 if correct else 0.1])
    con.close()
    out = tmp_path / "signal.json"
    assert main([str(path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["members"], row["prompts"]) == (64, 64)
    assert row["split_half_r"] > row["split_half_null"][1] and row["partners_r"] < row["partners_null"][0]


def test_member_signal_summarises_a_run_whose_members_all_scored_alike(tmp_path, capsys):
    """A rehearsal on a tiny model (every reward 0) has no statistic to pool: the summary says so
    instead of failing after the table (found by the population recipes' CPU rehearsal)."""
    import duckdb

    from benchmarks.member_signal import main

    path = tmp_path / "ledger.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE samples (run_id VARCHAR, generation INTEGER, member INTEGER, problem_id VARCHAR, reward DOUBLE)")
    for g in (0, 1):
        for m in range(8):
            for p in range(8):
                con.execute("INSERT INTO samples VALUES ('flat', ?, ?, ?, 0.0)", [g, m, f"p{p}"])
    con.close()
    assert main([str(path), "--json", str(tmp_path / "signal.json")]) == 0
    summary = capsys.readouterr().out.splitlines()[-1].split()
    assert summary[:2] == ["flat", "2"] and summary.count("-") >= 4
    assert main(["--from-json", str(tmp_path / "signal.json")]) == 0


@pytest.mark.parametrize("accuracies, plateaued", [
    ([0.50, 0.60, 0.60, 0.59], True),  # the last two gain nothing over the best before them
    ([0.50, 0.60, 0.60], False),  # 0.60 gained over 0.50
    ([0.50, 0.60, 0.58, 0.59], True),
    ([0.50, 0.60, 0.58, 0.61], False),  # the last one gains
    ([0.50, 0.60, 0.61, 0.55], False),  # the one before it gained
    ([0.50, 0.49], False),  # two evaluations cannot show a plateau of two
])
def test_a_plateau_is_two_evaluations_that_gain_nothing_over_the_best_before_them(accuracies, plateaued):
    from benchmarks.learning_runs import plateaued as is_plateau

    assert is_plateau(accuracies) is plateaued


@pytest.mark.slow
def test_the_plateau_step_continues_the_warm_start_and_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Each increment continues the last warm start (the ledger's parent), its held-out accuracy is
    read back, and the same command again trains nothing: what the data dir holds is read."""
    import json
    import sys

    from artifacts.ledger import Ledger
    from benchmarks import learning_runs

    monkeypatch.setenv("ES", f"{sys.executable} -m flows.cli")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paper = Path(__file__).resolve().parents[2] / "shared" / "data" / "countdown.json"
    args = ["plateau", str(tmp_path), "--every", "1", "--max-steps", "3", "--paper", str(paper), "--paper-size", "4",
            *[a for kv in ("model.name=tiny-llama", "data.heldout_size=4", "warm_start.batch_size=2", "generation.max_new_tokens=8")
              for a in ("--set", kv)]]
    assert learning_runs.main(args) == 0
    record = json.loads((tmp_path / learning_runs.PLATEAU_FILE).read_text())
    assert [p["steps"] for p in record["points"]] == [1, 2, 3] and record["plateau_steps"] == 3  # tiny-llama never answers: 0% thrice
    parents = Ledger(tmp_path).query("SELECT steps, parent_warm_start_sha256 IS NOT NULL FROM warm_starts ORDER BY steps")[1]
    assert parents == [(1, False), (2, True), (3, True)]
    monkeypatch.setenv("ES", "false")  # a second call that tried to train would fail
    capsys.readouterr()
    assert learning_runs.main(args) == 0
    assert "plateau at 3 steps" in capsys.readouterr().out

    # A fresh machine with the slim ledger alone (sweep.sh's LEDGER): the recorded warm starts are
    # trained again shortest first, each continuing the last, to the recorded bits (the run row
    # refuses others), so none starts over from step 0; then nothing is missing and nothing runs.
    import time

    from artifacts.slim import slim_copy
    from artifacts.store import ArtifactStore

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    slim_copy(tmp_path, fresh / "ledger.duckdb")
    supervised = ["--config", learning_runs.CONFIG, "--data-dir", str(fresh), "--set", learning_runs.eval_sets(str(paper), 4)]
    extra = args[args.index("--set"):]
    assert learning_runs.remake_warm_starts(fresh, 3, supervised, extra, time.monotonic()) is False  # past its deadline: runs nothing
    assert "would end after the deadline" in capsys.readouterr().out
    monkeypatch.setenv("ES", f"{sys.executable} -m flows.cli")
    assert learning_runs.remake_warm_starts(fresh, 3, supervised, extra, time.monotonic() + 600) is True
    recorded = Ledger(tmp_path).query("SELECT run_id, warm_start_sha256 FROM runs ORDER BY run_id")[1]
    assert Ledger(fresh).query("SELECT run_id, warm_start_sha256 FROM runs ORDER BY run_id")[1] == recorded
    assert all(ArtifactStore(fresh / "artifacts").exists(sha) for _, sha in recorded)
    assert all("continuing" in (fresh / f"sft-{n}.log").read_text() for n in (2, 3))
    monkeypatch.setenv("ES", "false")
    assert learning_runs.remake_warm_starts(fresh, 3, supervised, extra, time.monotonic() + 600) is True
