"""CPU-testable parts of benchmarks/sglang_real.py and scripts/sglang_unpack.sh."""
import pytest

from benchmarks.sglang_real import first_diff, parse_args, server_python


def test_steps_parsed_and_unknown_refused():
    assert parse_args(["--steps", "launch, parity"]).steps == ["launch", "parity"]
    with pytest.raises(SystemExit):
        parse_args(["--steps", "parity,bogus"])


def test_server_python_puts_sglang_site_first(monkeypatch):
    monkeypatch.setenv("SGLANG_PYTHONPATH", "/root/sgsite")
    monkeypatch.setenv("PYTHONPATH", "/root/site")
    assert server_python("python3") == "env PYTHONPATH=/root/sgsite:/root/site python3"
    monkeypatch.delenv("SGLANG_PYTHONPATH")
    assert server_python("python3") == "python3"


def test_first_diff():
    assert first_diff([1, 2, 3], [1, 2, 4]) == 2
    assert first_diff([1, 2], [1, 2]) is None
    assert first_diff([1, 2], [1, 2, 3]) == 2
