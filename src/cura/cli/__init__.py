"""The `cura` command: one entry point, one module per subcommand.

Each module in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parser (with the one-line help
of `SUBCOMMANDS`) and sets `func(args) -> int` as the parser default. Only the module of the command being run
is imported, so `cura --help` and `cura estimate` start without loading torch. The CLI is a thin layer: every
subcommand calls the same public functions a Python user would.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cura.errors import CuraError

# subcommand (module under cura.cli) -> its one-line help
SUBCOMMANDS = {
    "train": "fine-tune a model with QLoRA (no arguments: the demo on the bundled model)",
    "generate": "complete a prompt with a model (and optionally an adapter)",
    "chat": "chat with a model interactively (streaming)",
    "data": "inspect a training data file",
    "estimate": "plan a run's memory (terms, total, which GPUs it fits) and make it fit (--fit 12GB)",
    "eval": "evaluate a model (and adapter): loss, ROUGE, BLEU, chrF, exact match",
    "merge": "merge an adapter into its base model (transformers safetensors)",
    "export": "export a model (optionally with an adapter merged) to another format",
}


def add_model_argument(
    parser: argparse.ArgumentParser, help: str = "model folder, .gguf file or known name"
) -> None:
    """`--model`, defaulting to the base an `--adapter` names (else the bundled model): see `model_source`."""
    parser.add_argument(
        "--model", default=None, help=f"{help} (default: the adapter's base, else smollm2-135m)"
    )


def model_source(args) -> str:
    """`--model` as given, else the base model recorded in `--adapter`'s adapter_config.json, else the
    bundled model; says which when it was not given."""
    if args.model:
        return args.model
    from cura.models.sources import BUNDLED_NAME

    adapter = getattr(args, "adapter", None)
    if adapter:
        from cura.adapters import base_model_of

        base = base_model_of(adapter)
        if base:
            print(
                f"base model: {base} (from {adapter}/adapter_config.json; --model overrides it)",
                file=sys.stderr,
            )
            return base
    return BUNDLED_NAME


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with `command`'s full subparser (its module imported) and a summary line for the rest."""
    parser = argparse.ArgumentParser(
        prog="cura",
        description="Fine-tune large language models on the hardware you have (QLoRA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(f"cura.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the demo: `cura` alone runs the default fine-tune
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CuraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
