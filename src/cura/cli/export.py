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
        "--lora-only",
        action="store_true",
        help="with --adapter: write the adapter alone as a llama.cpp LoRA GGUF (llama-server --lora, Ollama "
        "ADAPTER) to use on the unquantized GGUF of its base (--type f16 or f32)",
    )
    g.add_argument(
        "--base-gguf", default=None, help="with --lora-only: the base GGUF the Modelfile's FROM names"
    )
    g.add_argument(
        "--with-base",
        action="store_true",
        help="with --lora-only: also write the base as trained (a QLoRA adapter's dequantized NF4 base) "
        "as <output>-base.gguf, the base the LoRA GGUF expects",
    )
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
    if args.lora_only or args.base_gguf or args.with_base:
        return _run_lora_only(args)
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


def _run_lora_only(args) -> int:
    from cura.errors import CuraError
    from cura.export.lora_gguf import export_lora_gguf

    if not args.lora_only:
        raise CuraError("--base-gguf and --with-base only make sense with --lora-only; add --lora-only")
    if not args.adapter:
        raise CuraError("--lora-only needs --adapter RUN/adapter (the adapter to write as a LoRA GGUF)")
    export_lora_gguf(
        args.adapter,
        args.output,
        model_source=args.model,
        out_type=args.out_type,
        check=not args.no_check,
        overwrite=args.overwrite,
        verify=args.verify,
        base_gguf=args.base_gguf,
        with_base=args.with_base,
    )
    return 0
