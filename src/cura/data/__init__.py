"""The data pipeline: files -> validated rows -> chat messages -> tokens with answer-only labels -> batches.

from cura.data import DataConfig, build_datasets, batches
train, eval, report = build_datasets(DataConfig(path="data.jsonl", eval_split=0.1), tokenizer)
for batch in batches(train, batch_size=4, max_length=512, packing=True, seed=0, epoch=0,
                     pad_token_id=tokenizer.pad_token_id): ...
"""

from cura._lazy import lazy_getattr
from cura.data.config import FORMATS, DataConfig

_LAZY = {
    **dict.fromkeys(
        ("DataReport", "TokenizedDataset", "build_datasets", "length_stats", "read_rows", "split_rows"),
        "cura.data.dataset",
    ),
    **dict.fromkeys(("detect_format", "normalize"), "cura.data.formats"),
    **dict.fromkeys(("Batches", "batches", "block_causal_mask"), "cura.data.packing"),
    **dict.fromkeys(
        (
            "FALLBACK_CHAT_TEMPLATE",
            "effective_chat_template",
            "encode_messages",
            "encode_text",
            "render_prompt",
            "split_prompt_reference",
        ),
        "cura.data.template",
    ),
}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FORMATS",
    "DataConfig",
    "Batches",
    "DataReport",
    "TokenizedDataset",
    "batches",
    "block_causal_mask",
    "build_datasets",
    "detect_format",
    "effective_chat_template",
    "encode_messages",
    "encode_text",
    "length_stats",
    "normalize",
    "read_rows",
    "render_prompt",
    "split_prompt_reference",
    "split_rows",
]
