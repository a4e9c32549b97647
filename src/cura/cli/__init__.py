"""The `cura` command: one entry point, one module per subcommand.

Each module in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the parser default. The CLI is a thin layer: every subcommand calls the same public
functions a Python user would.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cura.errors import CuraError

# module name under cura.cli -> loaded lazily so that `cura --help` stays fast
SUBCOMMANDS = ("train", "generate", "chat", "data", "estimate", "eval", "merge", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cura",
        description="Fine-tune large language models on the hardware you have (QLoRA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"cura.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name != f"cura.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # the demo: `cura` alone runs the default fine-tune
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
