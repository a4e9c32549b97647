"""Evaluate a model on rows (loss + generation metrics), and compare two models on the same rows.

rows -> limit -> loss over answer tokens (teacher forcing)
     -> batched greedy generation (chat template, left padding, stop at EOS / end of turn)
     -> metrics against the references
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cura.constants import DEFAULT_MAX_NEW_TOKENS
from cura.errors import CuraError
from cura.evaluate import metrics as M
from cura.evaluate.loss import answer_loss, encode_rows
from cura.evaluate.rows import EvalRow

METRICS = ("loss", "rouge", "bleu", "chrf", "exact_match")
GENERATION_METRICS = ("rouge", "bleu", "chrf", "exact_match")


@dataclass
class EvalResult:
    """Scores (flat: loss, perplexity, rouge1/2/L, bleu, chrf, exact_match; 0-100 except loss/perplexity),
    the generations with their prompts and references, and bookkeeping."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    n_samples: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0
    label: str = "model"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """Two results on the same rows: `before` (base or adapter A) and `after` (adapter or adapter B)."""

    before: EvalResult
    after: EvalResult

    def deltas(self) -> dict[str, float]:
        return {
            k: self.after.metrics[k] - v for k, v in self.before.metrics.items() if k in self.after.metrics
        }

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "deltas": self.deltas()}


def parse_metrics(text: str | Sequence[str] | None) -> list[str] | None:
    """'loss,rouge' -> ['loss', 'rouge'] (None stays None: defaults by data); unknown names are user errors."""
    if text is None:
        return None
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    names = ["loss" if n == "perplexity" else n for n in names]
    for name in names:
        if name not in METRICS:
            raise CuraError(f"--metrics: unknown metric '{name}'; use a comma list of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def default_metrics(rows: Sequence[EvalRow], extractor: str | None = None) -> list[str]:
    """Loss always; ROUGE, BLEU and chrF where the rows have references; exact match when an extractor is set."""
    if not any(r.references for r in rows):
        return ["loss"]
    names = ["loss", "rouge", "bleu", "chrf"]
    if extractor and extractor != "none":
        names.append("exact_match")
    return names


def generation_scores(
    predictions: Sequence[str], references: M.References, names: Sequence[str], extractor: str | None
) -> dict[str, float]:
    """The requested generation metrics (flat names) for predictions against their references."""
    scores: dict[str, float] = {}
    if "rouge" in names:
        scores.update(M.rouge(predictions, references))
    if "bleu" in names:
        scores["bleu"] = M.bleu(predictions, references)
    if "chrf" in names:
        scores["chrf"] = M.chrf(predictions, references)
    if "exact_match" in names:
        scores["exact_match"] = M.exact_match(predictions, references, extractor)
    return scores


def _generation_part(model, tokenizer, rows, gen_names, extractor, max_new_tokens, batch_size, progress):
    """(scores, samples) of greedy generations on the rows that have references."""
    from cura.generate import generate

    scored = [r for r in rows if r.references]
    if not scored:
        raise CuraError(
            f"metrics {', '.join(gen_names)} need references but no row has one; name the reference "
            "column with --field reference=COLUMN or use --metrics loss"
        )
    predictions = generate(
        model,
        tokenizer,
        [r.prompt for r in scored],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    scores = generation_scores(predictions, [r.references for r in scored], gen_names, extractor)
    samples = [
        {"prompt": r.prompt[-1]["content"], "references": list(r.references), "prediction": p}
        for r, p in zip(scored, predictions, strict=True)
    ]
    return scores, samples


def evaluate(
    model,
    tokenizer,
    rows: Sequence[EvalRow],
    metrics: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    extractor: str | None = None,
    loss_samples: Sequence[dict] | None = None,
    progress: bool = True,
    label: str = "model",
) -> EvalResult:
    """Score `model` on the first `limit` rows: loss/perplexity over the answer tokens and, for rows with
    references, greedy generations scored with the requested metrics (default: see `default_metrics`).

    `loss_samples` (tokenized `{"input_ids", "labels"}` dicts, e.g. from cura.data) replace the rows'
    own tokenization for the loss.
    """
    rows = list(rows)[:limit] if limit is not None else list(rows)
    if not rows:
        raise CuraError("there are no rows to evaluate; check --data (and --limit)")
    names = list(metrics) if metrics is not None else default_metrics(rows, extractor)
    M.get_extractor(extractor)  # a bad extractor fails before any model work
    started = time.perf_counter()
    scores: dict[str, float] = {}
    loss_tokens = 0
    if "loss" in names:
        samples = list(loss_samples)[:limit] if loss_samples is not None else encode_rows(tokenizer, rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result = answer_loss(model, samples, batch_size=batch_size, pad_token_id=pad)
        scores.update(loss=result.loss, perplexity=result.perplexity)
        loss_tokens = result.tokens
    gen_names = [n for n in names if n in GENERATION_METRICS]
    samples_out: list[dict[str, Any]] = []
    if gen_names:
        gen_scores, samples_out = _generation_part(
            model, tokenizer, rows, gen_names, extractor, max_new_tokens, batch_size, progress
        )
        scores.update(gen_scores)
    return EvalResult(
        metrics=scores,
        samples=samples_out,
        n_samples=len(rows),
        loss_tokens=loss_tokens,
        seconds=time.perf_counter() - started,
        label=label,
    )


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def use_adapter_template(tokenizer, adapter: str | Path, warn: Callable[[str], None] = _warn) -> bool:
    """Put the chat template stored with the adapter into `tokenizer` (warning when it differs); returns
    whether the adapter stores one."""
    from cura.adapters import read_adapter_metadata

    stored = (read_adapter_metadata(adapter) or {}).get("chat_template")
    current = getattr(tokenizer, "chat_template", None)
    if stored and stored != current:
        if current:
            warn(
                f"the adapter in {adapter} was trained with a different chat template than the tokenizer's; "
                "using the adapter's template (for both sides of a comparison) so prompts look like training"
            )
        tokenizer.chat_template = stored
    return bool(stored)


def compare(
    model,
    tokenizer,
    rows: Sequence[EvalRow],
    metrics: Sequence[str] | None = None,
    *,
    adapter: str | Path,
    adapter_b: str | Path | None = None,
    warn: Callable[[str], None] = _warn,
    **kwargs,
) -> Comparison:
    """Evaluate base vs `adapter` (or `adapter` vs `adapter_b`) on the same rows with one loaded base.

    `model` must carry no adapter. The second adapter's template is checked too; the first stored
    template found is used for both runs. Extra keyword arguments go to `evaluate`. The model is left with
    the last adapter attached.
    """
    from cura.adapters import load_adapter, lora_layers, unwrap_lora

    if lora_layers(model):
        raise CuraError("compare needs the base model without adapters; load it without --adapter first")
    for folder in (adapter, adapter_b):
        if folder is not None and use_adapter_template(tokenizer, folder, warn):
            break
    if adapter_b is None:
        before = evaluate(model, tokenizer, rows, metrics, label="base", **kwargs)
        load_adapter(model, adapter, trainable=False)
        after = evaluate(model, tokenizer, rows, metrics, label=f"adapter {_short(adapter)}", **kwargs)
    else:
        load_adapter(model, adapter, trainable=False)
        before = evaluate(model, tokenizer, rows, metrics, label=f"A: {_short(adapter)}", **kwargs)
        unwrap_lora(model)
        load_adapter(model, adapter_b, trainable=False)
        after = evaluate(model, tokenizer, rows, metrics, label=f"B: {_short(adapter_b)}", **kwargs)
    return Comparison(before, after)


def _short(adapter: str | Path) -> str:
    """An adapter folder's name for labels; a run's `.../<run>/adapter` is named by its run."""
    path = Path(adapter)
    return f"{path.parent.name}/{path.name}" if path.name == "adapter" and path.parent.name else path.name
