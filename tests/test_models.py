"""Base models: presets resolve to plain local HF folders; a GGUF is converted once, atomically."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import es_core.models as models
from es_core.lora import find_targets_in_folder
from es_core.models import ModelError, load_causal_lm, load_tokenizer, resolve_base_model
from es_core.settings import ModelSettings

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smollm2_gguf_becomes_a_plain_safetensors_folder_keyed_by_its_hash(model_cache, smollm2_gguf):
    resolved = resolve_base_model(ModelSettings(name="smollm2-135m"), model_cache)
    assert resolved.sha256 == sha256(smollm2_gguf)
    assert resolved.path.parent == model_cache and resolved.sha256[:16] in resolved.path.name
    config = json.loads((resolved.path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (resolved.path / "model.safetensors").is_file() and (resolved.path / "tokenizer.json").is_file()


def test_a_second_resolve_does_not_convert_again(model_cache, monkeypatch):
    first = resolve_base_model(ModelSettings(name="smollm2-135m"), model_cache)
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_base_model(ModelSettings(name="smollm2-135m"), model_cache) == first


def test_converted_folder_holds_the_gguf_models_weights_and_tokenizer(model_cache, smollm2_gguf, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(ModelSettings(name="smollm2-135m"), model_cache).path
    converted = load_causal_lm(path, "auto", "cpu")
    assert converted.dtype == torch.float32  # auto on CPU
    direct = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Make 24 from [3 8 1]"}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Make 24 from [3 8 1]"}], tokenize=False, add_generation_prompt=True) == text
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == smollm2_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_a_killed_conversion_leaves_no_half_folder_and_the_next_resolve_completes(tmp_path, monkeypatch):
    cache = tmp_path / "models"
    started = tmp_path / "started"
    # A child process whose conversion writes part of the folder, says so, then hangs until killed.
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import es_core.models as models
        from es_core.settings import ModelSettings
        def slow_convert(gguf, out):
            (out / "model.safetensors").write_bytes(b"half a model")
            Path({str(started)!r}).write_text("ok")
            time.sleep(600)
        models._convert_gguf = slow_convert
        models.resolve_base_model(ModelSettings(name="smollm2-135m"), Path({str(cache)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child did not start converting"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = sorted(p.name for p in cache.iterdir())
    assert len(leftovers) == 1 and leftovers[0].startswith(".gguf-") and ".tmp-" in leftovers[0]  # no visible folder

    def quick_convert(gguf, out):
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", quick_convert)
    resolved = resolve_base_model(ModelSettings(name="smollm2-135m"), cache)
    assert sorted(p.name for p in cache.iterdir()) == [resolved.path.name]  # stale temp folder removed
    assert (resolved.path / "config.json").read_text() == "{}"


def test_tiny_llama_is_seeded_the_same_in_any_cache(tmp_path, model_cache):
    a = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache)
    b = resolve_base_model(ModelSettings(name="tiny-llama"), tmp_path)
    assert a.sha256 == b.sha256
    assert sha256(a.path / "model.safetensors") == sha256(b.path / "model.safetensors")
    model = load_causal_lm(a.path, "auto", "cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 12
    assert load_tokenizer(a.path).eos_token == "<|im_end|>"


@pytest.mark.parametrize("name,params,layers", [("qwen2.5-0.5b-random", 494_032_768, 24), ("qwen2.5-1.5b-random", 1_543_714_304, 28)])
def test_random_qwen_presets_have_the_qwen25_shapes_and_no_weight_files(model_cache, name, params, layers):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_base_model(ModelSettings(name=name), model_cache).path
    assert not list(path.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in skeleton.parameters()) == params  # Qwen2.5's published counts
    assert config.model_type == "qwen2" and config.num_hidden_layers == layers
    assert len(find_targets_in_folder(path, [0], ["q_proj", "v_proj"])) == 2


def test_dummy_weights_are_drawn_seeded_at_load(tmp_path, monkeypatch):
    tiny = dict(models.PRESETS["tiny-llama"].config, num_hidden_layers=2)
    monkeypatch.setitem(models.PRESETS, "tiny-dummy", models.Preset("random", tiny, seed=5, save_weights=False))
    path = resolve_base_model(ModelSettings(name="tiny-dummy"), tmp_path).path
    assert not list(path.glob("*.safetensors"))
    a, b = load_causal_lm(path, "float32", "cpu"), load_causal_lm(path, "float32", "cpu")
    wa, wb = a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight
    assert torch.equal(wa, wb) and 0.015 < wa.std().item() < 0.025


def test_local_folder_resolves_to_itself_with_a_content_hash(tmp_path, model_cache):
    src = resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path
    copy = tmp_path / "my-model"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    first = resolve_base_model(ModelSettings(name=str(copy)), tmp_path / "cache")
    assert first.path == copy.resolve() and not (tmp_path / "cache").exists()
    (copy / "generation_config.json").write_text("{}")
    assert resolve_base_model(ModelSettings(name=str(copy)), tmp_path / "cache").sha256 != first.sha256


def test_errors_are_one_line_and_name_the_path(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    cases = [
        lambda: resolve_base_model(ModelSettings(name=str(bad)), tmp_path / "cache"),
        lambda: resolve_base_model(ModelSettings(name=str(tmp_path / "missing.gguf")), tmp_path / "cache"),
        lambda: resolve_base_model(ModelSettings(name=str(tmp_path)), tmp_path / "cache"),
        lambda: load_causal_lm(tmp_path / "nowhere"),
        lambda: load_tokenizer(tmp_path / "nowhere"),
    ]
    for case in cases:
        with pytest.raises(ModelError) as err:
            case()
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert not [p for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")]  # nothing half-made
    with pytest.raises(ModelError, match="nobody/no-such-model.*allow_download"):
        resolve_base_model(ModelSettings(name="nobody/no-such-model"), tmp_path / "cache")


def test_env_var_overrides_the_smollm2_gguf_path(tmp_path, monkeypatch):
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(tmp_path / "elsewhere.gguf"))
    with pytest.raises(ModelError, match="elsewhere.gguf"):
        resolve_base_model(ModelSettings(name="smollm2-135m"), tmp_path)


def test_a_built_folder_is_checked_against_its_recorded_hashes_at_every_resolve(tmp_path):
    """64 flipped bytes in a created (or converted) model's weights: loaded without a check before."""
    settings = ModelSettings(name="tiny-llama")
    folder = resolve_base_model(settings, tmp_path).path
    weights = folder / "model.safetensors"
    assert json.loads((folder / models.SOURCE_FILE).read_text())[models.FILES_KEY]["model.safetensors"] == sha256(weights)
    raw = bytearray(weights.read_bytes())
    raw[1000:1064] = bytes(b ^ 0xFF for b in raw[1000:1064])
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelError) as err:
        resolve_base_model(settings, tmp_path)
    message = str(err.value)
    assert message.startswith(f"model folder {folder} is damaged: {weights} has sha256 {sha256(weights)}, expected ") and "\n" not in message
    assert f"delete {folder} and it is built again" in message
    import shutil

    shutil.rmtree(folder)  # what the message says to do
    assert resolve_base_model(settings, tmp_path).path == folder


def test_a_full_disk_while_building_a_folder_names_it(tmp_path):
    import errno

    def build(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dest = tmp_path / "models" / "gguf-0123"
    with pytest.raises(ModelError, match=rf"^cannot write model folder {dest} \(built in .*\): No space left on device; free space"):
        models._build_atomically(dest, build, {"source": "x"})
    assert list(dest.parent.iterdir()) == []
