"""Tiny randomly initialised causal LMs built from configs in code (no weights, no hub).

Shapes follow the real families (grouped-query attention, separate or fused projections, tied or untied
embeddings) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

from functools import cache

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


# ------------------------------------------------------------------------------------------ tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as SmolLM2 / Qwen write it (without a default system prompt)."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0 (pad), 1 (bos), 2 (eos)

_CORPUS = (
    "The cat sat on the mat. The dog ran in the park. What is the capital of France? Paris is the capital.",
    'Summarize the dialogue. Translate to German: good morning. Answer with JSON: {"name": "Ada"}.',
    "user assistant system You are a helpful assistant. Hello! How are you? I am fine, thank you.",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] , ; :",
    'Convert this order to JSON. Please send the order. {"name": "Aiko", "item": "kettle", "quantity": 8, '
    '"city": "Split"} I would like 20 batteries, please. This is the order for the city.',
)


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (VOCAB ids, trained in memory on a few sentences) with a ChatML template.

    Every text encodes (256 byte tokens, no unknown token) and decodes back exactly; offsets are exact,
    so answer masks are computed as for a real model. Special tokens: pad `<|endoftext|>` (id 0), bos
    `<|im_start|>` (1), eos `<|im_end|>` (2), matching `tiny_model`'s config. A fresh object per call.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_chat_model(folder, tokenizer=None, arch: str = "llama", seed: int = 0) -> str:
    """A tiny random model of `arch` saved as a transformers folder with the tiny ChatML tokenizer (its
    vocabulary and special tokens, tied embeddings): what `cura train --model FOLDER` reads. Returns the
    folder as a string."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = tiny_config(arch)
    config.update(
        dict(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def plan_spec(**changes):
    """The planner settings the memory tests share (a small QLoRA step on CPU), with `changes` applied."""
    from cura.memory.spec import PlanSpec

    base = dict(
        method="qlora",
        quant_type="nf4",
        double_quant=True,
        blocksize=64,
        lora_r=8,
        lora_targets="all-linear",
        lora_dropout=0.05,
        optimizer="paged_adamw",
        compute_dtype="float32",
        batch_size=2,
        seq_len=24,
        gradient_checkpointing=True,
        loss_chunk_tokens=1024,
        packing=True,
        device="cpu",
    )
    return PlanSpec(**{**base, **changes})
