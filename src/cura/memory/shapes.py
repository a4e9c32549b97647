"""Model shapes for the memory planner: a few numbers from a config, never the weights.

A `ModelShape` is what memory depends on: vocabulary, hidden and MLP widths, layers, attention heads (query
and key/value), head size, tied embeddings and projection biases. It comes from

    a known name ("llama-3-8b", ...)      -> KNOWN_SHAPES, written from each model's public config.json
    a transformers folder / config.json   -> `shape_from_config` on the JSON (no transformers import)
    a .gguf file                          -> its metadata header (`cura.memory.gguf_meta`): keys and tensor
                                             names only; the tensor data is never read
    the bundled name "smollm2-135m"       -> KNOWN_SHAPES (the GGUF's header says the same)

Every decoder layer is modelled as a Llama block (RMSNorm, separate q/k/v/o projections, gated MLP with
gate/up/down): Llama, Mistral, Qwen2, SOLAR and SmolLM2 are exactly that; other families are mapped onto it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from cura.constants import RESIDUAL_MLP_OUTPUT_MODEL_TYPES
from cura.errors import CuraError
from cura.inputs import read_json_file


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a model's memory. `head_dim` defaults to hidden / heads in the configs."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    context_length: int | None = None  # the longest sequence the model was trained for (None: not known)
    residual_mlp_output: bool = False  # down_proj only feeds the residual add (RESIDUAL_MLP_OUTPUT_...)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one decoder layer: name -> (in_features, out_features)."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def linear_params(self) -> int:
        """Parameters of every decoder linear (the weights QLoRA stores in 4 bits)."""
        return self.num_layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when the output layer is tied to the input embedding (it shares that tensor)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        """Two RMSNorm weights per layer plus the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def bias_params(self) -> int:
        return self.num_layers * (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0

    @property
    def other_params(self) -> int:
        """Parameters that stay in full precision under QLoRA: embeddings, lm_head, norms, biases."""
        return self.embedding_params + self.lm_head_params + self.norm_params + self.bias_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


def _shape(
    name, vocab, hidden, inter, layers, heads, kv_heads, head_dim=None, tied=False, bias=False, context=None
):
    residual = not name.startswith(("gemma-2", "phi-3"))  # the other known families are listed ones
    return ModelShape(
        name, vocab, hidden, inter, layers, heads, kv_heads, head_dim or hidden // heads, tied, bias, context,
        residual_mlp_output=residual,
    )  # fmt: skip


# name -> shape, from each model's public config.json (Hugging Face model cards of the named repositories)
KNOWN_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        # meta-llama/Llama-2-{7b,13b,70b}-hf; LLaMA-1 7B (the QLoRA paper's model) has the 7B shape
        _shape("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
        _shape("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
        _shape("llama-2-70b", 32000, 8192, 28672, 80, 64, 8),
        _shape("llama-7b", 32000, 4096, 11008, 32, 32, 32),
        # meta-llama/Meta-Llama-3-8B (3.1-8B has the same shape), Llama-3.2-1B / 3B (tied embeddings)
        _shape("llama-3-8b", 128256, 4096, 14336, 32, 32, 8),
        _shape("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8),
        _shape("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, head_dim=64, tied=True),
        _shape("llama-3.2-3b", 128256, 3072, 8192, 28, 24, 8, head_dim=128, tied=True),
        # mistralai/Mistral-7B-v0.1
        _shape("mistral-7b", 32000, 4096, 14336, 32, 32, 8),
        # Qwen/Qwen2.5-7B (q/k/v biases)
        _shape("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, bias=True),
        # upstage/SOLAR-10.7B-v1.0: a 48-layer Llama/Mistral block stack, the ~10B model
        _shape("solar-10.7b", 32000, 4096, 14336, 48, 32, 8),
        # meta-llama/Meta-Llama-3-70B (3.1-70B, 3.3-70B: same shape), Llama-3.1-405B
        _shape("llama-3-70b", 128256, 8192, 28672, 80, 64, 8),
        _shape("llama-3.1-70b", 128256, 8192, 28672, 80, 64, 8),
        _shape("llama-3.3-70b", 128256, 8192, 28672, 80, 64, 8),
        _shape("llama-3.1-405b", 128256, 16384, 53248, 126, 128, 8),
        # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        _shape("tinyllama-1.1b", 32000, 2048, 5632, 22, 32, 4),
        # mistralai/Mistral-Nemo-Base-2407 (12B, head_dim 128 with hidden 5120)
        _shape("mistral-nemo-12b", 131072, 5120, 14336, 40, 32, 8, head_dim=128),
        # google/gemma-{2b,7b}, google/gemma-2-{2b,9b,27b}: tied embeddings, head_dim 256 (27B: 128)
        _shape("gemma-2b", 256000, 2048, 16384, 18, 8, 1, head_dim=256, tied=True),
        _shape("gemma-7b", 256000, 3072, 24576, 28, 16, 16, head_dim=256, tied=True),
        _shape("gemma-2-2b", 256000, 2304, 9216, 26, 8, 4, head_dim=256, tied=True),
        _shape("gemma-2-9b", 256000, 3584, 14336, 42, 16, 8, head_dim=256, tied=True),
        _shape("gemma-2-27b", 256000, 4608, 36864, 46, 32, 16, head_dim=128, tied=True),
        # microsoft/Phi-3-mini-4k-instruct (Phi-3.5-mini: same), Phi-3-medium-4k-instruct; Phi-3 fuses
        # q/k/v and gate/up into one linear each: the same weights, LoRA on the fused ones is slightly smaller
        _shape("phi-3-mini", 32064, 3072, 8192, 32, 32, 32),
        _shape("phi-3.5-mini", 32064, 3072, 8192, 32, 32, 32),
        _shape("phi-3-medium", 32064, 5120, 17920, 40, 40, 10),
        # Qwen/Qwen2.5-{0.5B,1.5B,3B,14B,32B,72B} (q/k/v biases; the small ones tie embeddings)
        _shape("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, tied=True, bias=True),
        _shape("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, tied=True, bias=True),
        _shape("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, tied=True, bias=True),
        _shape("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, bias=True),
        _shape("qwen2.5-32b", 152064, 5120, 27648, 64, 40, 8, bias=True),
        _shape("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8, bias=True),
        # HuggingFaceTB/SmolLM2-135M-Instruct (the bundled model), SmolLM2-360M / 1.7B
        _shape("smollm2-135m", 49152, 576, 1536, 30, 9, 3, head_dim=64, tied=True, context=8192),
        _shape("smollm2-360m", 49152, 960, 2560, 32, 15, 5, head_dim=64, tied=True),
        _shape("smollm2-1.7b", 49152, 2048, 8192, 24, 32, 32, tied=True),
    )
}


def known_names() -> list[str]:
    return sorted(KNOWN_SHAPES)


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a transformers config.json mapping (Llama-style keys; GPT-style aliases accepted)."""

    def get(*keys, default=None):
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is not None:
            return default
        raise CuraError(
            f"model config of '{name}' has no '{keys[0]}': give a decoder-only transformers config.json "
            "(Llama, Mistral, Qwen2, ...) or one of the known model names"
        )

    text = config.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in config:  # multimodal wrappers keep the LM inside
        return shape_from_config({**text, "tie_word_embeddings": config.get("tie_word_embeddings")}, name)
    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    return ModelShape(
        name=name,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        num_layers=int(get("num_hidden_layers", "n_layer")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(get("head_dim", default=hidden // heads)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias") or config.get("model_type") == "qwen2"),
        context_length=_int_or_none(config.get("max_position_embeddings") or config.get("n_positions")),
        residual_mlp_output=config.get("model_type") in RESIDUAL_MLP_OUTPUT_MODEL_TYPES,
    )


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def shape_from_gguf(path: Path) -> ModelShape:
    """A ModelShape from a GGUF file's metadata (`<arch>.embedding_length` etc.); tensor data is not read."""
    from cura.memory.gguf_meta import read_gguf_metadata

    meta, tensor_names = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CuraError(f"{path} has no 'general.architecture' in its GGUF metadata: re-export the file")

    def key(suffix: str, default=None):
        value = meta.get(f"{arch}.{suffix}", default)
        if value is None:
            raise CuraError(
                f"{path} lacks the GGUF metadata key '{arch}.{suffix}' the planner needs: re-export the file"
            )
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise CuraError(f"{path} has neither '{arch}.vocab_size' nor a token list: re-export the file")
    return ModelShape(
        name=path.name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        context_length=_int_or_none(meta.get(f"{arch}.context_length")),
        residual_mlp_output=arch in RESIDUAL_MLP_OUTPUT_MODEL_TYPES,  # llama.cpp writes Mistral as llama
    )


def shape_from_source(source: str | Path) -> ModelShape:
    """The shape of a known name, a .gguf file, a config.json, or a model folder; CuraError otherwise."""
    text = str(source)
    if text in KNOWN_SHAPES:
        return KNOWN_SHAPES[text]
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return shape_from_gguf(path)
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.is_file() and config_file.suffix.lower() == ".json":
        config = read_json_file(config_file, "fix or restore it")  # file:line, encoding, depth (cura.inputs)
        return shape_from_config(config, name=path.name if path.is_dir() else path.parent.name)
    if path.is_dir():
        raise CuraError(
            f"model folder {path} has no config.json: give a transformers model folder or a .gguf"
        )
    close = difflib.get_close_matches(text.lower(), known_names(), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise CuraError(
        f"unknown model '{text}': {hint}give a known name ('cura estimate --list' shows them), a model folder "
        "with config.json, a config.json file or a .gguf file"
    )
