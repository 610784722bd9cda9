"""`es-countdown sql | lineage | export | gc`, and the example queries of docs/ledger.md, against a
small ledger whose centres and member adapters are real artifacts."""

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from artifacts.cli import main, register
from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore
from tests.test_ledger import fake_generation, record_fake_run

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCS = PROJECT_ROOT / "docs" / "ledger.md"


def reward(g: int, m: int, p: int) -> float:
    """Problem p is solved by members with a larger index; later generations score a little more."""
    return round((1.1 if p < m else 0.1) + 0.01 * g, 6)


def _real_artifacts(store: ArtifactStore, rows: list[dict], keys: tuple[str, ...]) -> None:
    for row in rows:
        for key in keys:
            ref = store.put_bytes(row[key].encode(), "stand-in")
            row[key] = ref.sha256
            if key == "adapter_sha256":
                row["adapter_path"] = str(ref.path)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """my-run: 3 generations of 4 members on 3 problems, held-out evals of the base model (0) and
    centres 1 and 3; other-run: 1 generation; two artifacts nothing references."""
    data = tmp_path / "data"
    ledger, store = Ledger(data), ArtifactStore(data / "artifacts")
    ledger.record_problems([{"problem_id": f"cd-{p:03d}", "numbers": [p, 2, 3], "target": p + 5, "split": "train"} for p in range(3)])
    for run_id, generations in (("my-run", 3), ("other-run", 1)):
        record_fake_run(ledger, run_id)
        centres = {}
        for g in range(generations):
            generation, members, samples = fake_generation(run_id, g, population=4, problems=3, reward=reward)
            for key in ("parent_center_sha256", "center_sha256"):  # the same fake centre -> the same artifact
                fake = generation[key]
                centres.setdefault(fake, store.put_bytes(fake.encode(), "centre").sha256)
                generation[key] = centres[fake]
            _real_artifacts(store, members, ("adapter_sha256",))
            ledger.commit_generation(generation, members, samples)
    evals = [("base", 0, 0.1), ("centre", 1, 0.2), ("centre", 3, 0.4)]
    for model, g, accuracy in evals:
        samples_sha = store.put_bytes(f"{model} {g}\n".encode(), "samples.jsonl").sha256
        centre = None if model == "base" else ledger.generation_row("my-run", g - 1)["center_sha256"]
        ledger.record_eval({
            "run_id": "my-run", "generation": g, "split": "heldout", "model": model, "adapter_sha256": centre, "n": 100,
            "reward_mean": accuracy + 0.05, "reward_ci_low": accuracy - 0.05, "reward_ci_high": accuracy + 0.15,
            "accuracy": accuracy, "accuracy_ci_low": accuracy - 0.1, "accuracy_ci_high": accuracy + 0.1, "format_rate": 0.9,
            "samples_sha256": samples_sha,
        })
    store.put_bytes(b"orphan one", "x")
    store.put_bytes(b"orphan two", "y")
    return data


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- runs ----------------------------------------------------------------------------------------


def test_runs_lists_each_run_with_status_generations_and_best_held_out_accuracy(data_dir, capsys):
    Ledger(data_dir).set_run_status("my-run", "completed")  # other-run stays "running", and no process writes it
    code, out, err = run_cli(capsys, "runs", "--data-dir", data_dir)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["run_id", "name", "status", "generations", "best", "held-out", "accuracy", "started", "(UTC)"]
    mine = next(line for line in lines if line.startswith("my-run "))
    other = next(line for line in lines if line.startswith("other-run "))
    assert " completed " in mine and " 3/" in mine and "heldout 0.4 (centre g3)" in mine, mine
    assert " interrupted " in other and " 1/" in other and " - " in other, other
    assert lines[-1] == "(2 rows)"

    code, out, _ = run_cli(capsys, "runs", "--format", "json", "--data-dir", data_dir)
    runs = {r["run_id"]: r for r in json.loads(out)}
    assert runs["my-run"]["best_heldout"] == {"heldout": {"accuracy": 0.4, "model": "centre", "generation": 3}}
    assert runs["my-run"]["generations_committed"] == 3 and runs["other-run"]["recorded_status"] == "running"
    assert runs["other-run"]["status"] == "interrupted" and runs["other-run"]["best_heldout"] == {}


def test_runs_without_a_ledger_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "runs", "--data-dir", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1 and "no ledger at" in err


# --- sql -----------------------------------------------------------------------------------------


def test_sql_as_a_table(data_dir, capsys):
    code, out, _ = run_cli(capsys, "sql", "SELECT generation, reward_max, center_sha256 FROM generations WHERE run_id = 'my-run' ORDER BY 1",
                           "--max-width", "12", "--data-dir", data_dir)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["generation", "reward_max", "center_sha256"]
    assert lines[2].split()[:2] == ["0", "1.1"] and lines[2].split()[2].endswith("…") and len(lines[2].split()[2]) == 12
    assert lines[-1] == "(3 rows)"


def test_sql_as_csv_and_json_keeps_every_value_whole(data_dir, capsys):
    query = "SELECT problem_id, completion, prompt, correct FROM samples WHERE run_id = 'my-run' AND generation = 0 AND member = 1 ORDER BY problem_id"
    code, out, _ = run_cli(capsys, "sql", query, "--format", "csv", "--data-dir", data_dir)
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and rows[0] == ["problem_id", "completion", "prompt", "correct"]
    assert rows[1][1] == "member 1 says " + "x" * 40 and rows[1][2].endswith("equals 5.\n<think>") and rows[1][3] == "True" and len(rows) == 4
    code, out, _ = run_cli(capsys, "sql", "SELECT problem_id, numbers, target, [1.5, 'nan'::DOUBLE] AS l, now() AS t FROM problems ORDER BY 1",
                           "--format", "json", "--data-dir", data_dir)
    rows = json.loads(out)
    assert rows[0]["problem_id"] == "cd-000" and rows[0]["numbers"] == [0, 2, 3] and rows[0]["target"] == 5.0
    assert rows[0]["l"] == [1.5, None] and re.match(r"\d{4}-\d\d-\d\dT", rows[0]["t"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sql", "SELECT nope FROM runs"], "nope"),
        (["sql", "DELETE FROM runs"], "read-only"),
        (["sql", "SELECT 1", "--data-dir", "{missing}"], "no data dir at"),
        (["lineage", "abcdef12"], "no centre, member adapter or warm start"),
        (["lineage", "xyz"], "not a sha256"),
        (["export", "no-such-run"], "no-such-run is not in the ledger"),
    ],
)
def test_failures_are_one_line_on_stderr_with_exit_code_2(data_dir, capsys, argv, message):
    argv = [a.replace("{missing}", str(data_dir / "missing")) for a in argv]
    if "--data-dir" not in argv:
        argv += ["--data-dir", str(data_dir)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("es-countdown: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("template", ["COPY runs TO '{out}'", "COPY (SELECT * FROM runs) TO '{out}' (FORMAT parquet)",
                                      "SELECT * FROM read_csv('{other}')", "ATTACH '{out}' AS other"])
def test_read_only_sql_touches_no_file_but_the_ledger(data_dir, capsys, tmp_path, template):
    # DuckDB's read_only refuses writes to the ledger, not COPY ... TO another file
    out, other = tmp_path / "leaked.csv", tmp_path / "secret.csv"
    other.write_text("a,b\n1,2\n")
    code, stdout, err = run_cli(capsys, "sql", template.format(out=out, other=other), "--data-dir", str(data_dir))
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "sql reads the ledger only, no other file" in err and not out.exists(), err


def test_the_data_dir_defaults_to_es_data_dir(data_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ES_DATA_DIR", str(data_dir))
    assert run_cli(capsys, "sql", "SELECT count(*) AS n FROM runs", "--format", "csv")[1] == "n\n2\n"
    monkeypatch.delenv("ES_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # ./runs does not exist there
    code, _, err = run_cli(capsys, "sql", "SELECT 1")
    assert code == 2 and f"no data dir at {tmp_path / 'runs'}" in err


def test_a_real_process_gets_exit_code_2_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "artifacts.cli", "sql", "SELECT 1", "--data-dir", str(tmp_path / "none")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no data dir" in proc.stderr


# --- lineage -------------------------------------------------------------------------------------


def test_lineage_from_a_member_adapter_prefix(data_dir, capsys):
    member = Ledger(data_dir).member_rows("my-run", 2)[3]
    code, out, _ = run_cli(capsys, "lineage", member["adapter_sha256"][:10], "--data-dir", data_dir)
    assert code == 0
    assert out.startswith(f"member 3 of generation 2 (run my-run): adapter {member['adapter_sha256']}")
    assert [int(g) for g in re.findall(r"^generation (\d+)", out, re.M)] == [1, 0]
    assert "members (index:seed sign=reward): 0:1000+=0.11, 1:1000-=0.443333" in out
    assert out.splitlines()[-2].startswith("initial centre (run my-run): ")
    assert out.splitlines()[-1].startswith("base model ")
    code, out, _ = run_cli(capsys, "lineage", member["adapter_sha256"], "--format", "json", "--data-dir", data_dir)
    steps = json.loads(out)
    assert [s["kind"] for s in steps] == ["member", "update", "update", "init", "base"]
    assert steps[0]["center_sha256"] == steps[1]["center_sha256"]  # perturbed from theta_2 = what generation 1 made


# --- export --------------------------------------------------------------------------------------


def test_export_writes_every_table_of_the_run_as_parquet(data_dir, capsys, tmp_path):
    out_dir = tmp_path / "export"
    code, out, _ = run_cli(capsys, "export", "my-run", "--out", out_dir, "--data-dir", data_dir)
    assert code == 0
    assert sorted(Path(p).name for p in out.split()) == sorted(f"{t}.parquet" for t in ("runs", "generations", "members", "samples", "evals", "problems", "warm_starts"))
    con = duckdb.connect()
    count = lambda t: con.execute(f"SELECT count(*), count(DISTINCT run_id) FROM '{out_dir / t}.parquet'").fetchone()  # noqa: E731
    assert count("runs") == (1, 1) and count("generations") == (3, 1) and count("members") == (12, 1)
    assert count("samples") == (36, 1) and count("evals") == (3, 1)
    assert con.execute(f"SELECT DISTINCT run_id FROM '{out_dir}/samples.parquet'").fetchall() == [("my-run",)]
    assert con.execute(f"SELECT count(*) FROM '{out_dir}/problems.parquet'").fetchone() == (3,)
    assert con.execute(f"SELECT count(*) FROM '{out_dir}/warm_starts.parquet'").fetchone() == (0,)  # a run without one
    code, out, _ = run_cli(capsys, "export", "other-run", "--data-dir", data_dir)
    assert code == 0 and Path(out.split()[0]).parent == data_dir / "exports" / "other-run"


# --- gc ------------------------------------------------------------------------------------------


def test_gc_is_a_dry_run_until_yes_and_removes_only_unreferenced_artifacts(data_dir, capsys):
    store = ArtifactStore(data_dir / "artifacts")
    orphans = {store.put_bytes(b"orphan one", "x").sha256, store.put_bytes(b"orphan two", "y").sha256}
    before = {sha for sha, _ in store.iter_artifacts()}
    (store.tmp / "put-1-dead").mkdir(parents=True)  # a write a kill interrupted

    code, out, _ = run_cli(capsys, "gc", "--data-dir", data_dir)  # young: kept by default
    assert code == 0 and "would remove 0 unreferenced" in out and "and 2 younger than 24 h" in out

    code, out, _ = run_cli(capsys, "gc", "--min-age-hours", "0", "--data-dir", data_dir)
    assert code == 0
    assert {line.split()[2] for line in out.splitlines() if line.startswith("would remove ") and "unreferenced" not in line and "unfinished" not in line} == orphans
    assert "would remove 2 unreferenced artifact(s), 0 cached task result(s) naming them and 1 leftover(s)" in out and "dry run: add --yes" in out
    assert {sha for sha, _ in store.iter_artifacts()} == before and (store.tmp / "put-1-dead").exists()

    code, out, _ = run_cli(capsys, "gc", "--yes", "--min-age-hours", "0", "--data-dir", data_dir)
    assert code == 0 and "removed 2 unreferenced artifact(s), 0 cached task result(s) naming them and 1 leftover(s)" in out
    assert {sha for sha, _ in store.iter_artifacts()} == before - orphans
    assert not (store.tmp / "put-1-dead").exists()
    assert Ledger(data_dir).referenced_sha256() >= before - orphans  # everything left is referenced
    assert store.verify_all() == []
    code, out, _ = run_cli(capsys, "gc", "--yes", "--min-age-hours", "0", "--data-dir", data_dir)
    assert "removed 0 unreferenced artifact(s), 0 cached task result(s) naming them and 0 leftover(s), 0 B" in out


def test_gc_keeps_and_verify_checks_the_centre_a_weights_space_member_names(data_dir, capsys):
    """A weights-space member's artifact is a record naming its centre: without that centre it is
    nothing, so the centre is kept and checked with the member even where no ledger row names it."""
    from es_core.weights_space import MemberRecord

    store = ArtifactStore(data_dir / "artifacts")
    centre = store.put_bytes(b"a centre only a member names", "centre").sha256
    record = store.put_files({"es_member.json": MemberRecord(centre, 11, -1, 0.05, 1).to_bytes()}).sha256
    con = duckdb.connect(str(data_dir / "ledger.duckdb"))
    con.execute("UPDATE members SET adapter_sha256 = ? WHERE run_id = 'other-run' AND member = 0", [record])
    con.close()
    code, out, _ = run_cli(capsys, "gc", "--yes", "--min-age-hours", "0", "--data-dir", data_dir)
    assert code == 0 and "removed 3 unreferenced" in out and store.exists(centre) and store.exists(record)  # two orphans, the replaced member
    code, out, _ = run_cli(capsys, "verify", "--data-dir", data_dir)
    assert code == 0 and out.endswith(" 0 missing, 0 corrupt\n"), out
    store.remove(centre)
    code, out, _ = run_cli(capsys, "verify", "--data-dir", data_dir)
    assert code != 0 and f"MISSING artifact {centre} is missing" in out and f"(referenced by the member {record[:12]})" in out, out


@pytest.mark.parametrize("age", ["nan", "inf", "-1", "-inf"])
def test_gc_refuses_an_age_that_is_not_a_finite_number_of_hours(data_dir, capsys, age):
    # NaN compares false: every unreferenced artifact counted as old, a live run's centre included
    store = ArtifactStore(data_dir / "artifacts")
    store.put_bytes(b"orphan", "x")
    before = sorted(store.iter_artifacts())
    for yes in ([], ["--yes"]):
        code, out, err = run_cli(capsys, "gc", *yes, f"--min-age-hours={age}", "--data-dir", data_dir)
        assert code == 2 and out == "" and err.count("\n") == 1 and "--min-age-hours must be a finite number of hours >= 0" in err, err
    assert sorted(store.iter_artifacts()) == before


def test_gc_removes_nothing_while_a_run_writes_the_data_dir(data_dir, capsys):
    """A run holds writers.lock (shared) from its start to its end; here another process does."""
    store = ArtifactStore(data_dir / "artifacts")
    orphan = store.put_bytes(b"written, not yet committed", "x").sha256
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from artifacts.runs import DataDirWriter\n"
                               f"with DataDirWriter({str(data_dir)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run_cli(capsys, "gc", "--yes", "--min-age-hours", "0", "--data-dir", data_dir)
        assert code == 2 and out == "" and err.count("\n") == 1 and "a run is writing" in err and "gc removes nothing now" in err, err
        assert store.exists(orphan)
        code, out, _ = run_cli(capsys, "gc", "--min-age-hours", "0", "--data-dir", data_dir)
        assert code == 0 and "gc --yes would refuse" in out
    finally:
        holder.kill()
        holder.wait()
    code, out, _ = run_cli(capsys, "gc", "--yes", "--min-age-hours", "0", "--data-dir", data_dir)  # the holder is gone: its lock too
    assert code == 0 and not store.exists(orphan)


def test_register_adds_the_commands_to_another_parser():
    parser = argparse.ArgumentParser(prog="es-countdown")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    register(sub)
    args = parser.parse_args(["gc", "--yes", "--data-dir", "/d"])
    assert args.yes and args.data_dir == "/d" and callable(args.handler)
    assert parser.parse_args(["sql", "SELECT 1", "--format", "json"]).format == "json"


# --- the example queries of docs/ledger.md --------------------------------------------------------


def doc_queries() -> list[tuple[str, str]]:
    """(### title, sql) of each example under '## Example queries', in order."""
    text = DOCS.read_text().split("## Example queries", 1)[1]
    return re.findall(r"^### (.+?)\n.*?```sql\n(.*?)```", text, re.S | re.M)


def test_the_docs_have_five_example_queries():
    titles = [t for t, _ in doc_queries()]
    assert len(titles) == 5
    for word in ("Reward curve", "Best member", "Hardest", "Lineage", "held-out"):
        assert any(word in t for t in titles), word


def run_doc_query(n: int, data_dir: Path, capsys) -> list[dict]:
    code, out, err = run_cli(capsys, "sql", doc_queries()[n][1], "--format", "json", "--data-dir", data_dir)
    assert code == 0, err
    return json.loads(out)


def test_doc_query_reward_curve(data_dir, capsys):
    rows = run_doc_query(0, data_dir, capsys)
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert [round(r["reward_mean"], 6) for r in rows] == [round((0.3 + 1.3 + 2.3 + 3.3) / 12 + 0.01 * g, 6) for g in range(3)]
    assert [r["reward_max"] for r in rows] == [1.1, 1.11, 1.12] and [r["update_norm"] for r in rows] == [0.01, 0.02, 0.03]


def test_doc_query_best_member_per_generation(data_dir, capsys):
    rows = run_doc_query(1, data_dir, capsys)
    ledger = Ledger(data_dir)
    assert [(r["generation"], r["member"], r["sign"]) for r in rows] == [(0, 3, -1), (1, 3, -1), (2, 3, -1)]
    assert [r["seed"] for r in rows] == [1, 1001, 2001]
    assert rows[2]["adapter_sha256"] == ledger.member_rows("my-run", 2)[3]["adapter_sha256"]
    assert rows[2]["from_centre"] == ledger.generation_row("my-run", 1)["center_sha256"]


def test_doc_query_hardest_problems(data_dir, capsys):
    rows = run_doc_query(2, data_dir, capsys)
    assert [(r["problem_id"], r["attempts"], r["solve_rate"]) for r in rows] == [("cd-002", 12, 0.25), ("cd-001", 12, 0.5), ("cd-000", 12, 0.75)]
    assert rows[0]["numbers"] == [2, 2, 3] and rows[0]["target"] == 7.0


def test_doc_query_lineage(data_dir, capsys):
    rows = run_doc_query(3, data_dir, capsys)
    ledger = Ledger(data_dir)
    assert [r["generation"] for r in rows] == [2, 1, 0]
    for r in rows:
        g = ledger.generation_row("my-run", r["generation"])
        assert (r["from_centre"], r["to_centre"]) == (g["parent_center_sha256"], g["center_sha256"])
    assert [r["from_centre"] for r in rows[:-1]] == [r["to_centre"] for r in rows[1:]]  # a chain
    assert rows[0]["members"][1] == {"member": 1, "seed": 2000, "sign": -1, "reward": pytest.approx(1.3 / 3 + 0.02)}


def test_doc_query_base_vs_final_on_heldout(data_dir, capsys):
    (row,) = run_doc_query(4, data_dir, capsys)
    assert (row["n"], row["base_accuracy"], row["final_accuracy"], row["final_generation"]) == (100, 0.1, 0.4, 3)
    assert row["gain"] == pytest.approx(0.3) and row["accuracy_ci_low"] == pytest.approx(0.3)
