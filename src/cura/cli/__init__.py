"""The `cura` command: one entry point, one module per subcommand.

Each module in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parser (with the one-line help
of `SUBCOMMANDS`) and sets `func(args) -> int` as the parser default. Only the module of the command being run
is imported, so `cura --help` and `cura estimate` start without loading torch. The CLI is a thin layer: every
subcommand calls the same public functions a Python user would.
"""

from __future__ import annotations

import argparse
import difflib
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
    "ui": "fine-tune from a local web page: data check, memory plan, live training, chat, export",
}


def add_model_argument(
    parser: argparse.ArgumentParser, help: str = "model folder, .gguf file or known name"
) -> None:
    """`--model`, defaulting to the base an `--adapter` names (else the bundled model): see `model_source`."""
    parser.add_argument(
        "--model", default=None, help=f"{help} (default: the adapter's base, else smollm2-135m)"
    )


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """How the base is loaded for inference: `--no-quantize`, `--dtype`."""
    from cura.constants import COMPUTE_DTYPES

    parser.add_argument("--no-quantize", action="store_true", help="load the base in full precision")
    parser.add_argument(
        "--dtype", default="auto", choices=COMPUTE_DTYPES, help="compute dtype (auto: bf16 if native)"
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """`--system`, `--max-new-tokens`, `--temperature`, `--top-p` for generate and chat."""
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)


def add_check_arguments(
    parser: argparse.ArgumentParser, skip_help: str, tolerances: dict[str, float], per: str
) -> None:
    """`--no-check` and `--tolerance` of the parity checks that merge and export run on what they wrote."""
    parser.add_argument("--no-check", action="store_true", help=skip_help)
    defaults = ", ".join(f"{k} {v:g}" for k, v in tolerances.items())
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help=f"max |logit difference| allowed (default per {per}: {defaults})",
    )


def config_settings(args) -> dict:
    """The run settings as nested plain data: the YAML file (`args.config`), then every `cfg:KEY` flag,
    then each `--set KEY=VALUE` (later ones win). Validation is the config dataclasses' job."""
    from cura.config import load_yaml, set_path

    data: dict = load_yaml(args.config) if args.config else {}
    for name, value in vars(args).items():
        if name.startswith("cfg:"):
            set_path(data, name[4:], value)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CuraError(f"--set expects KEY=VALUE (e.g. --set lora.r=8), got {item!r}")
        set_path(data, key.strip(), value)
    return data


def model_source(args) -> str | None:
    """`--model` as given; without it, None when an `--adapter` is given (its recorded base is used, see
    `cura.adapters.load_base_for_adapter`), else the bundled model."""
    if args.model or getattr(args, "adapter", None):
        return args.model
    from cura.models.sources import BUNDLED_NAME

    return BUNDLED_NAME


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--max-step 10` is an error with a suggestion, never silently
    taken as `--max-steps` (or as whichever flag happens to share the prefix)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One sentence for arguments no option took, with the nearest real flag for each unknown one."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for arg in extras:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    if not hints:
        return f"unexpected argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
    return (
        f"unknown option{'s' if len(hints) > 1 else ''} {', '.join(hints)}; "
        f"'cura {parser.prog.split()[-1]} --help' lists them"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with `command`'s full subparser (its module imported) and a summary line for the rest."""
    parser = Parser(
        prog="cura",
        description="Fine-tune large language models on the hardware you have (QLoRA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    args, extras = parser.parse_known_args(argv)
    if extras:
        subparsers = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        target = subparsers.get(getattr(args, "command", None), parser)
        print(f"error: {unknown_flags_message(target, extras)}", file=sys.stderr)
        return 2
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return run_command(lambda: args.func(args), argv)


EXIT_USER, EXIT_BUG, EXIT_INTERRUPTED = 2, 70, 130


def run_command(command, argv: list[str]) -> int:
    """Run `command()` (a subcommand) and turn whatever escapes it into an exit code and one message:

    CuraError                  its sentence, exit 2
    an OSError the user can fix (full disk, read-only, permissions, a name too long): one sentence, 2
    KeyboardInterrupt          "interrupted", exit 130
    anything else (a bug)      a short line with the path of the saved traceback (a bug report), 70
    """
    try:
        return int(command() or 0)
    except CuraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        from cura.validate import os_error_sentence

        sentence = os_error_sentence(exc)
        if sentence is None:
            return report_bug(exc, argv)
        print(f"error: {sentence}", file=sys.stderr)
        return EXIT_USER
    except Exception as exc:
        from cura.atomic import os_error_in
        from cura.validate import os_error_sentence

        hidden = os_error_in(exc)  # a full disk reported by a writer in Rust (safetensors)
        sentence = None if hidden is None else os_error_sentence(hidden)
        if sentence is None:
            return report_bug(exc, argv)
        print(f"error: {sentence}", file=sys.stderr)
        return EXIT_USER


def report_bug(exc: BaseException, argv: list[str]) -> int:
    """Save the traceback (with the command line and versions) as a crash report and say where it is."""
    from cura.crash import save_crash_report

    path = save_crash_report(exc, argv)
    summary = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip(": ")[:200]
    where = f"the traceback is saved in {path}" if path else "the traceback could not be saved"
    if isinstance(exc, MemoryError):
        message = (
            f"cura ran out of memory ({summary}); lower --batch-size or --seq-len (`cura estimate` shows "
            f"what a run needs); {where}"
        )
    else:
        message = (
            f"cura stopped on an unexpected error ({summary}), a bug: {where}; please attach it to a report"
        )
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
