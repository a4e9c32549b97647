"""Tiny randomly initialised causal LMs built from configs in code (no weights, no hub).

Shapes follow the real families (grouped-query attention, separate or fused projections, tied or untied
embeddings) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 320

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**{**_COMMON, "num_key_value_heads": 4}),
}

ARCHS = tuple(TINY_CONFIGS)


def tiny_config(arch: str = "llama"):
    config = TINY_CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    return config


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised tiny model of the given family, in eval mode, deterministic per seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return model.eval()
