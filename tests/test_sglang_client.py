"""SGLangClient against the strict fake server: every endpoint, every rejection as one clear line,
retries on transient faults, a hanging unload that times out."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import LlamaConfig

from es_core.backends.base import BackendError
from es_core.backends.sglang_client import (
    AdapterChecker,
    AdapterNotLoaded,
    LoRAUnavailable,
    RequestRejected,
    ServerUnavailable,
    SGLangClient,
    UnloadTimeout,
)
from es_core.lora import find_targets_in_folder, init_centre, save_adapter, spec_from_tensors
from tests.fake_sglang import FakeSGLang, adapter_digest, fake_completion

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [f"Using the numbers [{a} {b} {c}], create an equation that equals {t}." for a, b, c, t in [(1, 2, 3, 6), (44, 19, 35, 98), (5, 7, 2, 37), (9, 3, 4, 39)]]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama config folder: enough for the client-side adapter check (meta device)."""
    folder = tmp_path_factory.mktemp("base")
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


def write_adapter(base_dir, folder, seed, *, layers=(0, 1), rank=1, b_scale=0.1):
    """A real PEFT folder from es_core.lora: the generation-0 centre with B moved by seeded noise."""
    targets = find_targets_in_folder(base_dir, list(layers), MODULES)
    tensors = init_centre(targets, rank, seed=0)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + b_scale * torch.randn(v.shape, generator=g) if ".lora_B." in k else v for k, v in tensors.items()}
    return save_adapter(tensors, folder, spec_from_tensors(tensors, 2.0 * rank))


@pytest.fixture
def fake():
    with FakeSGLang(max_lora_rank=4) as server:
        yield server


def fast_client(url, **kw):
    return SGLangClient(url, retries=kw.pop("retries", 2), backoff_s=0.01, max_backoff_s=0.05, unload_timeout_s=kw.pop("unload_timeout_s", 1.0), **kw)


def assert_one_line(exc, *parts):
    text = str(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


def test_health_waits_for_startup_and_reports_info(fake):
    slow = FakeSGLang(startup_s=0.4, model_path="/models/base").start()
    try:
        client = fast_client(slow.url)
        assert not client.healthy()
        waited = client.wait_healthy(5, poll_s=0.05)
        assert 0.2 < waited < 3
        assert client.model_info()["model_path"] == "/models/base"
        assert client.server_info()["enable_lora"] is True
    finally:
        slow.stop()
    with pytest.raises(ServerUnavailable) as info:
        fast_client(fake.url.replace(str(fake.port), "9")).wait_healthy(0.3, poll_s=0.05)
    assert_one_line(info.value, "startup", "/health_generate not 200 within")


def test_wait_healthy_fails_fast_when_the_process_died(fake):
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="exited with code 3"):
        fast_client("http://127.0.0.1:9").wait_healthy(60, dead=lambda: "the server process exited with code 3")
    assert time.monotonic() - start < 2


def test_load_generate_unload_round_trip(fake, base_dir, tmp_path):
    a = write_adapter(base_dir, tmp_path / "a", seed=1)
    b = write_adapter(base_dir, tmp_path / "b", seed=2)
    client = fast_client(fake.url)
    loaded = client.load_adapter("g0_m000", a, checker=AdapterChecker(base_dir, max_rank=4, target_modules=MODULES))
    client.load_adapter("g0_m001", b)
    assert loaded == {"g0_m000": str(a)}
    assert client.loaded_adapters() == {"g0_m000": str(a), "g0_m001": str(b)}

    loras = ["g0_m000", "g0_m001", None, "g0_m000"]
    out = client.generate(PROMPTS, loras, 64)
    assert [c.server for c in out] == [fake.url] * 4
    digests = {None: None, "g0_m000": adapter_digest(a)[0], "g0_m001": adapter_digest(b)[0]}
    for prompt, name, completion in zip(PROMPTS, loras, out):
        text, tokens, finish = fake_completion(digests[name], prompt, 64)
        assert (completion.text, completion.completion_tokens, completion.finish_reason) == (text, tokens, finish)
    sent = fake.calls("/generate")[-1]
    assert sent["sampling_params"] == {"temperature": 0, "max_new_tokens": 64}
    assert sent["lora_path"] == loras and sent["text"] == PROMPTS

    client.unload_adapter("g0_m000")
    client.unload_adapter("g0_m000")  # already gone: fine, the goal is that it is gone
    assert client.loaded_adapters() == {"g0_m001": str(b)}


def test_token_ids_are_sent_as_input_ids_and_length_is_reported(fake):
    out = fast_client(fake.url).generate([[1, 2, 3], [4, 5]], None, 2)
    sent = fake.calls("/generate")[-1]
    assert sent["input_ids"] == [[1, 2, 3], [4, 5]] and "text" not in sent and "lora_path" not in sent
    assert all(c.completion_tokens <= 2 for c in out)
    long = next(c for c in out if c.completion_tokens == 2)
    assert long.finish_reason in ("length", "stop")
    assert any(fast_client(fake.url).generate([p], None, 1)[0].finish_reason == "length" for p in PROMPTS)


def test_an_all_zero_adapter_answers_like_the_base_model(fake, base_dir, tmp_path):
    zero = write_adapter(base_dir, tmp_path / "z", seed=1, b_scale=0.0)  # generation 0: B = 0
    client = fast_client(fake.url)
    client.load_adapter("centre_g0", zero)
    assert [c.text for c in client.generate(PROMPTS, ["centre_g0"] * 4, 64)] == [c.text for c in client.generate(PROMPTS, None, 64)]


def test_duplicate_load_is_replaced_or_rejected(fake, base_dir, tmp_path):
    a = write_adapter(base_dir, tmp_path / "a", seed=1)
    client = fast_client(fake.url)
    client.load_adapter("g1_m000", a)
    with pytest.raises(RequestRejected) as info:
        client.load_adapter("g1_m000", a, replace=False)
    assert_one_line(info.value, fake.url, "load", "g1_m000", "already loaded")
    client.load_adapter("g1_m000", a)  # replace: unload, then load again
    assert [p for p, _ in fake.state.calls].count("/unload_lora_adapter") == 1
    assert client.loaded_adapters() == {"g1_m000": str(a)}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": ["x"], "sampling_params": {"temperature": 0, "max_tokens": 8}}, "unknown field: max_tokens"),
        ({"text": ["x", "y"], "sampling_params": {"max_new_tokens": 8}, "lora_path": ["a"]}, "lora_path list length (1) must match batch size (2)"),
        ({"text": ["x"], "sampling_params": {"max_new_tokens": 8}, "lora_path": ["nobody"]}, "never been loaded: nobody"),
        ({"text": ["x"], "input_ids": [[1]], "sampling_params": {}}, "Either text or input_ids"),
        ({"text": ["x"], "sampling_params": {}, "model": "m"}, "unknown field: model"),
    ],
)
def test_strict_generate_rejections_surface_as_one_line(fake, body, message):
    with pytest.raises(RequestRejected) as info:
        fast_client(fake.url)._request("POST", "/generate", step="generate", adapter="x", body=body)
    assert_one_line(info.value, fake.url, "generate", "HTTP 400", message)


def test_never_loaded_adapter_in_generate_is_adapter_not_loaded(fake):
    with pytest.raises(AdapterNotLoaded) as info:
        fast_client(fake.url).generate(PROMPTS[:2], ["g9_m001", None], 8)
    assert_one_line(info.value, fake.url, "generate g9_m001", "never been loaded")


def test_load_rejections_name_the_server_adapter_and_step(fake, base_dir, tmp_path):
    client = fast_client(fake.url)
    with pytest.raises(RequestRejected) as info:
        client.load_adapter("g0_m003", tmp_path / "nowhere")
    assert_one_line(info.value, fake.url, "load g0_m003", "adapter_config.json")

    not_lora = write_adapter(base_dir, tmp_path / "ia3", seed=1)
    config = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(RequestRejected, match="peft_type must be LORA"):
        client.load_adapter("g0_m004", not_lora)

    big = write_adapter(base_dir, tmp_path / "big", seed=1, rank=8)
    with pytest.raises(RequestRejected) as info:
        client.load_adapter("g0_m005", big)
    assert_one_line(info.value, "g0_m005", "incompatible with the current LoRA memory pool")


def test_client_side_check_stops_a_mismatched_adapter_before_the_server_sees_it(fake, base_dir, tmp_path):
    other_base = tmp_path / "other"
    LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2).save_pretrained(other_base)
    wrong_shape = write_adapter(other_base, tmp_path / "wrong", seed=1)  # hidden 64, our base has 32
    client = fast_client(fake.url)
    checker = AdapterChecker(base_dir, max_rank=4, target_modules=MODULES)
    with pytest.raises(RequestRejected) as info:
        client.load_adapter("g0_m006", wrong_shape, checker=checker)
    assert_one_line(info.value, fake.url, "check before load", "g0_m006", "has shape")
    big = write_adapter(base_dir, tmp_path / "big", seed=1, rank=8)
    with pytest.raises(RequestRejected, match=r"rank 8 > the server's --max-lora-rank 4"):
        client.load_adapter("g0_m007", big, checker=checker)
    assert fake.calls("/load_lora_adapter") == []  # the server (which would only warn) never saw them


def test_lora_not_enabled_is_lora_unavailable():
    with FakeSGLang(lora_enabled=False) as plain:
        with pytest.raises(LoRAUnavailable) as info:
            fast_client(plain.url).load_adapter("g0_m000", "/tmp")
    assert_one_line(info.value, "load g0_m000", "LoRA is not enabled")


def test_transient_faults_are_retried(fake):
    client = fast_client(fake.url, retries=3)
    fake.fault("/generate", "status", status=500, times=2)
    assert len(client.generate(PROMPTS, None, 8)) == 4
    fake.fault("/generate", "drop", times=1)
    assert len(client.generate(PROMPTS, None, 8)) == 4
    fake.fault("/generate", "slow", seconds=0.3)
    assert len(client.generate(PROMPTS, None, 8)) == 4
    assert fake.state.hits["/generate"] == 3 + 2 + 1 and len(fake.calls("/generate")) == 3


def test_persistent_failure_is_one_line_after_the_retries(fake):
    fake.fault("/generate", "status", status=503, times=3)
    with pytest.raises(ServerUnavailable) as info:
        fast_client(fake.url, retries=2).generate(PROMPTS, None, 8)
    assert_one_line(info.value, fake.url, "generate base model", "HTTP 503", "after 3 attempts")
    fake.fault("/generate", "slow", seconds=1.0, times=3)
    with pytest.raises(ServerUnavailable, match="no answer within 0.2 s"):
        fast_client(fake.url, retries=1, request_timeout_s=0.2).generate(PROMPTS, None, 8)


def test_a_hanging_unload_times_out(fake, base_dir, tmp_path):
    client = fast_client(fake.url, unload_timeout_s=0.3)
    client.load_adapter("g2_m000", write_adapter(base_dir, tmp_path / "a", seed=1))
    fake.fault("/unload_lora_adapter", "hang")
    start = time.monotonic()
    with pytest.raises(UnloadTimeout) as info:
        client.unload_adapter("g2_m000")
    assert time.monotonic() - start < 2
    assert_one_line(info.value, fake.url, "unload g2_m000", "36894")
    fake.release()


def test_a_dead_server_is_one_line(fake):
    url = fake.url
    fake.die()
    with pytest.raises(BackendError) as info:
        fast_client(url).generate(PROMPTS, None, 8)
    assert_one_line(info.value, url, "generate", "connection failed", "after 3 attempts")
