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


def _wheel(folder, name, version, requires=()):
    """A wheel holding only its METADATA: what sglang_carry.sh's check reads."""
    import zipfile

    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def _carry_check(wheels, base_list):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "sglang_carry.sh"
    r = subprocess.run(["bash", str(script), "--check", str(wheels), str(base_list)], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_carry_check_catches_the_two_misses_of_the_first_h100_run(tmp_path):
    """2026-12-07: transformers 5.12.1 refused the image's tokenizers 0.23.2, and fastapi wanted
    python-multipart, which sglang requires and nothing carried. Both are in the metadata."""
    wheels = tmp_path / "wheels"; wheels.mkdir()
    _wheel(wheels, "sglang", "0.5.16", ["fastapi", "python-multipart", "transformers==5.12.1", "torch==2.11.0", "tilelang==0.1.11",
                                        'av; platform_machine == "aarch64"', 'ray>=2; extra == "ray"'])
    _wheel(wheels, "transformers", "5.12.1", ["tokenizers<=0.23.0,>=0.22.0", "huggingface-hub<2.0,>=1.5.0"])
    base = tmp_path / "base.txt"
    base.write_text("fastapi-0.150.0-py3-none-any.whl\nstarlette-0.50.0-py3-none-any.whl\n")
    rc, out = _carry_check(wheels, base)
    assert rc == 1, out
    assert "VERSION tokenizers: the server would import image's 0.23.2; transformers requires tokenizers<=0.23.0,>=0.22.0" in out
    assert "MISSING python-multipart: sglang requires python-multipart" in out
    assert "torch" not in out.replace("tilelang", "") and " av" not in out and "ray" not in out  # met by the image; another platform; an extra not asked for
    assert "tilelang" in out.splitlines()[0]  # left out on purpose, and said so
    _wheel(wheels, "tokenizers", "0.22.2", ["huggingface-hub>=0.16.4,<2.0"])
    _wheel(wheels, "python-multipart", "0.0.34")
    rc, out = _carry_check(wheels, base)
    assert rc == 0, out


def test_carry_check_follows_the_extras_a_carried_wheel_is_asked_for(tmp_path):
    wheels = tmp_path / "wheels"; wheels.mkdir()
    _wheel(wheels, "sglang", "0.5.16", ["flashinfer-python[cu13]==0.6.14"])
    _wheel(wheels, "flashinfer-python", "0.6.14", ['nvidia-nothing-cu13; extra == "cu13"', 'other-thing; extra == "cu12"'])
    (tmp_path / "none.txt").write_text("")
    rc, out = _carry_check(wheels, tmp_path / "none.txt")
    assert rc == 1 and "MISSING nvidia-nothing-cu13: flashinfer-python[cu13] requires nvidia-nothing-cu13" in out and "other-thing" not in out, out
