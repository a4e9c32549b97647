"""The defaults and allowed values that several parts of cura share, in one torch-free module.

Each name here is the single source of the value: quant, nn, optim, data, evaluate, train, memory and the
CLI import it instead of restating it. Importing this module costs nothing (no torch), so the memory
planner and `cura estimate` can use it too.
"""

from __future__ import annotations

# --- the 4-bit format (QLoRA, Dettmers et al. 2023; bitsandbytes 0.50.2 layout) ---------------------------
QUANT_TYPES = ("nf4", "fp4")
DEFAULT_QUANT_TYPE = "nf4"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes of the 4-bit format that bitsandbytes accepts (and cura reads and writes)."""
DEFAULT_BLOCKSIZE = 64
DEFAULT_DOUBLE_QUANT = True
NESTED_BLOCKSIZE = 256
"""Blocksize of double quantization (the absmax values are quantized to 8 bits in blocks of 256)."""
DYNAMIC_MAP_SIZE = 256
"""Entries of the dynamic 8-bit map (double quantization, 8-bit optimizer state)."""

# --- compute ------------------------------------------------------------------------------------------
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""`compute_dtype` settings: "auto" (bfloat16 where the hardware multiplies it natively) or a dtype name."""
DEFAULT_COMPUTE_DTYPE = "auto"

# --- LoRA targets ----------------------------------------------------------------------------------------
ALL_LINEAR = "all-linear"
"""`target_modules` value: every linear layer but the output layer (PEFT's "all-linear")."""
DEFAULT_LORA_EXCLUDE = ("lm_head",)
"""Modules that never get an adapter and are never quantized by default (the QLoRA recipe)."""
RESIDUAL_MLP_OUTPUT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})
"""transformers `model_type`s whose decoder layer adds its MLP output projection (`mlp.down_proj`) straight
onto the residual stream as its last op, which saves nothing: a checkpointed recompute never needs that
projection's output (`cura.nn.linear4bit.mark_residual_outputs`; `cura.memory` counts what it then keeps).
Not here: Gemma 2/3 and OLMo 2 (a norm after the MLP saves its input), Phi-3 (its residual dropout), any
other family. `tests/test_linear4bit.py` checks each listed one's gradients bit for bit."""

# --- optimizer state --------------------------------------------------------------------------------------
OPTIM_BITS = (8, 32)
PAGING_MODES = ("auto", "always", "never")
"""Where a paged optimizer keeps its state: on the device while it fits (auto), in host memory, or on the device."""
STATE8_BLOCKSIZE = 256
"""Blocksize of the 8-bit optimizer state (bitsandbytes' blockwise 8-bit optimizers use 256 too)."""

# --- tokens and generation --------------------------------------------------------------------------------
IGNORE_INDEX = -100
"""Label of a token that is not trained (PyTorch's `cross_entropy` default `ignore_index`)."""
DEFAULT_MAX_NEW_TOKENS = 128
"""Tokens generated per prompt by `cura eval` and `cura.generate` unless told otherwise."""
DEFAULT_MAX_LENGTH = 512
"""Token length of a training sample (`data.max_length`)."""
DEFAULT_LOSS_CHUNK_TOKENS = 512
"""Trained tokens whose logits are computed at once by `cura.train.steps.loss_sum`. Its float32 buffers are
3 x chunk x vocab x 4 B at the loss peak: 302 MB for a 49k vocabulary, 788 MB for Llama 3's 128k. Measured on
the bundled model (4 x 256 tokens, 2 threads): 512 instead of 1024 lowered the peak RSS by 290-340 MiB at
the same step time (interleaved, paired ratio 1.003; 256 was within noise too)."""
