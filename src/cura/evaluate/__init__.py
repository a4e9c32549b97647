"""Evaluation: loss/perplexity over answer tokens, generation metrics, before/after comparisons.

rows = read_eval_rows("test.jsonl", fields={"prompt": "dialogue", "reference": "summary1,summary2"})
result = evaluate(model, tokenizer, rows, ["loss", "rouge"], limit=50, max_new_tokens=128)
comparison = compare(model, tokenizer, rows, adapter="run/adapter", limit=50)
write_comparison(comparison, "eval-out")      # report.md, eval.json, compare.png
"""

from cura.evaluate.loss import LossResult, answer_loss, encode_rows
from cura.evaluate.metrics import (
    bleu,
    chrf,
    exact_match,
    extract_choice,
    extract_gsm8k,
    get_extractor,
    normalize,
    rouge,
)
from cura.evaluate.report import comparison_markdown, write_comparison, write_result
from cura.evaluate.rows import EvalRow, parse_fields, read_eval_rows, read_text_pairs
from cura.evaluate.run import (
    METRICS,
    Comparison,
    EvalResult,
    compare,
    default_metrics,
    evaluate,
    parse_metrics,
    use_adapter_template,
)

__all__ = [
    "METRICS",
    "Comparison",
    "EvalResult",
    "EvalRow",
    "LossResult",
    "answer_loss",
    "bleu",
    "chrf",
    "compare",
    "comparison_markdown",
    "default_metrics",
    "encode_rows",
    "evaluate",
    "exact_match",
    "extract_choice",
    "extract_gsm8k",
    "get_extractor",
    "normalize",
    "parse_fields",
    "parse_metrics",
    "read_eval_rows",
    "read_text_pairs",
    "rouge",
    "use_adapter_template",
    "write_comparison",
    "write_result",
]
