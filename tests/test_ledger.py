"""The DuckDB ledger, against real files: idempotent writes, whole generations, migrations,
lineage, and other processes reading while one writes or dies."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from artifacts.ledger import CURRENT_VERSION, LEDGER_FILE, Ledger, LedgerError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def centre(run_id: str, g: int) -> str:
    """theta_g of a fake run (theta_0 is the initial centre)."""
    return sha(f"{run_id}:centre:{g}")


def fake_generation(run_id: str, g: int, population: int = 4, problems: int = 3, text: int = 40, reward=None) -> tuple[dict, list[dict], list[dict]]:
    """Rows of generation g as the pipeline writes them: theta_g perturbed into members, scored,
    producing theta_{g+1}. reward(g, member, problem) -> float; default a fixed pattern."""
    reward = reward or (lambda g, m, p: round(0.1 * m + 0.01 * g + 0.001 * p, 6))
    members, samples = [], []
    for m in range(population):
        sample_rewards = [reward(g, m, p) for p in range(problems)]
        for p, r in enumerate(sample_rewards):
            samples.append({
                "run_id": run_id, "generation": g, "member": m, "problem_id": f"cd-{p:03d}",
                "prompt": f"Using the numbers [{p}, 2, 3], create an equation that equals {p + 5}.\n<think>",
                "completion": f"member {m} says " + "x" * text, "reward": r, "format_reward": 0.1,
                "format_ok": True, "correct": r >= 1.0, "completion_tokens": 7 + p,
            })
        members.append({
            "run_id": run_id, "generation": g, "member": m, "seed": 1000 * g + m // 2, "sign": 1 if m % 2 == 0 else -1,
            "adapter_sha256": sha(f"{run_id}:member:{g}:{m}"), "adapter_path": f"/data/artifacts/{g}/{m}",
            "reward_mean": sum(sample_rewards) / problems, "format_rate": 1.0,
            "accuracy": sum(r >= 1.0 for r in sample_rewards) / problems, "tokens": sum(7 + p for p in range(problems)), "server": "",
        })
    rewards = [mm["reward_mean"] for mm in members]
    mean = sum(rewards) / population
    started = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=g)
    generation = {
        "run_id": run_id, "generation": g, "center_sha256": centre(run_id, g + 1), "center_path": f"/data/artifacts/c{g + 1}",
        "parent_center_sha256": centre(run_id, g), "reward_mean": mean,
        "reward_std": (sum((r - mean) ** 2 for r in rewards) / population) ** 0.5, "reward_max": max(rewards),
        "started_at": started, "finished_at": started + timedelta(seconds=30), "update_norm": 0.01 * (g + 1),
        "generate_seconds": 20.0, "wall_seconds": 30.0,
    }
    return generation, members, samples


def record_fake_run(ledger: Ledger, run_id: str, settings_sha256: str = "s" * 64) -> None:
    ledger.record_run(run_id, "test", json.dumps({"es": {"seed": 0}}), settings_sha256, "/models/tiny", "b" * 64, 0)


def counts(ledger: Ledger, run_id: str) -> tuple[int, int, int]:
    _, rows = ledger.query(
        "SELECT (SELECT count(*) FROM generations WHERE run_id = $r), (SELECT count(*) FROM members WHERE run_id = $r), "
        "(SELECT count(*) FROM samples WHERE run_id = $r)",
        {"r": run_id},
    )
    return rows[0]


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "data")


# --- runs ----------------------------------------------------------------------------------------


def test_record_run_twice_keeps_created_at_and_updates_the_rest(ledger):
    record_fake_run(ledger, "r1")
    first = ledger.run_row("r1")
    time.sleep(0.01)
    ledger.record_run("r1", "renamed", '{"es": {"generations": 9}}', "s" * 64, "/models/moved", "b" * 64, 0, status="running")
    second = ledger.run_row("r1")
    assert second["created_at"] == first["created_at"] and second["updated_at"] > first["updated_at"]
    assert second["run_name"] == "renamed" and second["base_model"] == "/models/moved"
    assert ledger.query("SELECT count(*) FROM runs")[1] == [(1,)]


def test_record_run_refuses_other_settings_or_base_model_in_one_line(ledger):
    record_fake_run(ledger, "r1")
    with pytest.raises(LedgerError, match="settings") as err:
        record_fake_run(ledger, "r1", settings_sha256="t" * 64)
    assert "\n" not in str(err.value)
    with pytest.raises(LedgerError, match="base model"):
        ledger.record_run("r1", "test", "{}", "s" * 64, "/models/tiny", "c" * 64, 0)
    assert ledger.run_row("r1")["settings_sha256"] == "s" * 64


def test_set_run_status(ledger):
    record_fake_run(ledger, "r1")
    ledger.set_run_status("r1", "completed")
    assert ledger.run_row("r1")["status"] == "completed"
    with pytest.raises(LedgerError, match="not in the ledger"):
        ledger.set_run_status("nope", "failed")


# --- generations ---------------------------------------------------------------------------------


def test_commit_generation_twice_keeps_one_copy_of_every_row(ledger):
    record_fake_run(ledger, "r1")
    for _ in range(2):
        ledger.commit_generation(*fake_generation("r1", 0))
    assert counts(ledger, "r1") == (1, 4, 12)
    assert ledger.last_generation("r1") == 0
    row = ledger.generation_row("r1", 0)
    assert row["center_sha256"] == centre("r1", 1) and row["parent_center_sha256"] == centre("r1", 0)
    assert row["started_at"] == datetime(2026, 1, 1)  # stored as UTC
    assert [m["member"] for m in ledger.member_rows("r1", 0)] == [0, 1, 2, 3]


def test_recommitting_a_generation_replaces_it_whole(ledger):
    record_fake_run(ledger, "r1")
    ledger.commit_generation(*fake_generation("r1", 0, population=6))
    ledger.commit_generation(*fake_generation("r1", 0, population=4, reward=lambda g, m, p: 0.5))
    assert counts(ledger, "r1") == (1, 4, 12)
    assert {m["reward_mean"] for m in ledger.member_rows("r1", 0)} == {0.5}


def test_a_failed_commit_writes_nothing_of_the_generation(ledger):
    record_fake_run(ledger, "r1")
    generation, members, samples = fake_generation("r1", 0)
    samples[-1]["completion_tokens"] = "many"  # fails after members were inserted
    with pytest.raises(LedgerError, match="completion_tokens"):
        ledger.commit_generation(generation, members, samples)
    samples[-1]["completion_tokens"] = 3
    samples[-1]["not_a_column"] = 1
    with pytest.raises(LedgerError, match="unknown column"):
        ledger.commit_generation(generation, members, samples)
    assert counts(ledger, "r1") == (0, 0, 0) and ledger.last_generation("r1") is None


def test_commit_generation_refuses_inconsistent_rows(ledger):
    record_fake_run(ledger, "r1")
    generation, members, samples = fake_generation("r1", 1)
    with pytest.raises(LedgerError, match="not \\(r1, 1\\)"):
        ledger.commit_generation(generation, members, [{**samples[0], "generation": 2}])
    with pytest.raises(LedgerError, match="not in the members"):
        ledger.commit_generation(generation, members[:1], samples)
    with pytest.raises(LedgerError, match="record_run first"):
        ledger.commit_generation(*fake_generation("unknown-run", 0))


def test_problems_and_evals_are_replaced_on_their_keys(ledger):
    record_fake_run(ledger, "r1")
    ledger.record_problems([{"problem_id": "cd-000", "numbers": [1, 2, 3], "target": 6, "split": "train"}])
    ledger.record_problems([{"problem_id": "cd-000", "numbers": [1, 2, 3], "target": 6.0, "split": "train"}])
    assert ledger.query("SELECT problem_id, numbers, target, split FROM problems")[1] == [("cd-000", [1, 2, 3], 6.0, "train")]
    row = {"run_id": "r1", "generation": 0, "split": "heldout", "model": "base", "adapter_sha256": None, "n": 10,
           "reward_mean": 0.1, "reward_ci_low": 0.0, "reward_ci_high": 0.2, "accuracy": 0.1, "accuracy_ci_low": 0.0,
           "accuracy_ci_high": 0.3, "format_rate": 0.5, "samples_sha256": "e" * 64}
    ledger.record_eval(row)
    ledger.record_eval({**row, "accuracy": 0.2})
    ledger.record_eval({**row, "model": "centre", "adapter_sha256": "f" * 64})
    assert ledger.query("SELECT model, accuracy FROM evals ORDER BY model")[1] == [("base", 0.2), ("centre", 0.1)]
    with pytest.raises(LedgerError, match="centre, base"):
        ledger.record_eval({**row, "model": "final"})


def test_reads_before_any_write(tmp_path):
    ledger = Ledger(tmp_path / "nothing-yet")
    assert ledger.run_row("r1") is None and ledger.last_generation("r1") is None and ledger.member_rows("r1", 0) == []
    with pytest.raises(LedgerError, match="no ledger at"):
        ledger.query("SELECT 1")
    assert not (tmp_path / "nothing-yet").exists()  # reading creates nothing


def test_query_is_read_only_and_errors_are_one_line(ledger):
    record_fake_run(ledger, "r1")
    with pytest.raises(LedgerError, match="read-only") as err:
        ledger.query("DELETE FROM runs")
    assert "\n" not in str(err.value)
    with pytest.raises(LedgerError) as err:
        ledger.query("SELECT nope FROM\n runs")
    assert "\n" not in str(err.value)
    assert ledger.run_row("r1") is not None


# --- lineage -------------------------------------------------------------------------------------


def test_lineage_over_three_generations(ledger):
    record_fake_run(ledger, "r1")
    for g in range(3):
        ledger.commit_generation(*fake_generation("r1", g))
    steps = ledger.lineage(centre("r1", 3))
    assert [s["kind"] for s in steps] == ["update", "update", "update", "init", "base"]
    assert [s.get("generation") for s in steps] == [2, 1, 0, None, None]
    assert [s["center_sha256"] for s in steps[:4]] == [centre("r1", g) for g in (3, 2, 1, 0)]
    assert steps[4]["base_model_sha256"] == ledger.run_row("r1")["base_model_sha256"]
    assert [(m["member"], m["seed"], m["sign"]) for m in steps[0]["members"]] == [(0, 2000, 1), (1, 2000, -1), (2, 2001, 1), (3, 2001, -1)]
    assert steps[2]["members"][3]["reward_mean"] == pytest.approx(0.301)
    # from a member adapter of generation 1: the member, then theta_1's chain
    member_steps = ledger.lineage(sha("r1:member:1:2")[:10])  # a prefix
    assert member_steps[0] == {
        "kind": "member", "run_id": "r1", "generation": 1, "member": 2, "seed": 1001, "sign": 1,
        "adapter_sha256": sha("r1:member:1:2"), "reward_mean": pytest.approx(0.211), "center_sha256": centre("r1", 1),
    }
    assert [s["kind"] for s in member_steps[1:]] == ["update", "init", "base"]
    # the initial centre is its own lineage, on the run's base model
    run = ledger.run_row("r1")
    assert ledger.lineage(centre("r1", 0)) == [{"kind": "init", "run_id": "r1", "center_sha256": centre("r1", 0)},
                                               {"kind": "base", "base_model": run["base_model"], "base_model_sha256": run["base_model_sha256"]}]
    with pytest.raises(LedgerError, match="no centre, member adapter or warm start"):
        ledger.lineage("0000")


# --- migrations ----------------------------------------------------------------------------------

_V1_BY_HAND = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL);
INSERT INTO schema_version VALUES (1, TIMESTAMP '2025-12-01 00:00:00');
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, config_json VARCHAR, base_model VARCHAR,
    base_model_sha256 VARCHAR, seed BIGINT, status VARCHAR);
CREATE TABLE generations (run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, center_sha256 VARCHAR, center_path VARCHAR,
    parent_center_sha256 VARCHAR, reward_mean DOUBLE, reward_std DOUBLE, reward_max DOUBLE, started_at TIMESTAMP,
    finished_at TIMESTAMP, PRIMARY KEY (run_id, generation));
CREATE TABLE members (run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, member INTEGER NOT NULL, seed BIGINT, sign INTEGER,
    adapter_sha256 VARCHAR, adapter_path VARCHAR, reward_mean DOUBLE, format_rate DOUBLE, accuracy DOUBLE, tokens BIGINT,
    PRIMARY KEY (run_id, generation, member));
CREATE TABLE samples (run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, member INTEGER NOT NULL, problem_id VARCHAR NOT NULL,
    prompt VARCHAR, completion VARCHAR, reward DOUBLE, format_ok BOOLEAN, correct BOOLEAN, completion_tokens INTEGER,
    PRIMARY KEY (run_id, generation, member, problem_id));
CREATE TABLE evals (run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, split VARCHAR NOT NULL, n INTEGER,
    reward_mean DOUBLE, accuracy DOUBLE, format_rate DOUBLE, PRIMARY KEY (run_id, generation, split));
CREATE TABLE problems (problem_id VARCHAR PRIMARY KEY, numbers INTEGER[], target DOUBLE, split VARCHAR);
INSERT INTO runs VALUES ('old', TIMESTAMP '2025-12-01 10:00:00', '{}', '/models/tiny', 'bbbb', 7, 'completed');
INSERT INTO generations VALUES ('old', 0, 'c1', '/a/c1', 'c0', 0.5, 0.1, 0.7, TIMESTAMP '2025-12-01 10:00:00', TIMESTAMP '2025-12-01 10:01:00');
INSERT INTO members VALUES ('old', 0, 0, 11, 1, 'm0', '/a/m0', 0.7, 1.0, 0.5, 100), ('old', 0, 1, 11, -1, 'm1', '/a/m1', 0.3, 1.0, 0.0, 90);
INSERT INTO samples VALUES ('old', 0, 0, 'cd-1', 'p', 'c', 0.7, true, false, 12);
INSERT INTO evals VALUES ('old', 1, 'heldout', 50, 0.4, 0.3, 0.9);
INSERT INTO problems VALUES ('cd-1', [1, 2, 3], 6, 'train');
"""


def test_a_v1_ledger_made_by_hand_is_migrated_to_the_current_version(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    con = duckdb.connect(str(data / LEDGER_FILE))
    con.execute(_V1_BY_HAND)
    con.close()
    ledger = Ledger(data)
    assert ledger.schema_version() == 1
    run = ledger.run_row("old")  # the first read migrates
    assert ledger.schema_version() == CURRENT_VERSION
    assert run["created_at"] == datetime(2025, 12, 1, 10) and run["updated_at"] == run["created_at"] and run["settings_sha256"] is None
    assert ledger.query("SELECT model, n, accuracy, reward_ci_low FROM evals")[1] == [("centre", 50, 0.3, None)]
    assert ledger.generation_row("old", 0)["update_norm"] is None
    assert ledger.query("SELECT format_reward, completion_tokens FROM samples")[1] == [(None, 12)]
    assert ledger.query("SELECT version FROM schema_version ORDER BY version")[1] == [(v,) for v in range(1, CURRENT_VERSION + 1)]
    assert [s["kind"] for s in ledger.lineage("c1")] == ["update", "init", "base"]
    assert ledger.run_row("old")["warm_start_sha256"] is None and ledger.query("SELECT count(*) FROM warm_starts")[1] == [(0,)]
    # its members were drawn with torch's CPU randn: a resume by this code is refused in one line
    assert run["noise_scheme"] == "torch-cpu-randn"
    with pytest.raises(LedgerError, match="recorded with noise scheme torch-cpu-randn, this code draws philox"):
        ledger.record_run("old", "old-run", "{}", "s" * 64, "/models/tiny", "bbbb", 7)
    # and it takes today's writes: a resume (by code of its scheme) fills the new columns, evals gain a base row
    ledger.record_run("old", "old-run", "{}", "s" * 64, "/models/tiny", "bbbb", 7, noise_scheme="torch-cpu-randn")
    ledger.record_eval({"run_id": "old", "generation": 0, "split": "heldout", "model": "base", "n": 50, "accuracy": 0.1})
    ledger.commit_generation(*fake_generation("old", 1))
    assert ledger.run_row("old")["settings_sha256"] == "s" * 64
    assert ledger.query("SELECT count(*) FROM evals")[1] == [(2,)]


def test_a_ledger_newer_than_the_code_is_refused(tmp_path):
    ledger = Ledger(tmp_path)
    record_fake_run(ledger, "r1")
    con = duckdb.connect(str(ledger.path))
    con.execute("INSERT INTO schema_version VALUES (?, now())", [CURRENT_VERSION + 1])
    con.close()
    with pytest.raises(LedgerError, match="newer than this code"):
        Ledger(tmp_path).run_row("r1")
    with pytest.raises(LedgerError, match="newer than this code"):
        record_fake_run(Ledger(tmp_path), "r2")


# --- other processes -----------------------------------------------------------------------------

_PRELUDE = f"""
import os, sys, time, json
sys.path.insert(0, {str(PROJECT_ROOT)!r})
from pathlib import Path
from artifacts.ledger import Ledger
from tests.test_ledger import fake_generation, record_fake_run
"""

_WRITER = _PRELUDE + """
ledger = Ledger(Path(sys.argv[1]))
record_fake_run(ledger, "live")
last = ledger.last_generation("live")
start = 0 if last is None else last + 1  # (`last or -1` restarted at 0 whenever generation 0 was the last)
print("ready", flush=True)
# optional: a file a reader process grows by a byte per read; then each commit waits for one more
# read (at most 30 s), so reads interleave with commits however the two processes are scheduled
reads = Path(sys.argv[6]) if len(sys.argv) > 6 else None
for g in range(start, start + int(sys.argv[2])):
    ledger.commit_generation(*fake_generation("live", g, population=int(sys.argv[3]), problems=int(sys.argv[4]), text=int(sys.argv[5])))
    print(g, flush=True)
    if reads is not None:
        done, deadline = reads.stat().st_size, time.monotonic() + 30
        while reads.stat().st_size == done and time.monotonic() < deadline:
            time.sleep(0.005)
"""

_READER = _PRELUDE + """
ledger = Ledger(Path(sys.argv[1]), read_timeout_s=float(sys.argv[4]))
population, problems = int(sys.argv[2]), int(sys.argv[3])
reads, slowest, half, seen = 0, 0.0, [], set()
stop = Path(sys.argv[5])
progress = Path(sys.argv[6])
first = True
while not stop.exists():
    t = time.monotonic()
    _, rows = ledger.query(
        "SELECT g.generation, (SELECT count(*) FROM members m WHERE m.run_id = g.run_id AND m.generation = g.generation), "
        "(SELECT count(*) FROM samples s WHERE s.run_id = g.run_id AND s.generation = g.generation) FROM generations g"
    )
    _, orphans = ledger.query(
        "SELECT count(*) FROM members m ANTI JOIN generations g USING (run_id, generation)"
    )
    slowest = max(slowest, time.monotonic() - t)
    half += [r for r in rows if r[1] != population or r[2] != population * problems]
    half += [("orphans", n) for (n,) in orphans if n]
    reads += 1
    seen.add(len(rows))
    with progress.open("ab") as f:
        f.write(b".")
    if first:
        print("ready", flush=True)
        first = False
print(json.dumps({"reads": reads, "slowest": slowest, "half": half, "seen": sorted(seen)}), flush=True)
"""


def test_a_reader_process_always_reads_whole_generations_while_a_writer_process_commits(tmp_path):
    data = tmp_path / "data"
    record_fake_run(Ledger(data), "live")
    stop, progress = tmp_path / "stop", tmp_path / "reads"
    progress.touch()
    population, problems, generations = 8, 25, 40
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(data), str(population), str(problems), "20", str(stop), str(progress)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"  # it reads in a loop from now on
    t0 = time.monotonic()
    writer = subprocess.run(
        [sys.executable, "-c", _WRITER, str(data), str(generations), str(population), str(problems), "400", str(progress)],
        capture_output=True, text=True, timeout=120,
    )
    stop.touch()
    out, _ = reader.communicate(timeout=60)
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0, "the reader failed (locked out past its retry budget?)"
    result = json.loads(out)
    print(f"writer {time.monotonic() - t0:.2f} s, reader {result['reads']} reads, slowest {result['slowest']:.3f} s")
    assert result["half"] == []
    assert len(result["seen"]) >= 3, result  # it really read while the writer was committing
    assert counts(Ledger(data), "live") == (generations, generations * population, generations * population * problems)


def test_a_writer_killed_at_random_points_never_leaves_a_half_generation(tmp_path):
    data = tmp_path / "data"
    population, problems = 10, 100
    rng = random.Random(11)
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(data), "1000", str(population), str(problems), "2000"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        # its first commit of this round has landed (however slow the machine): the kill then comes
        # at a random point of the commits that follow, during one or between two
        assert proc.stdout.readline().strip().isdigit()
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        ledger = Ledger(data)
        _, rows = ledger.query(
            "SELECT g.generation, (SELECT count(*) FROM members m WHERE m.run_id = g.run_id AND m.generation = g.generation), "
            "(SELECT count(*) FROM samples s WHERE s.run_id = g.run_id AND s.generation = g.generation) FROM generations g ORDER BY 1"
        )
        assert all(r[1] == population and r[2] == population * problems for r in rows), rows
        assert [r[0] for r in rows] == list(range(len(rows)))  # no gap: each commit after the previous
        assert ledger.query("SELECT count(*) FROM samples s ANTI JOIN generations g USING (run_id, generation)")[1] == [(0,)]
        assert ledger.query("SELECT count(*) FROM members m ANTI JOIN generations g USING (run_id, generation)")[1] == [(0,)]
    assert ledger.last_generation("live") >= 4  # each of the 5 rounds committed at least once before its kill


def test_a_run_that_failed_before_its_row_is_recorded_failed_and_its_resume_fills_it_in(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.record_failure("r1", "name", "{}", "s" * 64, 3, "ShapeExhausted: warm_start.batch_size 128: too few")
    row = ledger.run_row("r1")
    assert (row["status"], row["status_reason"], row["base_model_sha256"], row["warm_start_sha256"]) == ("failed", "ShapeExhausted: warm_start.batch_size 128: too few", None, None)
    # the resume records its base model and warm start as a new run would, and the reason goes
    ledger.record_run("r1", "name", "{}", "s" * 64, "/models/base", "b" * 64, 3, warm_start_sha256="w" * 64)
    row = ledger.run_row("r1")
    assert (row["status"], row["status_reason"], row["warm_start_sha256"]) == ("running", None, "w" * 64)
    ledger.record_failure("r1", "name", "{}", "s" * 64, 3, "stopped by SIGTERM")
    assert ledger.run_row("r1")["status_reason"] == "stopped by SIGTERM" and ledger.run_row("r1")["base_model_sha256"] == "b" * 64
