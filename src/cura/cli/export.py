"""`cura export gguf`: write a GGUF file (and an Ollama Modelfile) for llama.cpp / Ollama, checked by reading
it back and, where xllamacpp is installed, by running it in llama.cpp."""

from __future__ import annotations

import argparse

from cura.cli import SUBCOMMANDS, add_check_arguments, add_model_argument, model_source


def register(sub) -> None:
    from cura.export.gguf import OUT_TYPES, TOLERANCES

    p = sub.add_parser("export", help=SUBCOMMANDS["export"])
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama, with a Modelfile beside it")
    add_model_argument(g)
    g.add_argument("--adapter", default=None, help="an adapter folder to merge in first")
    g.add_argument("--output", required=True, help="the .gguf file to write")
    g.add_argument(
        "--type",
        dest="out_type",
        choices=OUT_TYPES,
        default="f16",
        help="tensor type (q4_k_m / q5_k_m: llama.cpp's per-tensor mixes)",
    )
    g.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the file in llama.cpp and compare its answers with transformers' "
        "(default: on when xllamacpp is installed: pip install 'cura[llamacpp]')",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export at --output (never a file cura did not write)",
    )
    add_check_arguments(g, "skip reading the file back with transformers", TOLERANCES, "type")
    g.set_defaults(func=run_gguf)


def run_gguf(args) -> int:
    args.model = model_source(args)  # None with --adapter: its recorded base
    from cura.export import export_gguf

    export_gguf(
        args.model,
        args.output,
        adapter=args.adapter,
        out_type=args.out_type,
        check=not args.no_check,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
        verify=args.verify,
    )
    return 0
