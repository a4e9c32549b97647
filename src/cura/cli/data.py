"""`cura data inspect FILE --model M`: what the data pipeline makes of a file, before any training.

Prints the detected format, row counts, token length statistics (min / median / p95 / max, and how many
rows `--max-length` would truncate or drop) and one rendered example with its trained tokens marked:
ANSI green on a terminal, `[[...]]` otherwise.
"""

from __future__ import annotations

import argparse
import sys

from cura.cli import SUBCOMMANDS
from cura.constants import IGNORE_INDEX
from cura.errors import CuraError

GREEN, RESET = "\x1b[32;1m", "\x1b[0m"


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help=SUBCOMMANDS["data"])
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="format, counts, token lengths and one example with trained tokens")
    p.add_argument("file", help="data file or folder (.jsonl, .json, .csv, .parquet, datasets folder)")
    p.add_argument(
        "--model", default=None, help="model source whose tokenizer is used (default: the demo model)"
    )
    p.add_argument("--format", default=None, help="data format (default: detected)")
    p.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN", help="column mapping")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sample")
    p.add_argument("--system", default=None, help="system prompt put before rows that have none")
    p.add_argument("--train-on-prompt", action="store_true", help="train on the prompt tokens too")
    p.add_argument("--example", type=int, default=0, help="index of the example row to show")
    p.add_argument(
        "--objective",
        choices=("dpo", "orpo", "kto"),
        default=None,
        help="read preference data: pairs (dpo, orpo) or labelled answers (kto), and show a pair's scored tokens",
    )
    p.set_defaults(func=inspect_command)


def parse_fields(items: list[str]) -> dict[str, str]:
    fields = {}
    for item in items:
        key, sep, column = item.partition("=")
        if not sep or not key or not column:
            raise CuraError(f"--field {item!r} is not KEY=COLUMN; write e.g. --field prompt=question")
        fields[key] = column
    return fields


def load_tokenizer(source: str | None):
    """The tokenizer of a model source, as `cura.models` resolves it (default: the bundled demo model)."""
    from cura.models import load_tokenizer as load
    from cura.models.sources import BUNDLED_NAME

    return load(source or BUNDLED_NAME)


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The decoded sample as (text, trained) runs: consecutive tokens that are all trained or all not."""
    runs: list[tuple[str, bool]] = []
    run: list[int] = []
    trained = False
    for token, label in zip(input_ids, labels):
        if (label != IGNORE_INDEX) != trained and run:
            runs.append((tokenizer.decode(run), trained))
            run = []
        trained = label != IGNORE_INDEX
        run.append(token)
    if run:
        runs.append((tokenizer.decode(run), trained))
    return runs


def highlight(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded sample with each run of trained tokens marked."""

    def mark(text: str) -> str:
        return (f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if text else text

    return "".join(
        mark(text) if trained else text for text, trained in trained_runs(tokenizer, input_ids, labels)
    )


def inspect_command(args: argparse.Namespace) -> int:
    from cura.data import DataConfig, build_datasets, length_stats

    options = {"path": args.file, "fields": parse_fields(args.field), "packing": False}
    if args.format:
        options["format"] = args.format
    if args.max_length is not None:
        options["max_length"] = args.max_length
    if args.system:
        options["system_prompt"] = args.system
    options["train_on_prompt"] = args.train_on_prompt
    config = DataConfig(**options)
    tokenizer = load_tokenizer(args.model)
    if args.objective:
        return inspect_preference(args, config, tokenizer)
    train, _, report = build_datasets(config, tokenizer)
    stats = length_stats(report.lengths)
    over = sum(n > config.max_length for n in report.lengths)
    print(f"file:      {args.file}")
    print(f"format:    {report.format}")
    print(f"rows:      {report.rows_read} read, {report.rows_used} usable")
    print(
        f"tokens:    min {stats['min']}, median {stats['median']}, p95 {stats['p95']}, max {stats['max']} "
        f"({report.trained_tokens} trained of {report.train_tokens} after cuts)"
    )
    dropped = ", ".join(f"{n} {why}" for why, n in report.dropped.items()) or "none dropped"
    print(
        f"max_length {config.max_length} ({config.overlong}): {over} rows over it, "
        f"{report.truncated} truncated, {dropped}"
    )
    template = (
        "fallback ChatML (the tokenizer has none)" if report.template_is_fallback else "the model's own"
    )
    print(f"template:  {template}")
    index = min(max(args.example, 0), len(train) - 1)
    sample = train[index]
    color = sys.stdout.isatty()
    legend = "trained tokens in green" if color else "trained tokens in [[...]]"
    print(f"\nexample {index} ({legend}):")
    print(highlight(tokenizer, sample["input_ids"], sample["labels"], color))
    return 0


def inspect_preference(args: argparse.Namespace, config, tokenizer) -> int:
    """A preference file: its shape, counts, and one example with the scored tokens of each answer."""
    from cura.data.preference import build_preference_datasets

    paired = args.objective != "kto"
    train, _, report = build_preference_datasets(config, tokenizer, paired=paired, batch_size=2)
    print(f"file:      {args.file}")
    print(report)
    index = min(max(args.example, 0), len(train) - 1)
    sample = train[index]
    color = sys.stdout.isatty()
    legend = "scored tokens in green" if color else "scored tokens in [[...]]"
    answers = ("chosen", "rejected") if paired else ("completion",)
    for name in answers:
        ids = sample["prompt_ids"] + sample[f"{name}_ids"]
        labels = [IGNORE_INDEX] * len(sample["prompt_ids"]) + sample[f"{name}_labels"]
        label = f", label {sample['label']}" if "label" in sample else ""
        print(f"\nexample {index}, {name}{label} ({legend}):")
        print(highlight(tokenizer, ids, labels, color))
    return 0
