"""Generation metrics as pure functions over strings, computed by the reference packages.

All scores are on a 0-100 scale (sacrebleu's convention), averaged over samples unless stated:

- ROUGE-1/2/L (`rouge-score`, F-measure, Porter stemming on). With several references a sample scores
  the max over its references, per ROUGE type (the standard multi-reference rule; `score_multi` does the same).
- BLEU and chrF (`sacrebleu`, corpus level). Several references per sample are passed as reference
  streams; a sample with fewer references than the most is padded with its own first reference, which
  changes neither BLEU's clipped counts nor its closest reference length, nor chrF's best-reference choice.
- Exact match: `100 * mean_i any_r [norm(extract(pred_i)) == norm(extract(ref_ir))]` where `extract` is an
  answer extractor (`gsm8k`, `choice`, `regex:<pattern>`, `none`) and `norm` strips, lowercases and
  collapses whitespace; an empty extracted answer never matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from cura.errors import CuraError

References = Sequence[Sequence[str]]  # per sample, one or more reference strings

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
EXTRACTORS = ("gsm8k", "choice", "none", "regex:<pattern>")

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_CHOICE = re.compile(r"\b([A-D])\b")


def normalize(text: str) -> str:
    """Strip, lowercase and collapse runs of whitespace to one space."""
    return " ".join(text.split()).lower()


def _clean_number(token: str) -> str:
    """'$1,234.50' -> '1234.5', '18.00' -> '18': numbers compare by value, not by formatting."""
    token = token.replace(",", "").replace("$", "").rstrip(".")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    return token


def extract_gsm8k(text: str) -> str:
    """The number after the last '####' (GSM8K's gold format), else the last number in the text, else ''."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        return _clean_number(found[0]) if found else text.strip()
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else ""


def extract_choice(text: str) -> str:
    """The first standalone capital letter A-D ('B', '(C)', 'Answer: D.'), else ''."""
    match = _CHOICE.search(text)
    return match.group(1) if match else ""


def regex_extractor(pattern: str) -> Callable[[str], str]:
    """The first match of `pattern` (its first group if it has groups), else ''."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise CuraError(
            f"--extractor regex:{pattern} is not a valid regular expression ({exc}); fix the pattern"
        ) from None

    def extract(text: str) -> str:
        match = compiled.search(text)
        if match is None:
            return ""
        return match.group(1) if compiled.groups else match.group(0)

    return extract


def get_extractor(name: str | None) -> Callable[[str], str]:
    """The extractor called `name`: 'gsm8k', 'choice', 'regex:<pattern>', or 'none'/None (identity)."""
    if name is None or name == "none":
        return lambda text: text
    if name == "gsm8k":
        return extract_gsm8k
    if name == "choice":
        return extract_choice
    if name.startswith("regex:"):
        return regex_extractor(name[len("regex:") :])
    raise CuraError(f"unknown answer extractor '{name}'; use one of {', '.join(EXTRACTORS)}")


def _check_lengths(predictions: Sequence[str], references: References) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"sample {i}: references must be a non-empty list of strings, got {refs!r}")


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (x100, stemming on), max over each sample's references."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        per_ref = [scorer.score(ref, pred) for ref in refs]
        for kind in ROUGE_TYPES:
            totals[kind] += max(s[kind].fmeasure for s in per_ref)
    n = max(len(predictions), 1)
    return {kind: 100.0 * total / n for kind, total in totals.items()}


def _reference_streams(references: References) -> list[list[str]]:
    """Per-sample reference lists -> sacrebleu's reference streams (padded with each sample's first)."""
    width = max(len(refs) for refs in references)
    padded = [list(refs) + [refs[0]] * (width - len(refs)) for refs in references]
    return [list(stream) for stream in zip(*padded, strict=True)]


def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: References) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def exact_match(predictions: Sequence[str], references: References, extractor: str | None = None) -> float:
    """Percent of samples whose extracted, normalized answer equals that of any of their references."""
    _check_lengths(predictions, references)
    extract = get_extractor(extractor)
    hits = 0
    for pred, refs in zip(predictions, references, strict=True):
        answer = normalize(extract(pred))
        hits += bool(answer) and any(answer == normalize(extract(ref)) for ref in refs)
    return 100.0 * hits / max(len(predictions), 1)
