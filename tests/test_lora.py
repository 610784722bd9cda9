"""LoRA tensors in PEFT's format: PEFT loads our files unchanged and applies the same B·A we do."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from es_core.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    check_adapter_matches,
    find_targets,
    init_centre,
    load_adapter,
    safetensors_bytes,
    save_adapter,
    spec_from_tensors,
)

CONFIG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG).eval()


def random_adapter(targets, rank, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in init_centre(targets, rank, seed=0).items()}


def merged_logits(model, tensors, scaling, ids):
    """Our own application of the adapter: W + scaling * B @ A, on a copy of the base model."""
    merged = tiny_model()
    merged.load_state_dict(model.state_dict())
    modules = dict(merged.named_modules())
    for key, a in tensors.items():
        if ".lora_A." in key:
            path = key[len("base_model.model.") : -len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            modules[path].weight.data += scaling * b @ a
    with torch.no_grad():
        return merged(ids).logits


def test_targets_follow_settings_and_shapes():
    targets = find_targets(tiny_model(), [0, 2], MODULES)
    assert len(targets) == 2 * 7 and {t.layer for t in targets} == {0, 2}
    q = next(t for t in targets if t.module == "q_proj")
    assert (q.in_features, q.out_features) == (32, 32)
    k = next(t for t in targets if t.module == "k_proj")
    assert k.out_features == 16  # 2 kv heads x head_dim 8
    # the number of layers the model has, not "1+" (which the first wanted layer gave)
    with pytest.raises(AdapterError, match=r"^lora.layers \[7\] do not exist in LlamaForCausalLM: it has 3 decoder layers, 0-2$"):
        find_targets(tiny_model(), [0, 7], MODULES)
    with pytest.raises(AdapterError, match=r"^lora.layers \[40, 41\] do not exist in LlamaForCausalLM: it has 3 decoder layers, 0-2$"):
        find_targets(tiny_model(), [40, 41], MODULES)
    with pytest.raises(AdapterError, match="not found|no Linear"):
        find_targets(tiny_model(), [0], ["qq_proj"])


def test_generation_zero_center_is_the_base_model():
    model = tiny_model()
    targets = find_targets(model, [0, 1, 2], MODULES)
    center = init_centre(targets, rank=2, seed=3)
    assert all(torch.count_nonzero(v) == 0 for k, v in center.items() if "lora_B" in k)
    assert torch.equal(init_centre(targets, 2, seed=3)[targets[0].key_a], center[targets[0].key_a])
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged_logits(model, center, 2.0, ids), model(ids).logits)


@pytest.mark.parametrize("rank, alpha", [(1, 2.0), (4, 8.0), (2, 1.0)])
def test_peft_round_trip_same_tensors_same_logits(tmp_path, rank, alpha):
    model = tiny_model()
    targets = find_targets(model, [0, 2], MODULES)
    tensors = random_adapter(targets, rank)
    spec = spec_from_tensors(tensors, alpha)
    save_adapter(tensors, tmp_path, spec)

    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == rank and config["lora_alpha"] == alpha and config["use_rslora"] is False
    assert config["base_model_name_or_path"] is None  # no location in a content-addressed file; PEFT gets the base below
    loaded, loaded_spec = load_adapter(tmp_path)
    assert loaded_spec == spec and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    state = peft_model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value)
    ids = torch.tensor([[1, 5, 9, 3, 7, 11]])
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
        base_logits = model(ids).logits
    ours = merged_logits(model, tensors, alpha / rank, ids)
    torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter really changes the model


def test_adapter_bytes_are_what_safetensors_torch_writes():
    """Artifact ids of adapters stay what they were when safetensors.torch.save wrote them."""
    from safetensors.torch import save

    targets = find_targets(tiny_model(), [0, 1, 2], MODULES)
    for rank in (1, 4):
        tensors = random_adapter(targets, rank, seed=rank)
        assert safetensors_bytes(tensors) == save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
    moments = {"adam_m.x": torch.randn(3, 2), "adam_step": torch.tensor([7], dtype=torch.int64)}
    assert safetensors_bytes(moments) == save(dict(sorted(moments.items())), metadata={"format": "pt"})


def test_missing_and_corrupt_adapter_files_are_one_line_errors(tmp_path):
    targets = find_targets(tiny_model(), [0], MODULES)
    tensors = random_adapter(targets, 1)
    save_adapter(tensors, tmp_path / "a", spec_from_tensors(tensors, 2.0))
    with pytest.raises(AdapterError, match="adapter file missing: .*adapter_config.json"):
        load_adapter(tmp_path / "nowhere")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(AdapterError, match="unreadable safetensors") as err:
        load_adapter(tmp_path / "a")
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "a" / ADAPTER_CONFIG).write_text("{")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tmp_path / "a")


def test_adapter_for_another_model_is_refused_before_use():
    model = tiny_model()
    targets = find_targets(model, [0, 1], MODULES)
    tensors = random_adapter(targets, 2)
    check_adapter_matches(tensors, targets, 2)
    with pytest.raises(AdapterError, match="shape"):
        check_adapter_matches(tensors, targets, 3)
    with pytest.raises(AdapterError, match="matches no target"):
        check_adapter_matches(tensors, find_targets(model, [0], MODULES), 2)
