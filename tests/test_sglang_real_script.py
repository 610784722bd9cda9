"""CPU-testable parts of benchmarks/sglang_real.py and scripts/sglang_unpack.sh."""
from pathlib import Path

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


def test_float32_servers_run_tritons_dots_in_ieee_float32(monkeypatch):
    """Triton runs a float32 tl.dot in TF32 unless told: the float32 parity run of 2026-12-07 had
    SGLang's attention and LoRA kernels in TF32 against an IEEE embedded engine."""
    from benchmarks.sglang_real import server_env

    monkeypatch.setenv("SGLANG_PYTHONPATH", "/root/sgsite")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert server_env(parse_args(["--dtype", "float32"])) == {"TRITON_F32_DEFAULT": "ieee"}
    assert server_env(parse_args([])) == {}
    assert server_env(parse_args(["--dtype", "float32", "--triton-f32", "tf32"])) == {"TRITON_F32_DEFAULT": "tf32"}
    command = server_python("python3", server_env(parse_args(["--dtype", "float32"])))
    assert command == "env PYTHONPATH=/root/sgsite TRITON_F32_DEFAULT=ieee python3"


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


def test_launch_extra_names_the_server_modes():
    from benchmarks.sglang_real import launch_extra

    extra = launch_extra(parse_args([]))
    assert "--enable-deterministic-inference" in extra and "--cuda-graph-max-bs" not in extra
    extra = launch_extra(parse_args(["--no-deterministic", "--cuda-graph-max-bs", "64"]))
    assert "--enable-deterministic-inference" not in extra and extra[extra.index("--cuda-graph-max-bs") + 1] == "64"


def test_compare_counts_identical_rows_and_bins_first_differences():
    from types import SimpleNamespace as C

    from benchmarks.sglang_real import compare

    a = [[C(text="a b c"), C(text="a b x y")], [C(text="q"), C(text=" ".join("t" * 70))]]
    b = [[C(text="a b c"), C(text="a b z y")], [C(text="q"), C(text=" ".join("t" * 69) + " u")]]
    stats, rows = compare(a, b, str.split)
    assert (stats["identical"], stats["total"], stats["share"]) == (2, 4, 0.5)
    assert [(m, p, d) for m, p, d, _, _ in rows] == [(0, 1, 2), (1, 1, 69)]
    assert stats["first_diff_hist"]["2"] == 1 and stats["first_diff_hist"]["64"] == 1 and sum(stats["first_diff_hist"].values()) == 2


def test_launch_phases_from_the_first_h100_server_log():
    from pathlib import Path

    from benchmarks.sglang_real import launch_phases

    log = Path(__file__).resolve().parents[1] / "docs" / "results" / "h100-2026-12-07-sglang" / "server.log"
    assert launch_phases(log) == {"server_args->load_weight": 38.0, "load_weight->capture_begin": 2.0, "capture_begin->capture_end": 87.0, "capture_end->ready": 0.0}


def test_reference_gaps_merge_the_adapter_as_peft_does(tmp_path):
    """At a 'first difference' made up from PEFT's own greedy token, the reference (its merge of the
    same adapter) must pick that token, with gap = its logit minus the other token's."""
    import torch
    from peft import PeftModel

    from benchmarks.sglang_real import reference_gaps
    from es_core.backends.base import AdapterRef
    from es_core.lora import find_targets_in_folder, init_centre, save_adapter, spec_from_tensors
    from es_core.models import load_causal_lm, load_tokenizer, resolve_base_model
    from es_core.settings import ModelSettings

    base = Path(resolve_base_model(ModelSettings(name="tiny-llama"), tmp_path / "models").path)
    tensors = init_centre(find_targets_in_folder(base, "all", ["q_proj", "v_proj", "down_proj"]), 2, seed=0)
    tensors = {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) if ".lora_B." in k else v for k, v in tensors.items()}
    ref = AdapterRef("m0", save_adapter(tensors, tmp_path / "m0", spec_from_tensors(tensors, 4.0)))
    tok = load_tokenizer(base)
    prompt = "Using the numbers [1 2 3], make 6."
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    peft_model = PeftModel.from_pretrained(load_causal_lm(base, "float32", "cpu"), str(ref.path))
    with torch.inference_mode():
        logits = peft_model(torch.tensor([ids])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    ctx = {"base": base, "tok": tok, "prompts": [prompt]}
    rows = [(0, 0, 0, [second, 7], [first, 7]), (0, 0, 1, [first], [first, 9])]  # (m, p, d, sglang ids, embedded ids)
    out = reference_gaps(ctx, [ref], rows)
    assert out[0]["reference_picks"] == "embedded"
    assert abs(out[0]["gap"] - float(logits[first] - logits[second])) < 1e-3 and abs(out[0]["margin"] - out[0]["gap"]) < 1e-3
    assert "note" in out[1]  # one completion ended where the other went on


def test_gap_summary_bins_are_disjoint_and_no_ledger_reads_as_nothing_committed(tmp_path):
    from benchmarks.sglang_real import committed, gap_summary

    g = gap_summary([{"gap": 0.01, "margin": 0.01, "reference_picks": "embedded"}, {"gap": -0.3, "margin": 0.3, "reference_picks": "sglang"}, {"note": "ended"}])
    assert sum(g["abs_gap_hist"].values()) == 2 and g["abs_gap_hist"]["0.0-0.05"] == 1 and g["abs_gap_hist"]["0.25-0.5"] == 1
    assert g["reference_picks"] == {"embedded": 1, "sglang": 1, "other": 0} and g["rows"] == 3
    assert committed(tmp_path, "sgcli") is None


def test_the_cli_step_runs_a_named_config_on_a_server_with_slots_for_its_population():
    """smollm2_gpu.yaml's 32 members must fit the launched server's adapter slots, and its run may
    share the step's data dir with the smoke run."""
    from benchmarks.sglang_real import cli_run_id, slots

    gpu = "configs/experiments/smollm2_gpu.yaml"
    assert slots(parse_args(["--steps", "launch,cli", "--cli-config", gpu])) == 32
    assert slots(parse_args(["--steps", "launch,parity", "--cli-config", gpu])) == 8  # no cli step: the parity members only
    assert slots(parse_args(["--steps", "launch,cli"])) == 8
    assert cli_run_id(gpu) == "sgcli-smollm2-gpu" and cli_run_id(parse_args([]).cli_config) == "sgcli"
